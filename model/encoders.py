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

    def forward(self, mel: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """mel [B, n_mels, 3000] -> frames [B, 1500, d].

        With `frames` < 1500 only the first 2*frames mel frames are encoded (positions 0..frames-1):
        the cost falls with the audio's length instead of always paying for 30 s. The official model
        always encodes the padded 30 s; SALMONN-tiny (trim_to_audio) is trained on the shorter form."""
        enc = self.encoder
        mel = mel.to(enc.conv1.weight.dtype)
        if frames is None:
            return enc(input_features=mel).last_hidden_state
        x = nn.functional.gelu(enc.conv1(mel[..., : 2 * frames]))
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x)


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
        # The waveform stays float32 (the fbank needs the precision); BEATs casts its features itself.
        feats, _ = self.beats.extract_features(wav.float(), padding_mask=padding_mask)
        return feats
