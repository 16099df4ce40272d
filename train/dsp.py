"""Signal helpers shared by the synthetic-audio generators (``train.synth``, ``train.sounds``).

Everything is 16 kHz mono. The underscore helpers (``_n``, ``_time``, ``_round``) are internal to the
``train`` generators, which import them from here so there is one copy of each.
"""

from __future__ import annotations

import hashlib

import numpy as np

SR = 16000


def seconds(x: np.ndarray) -> float:
    return round(len(x) / SR, 3)


def _n(sec: float) -> int:
    return int(round(sec * SR))


def _time(n: int) -> np.ndarray:
    return np.arange(n) / SR


def ramp_env(n: int, attack: float, release: float) -> np.ndarray:
    """Linear attack/release envelope; avoids clicks at note/event edges."""
    env = np.ones(n)
    a, r = min(_n(attack), n // 2), min(_n(release), n // 2)
    if a:
        env[:a] = np.linspace(0, 1, a, endpoint=False)
    if r:
        env[n - r:] = np.linspace(1, 0, r)
    return env


def decay_env(n: int, tau: float, attack: float = 0.002) -> np.ndarray:
    """Fast attack then exponential decay (percussive sounds)."""
    return ramp_env(n, attack, 0.005) * np.exp(-_time(n) / tau)


def add_at(dst: np.ndarray, src: np.ndarray, start: int) -> None:
    """Add ``src`` into ``dst`` at ``start``, cropping what does not fit."""
    end = min(len(dst), start + len(src))
    if end > start:
        dst[start:end] += src[: end - start]


def normalize(x: np.ndarray, peak: float) -> np.ndarray:
    m = float(np.max(np.abs(x))) if len(x) else 0.0
    return (x * (peak / m) if m > 0 else x).astype(np.float32)


def pad(x: np.ndarray, rng: np.random.Generator, lo: float = 0.1, hi: float = 0.5) -> np.ndarray:
    """Random leading/trailing silence so events do not always start at t=0."""
    a, b = _n(rng.uniform(lo, hi)), _n(rng.uniform(lo, hi))
    return np.concatenate([np.zeros(a), x, np.zeros(b)]).astype(np.float32)


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64))) if len(x) else 0.0


def shaped_noise(rng: np.random.Generator, n: int, lo: float, hi: float, tilt_db_oct: float = 0.0) -> np.ndarray:
    """Noise band-limited to [lo, hi] Hz with a spectral tilt (dB/octave), unit RMS.

    Done in the frequency domain: cheap, and soft band edges avoid ringing.
    """
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1] if n > 1 else 1.0
    gain = (f / 1000.0) ** (tilt_db_oct / 6.02)
    gain *= 1 / (1 + (lo / f) ** 4) / (1 + (f / hi) ** 4)
    x = np.fft.irfft(spec * gain, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def smooth_random(rng: np.random.Generator, n: int, rate_hz: float) -> np.ndarray:
    """Slowly varying random curve in [0, 1] (knots every 1/rate_hz s, interpolated)."""
    k = max(2, int(n / SR * rate_hz) + 2)
    knots = rng.uniform(0, 1, k)
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), knots)


def _round(d: dict) -> dict:
    """Plain Python types and short floats so labels serialize cleanly to JSON."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (float, np.floating)):
            v = round(float(v), 2)
        elif isinstance(v, np.integer):
            v = int(v)
        out[k] = v
    return out


def stable_hash(text: str) -> int:
    """Process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:4], "little")
