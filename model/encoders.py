"""The two auditory encoders that run side by side: Whisper (speech) and BEATs (audio events, music).

Both are frozen. Whisper sees a 30 s log-mel and gives 1500 frames (50 Hz); BEATs sees the raw
16 kHz waveform and gives ~50 tokens/s. The audio slot is optional: without BEATs the model runs
speech-encoder only, as the official code does with an empty `beats_path`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError


class SpeechEncoder(nn.Module):
    """transformers' Whisper encoder (any size) from a local HF directory."""

    def __init__(self, encoder: nn.Module, feature_extractor, name: str = "whisper"):
        super().__init__()
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.name = name

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def num_mel_bins(self) -> int:
        return self.encoder.config.num_mel_bins

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "SpeechEncoder":
        from transformers import WhisperFeatureExtractor, WhisperModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"Whisper path {path} is not a Hugging Face model directory (no config.json).")
        try:
            whisper = WhisperModel.from_pretrained(path, dtype=dtype, use_safetensors=None)
        except Exception as err:  # noqa: BLE001 - surface any loader failure with the path
            raise ConfigError(f"Could not load Whisper from {path}: {err}") from None
        try:
            extractor = WhisperFeatureExtractor.from_pretrained(path)
        except OSError:
            extractor = WhisperFeatureExtractor(feature_size=whisper.config.num_mel_bins)
        encoder = whisper.encoder
        del whisper.decoder  # the decoder is never used; free its memory
        return cls(encoder.eval(), extractor, name=path.name)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, 3000] -> frames [B, 1500, d]."""
        mel = mel.to(self.encoder.conv1.weight.dtype)
        return self.encoder(input_features=mel).last_hidden_state


class AudioEncoder(nn.Module):
    """The non-speech encoder slot: wav [B, N] at 16 kHz (+ padding mask) -> frames [B, T, dim]."""

    dim: int = 0
    name: str = "none"

    def forward(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class BEATsEncoder(AudioEncoder):
    """BEATs (our implementation in beats.py) behind the audio slot."""

    def __init__(self, beats: nn.Module, name: str = "BEATs"):
        super().__init__()
        self.beats = beats.eval()
        self.dim = beats.embed_dim
        self.name = name

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "BEATsEncoder":
        from .beats import load_beats

        return cls(load_beats(path, dtype=dtype), name=Path(path).name)

    def forward(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.beats.parameters()).dtype
        feats, _ = self.beats.extract_features(wav.to(dtype), padding_mask=padding_mask)
        return feats
