"""Kaldi-compatible log-mel filterbank in plain PyTorch.

A batched replacement for `torchaudio.compliance.kaldi.fbank` (torchaudio does not load with our
torch build). It follows Kaldi's `compute-fbank-feats` for the options BEATs uses: snip_edges,
no dither, no energy term. Runs on any device; works on [N] or [B, N] waveforms.
"""

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# Dataset statistics BEATs was trained with (AudioSet log-mel mean and std).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582
BEATS_SAMPLE_RATE = 16000
BEATS_NUM_MEL_BINS = 128

# Kaldi floors the mel energies at the float32 epsilon whatever the compute dtype.
_LOG_FLOOR = torch.finfo(torch.float32).eps

Lengths = Union[Tensor, Sequence[int]]


def _frame_sizes(sample_rate: int, frame_length_ms: float, frame_shift_ms: float) -> Tuple[int, int]:
    # Same rounding as Kaldi: truncate samples-per-frame to an integer.
    return int(sample_rate * frame_length_ms * 0.001), int(sample_rate * frame_shift_ms * 0.001)


def num_frames(
    num_samples: Union[int, Tensor],
    sample_rate: int = BEATS_SAMPLE_RATE,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> Union[int, Tensor]:
    """Number of snip-edges frames: 1 + (N - 400) // 160 at 16 kHz, 0 when N < 400."""
    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    if isinstance(num_samples, Tensor):
        n = num_samples.long()
        return torch.where(n >= length, 1 + (n - length).clamp(min=0) // shift, torch.zeros_like(n))
    return 1 + (num_samples - length) // shift if num_samples >= length else 0


def _mel(freq: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


@lru_cache(maxsize=16)
def mel_banks(num_bins: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float) -> Tensor:
    """Kaldi's triangular mel filters as a float64 [num_bins, n_fft // 2 + 1] matrix (CPU).

    Triangles are equally spaced on the mel scale 1127·ln(1 + f/700) between low_freq and
    high_freq (high_freq <= 0 means Nyquist + high_freq). Like Kaldi, the Nyquist bin gets no weight.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}")

    mel_low, mel_high = _mel(torch.tensor([low_freq, high_freq], dtype=torch.float64))
    step = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + step * torch.arange(num_bins, dtype=torch.float64)[:, None]
    center, right = left + step, left + 2 * step

    fft_mel = _mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft))
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.minimum(up, down).clamp(min=0.0)
    banks[:, -1] = 0.0
    return banks


def _window(window_type: str, length: int) -> Tensor:
    # Kaldi's windows are symmetric (divide by length - 1), hence periodic=False.
    if window_type == "povey":
        return torch.hann_window(length, periodic=False, dtype=torch.float64).pow(0.85)
    if window_type == "hanning":
        return torch.hann_window(length, periodic=False, dtype=torch.float64)
    if window_type == "hamming":
        return torch.hamming_window(length, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float64)
    if window_type == "rectangular":
        return torch.ones(length, dtype=torch.float64)
    raise ValueError(f"unknown window_type {window_type!r}: use povey, hanning, hamming or rectangular")


def kaldi_fbank(
    wav: Tensor,
    *,
    sample_rate: int = BEATS_SAMPLE_RATE,
    num_mel_bins: int = BEATS_NUM_MEL_BINS,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    window_type: str = "povey",
    round_to_power_of_two: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_power: bool = True,
    use_log: bool = True,
    lengths: Optional[Lengths] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Kaldi log-mel filterbank of `wav` ([N] or [B, N], in Kaldi units: int16 range, not [-1, 1]).

    Returns [T_f, num_mel_bins] or [B, T_f, num_mel_bins], T_f = 1 + (N - 400) // 160 at the
    defaults (snip_edges; dither is always 0). Computed in float64, returned as float64 for float64
    input and float32 otherwise.

    `lengths` (valid samples per batch element, padding at the end) makes it also return the
    per-element frame counts as a LongTensor; frames past an element's count are not meaningful.
    """
    squeeze = wav.dim() == 1
    if squeeze:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"expected a waveform of shape [N] or [B, N], got {tuple(wav.shape)}")
    out_dtype = torch.float64 if wav.dtype == torch.float64 else torch.float32
    # float64 throughout: DC removal and pre-emphasis cancel most of the low-frequency energy, and
    # in float32 the rounding noise left over shows up in the quietest mel bins. BEATs itself ran
    # torchaudio on float64 audio from soundfile.
    wav = wav.to(torch.float64)

    length, shift = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    n_fft = 2 ** math.ceil(math.log2(length)) if round_to_power_of_two else length
    n_frames = num_frames(wav.shape[-1], sample_rate, frame_length_ms, frame_shift_ms)

    if n_frames == 0:
        feats = wav.new_zeros(wav.shape[0], 0, num_mel_bins)
    else:
        frames = wav.unfold(-1, length, shift)  # [B, T_f, length], a view
        if remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        if preemphasis != 0.0:
            # Kaldi treats the sample before each frame's first sample as that sample itself.
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
            frames = frames - preemphasis * previous
        frames = frames * _window(window_type, length).to(frames)

        spectrum = torch.fft.rfft(frames, n=n_fft).abs()  # zero-pads each frame to n_fft
        if use_power:
            spectrum = spectrum.pow(2)
        banks = mel_banks(num_mel_bins, n_fft, float(sample_rate), float(low_freq), float(high_freq))
        feats = F.linear(spectrum, banks.to(spectrum))
        if use_log:
            feats = feats.clamp(min=_LOG_FLOOR).log()

    feats = feats.to(out_dtype)
    if squeeze:
        feats = feats.squeeze(0)
    if lengths is None:
        return feats
    lengths = torch.as_tensor(lengths, device=wav.device)
    return feats, num_frames(lengths, sample_rate, frame_length_ms, frame_shift_ms)


def beats_fbank(wav: Tensor, lengths: Optional[Lengths] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """BEATs input features: 128-bin Kaldi fbank of a 16 kHz waveform in [-1, 1], normalised.

    Same shapes and `lengths` behaviour as `kaldi_fbank`.
    """
    out = kaldi_fbank(wav * 2**15, lengths=lengths)  # BEATs scales to the int16 range Kaldi expects
    feats, frame_lengths = out if lengths is not None else (out, None)
    # The std is doubled on purpose: that is how BEATs was trained.
    feats = (feats - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
    return feats if lengths is None else (feats, frame_lengths)
