"""Synthetic, license-clean audio with exact labels.

Every generator returns ``(audio, labels)``: ``audio`` is 16 kHz mono float32,
``labels`` a small JSON-able dict describing exactly what was rendered.
Everything random comes from the ``numpy.random.Generator`` passed in, so the
same generator state always gives the same audio.

This module holds the speech part (espeak-ng voices, rendering, speed perturbation) and
re-exports the rest, so callers keep using ``synth.X``:
- ``train.dsp``: sample rate and signal helpers (envelopes, noise, normalization, hashing);
- ``train.sounds``: sound events, music and speech-over-background mixes;
- ``train.templates``: the English sentence and spoken-question generators used for the speech.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
from scipy.signal import resample_poly

from train.dsp import SR, normalize, pad, seconds
from train.sounds import (BEEP_PITCH_HZ, COUNTABLE, NOTE_NAMES, SCALES, SOUND_KINDS, TIMBRES, background_for, beeps,
                          counted_events, mix_at_snr, music, sound, sweep, tempo_label, texture)
from train.templates import load_sentences, sentence, sentence_for, sentence_split, spoken_question

__all__ = [
    # re-exported for callers of ``synth.X``
    "SR", "normalize", "pad", "seconds",
    "BEEP_PITCH_HZ", "COUNTABLE", "NOTE_NAMES", "SCALES", "SOUND_KINDS", "TIMBRES", "background_for", "beeps",
    "counted_events", "mix_at_snr", "music", "sound", "sweep", "tempo_label", "texture",
    "load_sentences", "sentence", "sentence_for", "sentence_split", "spoken_question",
    # speech, defined here
    "ACCENTS", "MALE_VARIANTS", "FEMALE_VARIANTS", "EXTRA_MALE_VARIANTS", "EXTRA_FEMALE_VARIANTS",
    "HELDOUT_ACCENTS", "HELDOUT_VARIANTS", "variant_gender", "voices", "espeak", "trim_silence", "rate_label",
    "speed_perturb", "speech",
]

ESPEAK_SR = 22050


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
