"""Train SALMONN's connection modules (window Q-Former, projection, LoRA) with encoders and LLM frozen.

General: the same code trains SALMONN-tiny on 2 CPU cores and the full 13B/7B model on a GPU from
the official annotation format {"annotation": [{"path", "text", "task", "Q"}]}. Because the encoders
are frozen, their outputs are computed once per clip and cached; each step then runs only the
Q-Former, the projection and the LLM. Optimiser and schedule follow the official recipe: AdamW
(0.9, 0.999), weight decay 0.05 on matrices, linear warm-up then cosine to a floor.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from model.audio import prepare_audio
from model.checkpoint import checkpoint_metadata, load_checkpoint, save_checkpoint
from model.ctc import CTCHead
from model.llm import AUDIO_PREFIX, PLACEHOLDER
from model.salmonn import SALMONN, answer_nll, token_logprobs
from train.grounding import naming_pieces


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    init_lr: float = 3e-5
    min_lr: float = 1e-5
    warmup_start_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.05
    max_txt_len: int = 300          # target tokens (official configs use 300)
    seed: int = 42
    log_every: int = 10
    save_every: int = 200
    grad_clip: float | None = None  # the official recipe does not clip
    # Auxiliary CTC loss on the audio tokens of these tasks' rows (0 = off, the paper's recipe). See
    # `ctc_alignment_loss`: a direct, per-window signal where the LM loss reaches the Q-Former only
    # through the whole frozen LLM. Our addition for tiny data on 2 CPU cores; not in the paper.
    ctc_weight: float = 0.0
    ctc_tasks: tuple[str, ...] = ("asr",)
    # 0 = an alignment warm-up: CTC only, on the ctc_tasks rows, without running the LLM at all
    # (~20x cheaper per step), so the Q-Former learns to spell words before the LM loss starts.
    lm_weight: float = 1.0
    # SpecAugment-style masking of the cached encoder frames (time and channel bands set to the
    # clip's mean, plus a little noise); 1.0 = 2 masks of up to 6 frames and 2 of up to 48 channels.
    # Against over-fitting to the training voices (the CTC warm-up reached 14 % train vs 37 % held-out
    # WER without it).
    feature_masking: float = 0.0
    # Train only LoRA, with the Q-Former and projection frozen. For activation tuning: what it must
    # change is how the LLM answers, not what the audio tokens say (alone a small gain in held-out
    # ASR, 56 -> 53 % WER; with example_mean, 38-40 %).
    lora_only: bool = False
    # Average the LM loss per example, then over the batch, instead of over all target tokens (the
    # official rule). With long stories beside short replayed answers the token mean gives the
    # stories nearly all the weight; this gives each example the same.
    example_mean: bool = False
    # Hold the audio tokens of the Trainer's anchor clips (e.g. sounds and music) near a reference
    # model's, by their squared distance relative to the reference's squared norm, on anchor_batch
    # clips a step. A stage that trains the Q-Former on speech alone otherwise moves it away from
    # sounds, and a later LLM stage did not bring them back.
    anchor_weight: float = 0.0
    anchor_batch: int = 8
    # Hold the answers of rows marked "distill" near the Trainer's reference model's: the KL divergence
    # from its next-token distribution at each answer token (given the same audio tokens and prompt).
    # For activation tuning: the replayed short answers alone did not keep the instruction-tuned
    # model's sound answers while the stories grew; its whole distribution holds more than one target.
    distill_weight: float = 0.0
    # Swap this share of a transcript's teacher-forced tokens (ctc_tasks rows) for random transcript
    # tokens; the targets stay. Greedy transcription follows the LLM's own sentence where the audio is
    # unclear: a sentence so far that cannot be trusted makes the audio tokens the better witness.
    transcript_noise: float = 0.0
    # Weight of the answer tokens that name the clip's sound (a keyword of a row's "sound_labels" in
    # train.grounding, e.g. "rain", "drizzle") in the LM loss, against 1 for every other token. In a
    # long story the few words that depend on the audio are lost among a hundred that do not, and the
    # tuned model learned the stories' style but not to name what it heard (1 = off).
    sound_word_weight: float = 1.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from warmup_start_lr to init_lr, then cosine over all steps down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.init_lr - cfg.warmup_start_lr) * step / max(1, cfg.warmup_steps)
    return cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))


def param_groups(model: SALMONN, weight_decay: float, lora_only: bool = False) -> list[dict]:
    """Official rule: decay parameters with ndim >= 2 whose names contain no 'bias', 'ln' or 'bn'.
    With lora_only, everything but the LoRA weights is frozen (requires_grad off)."""
    decay, no_decay = [], []
    for name, p in model.trainable_parameters().items():
        p.requires_grad_(not lora_only or "lora_" in name)
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in ("bias", "ln", "bn")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_annotations(path: str | Path, data_root: str | Path | None = None) -> list[dict]:
    """Official annotation JSON; relative paths are resolved against `data_root` or the JSON's folder."""
    path = Path(path)
    rows = json.loads(path.read_text())["annotation"]
    root = Path(data_root) if data_root else path.parent
    for r in rows:
        p = Path(r["path"])
        r["path"] = str(p if p.is_absolute() else (root / p).resolve())
        r.setdefault("task", "asr")
    return rows


