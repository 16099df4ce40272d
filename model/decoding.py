"""Decoding: everything that turns the assembled embeddings into answer tokens, behind one entry
point, `generate()` (in the spirit of openai/whisper's decoding.py).

- `decode_steps`: greedy / sampled decoding of a batch of rows with a KV cache (dynamic, or a static
  cache replayed as a CUDA graph), one token per row per step, optionally from a cached prompt prefix.
- `beam_search`: transformers' beam search (optionally beam-sampling), streamable through
  `AgreedPrefix` (the prefix every beam that can still win agrees on).
- `logits_processors`, `token_bias`, `Picker`: how a next token is chosen (repetition penalty,
  temperature / top-k / top-p, banned ids and bad words, EOS held back until min_length, CTC guidance as an extra
  processor).
- `generate`: one batched decoding task (rows x prompts x per-row LoRA scales), reporting `Progress`
  as it goes. The pipeline, the evaluation and the benchmarks call it; the shared batch (batching.py)
  picks each row's tokens with `Picker`.
"""
from __future__ import annotations

import functools
import math
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, NoBadWordsLogitsProcessor, StoppingCriteria,
                          StoppingCriteriaList)

from .config import GenerateConfig
from .fastdecode import DynamicRunner, single_device
from .kvcache import KV
from .llm import lora_scale


class _EventStop(StoppingCriteria):
    """Ends transformers' generate (beam search) at the next step once the event is set."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class AgreedPrefix(LogitsProcessor):
    """Watches one beam search and reports the longest token prefix its answer is sure to start with.

    Beam search cannot stream its best beam (it may lose), but every live beam extends the live
    beams of earlier steps, so their common prefix only grows. A beam that picks EOS leaves the
    search as a finished hypothesis that can still win, so the prefix must also agree with every
    beam that ended. The search keeps the 2 x num_beams best (beam score + token log-prob) of all
    beams; this observer re-adds each beam's log-probs the same way (it runs last, on the scores the
    search uses), so it knows when an EOS made that cut. With beam sampling any token can be drawn,
    so every beam whose EOS is possible counts as ended. Observes only: scores pass through."""

    def __init__(self, num_beams: int, eos: int, sampling: bool, on_prefix: Callable[[list[int]], None]):
        self.keep, self.eos, self.sampling, self.on_prefix = 2 * num_beams, eos, sampling, on_prefix
        self.ended: list[list[int]] = []
        self.agreed: list[int] = []
        self.last: tuple[dict, torch.Tensor, torch.Tensor] | None = None   # rows -> index, beam scores, log-probs

    def _beam_scores(self, rows: list[list[int]], device) -> torch.Tensor | None:
        """Each live beam's score: its parent's score plus the log-prob of its last token (None if a
        parent is unknown, e.g. the processor joined late)."""
        if self.last is None:          # first step: one real beam, the copies start at -1e9 as in generate
            return torch.tensor([0.0] + [-1e9] * (len(rows) - 1), device=device)
        index, scores, logp = self.last
        parents = [index.get(tuple(row[:-1])) if row else None for row in rows]
        if None in parents:
            return None
        parents_t = torch.tensor(parents, device=device)
        return scores[parents_t] + logp[parents_t, torch.tensor([row[-1] for row in rows], device=device)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids.tolist()
        possible = torch.isfinite(scores[:, self.eos])
        beam = None if self.sampling else self._beam_scores(rows, scores.device)
        if beam is None:
            ends = possible
        else:
            total = beam.to(scores.dtype)[:, None] + scores
            cut = total.flatten().topk(min(self.keep, total.numel())).values[-1]
            ends = possible & (total[:, self.eos] >= cut - 1e-4)      # a hair early on ties: never late
            index: dict[tuple, int] = {}
            for i in beam.argsort(descending=True).tolist():   # equal rows (the first step): the real beam
                index.setdefault(tuple(rows[i]), i)
            self.last = (index, beam, scores.detach().float().clone())
        self.ended += [rows[i] for i in ends.nonzero().flatten().tolist()]
        agreed = rows[0]
        for row in rows[1:] + self.ended:
            n = 0
            while n < min(len(agreed), len(row)) and agreed[n] == row[n]:
                n += 1
            agreed = agreed[:n]
        if len(agreed) > len(self.agreed):
            self.agreed = agreed
            self.on_prefix(list(agreed))
        return scores


def logits_processors(gen: GenerateConfig):
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if gen.repetition_penalty and gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.do_sample:
        if gen.temperature and gen.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k and gen.top_k > 0:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p is not None and gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs

def banned_ids(tokenizer, vocab: int) -> list[int]:
    """Token ids never to emit: the added [PAD] (when it is inside the vocabulary and not EOS)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return [pad] if pad is not None and pad != eos and pad < vocab else []

