"""Synthesize the bundled example clips in assets/examples/ (license-clean: espeak-ng speech and
numpy-made sounds). Deterministic (fixed seeds), 16 kHz mono 16-bit WAV, <= 8 s, < 300 KB each.

    python -m app.make_examples            # (re)write all clips
    python -m app.make_examples --check    # only verify the committed clips' format

What each clip holds is described in app/presets.py (EXAMPLES); keep the texts there in sync with
SPEECH below, because the scale lab scores reference answers against them.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter, resample_poly

RATE = 16000
OUT_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
MAX_SECONDS = 8.0
MAX_BYTES = 300_000

# Spoken texts (espeak-ng voice, text). The same texts are the ASR references in app/presets.py.
SPEECH = {
    "speech": ("en-us", "The quick brown fox jumps over the lazy dog near the river bank."),
    "question": ("en-us+f3", "What is the tallest mountain in the world?"),
    "request": ("en-gb", "Please set an alarm for seven thirty tomorrow morning."),
    "umbrella": ("en-us+f2", "Should I take an umbrella when I go outside?"),
    "speaker_a": ("en-us", "I will meet you at the station at noon."),
    "speaker_b": ("en-gb-scotland+f4", "The weather has been lovely all week."),
    # A held-out sentence of SALMONN-tiny's training domain in a held-out voice (the m3 variant is
    # never heard in training): the clip its ASR test transcribes.
    "dictation": ("en-us+m3", "Have you seen my purple book anywhere, Mia?"),
}


def speak(voice: str, text: str, speed: int = 150) -> np.ndarray:
    """espeak-ng -> float32 16 kHz mono."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng); it is needed to synthesize speech.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
        wav, rate = sf.read(path, dtype="float32")
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if rate != RATE:
        g = np.gcd(rate, RATE)
        wav = resample_poly(wav, RATE // g, rate // g).astype(np.float32)
    return _trim_silence(wav)


def _trim_silence(wav: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wav) > threshold)
    if loud.size == 0:
        return wav
    return wav[max(0, loud[0] - 800): loud[-1] + 1600]


def rain(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Rain: pink-ish noise plus sparse random droplet clicks."""
    n = int(seconds * RATE)
    white = rng.standard_normal(n).astype(np.float32)
    # A one-pole low-pass keeps the hiss soft; droplets are short decaying bursts.
    pink = lfilter([0.03], [1.0, -0.97], white).astype(np.float32)
    pink /= np.abs(pink).max() + 1e-9
    drops = np.zeros(n, dtype=np.float32)
    decay = np.exp(-np.arange(240) / 30.0).astype(np.float32)
    for start in rng.integers(0, n - 240, size=int(seconds * 40)):
        drops[start:start + 240] += decay * rng.uniform(0.2, 0.7) * rng.choice([-1, 1])
    return 0.5 * pink + 0.25 * drops


def beeps(seconds: float, freq: float = 1000.0, period: float = 1.0, length: float = 0.2) -> np.ndarray:
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    gate = ((t % period) < length).astype(np.float32)
    ramp = np.convolve(gate, np.ones(80) / 80, mode="same")  # soften clicks at the edges
    return (np.sin(2 * np.pi * freq * t) * ramp).astype(np.float32)


def melody(rng: np.random.Generator) -> np.ndarray:
    """A slow major-key tune with a bass note per bar: plucked tones with harmonics."""
    notes = [60, 64, 67, 72, 71, 67, 64, 62, 60, 62, 64, 67, 65, 64, 62, 60]   # MIDI
    bass = [48, 48, 43, 43]
    beat = 0.4
    total = int(len(notes) * beat * RATE)
    out = np.zeros(total + RATE, dtype=np.float32)

    def tone(midi: int, seconds: float, gain: float) -> np.ndarray:
        f = 440.0 * 2 ** ((midi - 69) / 12)
        t = np.arange(int(seconds * RATE)) / RATE
        env = np.exp(-t * 3.0) * np.minimum(1, t * 200)
        wave = sum(np.sin(2 * np.pi * f * k * t) / k ** 1.5 for k in (1, 2, 3, 4))
        return (gain * env * wave).astype(np.float32)

    for i, m in enumerate(notes):
        s = int(i * beat * RATE)
        piece = tone(m, beat * 2, 0.35)
        out[s:s + len(piece)] += piece[: len(out) - s]
    for i, m in enumerate(bass):
        s = int(i * 4 * beat * RATE)
        piece = tone(m, beat * 4, 0.3)
        out[s:s + len(piece)] += piece[: len(out) - s]
    return out[:total]


def place(background: np.ndarray, fg: np.ndarray, at: float) -> np.ndarray:
    out = background.copy()
    s = int(at * RATE)
    end = min(len(out), s + len(fg))
    out[s:end] += fg[: end - s]
    return out


def normalize(wav: np.ndarray, peak: float = 0.9) -> np.ndarray:
    return (wav / (np.abs(wav).max() + 1e-9) * peak).astype(np.float32)


def build() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    clips: dict[str, np.ndarray] = {}
    for name in ("speech", "question", "request", "dictation"):
        voice, text = SPEECH[name]
        clips[name] = speak(voice, text)
    # Two different voices one after the other (speaker verification: same or different speaker?).
    a = speak(*SPEECH["speaker_a"])
    b = speak(*SPEECH["speaker_b"])
    clips["two_speakers"] = np.concatenate([a, np.zeros(int(0.5 * RATE), np.float32), b])
    # The same two voices overlapping by about half (overlapped-speech recognition).
    overlap = np.zeros(max(len(a), int(len(a) * 0.4) + len(b)), np.float32)
    overlap = place(place(overlap, a, 0.0), 0.9 * b, len(a) * 0.4 / RATE)
    clips["overlap"] = overlap
    # Sound scene: rain with a beeping device (captioning, storytelling).
    clips["rain_beeps"] = rain(6.0, rng) + 0.25 * beeps(6.0, freq=1200.0, period=1.5, length=0.25)
    clips["melody"] = melody(rng)
    # A spoken question that only the background answers (speech-audio co-reasoning).
    voice, text = SPEECH["umbrella"]
    speech = speak(voice, text)
    clips["speech_rain"] = place(0.6 * rain(len(speech) / RATE + 1.5, rng), speech * 1.2, 0.75)
    return {name: normalize(wav) for name, wav in clips.items()}


def check(directory: Path = OUT_DIR) -> list[str]:
    """Problems with the committed clips (empty list = all fine)."""
    problems = []
    files = sorted(directory.glob("*.wav"))
    if not files:
        problems.append(f"no clips in {directory}")
    for f in files:
        info = sf.info(f)
        if info.samplerate != RATE or info.channels != 1:
            problems.append(f"{f.name}: {info.samplerate} Hz x {info.channels} ch (want 16 kHz mono)")
        if info.duration > MAX_SECONDS:
            problems.append(f"{f.name}: {info.duration:.1f} s (limit {MAX_SECONDS} s)")
        if f.stat().st_size > MAX_BYTES:
            problems.append(f"{f.name}: {f.stat().st_size} bytes (limit {MAX_BYTES})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="only verify the clips")
    args = parser.parse_args(argv)
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, wav in build().items():
            wav = wav[: int(MAX_SECONDS * RATE)]
            path = args.out / f"{name}.wav"
            sf.write(path, wav, RATE, subtype="PCM_16")
            print(f"{path}  {len(wav) / RATE:.2f} s  {path.stat().st_size // 1024} KB")
    problems = check(args.out)
    for p in problems:
        print("problem:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
