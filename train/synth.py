"""Synthetic, license-clean audio with exact labels.

Every generator returns ``(audio, labels)``: ``audio`` is 16 kHz mono float32,
``labels`` a small JSON-able dict describing exactly what was rendered.
Everything random comes from the ``numpy.random.Generator`` passed in, so the
same generator state always gives the same audio.

Parts: speech (espeak-ng), sound events, music, speech-over-background mixes,
and the English sentence / spoken-question generators used for the speech.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
from scipy.signal import lfilter, resample_poly

SR = 16000
ESPEAK_SR = 22050


# --------------------------------------------------------------------------- helpers

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


# --------------------------------------------------------------------------- speech

ACCENTS = {
    "en-us": "American",
    "en": "British",  # not "en-gb": espeak-ng 1.51+ ignores "+variant" after "en-gb"
    "en-gb-scotland": "Scottish",
    "en-gb-x-rp": "British",
    "en-gb-x-gbclan": "Lancashire",
    "en-gb-x-gbcwmd": "West Midlands",
    "en-us-nyc": "New York",
    "en-029": "Caribbean",
}
MALE_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
                 "Andy", "Lee", "Denis", "Hugo", "michel", "travis", "victor", "sandro"]
FEMALE_VARIANTS = ["f1", "f2", "f3", "f4", "f5",
                   "Alicia", "Andrea", "Annie", "anika", "belinda", "linda", "steph", "grandma"]
# More espeak-ng variants, for training only (``make_data --more-voices``): a new voice costs held-out
# ASR about as much as a new sentence, and the base pool has 25 variants (21 after the held-out ones).
# Genders by the variant file's pitch range (most of these files do not say).
EXTRA_MALE_VARIANTS = ["adam", "benjamin", "caleb", "david", "ed", "edward", "gustave", "iven", "john", "max",
                       "paul", "quincy", "rob", "robert", "Michael", "Mike", "Gene", "Jacky", "norbert", "grandpa",
                       "Diogo", "Henrique", "Marco", "antonio", "miguel", "pedro", "marcelo", "pablo"]
EXTRA_FEMALE_VARIANTS = ["aunty", "steph2", "steph3", "shelby"]
# Evaluation voices use a held-out accent or a held-out speaker variant, so
# no evaluation voice (accent+variant) is ever heard in training.
HELDOUT_ACCENTS = {"en-gb-x-gbcwmd"}
HELDOUT_VARIANTS = {"m3", "travis", "f4", "Annie"}


def variant_gender(variant: str) -> str:
    return "female" if variant in FEMALE_VARIANTS or variant in EXTRA_FEMALE_VARIANTS else "male"


def voices(split: str, gender: str | None = None, more: bool = False) -> list[str]:
    """espeak-ng voice names ``accent+variant`` available to ``split`` ('train' or 'eval'); `more` adds
    the extra variants to the training voices (the held-out voices never change)."""
    out = []
    extra = EXTRA_MALE_VARIANTS + EXTRA_FEMALE_VARIANTS if more and split == "train" else []
    for accent in ACCENTS:
        for variant in MALE_VARIANTS + FEMALE_VARIANTS + extra:
            held = accent in HELDOUT_ACCENTS or variant in HELDOUT_VARIANTS
            if held != (split == "eval"):
                continue
            if gender and variant_gender(variant) != gender:
                continue
            out.append(f"{accent}+{variant}")
    return out


def espeak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Render ``text`` with espeak-ng and return 16 kHz float32 audio."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed; install it (apt-get install espeak-ng) to synthesize speech.")
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    raw = proc.stdout
    pos = raw.find(b"data")  # --stdout writes a streaming WAV header; samples follow the data chunk id + size
    if proc.returncode != 0 or pos < 0:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    pcm = np.frombuffer(raw[pos + 8: pos + 8 + (len(raw) - pos - 8) // 2 * 2], dtype="<i2")
    x = pcm.astype(np.float32) / 32768.0
    return resample_poly(x, 320, 441).astype(np.float32)  # 22050 * 320/441 = 16000


def trim_silence(x: np.ndarray, thresh: float = 0.005) -> np.ndarray:
    idx = np.flatnonzero(np.abs(x) > thresh)
    return x[idx[0]: idx[-1] + 1] if len(idx) else x


def rate_label(rate: int) -> str:
    return "slow" if rate < 145 else "fast" if rate > 185 else "normal"


def speed_perturb(x: np.ndarray, factor: float) -> np.ndarray:
    """Play ``x`` ``factor`` times faster (resampling, as Kaldi's speed perturbation): tempo, pitch and
    formants move together, like a speaker with a shorter (>1) or longer (<1) vocal tract."""
    up = 50  # factors on a 0.02 grid keep the polyphase filter short
    down = int(round(factor * up))
    return resample_poly(x, up, down).astype(np.float32) if down != up else x


def speech(text: str, rng: np.random.Generator, voice: str | None = None, split: str = "train",
           rate: int | None = None, pitch: int | None = None, more_voices: bool = False,
           speed: float = 1.0) -> tuple[np.ndarray, dict]:
    """Speak ``text``; voice/rate/pitch are drawn from ``rng`` unless given (`more_voices`: from the
    larger training pool, ``voices(..., more=True)``); `speed` != 1 speed-perturbs the rendering and the
    rate label follows it."""
    if voice is None:
        gender = str(rng.choice(["male", "female"]))
        voice = str(rng.choice(voices(split, gender, more_voices)))
    accent, variant = voice.split("+")
    rate = int(rng.integers(125, 206)) if rate is None else rate
    pitch = int(rng.integers(30, 71)) if pitch is None else pitch
    x = trim_silence(espeak(text, voice, rate, pitch))
    if speed != 1.0:
        x, rate = speed_perturb(x, speed), int(round(rate * speed))
    x = normalize(x, 0.9)
    labels = {"text": text, "voice": voice, "accent": ACCENTS[accent], "gender": variant_gender(variant),
              "rate": rate, "rate_label": rate_label(rate), "pitch": pitch, "duration": seconds(x)}
    if speed != 1.0:
        labels["speed"] = speed
    return x, labels


# --------------------------------------------------------------------------- sound events

BEEP_PITCH_HZ = {"low": (300, 500), "medium": (800, 1200), "high": (2000, 3000)}  # gaps keep classes unambiguous


def beeps(rng: np.random.Generator, count: int | None = None, pitch: str | None = None) -> tuple[np.ndarray, dict]:
    count = int(rng.integers(1, 7)) if count is None else count
    pitch = str(rng.choice(list(BEEP_PITCH_HZ))) if pitch is None else pitch
    freq = rng.uniform(*BEEP_PITCH_HZ[pitch])
    dur, gap = rng.uniform(0.1, 0.3), rng.uniform(0.18, 0.45)
    n_beep, n_step = _n(dur), _n(dur + gap)
    tone = np.sin(2 * np.pi * freq * _time(n_beep)) * ramp_env(n_beep, 0.005, 0.01)
    x = np.zeros(n_step * (count - 1) + n_beep)
    for i in range(count):
        add_at(x, tone, i * n_step)
    return x.astype(np.float32), _round({"kind": "beeps", "count": count, "pitch": pitch, "freq_hz": freq})


def sweep(rng: np.random.Generator, direction: str | None = None, repeats: int | None = None) -> tuple[np.ndarray, dict]:
    """Siren-like tone gliding up ('rising') or down ('falling'), repeated 1-3 times."""
    direction = str(rng.choice(["rising", "falling"])) if direction is None else direction
    repeats = int(rng.integers(1, 4)) if repeats is None else repeats
    lo = rng.uniform(300, 700)
    hi = lo * rng.uniform(2.0, 3.5)
    f0, f1 = (lo, hi) if direction == "rising" else (hi, lo)
    n = _n(rng.uniform(0.6, 2.0))
    freq = f0 * (f1 / f0) ** np.linspace(0, 1, n)  # exponential glide sounds like a siren
    phase = 2 * np.pi * np.cumsum(freq) / SR
    one = (np.sin(phase) + 0.3 * np.sin(2 * phase)) * ramp_env(n, 0.02, 0.05)
    gap = np.zeros(_n(rng.uniform(0.1, 0.3)))
    x = np.concatenate([one] + [np.concatenate([gap, one]) for _ in range(repeats - 1)])
    return x.astype(np.float32), _round({"kind": "sweep", "direction": direction, "repeats": repeats,
                                         "f_start_hz": f0, "f_end_hz": f1})


def _knock(rng: np.random.Generator) -> np.ndarray:
    n = _n(0.12)
    t = _time(n)
    body = np.sin(2 * np.pi * rng.uniform(160, 300) * t) * np.exp(-t / 0.025)
    wood = 0.5 * np.sin(2 * np.pi * rng.uniform(600, 1000) * t) * np.exp(-t / 0.01)
    tap = 0.3 * shaped_noise(rng, n, 200, 3000) * np.exp(-t / 0.004)
    return body + wood + tap


def _clap(rng: np.random.Generator) -> np.ndarray:
    n = _n(0.1)
    x = np.zeros(n)
    for k in range(3):  # a real clap is a few micro-bursts within ~10 ms
        burst = shaped_noise(rng, n, 800, 4500) * decay_env(n, rng.uniform(0.015, 0.03))
        add_at(x, burst * (0.6 if k else 1.0), _n(0.004 * k))
    return x


def _bark(rng: np.random.Generator) -> np.ndarray:
    n = _n(rng.uniform(0.15, 0.28))
    f0 = rng.uniform(450, 700) * np.linspace(1.0, 0.7, n)  # barks drop in pitch
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formant = rng.uniform(900, 1500)
    x = np.zeros(n)
    for k in range(1, 12):
        weight = np.exp(-0.5 * ((k * f0[0] - formant) / 600) ** 2) + 0.3 / k
        x += weight * np.sin(k * phase)
    x += 0.25 * np.std(x) * shaped_noise(rng, n, 300, 4000)
    return x * ramp_env(n, 0.008, 0.01) * np.exp(-_time(n) / 0.12)


def counted_events(rng: np.random.Generator, kind: str | None = None, count: int | None = None) -> tuple[np.ndarray, dict]:
    """Knocks, claps or dog barks repeated ``count`` times at a steady-ish rhythm."""
    kind = str(rng.choice(["knock", "clap", "dog_bark"])) if kind is None else kind
    count = int(rng.integers(1, 7 if kind != "dog_bark" else 6)) if count is None else count
    make = {"knock": _knock, "clap": _clap, "dog_bark": _bark}[kind]
    base_gap = rng.uniform(0.25, 0.5) if kind != "dog_bark" else rng.uniform(0.35, 0.6)
    onsets, t = [], 0.0
    for _ in range(count):
        onsets.append(t)
        t += base_gap * rng.uniform(0.85, 1.15)  # a little human timing jitter
    x = np.zeros(_n(onsets[-1] + 0.35))
    for o in onsets:
        add_at(x, make(rng) * rng.uniform(0.8, 1.0), _n(o))
    return x.astype(np.float32), _round({"kind": kind, "count": count})


def birds(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    chirps = []
    for _ in range(int(rng.integers(1, 4))):  # 1-3 phrases of quick chirps
        for _ in range(int(rng.integers(3, 8))):
            n = _n(rng.uniform(0.04, 0.1))
            f = np.linspace(rng.uniform(2200, 3200), rng.uniform(3800, 5500), n)
            c = np.sin(2 * np.pi * np.cumsum(f) / SR) * np.hanning(n)
            chirps.append(np.concatenate([c, np.zeros(_n(rng.uniform(0.05, 0.15)))]))
        chirps.append(np.zeros(_n(rng.uniform(0.3, 0.8))))
    x = np.concatenate(chirps)
    return x.astype(np.float32), {"kind": "bird"}


ALARM_PATTERNS = ["two-tone", "pulsing", "continuous"]


def alarm(rng: np.random.Generator, pattern: str | None = None) -> tuple[np.ndarray, dict]:
    pattern = str(rng.choice(ALARM_PATTERNS)) if pattern is None else pattern
    total = _n(rng.uniform(2.0, 4.5))
    t = _time(total)

    def square_ish(freq):  # odd harmonics: harsh, buzzer-like
        return sum(np.sin(2 * np.pi * k * freq * t) / k for k in (1, 3, 5))

    if pattern == "two-tone":
        hi, lo, half = rng.uniform(900, 1050), rng.uniform(650, 800), rng.uniform(0.3, 0.5)
        use_hi = (np.floor(t / half) % 2) == 0
        freq = np.where(use_hi, hi, lo)
        x = np.sin(2 * np.pi * np.cumsum(freq) / SR)
        x = x + np.sin(3 * 2 * np.pi * np.cumsum(freq) / SR) / 3
    elif pattern == "pulsing":
        on = rng.uniform(0.06, 0.1)
        gate = (t % (2 * on)) < on
        x = np.sin(2 * np.pi * rng.uniform(2000, 3200) * t) * gate
    else:
        x = square_ish(rng.uniform(380, 600))
    x = x * ramp_env(total, 0.01, 0.02)
    return x.astype(np.float32), {"kind": "alarm", "pattern": pattern}


TEXTURES = ["rain", "wind", "waves", "crowd", "engine"]


def texture(rng: np.random.Generator, name: str | None = None, duration: float | None = None) -> tuple[np.ndarray, dict]:
    """Stationary background noises, all built from shaped noise."""
    name = str(rng.choice(TEXTURES)) if name is None else name
    duration = rng.uniform(2.0, 8.0) if duration is None else duration
    n = _n(duration)
    t = _time(n)
    if name == "rain":
        x = 0.5 * shaped_noise(rng, n, 800, 7000, -1.5)
        drop = np.exp(-_time(_n(0.01)) / 0.002)
        for start in rng.integers(0, n, int(rng.uniform(40, 120) * duration)):  # droplets
            add_at(x, drop * rng.uniform(0.5, 2.0) * rng.choice([-1, 1]), int(start))
    elif name == "wind":
        gust = 0.2 + 0.8 * smooth_random(rng, n, rng.uniform(0.4, 1.0)) ** 2
        x = shaped_noise(rng, n, 80, 1200, -4) * gust
    elif name == "waves":
        period = rng.uniform(3.0, 6.0)
        swell = (0.15 + 0.85 * np.sin(np.pi * (t / period + rng.uniform()))**2) ** 2
        x = shaped_noise(rng, n, 60, 5000, -3) * swell
    elif name == "crowd":
        # Many independent syllable-rate modulated bands: sounds like murmur, has no words.
        x = np.zeros(n)
        for _ in range(8):
            x += shaped_noise(rng, n, 250, 3500, -3) * smooth_random(rng, n, rng.uniform(3, 6))
    else:  # engine
        f0 = rng.uniform(30, 60)
        x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.28)) / k for k in range(1, 16))
        x = x * (1 + 0.3 * np.sin(np.pi * f0 * t)) + 0.4 * shaped_noise(rng, n, 40, 1500, -6)
    x = x * ramp_env(n, 0.2, 0.2)
    return x.astype(np.float32), {"kind": name}


SOUND_KINDS = ["beeps", "sweep", "knock", "clap", "dog_bark", "bird", "alarm"] + TEXTURES
COUNTABLE = {"beeps", "knock", "clap", "dog_bark"}


def sound(rng: np.random.Generator, kind: str | None = None, duration: float | None = None) -> tuple[np.ndarray, dict]:
    """One sound event of ``kind`` (random if None). ``duration`` only applies to textures."""
    kind = str(rng.choice(SOUND_KINDS)) if kind is None else kind
    if kind == "beeps":
        x, lab = beeps(rng)
    elif kind == "sweep":
        x, lab = sweep(rng)
    elif kind in ("knock", "clap", "dog_bark"):
        x, lab = counted_events(rng, kind)
    elif kind == "bird":
        x, lab = birds(rng)
    elif kind == "alarm":
        x, lab = alarm(rng)
    elif kind in TEXTURES:
        x, lab = texture(rng, kind, duration)
    else:
        raise ValueError(f"unknown sound kind {kind!r}; expected one of {SOUND_KINDS}")
    return normalize(x, 0.9), lab


# --------------------------------------------------------------------------- music

NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
PROGRESSIONS = {"major": [[0, 3, 4, 0], [0, 5, 3, 4], [0, 4, 5, 3]],  # scale-degree roots (0 = tonic)
                "minor": [[0, 3, 4, 0], [0, 5, 2, 6], [0, 3, 6, 0]]}
TIMBRES = {"sine": "sine wave synthesizer", "square": "square wave synthesizer", "pluck": "plucked string",
           "organ": "organ", "bell": "bell"}
TEMPO_BPM = {"slow": (60, 84), "medium": (95, 115), "fast": (130, 160)}  # gaps keep classes unambiguous


def tempo_label(bpm: float) -> str:
    return "slow" if bpm < 90 else "fast" if bpm > 122 else "medium"


def midi_hz(m: float) -> float:
    return 440.0 * 2 ** ((m - 69) / 12)


def karplus_strong(rng: np.random.Generator, freq: float, n: int, damping: float = 0.996) -> np.ndarray:
    """Plucked string: noise burst through a delay line with an averaging (low-pass) loop."""
    delay = max(2, int(round(SR / freq - 0.5)))  # the 2-tap average adds half a sample of delay
    burst = np.zeros(n)
    burst[:delay] = rng.uniform(-1, 1, min(delay, n))
    a = np.zeros(delay + 2)
    a[0], a[delay], a[delay + 1] = 1.0, -0.5 * damping, -0.5 * damping
    return lfilter([1.0], a, burst)


def tone(rng: np.random.Generator, timbre: str, freq: float, dur: float) -> np.ndarray:
    """One note of ``dur`` seconds; ends with a short gap so repeated notes have distinct onsets."""
    n = _n(dur)
    t = _time(n)
    sounding = _n(dur * 0.88)
    if timbre == "sine":
        x = np.sin(2 * np.pi * freq * t)
    elif timbre == "square":
        x = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 16, 2) if k * freq < 7000)
        x = 0.6 * x
    elif timbre == "organ":
        x = sum(w * np.sin(2 * np.pi * h * freq * t) for h, w in [(1, 1), (2, .6), (3, .4), (4, .25), (6, .15)]
                if h * freq < 7500)
        x = x * (1 + 0.05 * np.sin(2 * np.pi * 6 * t))  # slight tremolo
    elif timbre == "pluck":
        return karplus_strong(rng, freq, n) * ramp_env(n, 0.0, 0.02)
    elif timbre == "bell":
        x = sum(w * np.sin(2 * np.pi * r * freq * t) * np.exp(-t / d)
                for r, w, d in [(1, 1, .6), (2.0, .5, .4), (2.76, .4, .25), (5.4, .2, .12)] if r * freq < 7500)
        return x * ramp_env(n, 0.002, 0.02)
    else:
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {list(TIMBRES)}")
    env = np.zeros(n)
    env[:sounding] = ramp_env(sounding, 0.01, 0.04) * np.linspace(1.0, 0.7, sounding)
    return x * env


def _drum(rng: np.random.Generator, part: str) -> np.ndarray:
    if part == "kick":
        n = _n(0.25)
        f = 45 + 90 * np.exp(-_time(n) / 0.03)  # pitch drop gives the thump
        return np.sin(2 * np.pi * np.cumsum(f) / SR) * decay_env(n, 0.08)
    if part == "snare":
        n = _n(0.18)
        return (0.8 * shaped_noise(rng, n, 1000, 6000) + 0.5 * np.sin(2 * np.pi * 190 * _time(n))) * decay_env(n, 0.05)
    n = _n(0.05)  # hi-hat
    return 0.4 * shaped_noise(rng, n, 5500, 7900) * decay_env(n, 0.012)


def drum_track(rng: np.random.Generator, n_beats: int, beat: float, n: int) -> np.ndarray:
    """Rock beat: kick on 1 and 3, snare on 2 and 4, hi-hat on eighth notes."""
    x = np.zeros(n)
    for b in range(n_beats):
        add_at(x, _drum(rng, "kick" if b % 2 == 0 else "snare"), _n(b * beat))
        for half in (0, 0.5):
            add_at(x, _drum(rng, "hat"), _n((b + half) * beat))
    return x


def music(rng: np.random.Generator, key: str | None = None, mode: str | None = None, bpm: float | None = None,
          timbre: str | None = None, drums: bool | None = None, texture_: str | None = None,
          duration: float | None = None) -> tuple[np.ndarray, dict]:
    """A short piece in 4/4 with every note onset on the beat grid.

    texture_: 'melody', 'chords' (arpeggiated triads) or 'melody and chords'.
    Melody notes last one or two beats, chords one beat per arpeggio note, so
    the shortest gap between onsets (without drums) is exactly one beat.
    """
    key = str(rng.choice(NOTE_NAMES)) if key is None else key
    mode = str(rng.choice(list(SCALES))) if mode is None else mode
    bpm = float(rng.uniform(*TEMPO_BPM[str(rng.choice(list(TEMPO_BPM)))])) if bpm is None else float(bpm)
    timbre = str(rng.choice(list(TIMBRES))) if timbre is None else timbre
    drums = bool(rng.random() < 0.4) if drums is None else drums
    texture_ = str(rng.choice(["melody", "chords", "melody and chords"])) if texture_ is None else texture_
    duration = rng.uniform(3.0, 8.0) if duration is None else duration

    beat = 60.0 / bpm
    n_bars = int(max(1, min(round(duration / (4 * beat)), 8)))
    n_beats = 4 * n_bars
    n = _n(n_beats * beat + 0.6)
    tonic = 60 + NOTE_NAMES.index(key)
    scale = SCALES[mode]

    def degree_midi(d: int, octave: int = 0) -> int:  # scale degree (any int) -> MIDI note
        return tonic + 12 * (octave + d // 7) + scale[d % 7]

    x = np.zeros(n)
    if "chords" in texture_:
        prog = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]
        for bar in range(n_bars):
            root = prog[bar % len(prog)] if bar < n_bars - 1 or n_bars == 1 else 0  # end on the tonic chord
            notes = [degree_midi(root + k, -1) for k in (0, 2, 4, 2)]  # arpeggio 1-3-5-3
            for i, m in enumerate(notes):
                add_at(x, 0.6 * tone(rng, timbre, midi_hz(m), beat), _n((4 * bar + i) * beat))
    if "melody" in texture_:
        d, b = 0, 0
        while b < n_beats:
            left = n_beats - b
            length = 2 if (left == 2 or (left > 2 and rng.random() < 0.3)) else 1
            if left <= 2:
                d = 0 if abs(d) < 4 else 7 * round(d / 7)  # resolve to a tonic at the end
            add_at(x, tone(rng, timbre, midi_hz(degree_midi(d)), length * beat), _n(b * beat))
            b += length
            d = int(np.clip(d + rng.choice([-2, -1, 1, 1, 2, 3, -3]), -3, 9))
    if drums:
        x = x / (np.max(np.abs(x)) + 1e-9) + 0.5 * drum_track(rng, n_beats, beat, n)
    x = normalize(x, 0.9)
    labels = _round({"kind": "music", "key": key, "mode": mode, "bpm": round(bpm), "tempo": tempo_label(bpm),
                     "timbre": timbre, "instrument": TIMBRES[timbre], "has_drums": drums, "texture": texture_,
                     "bars": n_bars})
    return x, labels


# --------------------------------------------------------------------------- mixing

def mix_at_snr(speech_x: np.ndarray, background: np.ndarray, snr_db: float,
               rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Speech over a background at ``snr_db``.

    SNR = mean speech power / mean background power over the whole mixed clip,
    both zero-padded to the clip length. The shorter signal is placed at a random
    offset. Returns the mix (peak-normalized; SNR unaffected) and placement info.
    """
    n = max(len(speech_x), len(background))
    s, b = np.zeros(n), np.zeros(n)
    s_start = int(rng.integers(0, n - len(speech_x) + 1))
    b_start = int(rng.integers(0, n - len(background) + 1))
    add_at(s, speech_x, s_start)
    add_at(b, background, b_start)
    b *= np.sqrt(power(s) / (power(b) * 10 ** (snr_db / 10) + 1e-20))
    mix = normalize(s + b, rng.uniform(0.5, 0.9))
    return mix, {"snr_db": round(float(snr_db), 1), "speech_start": s_start, "background_start": b_start}


def background_for(rng: np.random.Generator, source: str, duration: float,
                   kind: str | None = None) -> tuple[np.ndarray, dict]:
    """Background for a speech clip: a sound event / texture or a music piece (~``duration`` s)."""
    if source == "music":
        return music(rng, duration=max(duration, 3.0))
    return sound(rng, kind, duration=duration + rng.uniform(0.4, 1.2))


# --------------------------------------------------------------------------- sentences

NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Isla", "Jack", "Karen", "Leo",
         "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe",
         "Oscar", "Nina", "Lucas", "Mia", "Ethan", "Sofia", "Daniel", "Hannah", "Omar", "Priya", "Tom", "Lily"]