def bad_words_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """The token sequences of `words` in the forms they appear in text: as given, lower-case,
    capitalised and upper-case, each with and without a leading space."""
    return [list(s) for s in _bad_word_sequences(tokenizer, tuple(words))]

@functools.lru_cache(maxsize=32)
def _bad_word_sequences(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    # cached: tokenizing a word list costs milliseconds, and every answer of the studio sends the same list
    seqs = set()
    for word in words:
        for form in {word, word.lower(), word.capitalize(), word.upper()}:
            for text in (form, " " + form):
                ids = tokenizer(text, add_special_tokens=False).input_ids
                if ids:
                    seqs.add(tuple(ids))
    return tuple(sorted(seqs))

def token_bias(model, vocab: int, gen: GenerateConfig):
    """Additive logit biases on the device, built once per answer: -inf on banned ids (always) and
    on EOS (while step < min_length). Indexing with a Python list each step would copy it to the
    device every token."""
    device = model.llm_device
    always = torch.zeros(vocab, device=device)
    banned = banned_ids(model.tokenizer, vocab)
    if banned:
        always[banned] = -math.inf
    early = always.clone()
    eos = model.tokenizer.eos_token_id
    if eos is not None and gen.min_length > 0:
        early[eos] = -math.inf
    return always, early

def use_static_decoding(model, gen: GenerateConfig, mask: torch.Tensor | None, rows: int = 1,
                        length: int = 0) -> bool:
    """Static KV cache + CUDA graph only where it pays and is exact: on CUDA, unpadded rows,
    greedy decoding (repetition penalty included), the LLM on one GPU (a device map may put it
    there; bitsandbytes 8-bit is not captured), and a cache for `length` positions small beside
    the weights (each step reads all of it: see fastdecode.STATIC_KV_SHARE)."""
    return (model.llm_device.type == "cuda" and mask is None and not gen.do_sample and not model.cfg.load_in_8bit
            and single_device(model.llama_model) is not None
            and model.runners.static_pays(model.llama_model, rows, length))

@torch.no_grad()
def decode_steps(model, embeds: torch.Tensor, mask: torch.Tensor | None, gen: GenerateConfig,
                 stop: threading.Event | None = None, past: KV | None = None, record: dict | None = None,
                 trace: dict | None = None,
                 static: bool | None = None, lookahead: bool | None = None,
                 guide: LogitsProcessor | None = None) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding with a KV cache; yields the next token of every row each step
    (a CPU LongTensor [B]). Rows that finished keep yielding EOS. The caller sets the LoRA scale.

    `embeds` [B, S, H] are the positions after `past` (per layer keys/values [B, h, P, d] of the
    first P positions: a reused prompt prefix). `mask` [B, P + S] marks left padding, or is None
    when no row is padded (then no mask is built or checked at all). On exit `record` gets "kv"
    (keys/values of every position fed to the LLM: the prompt, then answer tokens) and "fed" (how
    many answer tokens that covers; the last yielded token is usually not among them); `trace` gets the
    path the answer took (the runner, whether a CUDA graph ran). `static`: None = auto (see
    use_static_decoding). `lookahead`:
    queue step t+1 before handing out token t (None = on CUDA, where it hides the host's work).
    `guide`: a last logits processor (e.g. ``ctc.CTCGuide``, one row per clip).

    No host<->device sync inside the loop (unpadded rows; with padding transformers checks the
    mask each step): the end-of-answer bookkeeping stays on the device, and on CUDA the next step
    is queued before the host waits for this step's token."""
    rows, new_len = embeds.shape[:2]
    past_len = past[0][0].shape[2] if past else 0
    device = model.llm_device
    length = past_len + new_len + gen.max_new_tokens
    if static is None:
        static = use_static_decoding(model, gen, mask, rows, length)
    if static:
        runner = model.runners.take(model.llama_model, rows, length, past, graph=device.type == "cuda")
    else:
        runner = DynamicRunner(model.llama_model, mask, past)
    if mask is not None:
        pos = model.positions(mask)[:, past_len:]
    else:
        pos = torch.arange(past_len, past_len + new_len, device=device).expand(rows, -1)
    rng = None
    if gen.do_sample and gen.seed is not None:
        rng = torch.Generator(device=device).manual_seed(gen.seed)
    picker = Picker(model, gen, guide, rows, rng)
    eos = model.tokenizer.eos_token_id
    overlap = device.type == "cuda" if lookahead is None else lookahead

    fed = 0
    try:
        nxt = picker.pick(runner.prefill(embeds, pos))
        done_host = torch.zeros(rows, dtype=torch.bool)
        for step in range(gen.max_new_tokens):
            host = nxt.to("cpu", non_blocking=overlap)
            ready = None
            if overlap and device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))     # the copy's stream, not cuda:0's
            last = step == gen.max_new_tokens - 1
            following = None
            # queue step+1 on the GPU before waiting for this token; not before the first token,
            # which should reach the user at once (the first feed may capture a CUDA graph)
            if overlap and step > 0 and not last:
                following = picker.pick(runner.feed(nxt))
                fed += 1
            if ready is not None:
                ready.synchronize()
            yield host
            if eos is not None:
                done_host |= host == eos
            if bool(done_host.all()) or (stop is not None and stop.is_set()) or last:
                return
            if following is None:
                following = picker.pick(runner.feed(nxt))
                fed += 1
            nxt = following
    finally:
        if record is not None:
            record["kv"] = runner.kv(past_len + new_len + fed)
            record["fed"] = fed
        if trace is not None:       # for benchmarks and bug reports
            trace.update(runner=type(runner).__name__, cuda_graph=getattr(runner, "graph", None) is not None,
                         graph_error=getattr(runner, "graph_error", None), answers_on_runner=getattr(runner, "answers", 1))
        if static and not isinstance(sys.exc_info()[1], Exception):   # ended, or closed early: reusable
            model.runners.give(runner)


