"""Several prompts and/or LoRA scales over one audio (the Scale lab, the scale sweep): answered in
one batch (greedy, sampled) or row by row (beam search), and teacher-forced scores of a reference."""
from __future__ import annotations

import threading
import time
from typing import Iterator, Sequence

import torch

from .answers import Answer, BatchEvent, Encoding, Score
from .config import GenerateConfig
from .decoding import generate
from .errors import PromptError
from .guards import MemoryGuard, release_memory


class ManyAnswers:
    """The Pipeline's answers to many rows over one audio (mixed into `Pipeline`)."""

    def _many_request(self, prompts, lora_scales, history, generate) -> tuple[list[str], list[float], GenerateConfig]:
        """(prompt texts, LoRA scales, settings) of a batch: one prompt or scale stands for every row."""
        gen = self.check_generate(generate or self.default_generate)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        scales = [lora_scales] if lora_scales is None or isinstance(lora_scales, (int, float)) else list(lora_scales)
        rows = max(len(prompts), len(scales))
        if len(prompts) == 1:
            prompts = prompts * rows
        if len(scales) == 1:
            scales = scales * rows
        if len(prompts) != len(scales):
            raise PromptError(f"{len(prompts)} prompts and {len(scales)} LoRA scales: give one of each per row, or one of either.")
        scales = [self.check_scale(s) for s in scales]
        return [self.prompt_text(p, history) for p in prompts], scales, gen

    def answer_many(self, audio, prompts: str | Sequence[str], lora_scales: float | Sequence[float] | None = None,
                    history: Sequence[tuple[str, str]] = (), generate: GenerateConfig | None = None) -> list[Answer]:
        """Several prompts and/or LoRA scales over one audio. Greedy/sampled decoding runs all rows in one
        batch (each row with its own LoRA scale); beam search runs row by row."""
        texts, scales, gen = self._many_request(prompts, lora_scales, history, generate)
        with self._lock, MemoryGuard(self, "answering", gen=gen):
            for event in self._many_locked(audio, texts, scales, gen, None, None):
                pass
        return event.answers

    def stream_many(self, audio, prompts: str | Sequence[str], lora_scales: float | Sequence[float] | None = None,
                    history: Sequence[tuple[str, str]] = (), generate: GenerateConfig | None = None,
                    stop: threading.Event | None = None, every: float = 0.25) -> Iterator[BatchEvent]:
        """`answer_many` on a worker thread (see `_on_worker`), reporting every `every` seconds each row's
        text so far and which rows have ended; the last event carries the answers. Stop, closing or
        abandoning the stream ends the batch at its next step (stopped rows are marked) and frees the
        model and the memory the batch held."""
        texts, scales, gen = self._many_request(prompts, lora_scales, history, generate)
        if not isinstance(audio, Encoding):
            audio = self.prepare(audio)

        def produce(either):
            with MemoryGuard(self, "answering", gen=gen):
                yield from self._many_locked(audio, texts, scales, gen, either, every)
            release_memory()               # a batch's cache is large: give it back at once

        yield from self._on_worker(produce, stop or threading.Event())

    def _many_locked(self, audio, texts: list[str], scales: list[float], gen: GenerateConfig, stop,
                     every: float | None) -> Iterator[BatchEvent]:
        """The batch itself (`decoding.generate`; the caller holds the lock): greedy and sampled rows
        together, beam searches row by row. Progress every `every` seconds (None: none)."""
        t0 = time.perf_counter()
        enc = self.encode(audio)
        m = self.model
        if gen.num_beams > 1:
            yield from self._beams_locked(enc, texts, scales, gen, stop, every)
            return
        rows = len(texts)
        row_ids = [self._row_ids(enc, t) for t in texts]
        embeds, mask, _ = m.assemble([enc.tokens.embeds] * rows, texts)
        pads = [embeds.shape[1] - len(r) for r in row_ids]
        past, reused = self._reusable(enc, row_ids, scales)
        record: dict = {}
        trace: dict = {}
        shown_at = time.perf_counter()
        for progress in generate(m, embeds[:, reused:], mask if any(pads) else None, gen, scales, stop=stop,
                                 past=past, record=record, trace=trace,
                                 guide=m.ctc_guide([enc.tokens.embeds], gen, rows_per_clip=rows)):
            if not progress.done and every is not None and time.perf_counter() - shown_at >= every:
                shown_at = time.perf_counter()
                yield BatchEvent([m.decode_text(t) for t in progress.tokens], list(progress.ended))
        if not progress.stopped:         # a cut-short batch is not worth keeping
            self._remember(enc, row_ids, scales, progress.fed, record, pads)
        timings = {"total_s": round(time.perf_counter() - t0, 4), "reused_tokens": reused, "decode": trace}
        answers = [Answer(m.decode_text(tokens), text, scale, len(tokens), stopped=progress.stopped and not ended,
                          timings={**timings, "prompt_tokens": len(r)})
                   for tokens, ended, text, scale, r in zip(progress.tokens, progress.ended, texts, scales, row_ids)]
        yield BatchEvent([a.text for a in answers], [True] * rows, answers)

    def _beams_locked(self, enc: Encoding, texts: list[str], scales: list[float], gen: GenerateConfig, stop,
                      every: float | None) -> Iterator[BatchEvent]:
        """Beam searches one row at a time (each its own transformers search), reporting each as it ends."""
        m = self.model
        rows = len(texts)
        guide = m.ctc_guide([enc.tokens.embeds], gen)      # one clip: its frames serve every search
        answers: list[Answer] = []
        for text, scale in zip(texts, scales):
            if stop is not None and stop.is_set():
                answers.append(Answer("", text, scale, 0, stopped=True))
                continue
            embeds, mask, _ = m.assemble([enc.tokens.embeds], [text])
            *_, last = generate(m, embeds, mask, gen, [scale], stop=stop, guide=guide)
            answers.append(Answer(m.decode_text(last.tokens[0]), text, scale, len(last.tokens[0]), stopped=last.stopped))
            if every is not None and len(answers) < rows:
                yield BatchEvent([a.text for a in answers] + [""] * (rows - len(answers)),
                                 [True] * len(answers) + [False] * (rows - len(answers)))
        yield BatchEvent([a.text for a in answers], [True] * rows, answers)

    def score(self, audio, prompt: str, reference: str, lora_scales: float | Sequence[float] | None = None) -> list[Score]:
        """Teacher-forced log-probability of `reference` (+ EOS) at each LoRA scale, in one batch."""
        scales = [self.check_scale(None if lora_scales is None else lora_scales)] if not isinstance(lora_scales, (list, tuple)) \
            else [self.check_scale(s) for s in lora_scales]
        text = self.prompt_text(prompt)
        tok = self.model.tokenizer
        target = tok(reference.strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
        with self._lock, MemoryGuard(self, "scoring"):
            enc = self.encode(audio)
            with torch.no_grad():
                logps = self.model.target_logprobs([enc.tokens.embeds] * len(scales), [text] * len(scales),
                                                   [target] * len(scales), scales)
        pieces = [tok.decode([t]) for t in target]
        return [Score(s, pieces, lp.tolist()) for s, lp in zip(scales, logps)]
