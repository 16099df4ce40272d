"""Text-to-speech engines for training and testing hearing: one function per engine, each returning
16 kHz mono float32 audio.

- ``espeak``: espeak-ng, many accents and variants (``synth.voices``); the recipe's original voices.
- ``festival``: Debian's festival with its installable voices (a diphone and an HTS voice): other
  engines, so other vocal tracts and prosody than any espeak-ng variant.
- ``flite``: the held-out engine. It is never used for training; its voices (slt, rms, awb, kal)
  speak the everyday evaluation set, i.e. speech the model has never heard from any voice like it.

A missing engine raises ``EngineMissing`` with the Debian package to install.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from train import synth

HELD_OUT = "flite"
TRAIN_ENGINES = ("espeak", "festival")
# program each engine runs, and the Debian packages that provide it (and its voices)
PROGRAMS = {"espeak": "espeak-ng", "festival": "text2wave", "flite": "flite"}
PACKAGES = {"espeak": "espeak-ng", "festival": "festival festvox-kallpc16k festvox-us-slt-hts", "flite": "flite"}
FESTIVAL_VOICES = {"kal_diphone": "male", "cmu_us_slt_arctic_hts": "female"}
FLITE_VOICES = {"slt": "female", "rms": "male", "awb": "male", "kal": "male"}


class EngineMissing(RuntimeError):
    pass


def require(engine: str) -> None:
    """Raise ``EngineMissing`` (saying what to install) unless `engine` can run here."""
    if engine not in PROGRAMS:
        raise ValueError(f"unknown TTS engine {engine!r}; expected one of {sorted(PROGRAMS)}")
    if shutil.which(PROGRAMS[engine]) is None:
        raise EngineMissing(f"TTS engine {engine!r} needs {PROGRAMS[engine]!r}, which is not installed: "
                            f"apt-get install -y {PACKAGES[engine]}")


def to_16k(x: np.ndarray, sr: int) -> np.ndarray:
    if x.ndim > 1:
        x = x.mean(axis=1)
    g = gcd(synth.SR, sr)
    x = x if sr == synth.SR else resample_poly(x, synth.SR // g, sr // g)
    return np.asarray(x, dtype=np.float32)


def _run_to_wav(cmd: list[str], engine: str, stdin: str | None = None) -> np.ndarray:
    """Run `cmd`, which writes a WAV to the path substituted for "{out}", and read it back at 16 kHz."""
    require(engine)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.wav")
        proc = subprocess.run([out if c == "{out}" else c for c in cmd], input=stdin, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0 or not Path(out).is_file() or Path(out).stat().st_size <= 44:
            raise RuntimeError(f"{engine} failed ({' '.join(cmd[:3])}...): {proc.stderr.strip()[-300:]}")
        x, sr = sf.read(out, dtype="float32")
    return to_16k(x, sr)


def espeak(text: str, voice: str, rate: int = 165, pitch: int = 50) -> np.ndarray:
    require("espeak")
    return synth.espeak(text, voice, rate, pitch)


def festival(text: str, voice: str, stretch: float = 1.0) -> np.ndarray:
    """`voice` is a festival voice name without the ``voice_`` prefix; `stretch` > 1 speaks slower."""
    if voice not in FESTIVAL_VOICES:
        raise ValueError(f"unknown festival voice {voice!r}; expected one of {sorted(FESTIVAL_VOICES)}")
    setup = f"(voice_{voice})" + (f" (Parameter.set 'Duration_Stretch {stretch:.3f})" if stretch != 1.0 else "")
    return _run_to_wav(["text2wave", "-eval", setup, "-o", "{out}"], "festival", stdin=text)


def flite(text: str, voice: str) -> np.ndarray:
    if voice not in FLITE_VOICES:
        raise ValueError(f"unknown flite voice {voice!r}; expected one of {sorted(FLITE_VOICES)}")
    return _run_to_wav(["flite", "-voice", voice, "-t", text, "-o", "{out}"], "flite")


def voices(engine: str) -> list[str]:
    """The voices `engine` speaks with (espeak-ng: the larger training pool)."""
    if engine == "espeak":
        return synth.voices("train", more=True)
    return list(FESTIVAL_VOICES if engine == "festival" else FLITE_VOICES)


def gender(engine: str, voice: str) -> str:
    if engine == "espeak":
        return synth.variant_gender(voice.split("+")[1])
    return (FESTIVAL_VOICES if engine == "festival" else FLITE_VOICES)[voice]


def speak(engine: str, text: str, rng: np.random.Generator, voice: str | None = None,
          speed: float = 1.0) -> tuple[np.ndarray, dict]:
    """`text` in `engine` (a random voice and rate unless given), trimmed, speed-perturbed by `speed`
    and peak-normalised; labels say which engine and voice spoke it."""
    voice = str(rng.choice(voices(engine))) if voice is None else voice
    labels: dict = {"text": text, "engine": engine, "voice": voice, "gender": gender(engine, voice)}
    if engine == "espeak":
        labels.update(rate=int(rng.integers(125, 206)), pitch=int(rng.integers(30, 71)))
        x = espeak(text, voice, labels["rate"], labels["pitch"])
    elif engine == "festival":
        labels["stretch"] = round(float(rng.uniform(0.85, 1.2)), 2)   # festival's own rate control
        x = festival(text, voice, labels["stretch"])
    else:
        x = flite(text, voice)
    x = synth.trim_silence(x)
    if speed != 1.0:
        x, labels["speed"] = synth.speed_perturb(x, speed), speed
    x = synth.normalize(x, 0.9)
    labels["duration"] = synth.seconds(x)
    return x, labels