CITIES = ["London", "Paris", "Berlin", "Madrid", "Rome", "Boston", "Chicago", "Toronto", "Sydney", "Dublin",
          "Edinburgh", "Oslo", "Vienna", "Lisbon", "Denver", "Seattle", "Glasgow", "Leeds", "Austin", "Miami",
          "Tokyo", "Cairo", "Nairobi", "Lima", "Prague", "Athens", "Montreal", "Bristol", "Houston", "Atlanta"]
PLACES = ["the park", "the station", "the library", "the market", "the beach", "the office", "the museum",
          "the airport", "the hospital", "the school", "the bakery", "the gym", "the cinema", "the harbour",
          "the post office", "the garden", "the bank", "the hotel", "the stadium", "the zoo", "the church",
          "the supermarket", "the bus stop", "the pharmacy", "the town hall"]
BUILDINGS = ["library", "bank", "pharmacy", "post office", "bus stop", "train station", "hospital", "bakery",
             "petrol station", "supermarket", "hotel", "museum", "cinema", "school", "police station"]
OBJECTS = ["keys", "phone", "wallet", "umbrella", "laptop", "glasses", "notebook", "jacket", "bag", "ticket",
           "passport", "camera", "charger", "scarf", "watch", "book", "hat", "pen", "bicycle", "guitar"]
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "garage", "hallway", "office", "basement", "attic"]
APPLIANCES = ["lights", "heater", "television", "radio", "oven", "fan", "kettle", "washing machine", "computer"]
FURNITURE = ["table", "shelf", "desk", "chair", "sofa", "counter", "bed", "windowsill"]
FOODS = ["apples", "bananas", "oranges", "potatoes", "tomatoes", "eggs", "carrots", "onions", "lemons",
         "sandwiches", "cookies", "muffins", "peppers", "pears", "grapes"]
