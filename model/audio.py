"""Audio front end: any file or array -> 16 kHz mono float32, cut into 30 s chunks.

The official code reads channel 0 and never resamples (a 44.1 kHz upload silently gives wrong
features); we average channels and resample with a polyphase filter instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from .errors import AudioError

SAMPLE_RATE = 16000
AudioSource = Union[str, Path, bytes, np.ndarray, tuple]
# A sanity bound on files and bytes given to the pipeline (memory); the app's upload cap is lower.
MAX_FILE_BYTES = 512 * 2**20


@dataclass
class PreparedAudio:
    """What the model hears: 16 kHz mono float32, already cut to the configured maximum."""
    wav: np.ndarray
    original_seconds: float       # the whole input (at least this long when not length_known)
    original_rate: int
    original_channels: int
    key: str                      # content hash: the cache key for encoder outputs
    length_known: bool = True     # False: cut, and the container did not say how long it was
    notes: list[str] = field(default_factory=list)   # for the user: cut, clipped, scaled

    @property
    def seconds(self) -> float:
        return len(self.wav) / SAMPLE_RATE

    @property
    def cut_seconds(self) -> float:
        return max(0.0, self.original_seconds - self.seconds)

    @property
    def was_cut(self) -> bool:
        return not self.length_known or self.cut_seconds > 0.01

    def cut_note(self) -> str:
        length = f"{self.original_seconds:.0f} s long" if self.length_known else f"longer than {self.seconds:.0f} s"
        return f"The audio is {length}; only the first {self.seconds:.0f} s are used (the rest was cut)."

    def chunks(self, chunk_seconds: float = 30.0) -> list[np.ndarray]:
        size = int(chunk_seconds * SAMPLE_RATE)
        return [self.wav[i:i + size] for i in range(0, len(self.wav), size)]

    def describe(self) -> str:
        length = f"{self.original_seconds:.2f} s" if self.length_known else f"over {self.seconds:.0f} s"
        text = (f"{length}, {self.original_rate} Hz, {self.original_channels} ch"
                f" -> 16 kHz mono, {self.seconds:.2f} s used")
        if self.was_cut:
            text += f"; the rest was cut (limit {self.seconds:.0f} s)"
        others = [n for n in self.notes if "was cut" not in n]
        return text + "".join(f". {n.rstrip('.')}" for n in others)


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


# Containers ffmpeg may open for us. A whitelist, because ffmpeg also reads playlists (HLS, concat)
# that can pull in other local files or URLs: an upload must only ever be decoded as itself.
_FFMPEG_FORMATS = "wav,w64,aiff,flac,mp3,ogg,mov,matroska,aac,ac3,eac3,amr,au,caf,asf,wv,mpeg"
_FFMPEG_SAFE = ["-protocol_whitelist", "file,pipe", "-format_whitelist", _FFMPEG_FORMATS]


def _ffmpeg_input(path: Path | None) -> str:
    # "file:" so a name like "concat:a|b" or "http://..." is never read as a protocol
    return "pipe:0" if path is None else f"file:{path.resolve()}"


def _run(cmd: list[str], data: bytes | None, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=data, capture_output=True, timeout=timeout,
                              stdin=None if data is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AudioError(f"Decoding the audio took longer than {timeout:.0f} s; try a shorter or "
                         "simpler file (wav, flac, mp3).") from None


def _read_with_ffmpeg(path: Path | None, data: bytes | None, max_seconds: float | None
                      ) -> tuple[np.ndarray, int, float | None]:
    """(samples [N] or [N, C], rate, total seconds or None when the container does not say)."""
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if ffmpeg is None or ffprobe is None:
        raise AudioError("This audio format needs ffmpeg, which is not installed (apt-get install ffmpeg). "
                         "WAV, FLAC, OGG and MP3 work without it.")
    src = _ffmpeg_input(path)
    probe = _run([ffprobe, "-v", "error", *_FFMPEG_SAFE, "-show_entries",
                  "stream=codec_type,sample_rate,channels:format=duration", "-of", "json", src], data, 60)
    try:
        info = json.loads(probe.stdout or b"{}")
    except ValueError:
        info = {}
    streams = info.get("streams") or []
    audio = next((st for st in streams if st.get("codec_type") == "audio"), None)
    if audio is None:
        what = "it has no audio stream (an image or a silent video?)" if streams else \
            "it is not an audio format we read, or it is damaged or truncated"
        raise AudioError(f"The file is not audio that can be decoded: {what}. Accepted: wav, flac, ogg, mp3, "
                         "m4a, webm, opus, aiff.")
    rate, channels = int(audio.get("sample_rate") or 0), int(audio.get("channels") or 0)
    if rate <= 0 or channels <= 0:
        raise AudioError("The audio stream is damaged: it has no sample rate or no channels.")
    try:
        total = float(info.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        total = None           # e.g. browser webm recordings carry no duration
    limit = [] if max_seconds is None else ["-t", f"{max_seconds + 1:.3f}"]
    out = _run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *_FFMPEG_SAFE, "-i", src,
                "-map", "0:a:0", *limit, "-f", "f32le", "-acodec", "pcm_f32le", "-"], data, 300)
    samples = np.frombuffer(out.stdout, dtype=np.float32)
    if out.returncode != 0 and samples.size < channels:
        raise AudioError("The audio file is damaged or truncated and could not be decoded: "
                         + out.stderr.decode(errors="replace").strip()[-200:])
    if samples.size < channels:
        raise AudioError("The audio file is damaged or truncated: no audio samples could be decoded.")
    samples = samples[: samples.size // channels * channels]
    return (samples.reshape(-1, channels) if channels > 1 else samples), rate, total


def _read_with_soundfile(source, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    """Read at most max_seconds (+1 s, so we know when there was more) without decoding the rest."""
    with sf.SoundFile(source) as f:
        rate, frames = f.samplerate, f.frames
        want = frames if max_seconds is None else min(frames, int((max_seconds + 1) * rate))
        samples = f.read(want, dtype="float32", always_2d=False)
    return samples, int(rate), frames / rate if rate else 0.0


def _decode(source: AudioSource, max_seconds: float | None = None, max_bytes: int | None = None
            ) -> tuple[np.ndarray, int, float | None]:
    """(samples, rate, total seconds of the whole input, None when unknown)."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("Audio tuples must be (sample_rate, samples).")
        rate, samples = source
        if isinstance(rate, np.ndarray):            # accept (samples, rate) too
            rate, samples = samples, rate
        try:
            rate = int(rate)
        except (TypeError, ValueError):
            raise AudioError(f"The sample rate must be a number of Hz, not {rate!r}.") from None
        return np.asarray(samples), rate, None
    if isinstance(source, np.ndarray):
        return source, SAMPLE_RATE, None
    path, data = None, None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"Audio file not found: {path}")
        size = path.stat().st_size
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        size = len(data)
    else:
        raise AudioError(f"Unsupported audio input of type {type(source).__name__}.")
    if size == 0:
        raise AudioError("The audio file is empty (0 bytes).")
    if max_bytes is not None and size > max_bytes:
        raise AudioError(f"The audio file is too large ({size / 2**20:.1f} MB); the limit is "
                         f"{max_bytes / 2**20:.0f} MB. Cut it shorter or compress it (mp3, ogg, m4a).")
    try:
        return _read_with_soundfile(str(path) if path is not None else io.BytesIO(data), max_seconds)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):  # not a libsndfile format: try ffmpeg
        return _read_with_ffmpeg(path, data, max_seconds)


