"""Sound events, music and speech-over-background mixing for the synthetic training audio.

Every generator returns ``(audio, labels)`` like ``train.synth``: 16 kHz mono float32 audio and a
JSON-able dict of exactly what was rendered, with all randomness drawn from the ``rng`` passed in.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from train.dsp import (SR, _n, _round, _time, add_at, decay_env, normalize, power, ramp_env, shaped_noise,
                       smooth_random)


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