DRINKS = ["tea", "coffee", "orange juice", "water", "hot chocolate", "milk", "lemonade"]
ANIMALS = ["dogs", "cats", "horses", "ducks", "sheep", "rabbits", "cows", "goats", "birds", "foxes"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "silver", "orange", "purple", "grey"]
VEHICLES = ["car", "bus", "van", "truck", "taxi", "bike", "motorcycle", "tram"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEATHER = ["sunny", "cloudy", "windy", "cold", "warm", "foggy", "rainy", "hot", "freezing"]
SPORTS = ["football", "tennis", "basketball", "chess", "cricket", "volleyball", "golf", "hockey"]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Italian", "Arabic", "Chinese", "Portuguese"]
ADJECTIVES = ["heavy", "expensive", "small", "old", "loud", "bright", "cheap", "large", "slow", "noisy"]
EVENTS = ["concert", "meeting", "film", "match", "lecture", "party", "class", "show", "interview", "dinner"]
GENRES = ["jazz", "classical", "rock", "pop", "folk", "country", "piano", "relaxing"]
RELATIVES = ["sister", "brother", "aunt", "uncle", "cousin", "grandmother", "grandfather", "friend", "neighbour"]
TASK_NOUNS = ["report", "homework", "painting", "presentation", "puzzle", "letter", "project", "essay"]
PARTS_OF_DAY = ["morning", "afternoon", "evening"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "twentieth", "twenty first",
            "twenty second", "twenty third", "thirtieth"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999 as English words: transcripts match exactly what espeak-ng says."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def time_words(rng: np.random.Generator) -> str:
    h = int(rng.integers(1, 13))
    style = int(rng.integers(5))
    if style == 0:
        return f"{number_words(h)} o'clock"
    if style == 1:
        return f"half past {number_words(h)}"
    if style == 2:
        return f"a quarter to {number_words(h)}"
    if style == 3:
        return f"a quarter past {number_words(h)}"
    return f"{number_words(h)} {number_words(int(rng.choice([10, 15, 20, 30, 40, 45, 50])))}"


TEMPLATES = [
    # statements
    "{name} is going to {place} on {day}.",
    "The {event} starts at {time}.",
    "I bought {num} {food} at the market.",
    "My {relative} has lived in {city} for {small} years.",
    "The {color} {vehicle} is parked outside the {building}.",
    "We will arrive in {city} at {time}.",
    "{name} said the {object} was too {adjective}.",
    "There are {num} {animal} in {place}.",
    "It was {weather} in {city} on {day} {part}.",
    "The train to {city} leaves from platform {small} at {time}.",
    "{name} and {name2} played {sport} after school.",
    "{name} left the {color} {object} in the {room} on {day}.",
    "The {object} costs {num} dollars.",
    "Our flight to {city} was delayed by {num} minutes.",
    "{name} has been learning {language} for {small} years.",
    "{name} usually drinks {drink} on {day} {part}s.",
    "{name} was born on the {ordinal} of {month}.",
    "The {building} on Main Street closes at {time}.",
    "Yesterday it was {weather} in {city}, so {name} stayed home.",
    "{name} finished the {task} on {day} {part}.",
    "My {relative} bought a {color} {vehicle} last {month}.",
    "We need {small} more chairs for the {event} on {day}.",
    # questions
    "Where is the nearest {building} in {city}?",
    "What time does {name}'s {event} start on {day}?",
    "How many {food} do we need for the {event} on {day}?",
    "Have you seen my {color} {object} anywhere, {name}?",
    "Is it going to be {weather} in {city} tomorrow?",
    "Did {name} finish the {task} for {name2} yet?",
    "Why is {place} in {city} closed on {day}?",
    "Which {vehicle} goes from {place} to {city}?",
    "{name}, would you like some {drink} this {part}?",
    "Can {name} meet me at {place} at {time}?",
    "How long does it take to drive from {city} to {city2}?",
    "When is your {relative} coming back from {city}?",
    "Who left the {color} {object} on the {furniture}?",
    "Do you know where {name} put the {object}?",
    # commands
    "Please turn off the {appliance} in the {room} at {time}.",
    "Set an alarm for {time} on {day}.",
    "Call {name} and tell them I will be {small} minutes late.",
    "Put the {object} on the {furniture} in the {room}.",
    "Remind me to buy {food} and {drink} on {day} at {time}.",
    "Play some {genre} music in the {room} until {time}.",
    "Send a message to {name} saying I am at {place}.",
    "Add {num} {food} to the shopping list.",
    "Book a table for {small} at {time} on {day}.",
    "Take the {ordinal} street on the left after {place}.",
    "{name}, turn on the {appliance} and close the {room} door.",
    "Meet me at {place} at {time}.",
]


def _one_sentence(rng: np.random.Generator) -> str:
    """One English sentence from our own templates and word lists (millions of combinations)."""
    name, name2 = rng.choice(NAMES, 2, replace=False)
    city, city2 = rng.choice(CITIES, 2, replace=False)
    slots = {
        "name": name, "name2": name2, "city": city, "city2": city2, "place": rng.choice(PLACES),
        "building": rng.choice(BUILDINGS), "object": rng.choice(OBJECTS), "room": rng.choice(ROOMS),
        "appliance": rng.choice(APPLIANCES), "furniture": rng.choice(FURNITURE), "food": rng.choice(FOODS),
        "drink": rng.choice(DRINKS), "animal": rng.choice(ANIMALS), "color": rng.choice(COLORS),
        "vehicle": rng.choice(VEHICLES), "day": rng.choice(DAYS), "month": rng.choice(MONTHS),
        "weather": rng.choice(WEATHER), "sport": rng.choice(SPORTS), "language": rng.choice(LANGUAGES),
        "adjective": rng.choice(ADJECTIVES), "event": rng.choice(EVENTS), "genre": rng.choice(GENRES),
        "relative": rng.choice(RELATIVES), "task": rng.choice(TASK_NOUNS), "part": rng.choice(PARTS_OF_DAY),
        "ordinal": rng.choice(ORDINALS), "time": time_words(rng), "num": number_words(int(rng.integers(2, 100))),
        "small": number_words(int(rng.integers(2, 13))),
    }
    text = str(rng.choice(TEMPLATES)).format(**{k: str(v) for k, v in slots.items()})
    return text[0].upper() + text[1:]


def sentence(rng: np.random.Generator) -> str:
    """One or (25%) two sentences: longer utterances give 4-7 s clips too."""
    text = _one_sentence(rng)
    if rng.random() < 0.25:
        text += " " + _one_sentence(rng)
    return text


def sentence_split(text: str) -> str:
    """Fixed 90/10 split by content hash: a sentence is always train or always eval."""
    return "eval" if stable_hash(text) % 10 == 0 else "train"


def load_sentences(path: str | Path) -> dict[str, list[str]]:
    """A corpus written by ``python -m train.sentences``, split into train / eval by ``sentence_split``."""
    corpus = json.loads(Path(path).read_text())["sentences"]
    return {split: [s for s in corpus if sentence_split(s) == split] for split in ("train", "eval")}


def sentence_for(split: str, rng: np.random.Generator, corpus: dict[str, list[str]] | None = None,
                 share: float = 0.0) -> str:
    """A sentence belonging to ``split`` (rejection sampling on the hash split). With a ``corpus``
    (``load_sentences``), a ``share`` of them come from its open-vocabulary sentences."""
    if corpus and corpus.get(split) and rng.random() < share:
        return str(rng.choice(corpus[split]))
    while True:
        text = sentence(rng)
        if sentence_split(text) == split:
            return text


# --------------------------------------------------------------------------- spoken questions about the background

# (category, target) -> phrasings. target narrows a yes/no question to one sound.
QUESTIONS = {
    ("identify", None): ["What is making that sound behind me?", "What is that noise in the background?",
                         "Can you tell what sound is playing behind me?", "What do you hear in the background?",
                         "What is that sound I can hear right now?"],
    ("count", "beeps"): ["How many beeps did you hear?", "How many times did it beep?",
                         "Can you count the beeps for me?", "How many beeps were there in total?"],
    ("count", "knock"): ["How many times did someone knock?", "How many knocks did you hear?",
                         "Can you count the knocks for me?", "How many knocks were there?"],
    ("count", "clap"): ["How many times did they clap?", "How many claps did you hear?",
                        "Can you count the claps for me?", "How many claps were there?"],
    ("count", "dog_bark"): ["How many times did the dog bark?", "How many barks did you hear?",
                            "Can you count how often the dog barked?", "How many barks were there?"],
    ("pitch", "beeps"): ["Are those beeps high or low?", "Is the beeping high pitched or low pitched?",
                         "Would you say the beeps are high or low in pitch?"],
    ("direction", "sweep"): ["Is that tone going up or down?", "Is the pitch of that sound rising or falling?",
                             "Does that siren sound go up or down in pitch?"],
    ("location", None): ["Where do you think I am right now?", "Can you guess where I am from the sound around me?",
                         "Based on the background, where am I?"],
    ("yes_no", "rain"): ["Is it raining where I am?", "Do you think it is raining here?",
                         "Should I take an umbrella, judging by the sound?"],
    ("yes_no", "wind"): ["Is it windy where I am?", "Do you think the wind is blowing here?",
                         "Is there a strong wind around me?"],
    ("yes_no", "waves"): ["Am I near the sea?", "Do you think I am close to the ocean?",
                          "Can you hear waves behind me?"],
    ("yes_no", "crowd"): ["Are there a lot of people around me?", "Am I in a crowded place?",
                          "Do you think I am surrounded by people?"],
    ("yes_no", "engine"): ["Is there an engine running nearby?", "Can you hear a motor running?",
                           "Is a machine running near me?"],
    ("animals", None): ["Are there any animals nearby?", "Can you hear any animals around me?",
                        "Is there an animal close to me?"],
    ("alarm", None): ["Should I be worried about that sound?", "Is that an alarm going off?",
                      "Is there an alarm ringing somewhere?"],
    ("mood", "music"): ["Is the music behind me happy or sad?", "Does this song sound cheerful or gloomy?",
                        "What is the mood of the music I am listening to?"],
    ("instrument", "music"): ["What instrument is playing in the background?", "What instrument do you hear?",
                              "Which instrument is playing this tune?"],
    ("tempo", "music"): ["Is this song fast or slow?", "Is the music in the background fast or slow?",
                         "How fast is the music playing behind me?"],
    ("drums", "music"): ["Are there drums in this music?", "Can you hear any drums in the song?",
                         "Does this tune have a drum beat?"],
    ("dance", "music"): ["Could I dance to this music?", "Is this music good for dancing?",
                         "Would this song work at a dance party?"],
}


def question_phrasings(category: str, target: str | None, split: str) -> list[str]:
    """Phrasings for ``split``: the one with the smallest hash is held out for eval."""
    items = sorted(QUESTIONS[(category, target)], key=stable_hash)
    return items[:1] if split == "eval" else items[1:]


def question_categories(bg: dict) -> list[tuple[str, str | None]]:
    """Question (category, target) pairs that make sense for background labels ``bg``.

    Repeated entries are more likely to be picked; used so yes/no questions are
    not almost always answered "no".
    """
    kind = bg["kind"]
    if kind == "music":
        return [("identify", None)] + [(c, "music") for c in ("mood", "instrument", "tempo", "drums", "dance")]
    cats = [("identify", None), ("animals", None), ("alarm", None), ("yes_no", None)]
    if kind in ("dog_bark", "bird"):
        cats.append(("animals", None))
    if kind == "alarm":
        cats.append(("alarm", None))
    if kind in COUNTABLE:
        cats += [("count", kind)] * 3
    if kind == "beeps":
        cats += [("pitch", "beeps")] * 2
    if kind == "sweep":
        cats += [("direction", "sweep")] * 3
    if kind in TEXTURES:
        cats += [("location", None), ("yes_no", None)]
    return cats


def spoken_question(bg: dict, split: str, rng: np.random.Generator) -> dict:
    """Pick a question about background ``bg``: returns {category, target, text}."""
    cats = question_categories(bg)
    category, target = cats[int(rng.integers(len(cats)))]
    if category == "yes_no":  # ask about the true texture ~60% of the time when there is one
        others = [t for t in TEXTURES if t != bg["kind"]]
        target = bg["kind"] if bg["kind"] in TEXTURES and rng.random() < 0.6 else str(rng.choice(others))
    text = str(rng.choice(question_phrasings(category, target, split)))
    return {"category": category, "target": target, "text": text}
