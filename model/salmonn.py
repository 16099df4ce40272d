"""SALMONN assembled: encoders -> window Q-Former -> projection -> LLM with LoRA.

Module names follow the official checkpoint where they can (speech_llama_proj, llama_model), so
the loader's key map (checkpoint.py) stays short.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .audio import SAMPLE_RATE, log_mel
from .config import CHUNK_SECONDS, ENCODER_FRAMES, GenerateConfig, SALMONNConfig
from .ctc import CTCGuide, CTCHead
from .encoders import AudioEncoder, BEATsEncoder, SpeechEncoder
from .errors import ConfigError
from .fastdecode import RunnerPool
from .llm import LoraScale, PromptFormat, add_lora, load_llm, lora_scale
from .qformer import WindowQFormer, cut_windows

FRAME_RATE = ENCODER_FRAMES / CHUNK_SECONDS   # encoder frames per second


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
        from .checkpoint import loaded_config

        cfg = loaded_config(cfg)              # the LoRA its checkpoint was trained with
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
        full = self.window_qformer.num_windows(ENCODER_FRAMES)
        if not self.cfg.trim_to_audio:
            return full
        frames = math.ceil(samples / SAMPLE_RATE * FRAME_RATE)
        return max(1, min(full, math.ceil(frames / self.window_qformer.stride_frames)))

    def window_span(self, samples: int) -> int:
        """Encoder frames the kept windows of a chunk of `samples` read."""
        qf = self.window_qformer
        return (self.chunk_windows(samples) - 1) * qf.stride_frames + qf.window_frames

    def encoder_frames(self, samples: int) -> int:
        """Whisper frames to compute for a chunk: all of them, or (trim_to_audio) only the kept windows'."""
        return min(ENCODER_FRAMES, self.window_span(samples)) if self.cfg.trim_to_audio else ENCODER_FRAMES

    def run_encoders(self, chunks: Sequence[np.ndarray]):
        """The frozen encoders on a batch of <= 30 s chunks.

        Returns (speech [C, T, d_w], audio [C, T_b, d_b] or None, valid BEATs lengths or None, mel [C, n_mels, 3000])."""
        mel = log_mel(list(chunks), self.speech_encoder.feature_extractor)
        mel_t = torch.from_numpy(mel).to(self.device)
        frames = [self.encoder_frames(len(c)) for c in chunks]
        if all(f == ENCODER_FRAMES for f in frames):
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

    def clip_tokens(self, frames: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """Encoder frames of clips of any lengths (speech [T, d], audio [T_b, d] or None, as training
        caches them) -> each clip's projected audio tokens, all windows of the batch in one Q-Former call."""
        qf = self.window_qformer
        windows, counts = [], []
        for speech, audio in frames:
            speech = speech.to(self.device)[None]
            audio = None if audio is None else audio.to(self.device)[None]
            lengths = None if audio is None else torch.tensor([audio.shape[1]])
            w = cut_windows(qf.fuse(speech, audio, lengths), qf.window_frames, qf.stride_frames)[0]
            windows.append(w)
            counts.append(w.shape[0])
        tokens, _ = qf.attend(torch.cat(windows))
        tokens = self.speech_llama_proj(tokens.reshape(-1, tokens.shape[-1]))
        return list(torch.split(tokens, [c * self.cfg.qformer.num_query_tokens for c in counts]))

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
    def answer_logprobs(self, audio: Sequence[torch.Tensor], texts: Sequence[str], targets: Sequence[Sequence[int]],
                        scales: float | Sequence[float] | None = None,
                        fed: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """The next-token distribution (log-probabilities over the vocabulary, [len(target), V]) at each
        target position given audio + prompt and the target so far (teacher forcing), per row. `fed`:
        the answer tokens fed in place of the targets (same lengths), e.g. a transcript with some words
        swapped so that training leans on the audio rather than on the sentence so far."""
        if fed is not None and [len(f) for f in fed] != [len(t) for t in targets]:
            raise ValueError("fed answer tokens must have the targets' lengths")
        return list(self._answer_dists(audio, texts, targets, scales, fed))

    def target_logprobs(self, audio: Sequence[torch.Tensor], texts: Sequence[str], targets: Sequence[Sequence[int]],
                        scales: float | Sequence[float] | None = None) -> list[torch.Tensor]:
        """Log-probability of each target token given audio + prompt (teacher forcing), per row."""
        # row by row: one [len(target), V] distribution alive at a time, not the batch's
        return token_logprobs(self._answer_dists(audio, texts, targets, scales), targets)

    def _answer_dists(self, audio, texts, targets, scales, fed=None) -> Iterator[torch.Tensor]:
        embeds, mask, start = self.assemble(audio, texts, targets if fed is None else fed)
        scale = self._scale_tensor(scales, len(texts))
        base = self.llama_model.get_base_model() if hasattr(self.llama_model, "get_base_model") else self.llama_model
        with lora_scale(self.llama_model, scale):
            hidden = base.model(inputs_embeds=embeds, attention_mask=mask,
                                position_ids=self.positions(mask), use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        for i, (s, tgt) in enumerate(zip(start, targets)):
            # the token at position p is predicted by the hidden state at p-1
            yield torch.log_softmax(head(hidden[i, int(s) - 1: int(s) - 1 + len(tgt)]).float(), dim=-1)

    def loss(self, audio: Sequence[torch.Tensor], texts: Sequence[str], targets: Sequence[Sequence[int]],
             per_example: bool = False) -> torch.Tensor:
        """Mean cross-entropy over all target tokens of the batch (the official training loss), or with
        `per_example` the mean of each row's own mean, so a short answer weighs as much as a long one."""
        return answer_nll(self.target_logprobs(audio, texts, targets), per_example)

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

    def decode_text(self, ids: Sequence[int]) -> str:
        ids = [int(t) for t in ids]
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def token_logprobs(dists: Iterable[torch.Tensor], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Each target token's log-probability, picked from its row's ``answer_logprobs`` distributions."""
    return [d.gather(1, torch.tensor(list(t), device=d.device)[:, None]).squeeze(1) for d, t in zip(dists, targets)]


def answer_nll(logps: Sequence[torch.Tensor], per_example: bool = False,
               weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (``SALMONN.loss``); with `weights` (one per
    target token), the weighted mean."""
    if per_example:
        means = ([lp.mean() for lp in logps] if weights is None else
                 [(lp * w).sum() / w.sum() for lp, w in zip(logps, weights)])
        return -torch.stack(means).mean()
    if weights is None:
        return -torch.cat(list(logps)).mean()
    w = torch.cat(list(weights))
    return -(torch.cat(list(logps)) * w).sum() / w.sum()
