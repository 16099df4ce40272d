"""Audio front end: any file or array -> 16 kHz mono float32, cut into 30 s chunks.

The official code reads channel 0 and never resamples (a 44.1 kHz upload silently gives wrong
features); we average channels and resample with a polyphase filter instead.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from .errors import AudioError

SAMPLE_RATE = 16000
AudioSource = Union[str, Path, bytes, np.ndarray, tuple]


@dataclass
class PreparedAudio:
    """What the model hears: 16 kHz mono float32, already cut to the configured maximum."""
    wav: np.ndarray
    original_seconds: float
    original_rate: int
    original_channels: int
    key: str                      # content hash: the cache key for encoder outputs

    @property
    def seconds(self) -> float:
        return len(self.wav) / SAMPLE_RATE

    @property
    def cut_seconds(self) -> float:
        return max(0.0, self.original_seconds - self.seconds)

    def chunks(self, chunk_seconds: float = 30.0) -> list[np.ndarray]:
        size = int(chunk_seconds * SAMPLE_RATE)
        return [self.wav[i:i + size] for i in range(0, len(self.wav), size)]

    def describe(self) -> str:
        text = (f"{self.original_seconds:.2f} s, {self.original_rate} Hz, {self.original_channels} ch"
                f" -> 16 kHz mono, {self.seconds:.2f} s used")
        if self.cut_seconds > 0:
            text += f"; the last {self.cut_seconds:.2f} s were cut (limit {self.seconds:.0f} s)"
        return text


def _to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> [-1, 1) float32; float stays float."""
    if samples.dtype.kind == "u":            # 8-bit WAV is unsigned
        bits = samples.dtype.itemsize * 8
        return (samples.astype(np.float32) - 2 ** (bits - 1)) / 2 ** (bits - 1)
    if samples.dtype.kind == "i":
        return samples.astype(np.float32) / float(2 ** (samples.dtype.itemsize * 8 - 1))
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    raise AudioError(f"Unsupported sample type {samples.dtype}; give integer PCM or float samples.")


def _read_with_ffmpeg(data: bytes) -> tuple[np.ndarray, int, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError("This audio format needs ffmpeg, which is not installed (apt-get install ffmpeg).")
    probe = subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-i", "pipe:0"], input=data,
                           capture_output=True, timeout=60)
    text = probe.stderr.decode(errors="replace")
    rate, channels = 0, 1
    for line in text.splitlines():
        if "Audio:" in line:
            parts = [p.strip() for p in line.split("Audio:", 1)[1].split(",")]
            for p in parts:
                if p.endswith(" Hz"):
                    rate = int(p.split()[0])
                elif p in ("mono",):
                    channels = 1
                elif p in ("stereo",):
                    channels = 2
                elif p.endswith("channels"):
                    channels = int(p.split()[0])
            break
    if rate == 0:
        raise AudioError("The file is not audio that can be decoded (no audio stream found). "
                         "Accepted: wav, flac, ogg, mp3, m4a, webm and other formats ffmpeg reads.")
    out = subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", "pipe:0",
                          "-f", "f32le", "-acodec", "pcm_f32le", "-"], input=data, capture_output=True, timeout=300)
    if out.returncode != 0:
        raise AudioError("The audio file is damaged or truncated and could not be decoded: "
                         + out.stderr.decode(errors="replace").strip()[-200:])
    samples = np.frombuffer(out.stdout, dtype=np.float32)
    return samples.reshape(-1, channels) if channels > 1 else samples, rate, channels


def read_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decode a file path, raw bytes, `(rate, samples)` (Gradio's numpy form) or a 16 kHz array."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("Audio tuples must be (sample_rate, samples).")
        rate, samples = source
        if isinstance(rate, np.ndarray):            # accept (samples, rate) too
            rate, samples = samples, rate
        return np.asarray(samples), int(rate)
    if isinstance(source, np.ndarray):
        return source, SAMPLE_RATE
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"Audio file not found: {path}")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise AudioError(f"Unsupported audio input of type {type(source).__name__}.")
    if not data:
        raise AudioError("The audio file is empty (0 bytes).")
    try:
        samples, rate = sf.read(io.BytesIO(data), always_2d=False)
        return samples, int(rate)
    except Exception:  # noqa: BLE001 - soundfile raises several types; fall back to ffmpeg
        samples, rate, _ = _read_with_ffmpeg(data)
        return samples, rate


def to_mono_16k(samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    samples = np.asarray(samples)
    if samples.size == 0:
        raise AudioError("The audio has no samples (zero length).")
    if samples.ndim == 2:
        # Gradio gives [N, C]; accept [C, N] when the channel axis is the short one.
        if samples.shape[0] < samples.shape[1] and samples.shape[0] <= 8:
            samples = samples.T
        channels = samples.shape[1]
        samples = _to_float(samples).mean(axis=1)
    elif samples.ndim == 1:
        channels = 1
        samples = _to_float(samples)
    else:
        raise AudioError(f"Audio must be 1-D (mono) or 2-D (samples x channels); got shape {samples.shape}.")
    if not (1000 <= rate <= 384000):
        raise AudioError(f"Unsupported sample rate {rate} Hz; accepted: 1 kHz to 384 kHz.")
    if not np.all(np.isfinite(samples)):
        raise AudioError("The audio contains NaN or infinite samples; it is corrupt.")
    if rate != SAMPLE_RATE:
        ratio = Fraction(SAMPLE_RATE, rate).limit_denominator(1000)
        samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    return np.ascontiguousarray(samples, dtype=np.float32), channels


def prepare_audio(source: AudioSource, max_seconds: float = 300.0, min_seconds: float = 0.1) -> PreparedAudio:
    """Read, average channels, resample to 16 kHz and cut to `max_seconds`."""
    samples, rate = read_audio(source)
    wav, channels = to_mono_16k(samples, rate)
    original = len(wav) / SAMPLE_RATE
    if original < min_seconds:
        raise AudioError(f"The audio is too short ({original * 1000:.0f} ms); at least {min_seconds:.1f} s is needed.")
    wav = wav[: int(max_seconds * SAMPLE_RATE)]
    key = hashlib.sha1(wav.tobytes()).hexdigest()
    return PreparedAudio(wav=wav, original_seconds=original, original_rate=rate,
                         original_channels=channels, key=key)


def log_mel(chunks: list[np.ndarray], feature_extractor) -> np.ndarray:
    """Whisper log-mel of each chunk, padded to 30 s: [C, n_mels, 3000]."""
    feats = feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="np")
    return feats["input_features"].astype(np.float32)