@torch.no_grad()
def beam_search(model, embeds: torch.Tensor, mask: torch.Tensor, gen: GenerateConfig, stop=None,
                on_prefix: Callable[[list[int]], None] | None = None,
                guide: LogitsProcessor | None = None) -> torch.Tensor:
    """Beam search (optionally beam-sample) through transformers' generate; returns new tokens [B, T].
    `stop` (anything with is_set()) ends the search after the current step, with the best beam so far.
    `on_prefix` (one row only) is called with each longer token prefix the answer is sure to start
    with (`AgreedPrefix`), so the answer can be shown while the beams still search. `guide`: a logits
    processor run on every beam's log-probs (e.g. ``ctc.CTCGuide``), before that observer."""
    vocab = model.llama_model.get_output_embeddings().weight.shape[0]
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=gen.max_new_tokens,
                  num_beams=gen.num_beams, do_sample=gen.do_sample, min_new_tokens=gen.min_length,
                  repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
                  eos_token_id=model.tokenizer.eos_token_id,
                  pad_token_id=model.tokenizer.eos_token_id, early_stopping=True)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
    banned = banned_ids(model.tokenizer, vocab)
    if banned:
        kwargs["suppress_tokens"] = banned
    if gen.bad_words:
        kwargs["bad_words_ids"] = bad_words_ids(model.tokenizer, gen.bad_words)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_EventStop(stop)])
    procs = LogitsProcessorList([guide] if guide is not None else [])
    if on_prefix is not None:
        if embeds.shape[0] != 1:
            raise ValueError("on_prefix follows one beam search: give one row.")
        procs.append(AgreedPrefix(gen.num_beams, model.tokenizer.eos_token_id, gen.do_sample, on_prefix))
    if procs:
        kwargs["logits_processor"] = procs
    if not (gen.do_sample and gen.seed is not None):
        return model.llama_model.generate(**kwargs)
    # transformers samples from the global generator: seed a fork of it, so no one else's draws change
    with torch.random.fork_rng(devices=[model.llm_device] if model.llm_device.type == "cuda" else []):
        torch.manual_seed(gen.seed)
        return model.llama_model.generate(**kwargs)


