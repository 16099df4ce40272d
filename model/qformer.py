"""Window-level Q-Former: encoder frames -> N audio tokens per ~0.33 s window (N = 1 in the paper).

LayerNorm each stream, zero-pad the shorter one in time, concatenate (Whisper channels first),
cut into windows of 17 frames with stride 17 (88 windows per 30 s), and let N learned queries
cross-attend to each window as if it were a tiny image (BLIP-2's Q-Former, transformers'
`Blip2QFormerModel`, which is key-for-key the official BERT-style block with query-only FFN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from .config import QFormerConfig


@dataclass
class QFormerOutput:
    tokens: torch.Tensor                      # [B, L * N, hidden], window-major
    cross_attentions: torch.Tensor | None     # [B, L, layers, heads, N, window_frames]


def cut_windows(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """[B, T, C] -> [B, L, kernel, C] with L = (T - kernel) // stride + 1 (F.unfold semantics, no padding)."""
    return x.unfold(1, kernel, stride).permute(0, 1, 3, 2)


class WindowQFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, speech_dim: int, audio_dim: int = 0):
        super().__init__()
        self.cfg = cfg
        self.ln_speech = nn.LayerNorm(speech_dim)
        self.ln_audio = nn.LayerNorm(audio_dim) if audio_dim else None
        qcfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size, cross_attention_frequency=1,
            encoder_hidden_size=speech_dim + audio_dim, use_qformer_text_input=False,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        )
        qcfg._attn_implementation = "eager"   # eager returns the attention probabilities we visualise
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)   # BLIP-2's initialisation

    @property
    def window_frames(self) -> int:
        return self.cfg.window_frames

    @property
    def stride_frames(self) -> int:
        return self.cfg.stride_frames

    def num_windows(self, frames: int) -> int:
        return max(0, (frames - self.window_frames) // self.stride_frames + 1)

    def fuse(self, speech: torch.Tensor, audio: torch.Tensor | None,
             audio_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """LayerNorm each stream, then zero-pad in time (after the norm: pads are exact zeros) and concat.

        `audio_lengths` [B] marks valid audio frames in a padded batch; frames past it become zeros too,
        exactly as if each item had been encoded alone (the official batch size is 1)."""
        dtype = self.ln_speech.weight.dtype
        speech = self.ln_speech(speech.to(dtype))
        if self.ln_audio is None:
            return speech
        if audio is None:
            raise ValueError("This Q-Former was built for speech + audio features; audio features are missing.")
        audio = self.ln_audio(audio.to(dtype))
        if audio_lengths is not None:
            valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < audio_lengths.to(audio.device)[:, None]
            audio = audio * valid[..., None]
        t_speech, t_audio = speech.shape[1], audio.shape[1]
        if t_audio < t_speech:
            audio = nn.functional.pad(audio, (0, 0, 0, t_speech - t_audio))
        elif t_speech < t_audio:
            speech = nn.functional.pad(speech, (0, 0, 0, t_audio - t_speech))
        return torch.cat([speech, audio], dim=-1)

    def attend(self, windows: torch.Tensor, output_attentions: bool = False):
        """Windows [W, K, C] of fused frames -> tokens [W, N, hidden] (+ cross-attention [W, layers, heads, N, K])."""
        queries = self.query_tokens.expand(windows.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=windows,
                           encoder_attention_mask=torch.ones(windows.shape[:2], dtype=torch.long, device=windows.device),
                           output_attentions=output_attentions)
        attn = torch.stack(out.cross_attentions, dim=1) if output_attentions else None
        return out.last_hidden_state, attn

    def forward(self, speech: torch.Tensor, audio: torch.Tensor | None = None,
                audio_lengths: torch.Tensor | None = None, output_attentions: bool = False) -> QFormerOutput:
        x = self.fuse(speech, audio, audio_lengths)
        windows = cut_windows(x, self.window_frames, self.stride_frames)      # [B, L, K, C]
        b, n_win, k, c = windows.shape
        tokens, attn = self.attend(windows.reshape(b * n_win, k, c), output_attentions)
        tokens = tokens.reshape(b, n_win * tokens.shape[1], -1)
        if attn is not None:
            attn = attn.reshape(b, n_win, *attn.shape[1:])
        return QFormerOutput(tokens=tokens, cross_attentions=attn)
