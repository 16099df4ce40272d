"""SALMONN assembled: encoders -> window Q-Former -> projection -> LLM with LoRA.

Module names follow the official checkpoint where they can (speech_llama_proj, llama_model), so
the loader's key map (checkpoint.py) stays short.
"""
from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .audio import SAMPLE_RATE, log_mel
from .config import GenerateConfig, SALMONNConfig
from .ctc import CTCGuide, CTCHead
from .encoders import AudioEncoder, BEATsEncoder, SpeechEncoder
from .errors import ConfigError
from .fastdecode import RunnerPool, single_device
from .llm import LoraScale, PromptFormat, add_lora, load_llm, lora_scale
from .kvcache import KV
from .qformer import WindowQFormer

FRAME_RATE = 50.0   # encoder frames per second (Whisper 1500 / 30 s)


@dataclass
class AudioTokens:
    """The audio as the LLM sees it, plus what the app visualises."""
    embeds: torch.Tensor                    # [T, H_llm] on the LLM's input device
    cross_attentions: torch.Tensor | None   # [W, layers, heads, N, window_frames] (CPU float32)
    window_starts: np.ndarray               # [W] seconds
    window_seconds: float
    mel: np.ndarray                         # [n_mels, frames at 100 Hz] covering the audio
    chunk_starts: np.ndarray                # [C] seconds
    seconds: float
    lead_in: float = 0.0                    # seconds of quiet the model put in front (cfg.lead_in_seconds)


def with_lead_in(wav: np.ndarray, seconds: float, quiet: float = 0.02) -> np.ndarray:
    """`wav` with zeros prepended so that it starts with at least `seconds` of quiet (samples below
    `quiet` x its peak); audio that already starts quietly enough is returned as it is."""
    want = int(round(seconds * SAMPLE_RATE))
    if want <= 0 or len(wav) == 0:
        return wav
    level = np.abs(wav)
    loud = np.flatnonzero(level > quiet * max(float(level.max()), 1e-8))
    have = int(loud[0]) if len(loud) else len(wav)
    if have >= want:
        return wav
    return np.concatenate([np.zeros(want - have, dtype=wav.dtype), wav])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but no GPU is available; use --device cpu.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"Unknown dtype {name!r}; use one of {sorted(table)}.")
    return table[name]


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