def prompt_for(row: dict, prompts: dict[str, list[str]] | None, rng: random.Random) -> str:
    """The row's own prompt, else a random one for its task (official multi_prompt), with {} <- Q."""
    prompt = row.get("prompt")
    if not prompt:
        options = (prompts or {}).get(row["task"])
        if not options:
            raise KeyError(f"No prompt for task {row['task']!r}: add it to the prompt table or give 'prompt'.")
        prompt = rng.choice(options)
    if "{}" in prompt:
        prompt = prompt.replace("{}", row.get("Q", ""))
    return prompt if PLACEHOLDER in prompt else AUDIO_PREFIX + prompt


# ----------------------------------------------------------------------------- feature cache
@torch.no_grad()
def encode_clips(model: SALMONN, paths: list[str], cache_file: Path | None = None, batch_size: int = 16,
                 log: Callable[[str], None] = print) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Frozen-encoder outputs per clip (<= 30 s), kept only over the windows the model uses."""
    store: dict = {}
    if cache_file is not None and cache_file.is_file():
        store = torch.load(cache_file, weights_only=True)
    todo = sorted(set(p for p in paths if p not in store))
    start = time.perf_counter()
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        wavs = [prepare_audio(p, max_seconds=model.cfg.chunk_seconds).wav for p in batch]
        speech, audio, lengths, _ = model.run_encoders(wavs)
        for j, (path, wav) in enumerate(zip(batch, wavs)):
            frames = model.window_span(len(wav))
            a = None if audio is None else audio[j, : min(lengths[j], frames)].half().cpu()
            store[path] = (speech[j, :frames].half().cpu(), a)
        if (i // batch_size) % 20 == 0:
            log(f"  encoded {min(i + batch_size, len(todo))}/{len(todo)} clips ({time.perf_counter() - start:.0f} s)")
    if cache_file is not None and todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(store, cache_file)
    return store


@torch.no_grad()
def base_llm_write(model: SALMONN, texts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                   batch: int = 8) -> list[str]:
    """Sampled continuations of plain `texts` by the frozen LLM alone (LoRA off, no audio): how the LLM
    writes its own training text (stage-3 stories, open-vocabulary sentences). Seed torch first to repeat."""
    tok, base = model.tokenizer, model.llama_model.get_base_model()
    side, tok.padding_side = tok.padding_side, "left"   # every row continues at the right edge
    answers = []
    try:
        for start in range(0, len(texts), batch):
            enc = tok(texts[start:start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with model.llama_model.disable_adapter():
                out = base.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                    top_p=top_p, repetition_penalty=1.1, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
            answers += [model.decode_text(ids.tolist()) for ids in out[:, enc.input_ids.shape[1]:]]
    finally:
        tok.padding_side = side
    return answers


def ctc_head_for(model: SALMONN, trainer_state: str | Path | None = None) -> CTCHead:
    """The CTC head a run trains: the one kept in a Trainer's latest_state.pt (to carry an earlier
    run's head into a continued run), else the model's own (its checkpoint carried one), else fresh."""
    if trainer_state:
        head = CTCHead(model.llama_model.get_input_embeddings().weight.shape[1])
        head.load_state_dict(torch.load(trainer_state, weights_only=True)["ctc_head"])
        return head
    return model.ctc_head if model.ctc_head is not None else CTCHead(model.llama_model.get_input_embeddings().weight.shape[1])


def ctc_classes(embeddings: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    """The embedding rows the CTC head scores (all, or the sorted token ids in `vocab`); blank is added by the head."""
    return embeddings if vocab is None else embeddings[vocab.to(embeddings.device)]


def ctc_alignment_loss(head: CTCHead, tokens: list[torch.Tensor], targets: list[list[int]],
                       embeddings: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """CTC between each clip's audio tokens and its transcript's LLM token ids (blank = last class).

    A direct, per-window signal, where the LM loss reaches the Q-Former only through the whole frozen
    LLM. Needs at least as many audio tokens as transcript tokens (2 queries per window on espeak
    speech); impossible alignments contribute zero. `vocab` (sorted token ids) limits the softmax to
    those rows of the table, e.g. the tokens of all training transcripts: the only ones a target can
    need, and ~50x cheaper than SmolLM2's 49k."""
    table = ctc_classes(embeddings, vocab)
    if vocab is not None:
        targets = [torch.searchsorted(vocab, torch.tensor(t, dtype=torch.long)).tolist() for t in targets]
    seq = torch.nn.utils.rnn.pad_sequence([t.float() for t in tokens], batch_first=True)     # [B, T, H]
    logits = head(seq, table)                                                               # [B, T, V + 1]
    labels = [torch.tensor(t, dtype=torch.long) for t in targets]
    return torch.nn.functional.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1), torch.cat(labels).to(seq.device),
        torch.tensor([t.shape[0] for t in tokens]), torch.tensor([len(t) for t in labels]),
        blank=table.shape[0], zero_infinity=True)


@torch.no_grad()
def ctc_greedy(head: CTCHead, tokens: torch.Tensor, embeddings: torch.Tensor,
               vocab: torch.Tensor | None = None) -> list[int]:
    """The LLM token ids one clip's audio tokens spell under the CTC head (best path: repeats merged,
    blanks dropped): a cheap view of what the Q-Former has learned, without running the LLM."""
    table = ctc_classes(embeddings, vocab)
    best = head(tokens.float(), table).argmax(-1).tolist()
    out, prev = [], None
    for k in best:
        if k != prev and k != table.shape[0]:
            out.append(k if vocab is None else int(vocab[k]))
        prev = k
    return out


@torch.no_grad()
def ctc_spell(model: SALMONN, head: CTCHead, tokens: list[torch.Tensor], vocab: torch.Tensor | None = None) -> list[str]:
    """What each clip's audio tokens spell under `head` (``ctc_greedy``, decoded to text; no LLM)."""
    table = model.llama_model.get_input_embeddings().weight.float()
    return [model.tokenizer.decode(ctc_greedy(head, t, table, vocab)) for t in tokens]


def fit_ctc_head(head: CTCHead, tokens: list[torch.Tensor], targets: list[list[int]], embeddings: torch.Tensor,
                 steps: int = 200, lr: float = 0.02, batch_size: int = 64,
                 seed: int = 0) -> tuple[float, float]:
    """Fit only the CTC head (blank direction and scale) to fixed audio tokens; returns the CTC loss
    before and after on all of them.

    For a continued run whose earlier head is lost: a fresh head's random blank would make the first
    stage-2 steps pull the trained Q-Former toward it. The head has one vector and one scalar, so a
    few hundred steps on tokens computed once (no LLM, no Q-Former gradient) recover it."""
    vocab = torch.tensor(sorted({i for t in targets for i in t}), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)

    def loss_on(idx: list[int]) -> torch.Tensor:
        return ctc_alignment_loss(head, [tokens[i] for i in idx], [targets[i] for i in idx], embeddings, vocab)

    everything = list(range(len(tokens)))
    with torch.no_grad():
        before = float(loss_on(everything))
    for _ in range(steps):
        idx = torch.randint(0, len(tokens), (min(batch_size, len(tokens)),), generator=gen).tolist()
        loss = loss_on(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_on(everything))
    return before, after


@torch.no_grad()
def reference_tokens(model: SALMONN, feats: dict, paths: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The model's audio tokens for the cached clips at `paths`, as at inference: the anchor term's
    reference (take it before training moves the model)."""
    was_training = model.training
    model.eval()
    out = {}
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        out.update(zip(chunk, (t.detach().clone() for t in model.clip_tokens([feats[p] for p in chunk]))))
    model.train(was_training)
    return out


def anchor_distance(tokens: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Squared distance of the clips' audio tokens from their references, relative to the references'
    squared norm (0 = unchanged, 1 = as far as all-zero tokens)."""
    num = sum(((t - r.to(t)) ** 2).sum() for t, r in zip(tokens, reference))
    den = sum((r.float() ** 2).sum() for r in reference)
    return num / den


def answer_divergence(dists: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions (log-probabilities, [T, V] per row),
    summed over the vocabulary, averaged over each row's answer tokens, then over the rows."""
    return torch.stack([F.kl_div(d, r, log_target=True, reduction="none").sum(-1).mean()
                        for d, r in zip(dists, reference)]).mean()


def mask_features(speech: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """SpecAugment-style masks on cached encoder frames [T, C]: 2 time bands (up to 6 x strength
    frames) and 2 channel bands (up to 48 x strength) set to the clip's mean frame, plus Gaussian noise
    at 0.1 x strength of the features' spread."""
    x = speech.float().clone()
    t, c = x.shape
    mean = x.mean(0)
    rand = lambda hi: int(torch.randint(0, hi + 1, (1,), generator=gen))
    for _ in range(2):
        w = rand(int(6 * strength)); s = rand(max(0, t - w)); x[s:s + w] = mean
        w = rand(min(c, int(48 * strength))); s = rand(c - w); x[:, s:s + w] = mean[s:s + w]
    return x + 0.1 * strength * x.std() * torch.randn(x.shape, generator=gen)


def text_ids(tokenizer, text: str, max_txt_len: int) -> list[int]:
    """An answer's token ids, cut to leave room for end-of-sequence."""
    return tokenizer(text.strip(), add_special_tokens=False).input_ids[: max_txt_len - 1]


def answer_targets(tokenizer, rows: list[dict], max_txt_len: int) -> list[list[int]]:
    """LM targets: each row's answer token ids and end-of-sequence."""
    return [text_ids(tokenizer, r["text"], max_txt_len) + [tokenizer.eos_token_id] for r in rows]


def ctc_targets(tokenizer, rows: list[dict], max_txt_len: int) -> list[list[int]]:
    """CTC targets: the row's ``ctc_text`` if it has one, else its answer (a transcript)."""
    return [text_ids(tokenizer, r.get("ctc_text") or r["text"], max_txt_len) for r in rows]


# ----------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, model: SALMONN, rows: list[dict], feats: dict, cfg: TrainConfig, out_dir: str | Path,
                 prompts: dict[str, list[str]] | None = None, log: Callable[[str], None] = print,
                 ctc_head: CTCHead | None = None, anchors: dict[str, torch.Tensor] | None = None,
                 reference: SALMONN | None = None):
        if cfg.lm_weight <= 0:
            if cfg.ctc_weight <= 0:
                raise ValueError("lm_weight 0 needs ctc_weight > 0: there would be nothing to train.")
            rows = [r for r in rows if self.spells(r, cfg)]
            if not rows:
                raise ValueError(f"A CTC-only warm-up needs rows of the tasks {cfg.ctc_tasks} (or with a ctc_text).")
        self.model, self.rows, self.feats, self.cfg = model, rows, feats, cfg
        self.out = Path(out_dir)
        self.prompts = prompts
        self.log = log
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        groups = param_groups(model, cfg.weight_decay, cfg.lora_only)
        # A later stage may take over an earlier stage's head. A head that trains becomes the model's,
        # so checkpoints carry it (for CTC-guided transcription and for runs that continue them).
        self.ctc_head = ctc_head or ctc_head_for(model)
        if cfg.ctc_weight > 0:
            model.ctc_head = self.ctc_head
        ctc_rows = [r for r in rows if self.spells(r, cfg)] if cfg.ctc_weight > 0 else []
        self.ctc_vocab = torch.tensor(sorted({i for ids in self.ctc_targets(ctc_rows) for i in ids}), dtype=torch.long)
        if cfg.ctc_weight > 0:
            groups.append({"params": list(self.ctc_head.parameters()), "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.init_lr, betas=(0.9, 0.999))
        self.step = 0
        self.history: list[dict] = []
        # reference audio tokens per clip path (``reference_tokens``), for the anchor term
        self.anchors = anchors or {}
        self.anchor_paths = sorted(self.anchors)
        # the model whose answers the "distill" rows are held to (frozen, no dropout)
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        # its own random stream, so runs without it draw exactly as before
        self.noise_rng = random.Random(cfg.seed + 7)
        transcripts = [r for r in rows if r["task"] in cfg.ctc_tasks] if cfg.transcript_noise > 0 else []
        self.noise_vocab = sorted({i for ids in self.targets(transcripts) for i in ids[:-1]})

    def batch(self) -> list[dict]:
        return [self.rows[self.rng.randrange(len(self.rows))] for _ in range(self.cfg.batch_size)]

    @staticmethod
    def spells(row: dict, cfg: TrainConfig) -> bool:
        """Whether the CTC loss applies to `row`: a ctc_tasks row (its answer is the transcript), or a row
        that says what its audio tokens should spell (``ctc_text``, e.g. "knock knock knock")."""
        return row["task"] in cfg.ctc_tasks or bool(row.get("ctc_text"))

    def targets(self, rows: list[dict]) -> list[list[int]]:
        """LM targets: the answer's token ids and end-of-sequence."""
        return answer_targets(self.model.tokenizer, rows, self.cfg.max_txt_len)

    def ctc_targets(self, rows: list[dict]) -> list[list[int]]:
        return ctc_targets(self.model.tokenizer, rows, self.cfg.max_txt_len)

    def features(self, row: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        speech, audio = self.feats[row["path"]]
        if self.cfg.feature_masking > 0 and self.model.training:
            speech = mask_features(speech, self.cfg.feature_masking, self.gen)
        return speech, audio

    def loss_terms(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The batch's loss terms by name: "lm" (not in a CTC-only warm-up), "ctc" (when on and a row of
        the batch spells), "anchor" (when the Trainer has anchor clips), "distill" (when it has a
        reference model and a row of the batch is marked "distill")."""
        m, cfg = self.model, self.cfg
        tokens = m.clip_tokens([self.features(r) for r in rows])
        terms = {}
        if cfg.lm_weight > 0:
            texts = [m.prompt.conversation([prompt_for(r, self.prompts, self.rng)]) for r in rows]
            targets = self.targets(rows)
            dists = m.answer_logprobs(tokens, texts, targets, fed=self.fed(rows, targets))
            terms["lm"] = answer_nll(token_logprobs(dists, targets), cfg.example_mean, self.word_weights(rows, targets))
            held = [i for i, r in enumerate(rows) if r.get("distill")]
            if cfg.distill_weight > 0 and self.reference is not None and held:
                with torch.no_grad():
                    ref = self.reference.answer_logprobs([tokens[i].detach() for i in held], [texts[i] for i in held],
                                                         [targets[i] for i in held])
                terms["distill"] = answer_divergence([dists[i] for i in held], ref)
        picked = [i for i, r in enumerate(rows) if self.spells(r, cfg)]
        if cfg.ctc_weight > 0 and picked:
            terms["ctc"] = ctc_alignment_loss(self.ctc_head, [tokens[i] for i in picked],
                                              self.ctc_targets([rows[i] for i in picked]),
                                              m.llama_model.get_input_embeddings().weight, self.ctc_vocab)
        if cfg.anchor_weight > 0 and self.anchors:
            paths = [self.anchor_paths[self.rng.randrange(len(self.anchor_paths))] for _ in range(cfg.anchor_batch)]
            terms["anchor"] = anchor_distance(m.clip_tokens([self.feats[p] for p in paths]),
                                              [self.anchors[p] for p in paths])
        return terms

    def word_weights(self, rows: list[dict], targets: list[list[int]]) -> list[torch.Tensor] | None:
        """Per-token LM loss weights: sound_word_weight for the tokens of a word that names its row's
        sound (``train.grounding``'s keywords for the row's "sound_labels"), 1 elsewhere; None when off or
        no row of the batch has sound labels."""
        w = self.cfg.sound_word_weight
        if w == 1 or not any(r.get("sound_labels") for r in rows):
            return None
        tok = self.model.tokenizer
        return [torch.tensor([w if named else 1.0 for named in
                              naming_pieces(tok.batch_decode([[i] for i in t]), r.get("sound_labels") or [])])
                for r, t in zip(rows, targets)]

    def fed(self, rows: list[dict], targets: list[list[int]]) -> list[list[int]] | None:
        """The answer tokens fed in teacher forcing: the targets, with transcript_noise of each
        transcript's tokens (not its end-of-sequence) swapped for random transcript tokens."""
        p = self.cfg.transcript_noise
        if p <= 0 or not self.model.training:
            return None
        pick = self.noise_rng
        return [[pick.choice(self.noise_vocab) if j < len(t) - 1 and r["task"] in self.cfg.ctc_tasks
                 and pick.random() < p else tok for j, tok in enumerate(t)] for r, t in zip(rows, targets)]

    def objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the loss terms: what the optimiser minimises."""
        weights = {"lm": self.cfg.lm_weight, "ctc": self.cfg.ctc_weight, "anchor": self.cfg.anchor_weight,
                   "distill": self.cfg.distill_weight}
        return sum(weights[k] * v for k, v in terms.items())

    def loss_on(self, rows: list[dict]) -> torch.Tensor:
        return self.objective(self.loss_terms(rows))

    def train(self, on_save: Callable[[int], None] | None = None) -> list[dict]:
        m, cfg = self.model, self.cfg
        # a weighted term with nothing to hold the model to would silently train without it
        if cfg.distill_weight > 0 and self.reference is None:
            raise ValueError("distill_weight > 0 needs a reference model (Trainer(reference=...)).")
        if cfg.anchor_weight > 0 and not self.anchors:
            raise ValueError("anchor_weight > 0 needs anchor clips (Trainer(anchors=...)).")
        m.train()
        m.speech_encoder.eval()
        if m.audio_encoder is not None:
            m.audio_encoder.eval()
        if cfg.lora_only:   # frozen audio side: its tokens as at inference (no dropout)
            m.window_qformer.eval()
        start, running, parts = time.perf_counter(), [], {}
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            for group in self.opt.param_groups:
                group["lr"] = lr
            terms = self.loss_terms(self.batch())
            loss = self.objective(terms)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], cfg.grad_clip)
            self.opt.step()
            self.step += 1
            running.append(loss.item())
            for k in ("lm", "ctc", "anchor", "distill"):
                if k in terms:
                    parts.setdefault(k, []).append(terms[k].item())
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                entry = {"step": self.step, "loss": float(np.mean(running)), "lr": lr,
                         "seconds": round(time.perf_counter() - start, 1)}
                entry.update({k: float(np.mean(v)) for k, v in parts.items()})
                self.history.append(entry)
                note = "".join(f" ({k} {entry[k]:.3f})" for k in parts if k != "lm")
                self.log(f"  step {self.step}/{cfg.steps} loss {entry['loss']:.4f}{note} lr {lr:.2e} ({entry['seconds']} s)")
                running, parts = [], {}
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
                if on_save:
                    on_save(self.step)
        m.eval()
        return self.history

    # -------------------------------------------------------------- checkpoints (resume)
    def save(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        weights = save_checkpoint(self.model, self.out / "latest.safetensors",
                                  metadata={"step": str(self.step), "train_config": asdict(self.cfg)})
        torch.save({"optimizer": self.opt.state_dict(), "step": self.step, "history": self.history,
                    "rng": self.rng.getstate()[1], "noise_rng": self.noise_rng.getstate()[1],
                    "ctc_head": self.ctc_head.state_dict()}, self.out / "latest_state.pt")
        return weights

    @staticmethod
    def saved_step(out_dir: str | Path) -> int:
        """The step of the run saved in out_dir (0 when none), read without loading it."""
        weights = Path(out_dir) / "latest.safetensors"
        return int(checkpoint_metadata(weights).get("step", 0)) if weights.is_file() else 0

    def resume(self) -> bool:
        """Continue from out_dir/latest.* if present; returns whether it did."""
        weights, state = self.out / "latest.safetensors", self.out / "latest_state.pt"
        if not (weights.is_file() and state.is_file()):
            return False
        load_checkpoint(self.model, weights)
        if self.cfg.ctc_weight > 0:     # a run saved before checkpoints carried the head loads without one
            self.model.ctc_head = self.ctc_head
        saved = torch.load(state, weights_only=True)
        self.opt.load_state_dict(saved["optimizer"])
        self.step = int(saved["step"])
        if "ctc_head" in saved:
            self.ctc_head.load_state_dict(saved["ctc_head"])
        self.history = list(saved["history"])
        self.rng.setstate((3, tuple(saved["rng"]), None))
        if "noise_rng" in saved:      # states saved before transcript noise existed lack it
            self.noise_rng.setstate((3, tuple(saved["noise_rng"]), None))
        return True