def read_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decode a file path, raw bytes, `(rate, samples)` (Gradio's numpy form) or a 16 kHz array."""
    samples, rate, _ = _decode(source)
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
        raise AudioError(f"Unsupported sample rate {rate} Hz; accepted: 1 kHz to 384 kHz (8 to 192 kHz is usual).")
    if not np.all(np.isfinite(samples)):
        raise AudioError("The audio contains NaN or infinite samples; it is corrupt. Export it again as "
                         "16-bit or float WAV.")
    if rate != SAMPLE_RATE:
        ratio = Fraction(SAMPLE_RATE, rate).limit_denominator(1000)
        samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    return np.ascontiguousarray(samples, dtype=np.float32), channels


SILENCE_DBFS = -60.0        # peak level (DC removed) below which there is nothing to hear
CLIP_FRACTION = 0.005       # this share of samples stuck at full scale counts as clipped


def _clipped_fraction(samples: np.ndarray) -> float:
    """Share of samples in flat runs at full scale (clipping), before channels are mixed: a loud
    clean tone touches full scale only at isolated samples, a clipped one stays there."""
    x = _to_float(np.asarray(samples)) if samples.dtype.kind != "f" else np.asarray(samples)
    if x.ndim == 2 and x.shape[0] < x.shape[1] and x.shape[0] <= 8:
        x = x.T
    if x.shape[0] < 2:
        return 0.0
    at_max = np.abs(x) >= 0.99
    flat = at_max[1:] & (x[1:] == x[:-1])
    return float(flat.mean())


def check_content(wav: np.ndarray, raw: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """Refuse audio with nothing to hear; note clipping; scale float audio beyond full scale.
    Returns (wav, notes for the user)."""
    notes = []
    centred = wav - wav.mean(dtype=np.float64)
    peak = float(np.abs(centred).max()) if wav.size else 0.0
    level = 20 * np.log10(max(peak, 1e-12))
    if level < SILENCE_DBFS:
        how = "only digital silence" if peak == 0 else f"peak {level:.0f} dBFS, below {SILENCE_DBFS:.0f} dBFS"
        raise AudioError(f"The audio is silent ({how}): there is nothing to hear. Check that the microphone is on "
                         "and not muted, or upload another file.")
    top = float(np.abs(wav).max())
    if top > 1.0:
        wav = (wav / top).astype(np.float32)
        notes.append(f"The samples go beyond full scale (peak {top:.3g}); the audio was scaled down to fit.")
    if raw is not None and raw.size:
        clipped = _clipped_fraction(raw)
        if clipped >= CLIP_FRACTION:
            notes.append(f"The audio is clipped ({clipped:.1%} of samples stuck at full scale): it was recorded "
                         "too loud, so answers may be less reliable.")
    return wav, notes


def prepare_audio(source: AudioSource, max_seconds: float = 300.0, min_seconds: float = 0.1, *,
                  max_bytes: int | None = MAX_FILE_BYTES, strict: bool = False) -> PreparedAudio:
    """Read, average channels, resample to 16 kHz and cut to `max_seconds` (of a long file only that
    much is decoded). `strict` (the pipeline's front door) also refuses silence and notes clipping."""
    samples, rate, total = _decode(source, max_seconds, max_bytes)
    raw = np.asarray(samples)
    if raw.ndim == 2 and raw.shape[0] < raw.shape[1] and raw.shape[0] <= 8:
        raw = raw.T                                   # [C, N] -> [N, C], as to_mono_16k does
    if total is None and isinstance(source, (tuple, np.ndarray)) and raw.ndim in (1, 2) and rate > 0:
        total = raw.shape[0] / rate                   # an array: all of it is here
    if rate > 0 and raw.ndim in (1, 2):               # resample only what is used (+1 s for the filter edge)
        raw = raw[: int((max_seconds + 1) * rate)]
    wav, channels = to_mono_16k(raw, rate)
    decoded = len(wav) / SAMPLE_RATE
    known = total is not None or decoded <= max_seconds
    original = max(total or 0.0, decoded) if total is not None else decoded
    if original < min_seconds:
        raise AudioError(f"The audio is too short ({original * 1000:.0f} ms); at least {min_seconds:.1f} s "
                         "is needed.")
    wav = wav[: int(max_seconds * SAMPLE_RATE)]
    notes: list[str] = []
    if strict:
        wav, notes = check_content(wav, raw)
    audio = PreparedAudio(wav=wav, original_seconds=original, original_rate=rate, original_channels=channels,
                          key=hashlib.sha1(wav.tobytes()).hexdigest(), length_known=known, notes=notes)
    if audio.was_cut:
        audio.notes.insert(0, audio.cut_note())
    return audio


def log_mel(chunks: list[np.ndarray], feature_extractor) -> np.ndarray:
    """Whisper log-mel of each chunk, padded to 30 s: [C, n_mels, 3000]."""
    feats = feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="np")
    return feats["input_features"].astype(np.float32)