class SALMONN(nn.Module):
    def __init__(self, cfg: SALMONNConfig, speech_encoder: SpeechEncoder, audio_encoder: AudioEncoder | None,
                 llm: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.speech_encoder = speech_encoder
        self.audio_encoder = audio_encoder
        self.window_qformer = WindowQFormer(cfg.qformer, speech_encoder.dim, audio_encoder.dim if audio_encoder else 0)
        self.speech_llama_proj = nn.Linear(cfg.qformer.hidden_size, llm.config.hidden_size)
        self.llama_model = add_lora(llm, cfg.lora) if cfg.lora.enabled else llm
        self.tokenizer = tokenizer
        # our CTC head (ctc.py) when the checkpoint carries one: CTC-guided transcription
        self.ctc_head: CTCHead | None = None
        self.runners = RunnerPool()       # static decoders (CUDA graphs) kept across answers
        self.prompt = PromptFormat(tokenizer, cfg.prompt_template, add_bos=cfg.add_bos,
                                   turn_separator=cfg.turn_separator, followup_template=cfg.followup_template)
        for p in list(self.speech_encoder.parameters()) + (list(audio_encoder.parameters()) if audio_encoder else []):
            p.requires_grad_(False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: SALMONNConfig, progress: Callable[[str], None] | None = None,
                    llm_loader: Callable | None = None) -> "SALMONN":
        say = progress or (lambda msg: None)
        for key in ("whisper_path", "llama_path"):
            value = getattr(cfg, key)
            if not value:
                raise ConfigError(f"model.{key} is empty: give a local Hugging Face model directory.")
            if not Path(value).exists():
                raise ConfigError(f"model.{key} does not exist: {value}")
        if cfg.beats_path and not Path(cfg.beats_path).is_file():
            raise ConfigError(f"model.beats_path does not exist: {cfg.beats_path}")
        if cfg.ckpt and not Path(cfg.ckpt).is_file():
            raise ConfigError(f"model.ckpt does not exist: {cfg.ckpt}")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        say(f"Loading Whisper encoder from {cfg.whisper_path}")
        speech = SpeechEncoder.from_pretrained(cfg.whisper_path, dtype=dtype)
        audio = None
        if cfg.beats_path:
            say(f"Loading BEATs from {cfg.beats_path}")
            audio = BEATsEncoder.from_checkpoint(cfg.beats_path, dtype=dtype)
        say(f"Loading LLM from {cfg.llama_path}")
        # --8bit: bitsandbytes on a GPU; on the CPU torch's int8 kernels after loading (below)
        bnb = cfg.load_in_8bit and device.type != "cpu"
        if cfg.load_in_8bit and device.type == "cpu" and dtype != torch.float32:
            raise ConfigError("8-bit weights on the CPU compute in float32: leave --dtype at auto or float32.")
        # straight onto the GPU (no host copy of a 13B model first), unless a device map or bitsandbytes places it
        direct = str(device) if device.type == "cuda" and not bnb else None
        llm, tokenizer = (llm_loader or load_llm)(cfg.llama_path, dtype, cfg.device_map or direct, bnb)
        model = cls(cfg, speech, audio, llm, tokenizer)
        if cfg.ckpt:
            from .checkpoint import load_checkpoint

            say(f"Loading SALMONN checkpoint {cfg.ckpt}")
            load_checkpoint(model, cfg.ckpt)
        model.place(device, dtype)
        if cfg.load_in_8bit and device.type == "cpu":
            from .llm import quantize_int8_cpu

            say(f"Converting {quantize_int8_cpu(model.llama_model)} LLM layers to 8-bit weights (CPU)")
        return model.eval()

    def place(self, device: torch.device, dtype: torch.dtype) -> "SALMONN":
        """Encoders in `dtype`, Q-Former and projection in fp32 (as the official autocast setup),
        the LLM in `dtype` unless accelerate/bitsandbytes already placed it."""
        self.speech_encoder.to(device=device, dtype=dtype)
        if self.audio_encoder is not None:
            self.audio_encoder.to(device=device, dtype=dtype)
        self.window_qformer.to(device=device, dtype=torch.float32)
        self.speech_llama_proj.to(device=device, dtype=torch.float32)
        bnb = self.cfg.load_in_8bit and device.type != "cpu"     # bitsandbytes placed the LLM itself
        if not (self.cfg.device_map or bnb):
            self.llama_model.to(device=device, dtype=dtype)
        else:    # peft made LoRA float32: cast it (on its layer's device) to the dtype the LLM computes in
            for name, p in self.llama_model.named_parameters():
                if "lora_" in name and p.is_floating_point():
                    p.data = p.data.to(dtype)
        self.runners.clear()              # their graphs read the weights where they were
        return self

    @property
    def device(self) -> torch.device:
        return self.speech_llama_proj.weight.device

    @property
    def llm_device(self) -> torch.device:
        return self.llama_model.get_input_embeddings().weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llama_model.get_input_embeddings().weight.dtype

    @property
    def speech_only(self) -> bool:
        return self.audio_encoder is None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Q-Former (+ LayerNorms, queries), projection and LoRA: what a SALMONN checkpoint holds."""
        names = {}
        for name, p in self.named_parameters():
            if name.startswith(("window_qformer.", "speech_llama_proj.")) or "lora_" in name:
                names[name] = p
        return names

    # ----------------------------------------------------------------- audio -> tokens
    def chunk_windows(self, samples: int) -> int:
        """Windows kept for a chunk of `samples` (all 88 unless trim_to_audio)."""
        full = self.window_qformer.num_windows(1500)
        if not self.cfg.trim_to_audio:
            return full
        frames = math.ceil(samples / SAMPLE_RATE * FRAME_RATE)
        return max(1, min(full, math.ceil(frames / self.window_qformer.stride_frames)))

    def encoder_frames(self, samples: int) -> int:
        """Whisper frames to compute for a chunk: all 1500, or (trim_to_audio) only the kept windows'."""
        if not self.cfg.trim_to_audio:
            return 1500
        qf = self.window_qformer
        return min(1500, (self.chunk_windows(samples) - 1) * qf.stride_frames + qf.window_frames)

    def run_encoders(self, chunks: Sequence[np.ndarray]):
        """The frozen encoders on a batch of <= 30 s chunks.

        Returns (speech [C, T, d_w], audio [C, T_b, d_b] or None, valid BEATs lengths or None, mel [C, n_mels, 3000])."""
        mel = log_mel(list(chunks), self.speech_encoder.feature_extractor)
        mel_t = torch.from_numpy(mel).to(self.device)
        frames = [self.encoder_frames(len(c)) for c in chunks]
        if all(f == 1500 for f in frames):
            speech = self.speech_encoder(mel_t)
        else:
            # each chunk at its own length, so its features never depend on the rest of the batch
            parts = [self.speech_encoder(mel_t[i:i + 1], frames=f)[0] for i, f in enumerate(frames)]
            speech = nn.utils.rnn.pad_sequence(parts, batch_first=True)
        audio, lengths = None, None
        if self.audio_encoder is not None:
            # As the official front end: audio shorter than 1 s is zero-padded to 1 s for BEATs
            # (which needs at least one 16-frame patch).
            chunks = [np.pad(c, (0, max(0, SAMPLE_RATE - len(c)))) for c in chunks]
            lens = [len(c) for c in chunks]
            wav = torch.zeros(len(chunks), max(lens), device=self.device)
            pad = torch.ones(len(chunks), max(lens), dtype=torch.bool, device=self.device)
            for i, c in enumerate(chunks):
                wav[i, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
                pad[i, : len(c)] = False
            audio = self.audio_encoder(wav, padding_mask=pad)
            # Valid BEATs tokens per chunk: 8 * floor(T_f / 16), T_f Kaldi frames (25 ms / 10 ms).
            lengths = [8 * ((1 + (n - 400) // 160) // 16) for n in lens]
        return speech, audio, lengths, mel

    def encode_features(self, chunks: Sequence[np.ndarray], output_attentions: bool = False):
        """Encoders + Q-Former on a batch of <= 30 s chunks.

        Returns (tokens [C, L, H_llm] in fp32 before trimming, cross-attentions or None, mel [C, n_mels, 3000])."""
        speech, audio, lengths, mel = self.run_encoders(chunks)
        return self.qformer_tokens(speech, audio, lengths, output_attentions) + (mel,)

    def qformer_tokens(self, speech: torch.Tensor, audio: torch.Tensor | None, audio_lengths=None,
                       output_attentions: bool = False):
        """Encoder frames -> projected audio tokens [C, L*N, H_llm] (fp32) and attentions."""
        lengths = None if audio_lengths is None else torch.as_tensor(audio_lengths)
        out = self.window_qformer(speech, audio, lengths, output_attentions=output_attentions)
        return self.speech_llama_proj(out.tokens), out.cross_attentions

    @torch.no_grad()
    def encode_audio(self, wav: np.ndarray, output_attentions: bool = True) -> AudioTokens:
        """16 kHz mono audio (already cut to the maximum) -> audio tokens for the LLM.

        Audio longer than one chunk is encoded chunk by chunk; the chunks' tokens are concatenated.
        With `cfg.lead_in_seconds`, an abrupt start is first given that much quiet; the returned
        spectrogram and window times are then those of the audio as the model heard it. The lead-in
        only uses room left in the last chunk: it never adds a chunk that would cut off the clip's end."""
        size = int(self.cfg.chunk_seconds * SAMPLE_RATE)
        original = len(wav)
        wav = with_lead_in(wav, min(self.cfg.lead_in_seconds, (-original % size) / SAMPLE_RATE))
        chunks = [wav[i:i + size] for i in range(0, len(wav), size)] or [wav]
        tokens, attn, mel = self.encode_features(chunks, output_attentions=output_attentions)
        n_query = self.cfg.qformer.num_query_tokens
        stride_s = self.window_qformer.stride_frames / FRAME_RATE
        kept_tokens, kept_attn, starts = [], [], []
        for i, chunk in enumerate(chunks):
            n_win = self.chunk_windows(len(chunk))
            kept_tokens.append(tokens[i, : n_win * n_query])
            if attn is not None:
                kept_attn.append(attn[i, :n_win])
            starts.append(i * self.cfg.chunk_seconds + np.arange(n_win) * stride_s)
        mel_frames = [mel[i][:, : math.ceil(len(c) / 160)] for i, c in enumerate(chunks)]
        embeds = torch.cat(kept_tokens).to(device=self.llm_device, dtype=self.llm_dtype)
        return AudioTokens(
            embeds=embeds,
            cross_attentions=torch.cat(kept_attn).float().cpu() if kept_attn else None,
            window_starts=np.concatenate(starts),
            window_seconds=self.window_qformer.window_frames / FRAME_RATE,
            mel=np.concatenate(mel_frames, axis=1),
            chunk_starts=np.arange(len(chunks)) * self.cfg.chunk_seconds,
            seconds=len(wav) / SAMPLE_RATE,
            lead_in=(len(wav) - original) / SAMPLE_RATE,
        )

    # ----------------------------------------------------------------- splicing
    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.llama_model.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long, device=table.weight.device))

    def assemble(self, audio: Sequence[torch.Tensor], texts: Sequence[str],
                 targets: Sequence[Sequence[int]] | None = None):
        """Per row: [BOS] + before + audio + after (+ target), left-padded to one length.

        Returns (embeds [B, S, H], mask [B, S], target_start [B]); with left padding every row ends at
        S-1, which makes batched decoding straightforward. Pad positions are zero vectors, masked out.
        """
        rows, starts = [], []
        for i, (aud, text) in enumerate(zip(audio, texts)):
            before, after = self.prompt.split(text)
            parts = [self.embed_ids(before), aud.to(self.llm_dtype), self.embed_ids(after)]
            if targets is not None:
                parts.append(self.embed_ids(targets[i]))
            row = torch.cat(parts)
            rows.append(row)
            starts.append(row.shape[0] - (len(targets[i]) if targets is not None else 0))
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), length, hidden)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
        for i, row in enumerate(rows):
            embeds[i, length - row.shape[0]:] = row
            mask[i, length - row.shape[0]:] = 1
        target_start = torch.tensor([length - r.shape[0] + s for r, s in zip(rows, starts)])
        return embeds, mask, target_start

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def _scale_tensor(self, scales: float | Sequence[float] | None, rows: int):
        """None (keep the current scale), one float, or a LoraScale of per-row scales."""
        if scales is None:
            return None
        if isinstance(scales, (int, float)):
            return float(scales)
        if len(scales) != rows:
            raise ValueError(f"{len(scales)} LoRA scales for {rows} rows")
        if len(set(scales)) == 1:
            return float(scales[0])
        return LoraScale(scales)       # float32, each LoRA layer's copy on its own device

    # ----------------------------------------------------------------- teacher forcing
    def target_logprobs(self, audio: Sequence[torch.Tensor], texts: Sequence[str], targets: Sequence[Sequence[int]],
                        scales: float | Sequence[float] | None = None) -> list[torch.Tensor]:
        """Log-probability of each target token given audio + prompt (teacher forcing), per row."""
        embeds, mask, start = self.assemble(audio, texts, targets)
        scale = self._scale_tensor(scales, len(texts))
        base = self.llama_model.get_base_model() if hasattr(self.llama_model, "get_base_model") else self.llama_model
        with lora_scale(self.llama_model, scale):
            hidden = base.model(inputs_embeds=embeds, attention_mask=mask,
                                position_ids=self.positions(mask), use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        out = []
        for i, tgt in enumerate(targets):
            s = int(start[i])
            # the token at position p is predicted by the hidden state at p-1
            h = hidden[i, s - 1: s - 1 + len(tgt)]
            logp = torch.log_softmax(head(h).float(), dim=-1)
            ids = torch.tensor(list(tgt), device=logp.device)
            out.append(logp.gather(1, ids[:, None]).squeeze(1))
        return out

    def loss(self, audio: Sequence[torch.Tensor], texts: Sequence[str], targets: Sequence[Sequence[int]],
             per_example: bool = False) -> torch.Tensor:
        """Mean cross-entropy over all target tokens of the batch (the official training loss), or with
        `per_example` the mean of each row's own mean, so a short answer weighs as much as a long one."""
        logps = self.target_logprobs(audio, texts, targets)
        if per_example:
            return -torch.stack([lp.mean() for lp in logps]).mean()
        return -torch.cat(logps).mean()

    # ----------------------------------------------------------------- decoding
    def _processors(self, gen: GenerateConfig):
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

    def _banned_ids(self, vocab: int) -> list[int]:
        """Token ids never to emit: the added [PAD] (when it is inside the vocabulary and not EOS)."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        return [pad] if pad is not None and pad != eos and pad < vocab else []

    def _token_bias(self, vocab: int, gen: GenerateConfig):
        """Additive logit biases on the device, built once per answer: -inf on banned ids (always) and
        on EOS (while step < min_length). Indexing with a Python list each step would copy it to the
        device every token."""
        device = self.llm_device
        always = torch.zeros(vocab, device=device)
        banned = self._banned_ids(vocab)
        if banned:
            always[banned] = -math.inf
        early = always.clone()
        eos = self.tokenizer.eos_token_id
        if eos is not None and gen.min_length > 0:
            early[eos] = -math.inf
        return always, early

    def use_static_decoding(self, gen: GenerateConfig, mask: torch.Tensor | None, rows: int = 1,
                            length: int = 0) -> bool:
        """Static KV cache + CUDA graph only where it pays and is exact: on CUDA, unpadded rows,
        greedy decoding (repetition penalty included), the LLM on one GPU (a device map may put it
        there; bitsandbytes 8-bit is not captured), and a cache for `length` positions small beside
        the weights (each step reads all of it: see fastdecode.STATIC_KV_SHARE)."""
        return (self.llm_device.type == "cuda" and mask is None and not gen.do_sample and not self.cfg.load_in_8bit
                and single_device(self.llama_model) is not None
                and self.runners.static_pays(self.llama_model, rows, length))

    @torch.no_grad()
    def decode_steps(self, embeds: torch.Tensor, mask: torch.Tensor | None, gen: GenerateConfig,
                     stop: threading.Event | None = None, past: KV | None = None, record: dict | None = None,
                     static: bool | None = None, lookahead: bool | None = None,
                     guide: LogitsProcessor | None = None) -> Iterator[torch.Tensor]:
        """Greedy or sampled decoding with a KV cache; yields the next token of every row each step
        (a CPU LongTensor [B]). Rows that finished keep yielding EOS. The caller sets the LoRA scale.

        `embeds` [B, S, H] are the positions after `past` (per layer keys/values [B, h, P, d] of the
        first P positions: a reused prompt prefix). `mask` [B, P + S] marks left padding, or is None
        when no row is padded (then no mask is built or checked at all). On exit `record` gets "kv"
        (keys/values of every position fed to the LLM: the prompt, then answer tokens) and "fed" (how
        many answer tokens that covers; the last yielded token is usually not among them). `static`: None = auto (see use_static_decoding). `lookahead`:
        queue step t+1 before handing out token t (None = on CUDA, where it hides the host's work).
        `guide`: a last logits processor (e.g. ``ctc.CTCGuide``, one row per clip).

        No host<->device sync inside the loop (unpadded rows; with padding transformers checks the
        mask each step): the end-of-answer bookkeeping stays on the device, and on CUDA the next step
        is queued before the host waits for this step's token."""
        from .fastdecode import DynamicRunner

        rows, new_len = embeds.shape[:2]
        past_len = past[0][0].shape[2] if past else 0
        device = self.llm_device
        length = past_len + new_len + gen.max_new_tokens
        if static is None:
            static = self.use_static_decoding(gen, mask, rows, length)
        if static:
            runner = self.runners.take(self.llama_model, rows, length, past, graph=device.type == "cuda")
        else:
            runner = DynamicRunner(self.llama_model, mask, past)
        if mask is not None:
            pos = self.positions(mask)[:, past_len:]
        else:
            pos = torch.arange(past_len, past_len + new_len, device=device).expand(rows, -1)
        eos = self.tokenizer.eos_token_id
        procs = self._processors(gen)
        if guide is not None:
            procs.append(guide)
        rng = None
        if gen.do_sample and gen.seed is not None:
            rng = torch.Generator(device=device).manual_seed(gen.seed)
        overlap = device.type == "cuda" if lookahead is None else lookahead
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        generated = torch.zeros(rows, 0, dtype=torch.long, device=device)
        biases = None

        def pick(logits: torch.Tensor, step: int) -> torch.Tensor:
            nonlocal generated, finished, biases
            logits = logits.float()
            if biases is None:
                biases = self._token_bias(logits.shape[-1], gen)
            logits = logits + biases[1 if step < gen.min_length else 0]
            if len(procs):
                logits = procs(generated, logits)
            if gen.do_sample:
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
                finished = finished | (nxt == eos)
            if len(procs):
                generated = torch.cat([generated, nxt[:, None]], dim=1)
            return nxt

        fed = 0
        try:
            nxt = pick(runner.prefill(embeds, pos), 0)
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
                    following = pick(runner.feed(nxt), step + 1)
                    fed += 1
                if ready is not None:
                    ready.synchronize()
                yield host
                if eos is not None:
                    done_host |= host == eos
                if bool(done_host.all()) or (stop is not None and stop.is_set()) or last:
                    return
                if following is None:
                    following = pick(runner.feed(nxt), step + 1)
                    fed += 1
                nxt = following
        finally:
            # for benchmarks and bug reports: which path the last answer took
            self.last_decode = {"runner": type(runner).__name__, "cuda_graph": getattr(runner, "graph", None) is not None,
                                "graph_error": getattr(runner, "graph_error", None),
                                "answers_on_runner": getattr(runner, "answers", 1)}
            if record is not None:
                record["kv"] = runner.kv(past_len + new_len + fed)
                record["fed"] = fed
            if static and not isinstance(sys.exc_info()[1], Exception):   # ended, or closed early: reusable
                self.runners.give(runner)

    def ctc_guide(self, audio: Sequence[torch.Tensor], gen: GenerateConfig,
                  rows_per_clip: int | None = None) -> CTCGuide | None:
        """Joint CTC / LLM scoring (``ctc.CTCGuide``) for answers to these clips' audio tokens: each
        clip's `rows_per_clip` consecutive rows (default `gen.num_beams`: its beams) read its frames,
        which are scored once. None when `gen.ctc_weight` is 0."""
        if not gen.ctc_weight:
            return None
        if self.ctc_head is None:
            raise ConfigError("CTC-guided decoding needs a checkpoint with a CTC head (SALMONN-tiny's carry one); "
                              "set the CTC weight to 0.")
        table = self.llama_model.get_input_embeddings().weight
        return CTCGuide(self.ctc_head.frame_log_probs(audio, table), rows_per_clip or gen.num_beams, gen.ctc_weight,
                        self.tokenizer.eos_token_id)

    @torch.no_grad()
    def beam_search(self, embeds: torch.Tensor, mask: torch.Tensor, gen: GenerateConfig, stop=None,
                    on_prefix: Callable[[list[int]], None] | None = None,
                    guide: LogitsProcessor | None = None) -> torch.Tensor:
        """Beam search (optionally beam-sample) through transformers' generate; returns new tokens [B, T].
        `stop` (anything with is_set()) ends the search after the current step, with the best beam so far.
        `on_prefix` (one row only) is called with each longer token prefix the answer is sure to start
        with (`AgreedPrefix`), so the answer can be shown while the beams still search. `guide`: a logits
        processor run on every beam's log-probs (e.g. ``ctc.CTCGuide``), before that observer."""
        vocab = self.llama_model.get_output_embeddings().weight.shape[0]
        kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=gen.max_new_tokens,
                      num_beams=gen.num_beams, do_sample=gen.do_sample, min_new_tokens=gen.min_length,
                      repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
                      eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.eos_token_id, early_stopping=True)
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
        banned = self._banned_ids(vocab)
        if banned:
            kwargs["suppress_tokens"] = banned
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_EventStop(stop)])
        procs = LogitsProcessorList([guide] if guide is not None else [])
        if on_prefix is not None:
            if embeds.shape[0] != 1:
                raise ValueError("on_prefix follows one beam search: give one row.")
            procs.append(AgreedPrefix(gen.num_beams, self.tokenizer.eos_token_id, gen.do_sample, on_prefix))
        if procs:
            kwargs["logits_processor"] = procs
        return self.llama_model.generate(**kwargs)

    def decode_text(self, ids: Sequence[int]) -> str:
        ids = [int(t) for t in ids]
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