class Picker:
    """How the next token of each row is chosen: banned ids, and EOS until `min_length`, held back
    (additive biases on the device, built once: indexing with a list each step would copy it to the
    device every token), the settings' processors (repetition penalty, temperature / top-k / top-p),
    an extra last processor (CTC guidance), then argmax or a draw from `rng` (None: the global
    generator). A row that has ended keeps getting EOS. `generated` holds every row's tokens so far."""

    def __init__(self, model, gen: GenerateConfig, guide=None, rows: int = 1, rng: torch.Generator | None = None):
        self.model, self.gen, self.rng = model, gen, rng
        self.procs = logits_processors(gen)
        if gen.bad_words:
            self.procs.append(NoBadWordsLogitsProcessor(bad_words_ids(model.tokenizer, gen.bad_words),
                                                        eos_token_id=model.tokenizer.eos_token_id))
        if guide is not None:
            self.procs.append(guide)
        self.eos = model.tokenizer.eos_token_id
        device = model.llm_device
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.generated = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self.bias = None

    @classmethod
    def for_row(cls, model, gen: GenerateConfig, guide=None) -> "Picker":
        """A row decoded beside others that are at other steps (the shared batch): its own generator
        when it samples, so its draws do not depend on who else is in the batch."""
        rng = None
        if gen.do_sample:
            rng = torch.Generator(device=model.llm_device)
            rng.manual_seed(gen.seed if gen.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return cls(model, gen, guide, 1, rng)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> the next token of every row [B] (on the device)."""
        logits = logits.float()
        if self.bias is None:
            self.bias = token_bias(self.model, logits.shape[-1], self.gen)
        logits = logits + self.bias[1 if self.generated.shape[1] < self.gen.min_length else 0]
        if len(self.procs):
            logits = self.procs(self.generated, logits)
        if self.gen.do_sample:
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.rng).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.eos), nxt)
            self.finished = self.finished | (nxt == self.eos)
        self.generated = torch.cat([self.generated, nxt[:, None]], dim=1)
        return nxt


@dataclass
class Progress:
    """A decoding so far: each row's answer tokens (EOS excluded) and whether it has ended; `done`
    on the last report. `fed` holds every token each row produced, EOS included (a finished row of a
    batch keeps producing EOS): the tokens the LLM was fed, for caching keys/values."""
    tokens: list[list[int]]
    ended: list[bool]
    fed: list[list[int]] = field(default_factory=list)
    done: bool = False
    stopped: bool = False


def generate(model, embeds: torch.Tensor, mask: torch.Tensor | None, gen: GenerateConfig,
             scales: float | Sequence[float] | None = None, *, stop=None, guide=None, past: KV | None = None,
             record: dict | None = None, trace: dict | None = None, static: bool | None = None,
             lookahead: bool | None = None, stream: bool = False) -> Iterator[Progress]:
    """The one decoding entry point: answers to the assembled rows `embeds` [B, S, H] (left-padded,
    `mask` [B, P + S] or None; `past`: cached keys/values of the first P positions), at LoRA
    `scales` (one per row, or one for all; None keeps the model's), reporting `Progress` after every
    step and once more when done (`done`). Greedy and sampled rows decode together (`decode_steps`);
    beam search (`gen.num_beams > 1`) runs one transformers search, and with `stream` (one row) reports
    the prefix every beam that can still win agrees on. `stop` (anything with is_set()) ends it at the
    next step; `guide` is a last logits processor (CTC guidance); `record`, `trace` as in `decode_steps`."""
    rows = embeds.shape[0]
    with lora_scale(model.llama_model, model._scale_tensor(scales, rows) if scales is not None else None), \
            torch.no_grad():
        if gen.num_beams > 1:
            yield from _beams(model, embeds, mask, gen, stop, guide, stream)
            return
        eos = model.tokenizer.eos_token_id
        progress = Progress([[] for _ in range(rows)], [False] * rows, [[] for _ in range(rows)])
        steps = decode_steps(model, embeds, mask, gen, stop=stop, past=past, record=record, trace=trace,
                             static=static, lookahead=lookahead, guide=guide)
        try:
            for step in steps:
                for i, token in enumerate(step.tolist()):
                    progress.fed[i].append(token)
                    if token == eos:
                        progress.ended[i] = True
                    elif not progress.ended[i]:
                        progress.tokens[i].append(token)
                yield progress
        finally:
            steps.close()
    progress.done = True
    progress.stopped = bool(stop is not None and stop.is_set()) and not all(progress.ended)
    yield progress


def _beams(model, embeds, mask, gen: GenerateConfig, stop, guide, stream: bool) -> Iterator[Progress]:
    """Beam search as Progress. Streaming, the search runs on a helper thread (transformers' generate
    blocks) while this one reports each longer agreed prefix; the model stays the caller's throughout."""
    rows = embeds.shape[0]
    if not stream:
        ids = beam_search(model, embeds, mask, gen, stop=stop, guide=guide).tolist()
    else:
        found: queue.Queue = queue.Queue()
        finished = object()
        outcome: dict = {}

        def search():
            from .fastdecode import device_guard

            try:
                with torch.no_grad(), device_guard(model.llm_device):     # grad mode is per thread
                    outcome["ids"] = beam_search(model, embeds, mask, gen, stop=stop, on_prefix=found.put,
                                                 guide=guide).tolist()
            except BaseException as err:  # noqa: BLE001 - raised again on this thread
                outcome["error"] = err
            finally:
                found.put(finished)

        helper = threading.Thread(target=search, name="salmonn-beams", daemon=True)
        helper.start()
        try:
            while (prefix := found.get()) is not finished:
                yield Progress([_until_eos(model, prefix)], [False])
        finally:
            helper.join()      # the model is the caller's until the search has really ended
        if "error" in outcome:
            raise outcome["error"]
        ids = outcome["ids"]
    tokens = [_until_eos(model, row) for row in ids]
    stopped = bool(stop is not None and stop.is_set())
    yield Progress(tokens, [True] * rows, [list(row) for row in ids], done=True, stopped=stopped)


def _until_eos(model, ids: Sequence[int]) -> list[int]:
    ids = [int(t) for t in ids]
    eos = model.tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids
