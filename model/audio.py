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
CUT_TOLERANCE = 0.01        # seconds past the limit that do not count as cut (rounding)
FRAME_PADDING = 0.2         # seconds a decoder may give past the stream's stated end (AAC: a whole last frame)


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
    limit_seconds: float | None = None               # the max_seconds it was cut to (None: no limit given)

    @property
    def seconds(self) -> float:
        return len(self.wav) / SAMPLE_RATE

    @property
    def cut_seconds(self) -> float:
        return max(0.0, self.original_seconds - self.seconds)

    @property
    def was_cut(self) -> bool:
        return not self.length_known or self.cut_seconds > CUT_TOLERANCE

    @property
    def limit(self) -> float:
        return self.seconds if self.limit_seconds is None else self.limit_seconds

    def cut_note(self) -> str:
        limit = _seconds_text(self.limit)
        length = f"{_seconds_text(self.original_seconds)} s long" if self.length_known else f"longer than {limit} s"
        return (f"The audio is {length}; only the first {_seconds_text(self.seconds)} s are used "
                f"(the limit is {limit} s; the rest was cut).")

    def chunks(self, chunk_seconds: float = 30.0) -> list[np.ndarray]:
        size = int(chunk_seconds * SAMPLE_RATE)
        return [self.wav[i:i + size] for i in range(0, len(self.wav), size)]

    def describe(self) -> str:
        length = f"{self.original_seconds:.2f} s" if self.length_known else f"over {self.seconds:.0f} s"
        text = (f"{length}, {self.original_rate} Hz, {self.original_channels} ch"
                f" -> 16 kHz mono, {self.seconds:.2f} s used")
        if self.was_cut:
            text += f"; the rest was cut (limit {_seconds_text(self.limit)} s)"
        others = [n for n in self.notes if "was cut" not in n]
        return text + "".join(f". {n.rstrip('.')}" for n in others)


def _seconds_text(seconds: float) -> str:
    """412.0 -> "412", 2.5 -> "2.5": whole seconds stay whole, a tenth is kept when there is one."""
    return f"{round(seconds, 1):g}"


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


def _seconds_or_none(value) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if np.isfinite(seconds) and seconds >= 0 else None


def _audio_duration(audio: dict, info: dict, n_streams: int) -> float | None:
    """The audio stream's length. The container's duration is the longest stream's (a video track
    can outlast the audio), so it only stands in when the audio is the file's only stream."""
    seconds = _seconds_or_none(audio.get("duration"))
    if seconds is None and n_streams == 1:
        seconds = _seconds_or_none(info.get("format", {}).get("duration"))
    return seconds         # None e.g. for browser webm recordings, which carry no duration


def _read_with_ffmpeg(path: Path | None, data: bytes | None, max_seconds: float | None
                      ) -> tuple[np.ndarray, int, float | None]:
    """(samples [N] or [N, C], rate, the audio stream's seconds or None when the file does not say)."""
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if ffmpeg is None or ffprobe is None:
        raise AudioError("This audio format needs ffmpeg, which is not installed (apt-get install ffmpeg). "
                         "WAV, FLAC, OGG and MP3 work without it.")
    src = _ffmpeg_input(path)
    probe = _run([ffprobe, "-v", "error", *_FFMPEG_SAFE, "-show_entries",
                  "stream=codec_type,sample_rate,channels,duration:format=duration", "-of", "json", src], data, 60)
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
    total = _audio_duration(audio, info, len(streams))
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
# Where the audio came from, for advice that fits: a file to replace, or a microphone to check.
ORIGINS = {"file": "file", "upload": "file", "microphone": "microphone"}


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


def _mono_mix(samples: np.ndarray) -> np.ndarray:
    """Decoded samples [N] or [N, C] -> float mono, not resampled (a resampler rings at the edges
    of a constant signal and overshoots near full scale, which would mislead the checks)."""
    x = _to_float(np.asarray(samples))
    return x.mean(axis=1) if x.ndim == 2 else x


def _no_sound_advice(origin: str) -> str:
    if ORIGINS[origin] == "microphone":
        return ("Check that the microphone is on and not muted and that the right input device is selected, "
                "then record again.")
    return "The file holds no sound; pick another file."


def _refuse_silence(mono: np.ndarray, origin: str) -> None:
    """Refuse audio with nothing to hear, saying what it holds instead: zeros, a constant DC offset
    (sound is change, so a constant is silent however high it sits), or only a faint level."""
    offset = float(mono.mean(dtype=np.float64)) if mono.size else 0.0
    peak = float(np.abs(mono - offset).max()) if mono.size else 0.0
    level = 20 * np.log10(max(peak, 1e-12))
    if level >= SILENCE_DBFS:
        return
    if not np.any(mono):
        what = "The audio is silent (only digital silence): there is nothing to hear."
    elif abs(offset) >= 10 ** (SILENCE_DBFS / 20):
        what = (f"The audio is silent: it is only a constant DC offset (level {offset:+.3g} of full scale) "
                "with no sound in it, so there is nothing to hear.")
    else:
        what = (f"The audio is silent (peak {level:.0f} dBFS, below {SILENCE_DBFS:.0f} dBFS): "
                "there is nothing to hear.")
    raise AudioError(f"{what} {_no_sound_advice(origin)}")


def _peak_text(peak: float) -> str:
    """Enough digits to show how far past 1.0 the peak is: 6 -> "6", 1.0004 -> "1.0004"."""
    for digits in range(3, 10):
        text = f"{peak:.{digits}g}"
        if float(text) != 1.0:
            return text
    return text


def _fit_full_scale(wav: np.ndarray, raw: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """Scale down float input whose samples go beyond full scale (only float can: integer PCM
    cannot), with a note; then clip the resampler's slight overshoot past 1.0 silently."""
    if raw is None:
        peak = float(np.abs(wav).max()) if wav.size else 0.0
    else:
        peak = float(np.abs(raw).max()) if raw.dtype.kind == "f" and raw.size else 0.0
    notes = []
    if peak > 1.0:
        wav = wav / np.float32(peak)
        notes.append(f"The samples go beyond full scale (peak {_peak_text(peak)}); the audio was scaled down to fit.")
    return np.clip(wav, -1.0, 1.0).astype(np.float32, copy=False), notes


def check_content(wav: np.ndarray, raw: np.ndarray | None = None, *, origin: str = "file"
                  ) -> tuple[np.ndarray, list[str]]:
    """Refuse audio with nothing to hear; note clipping; scale float audio beyond full scale.
    `raw`: the decoded samples before resampling ([N] or [N, C]), which the checks prefer.
    Returns (wav, notes for the user)."""
    _refuse_silence(_mono_mix(raw) if raw is not None and raw.size else wav, origin)
    wav, notes = _fit_full_scale(wav, raw)
    if raw is not None and raw.size:
        clipped = _clipped_fraction(raw)
        if clipped >= CLIP_FRACTION:
            notes.append(f"The audio is clipped ({clipped:.1%} of samples stuck at full scale): it was recorded "
                         "too loud, so answers may be less reliable.")
    return wav, notes


def _audio_length(decoded: float, total: float | None, max_seconds: float) -> tuple[float, bool]:
    """(the audio's length in seconds, whether that length is known). At most max_seconds + 1 s is
    decoded, so what was decoded is all of it unless it passed the limit. Only then is the stated
    length used (the audio stream's, or an array's own), unless it is shorter than what was decoded
    by more than a codec's last padded frame: then the header is wrong, and the length unknown."""
    if decoded <= max_seconds + CUT_TOLERANCE:
        return decoded, True
    if total is None or total < decoded - FRAME_PADDING:
        return decoded, False
    return max(total, decoded), True


def prepare_audio(source: AudioSource, max_seconds: float = 300.0, min_seconds: float = 0.1, *,
                  max_bytes: int | None = MAX_FILE_BYTES, strict: bool = False, origin: str = "file"
                  ) -> PreparedAudio:
    """Read, average channels, resample to 16 kHz and cut to `max_seconds` (of a long file only that
    much is decoded). `strict` (the pipeline's front door) also refuses silence and notes clipping.
    `origin` ("file", "upload" or "microphone") words the advice when there is nothing to hear."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {sorted(ORIGINS)}, not {origin!r}")
    samples, rate, total = _decode(source, max_seconds, max_bytes)
    raw = np.asarray(samples)
    if raw.ndim == 2 and raw.shape[0] < raw.shape[1] and raw.shape[0] <= 8:
        raw = raw.T                                   # [C, N] -> [N, C], as to_mono_16k does
    if total is None and isinstance(source, (tuple, np.ndarray)) and raw.ndim in (1, 2) and rate > 0:
        total = raw.shape[0] / rate                   # an array: all of it is here
    if rate > 0 and raw.ndim in (1, 2):               # resample only what is used (+1 s for the filter edge)
        raw = raw[: int((max_seconds + 1) * rate)]
    wav, channels = to_mono_16k(raw, rate)            # also refuses a bad rate or shape
    original, known = _audio_length(raw.shape[0] / rate, total, max_seconds)
    if original < min_seconds:
        raise AudioError(f"The audio is too short ({original * 1000:.0f} ms); at least {min_seconds:.1f} s "
                         "is needed.")
    wav = wav[: int(max_seconds * SAMPLE_RATE)]
    notes: list[str] = []
    if strict:                                        # judged on the part that is used
        wav, notes = check_content(wav, raw[: int(max_seconds * rate)], origin=origin)
    audio = PreparedAudio(wav=wav, original_seconds=original, original_rate=rate, original_channels=channels,
                          key=hashlib.sha1(wav.tobytes()).hexdigest(), length_known=known, notes=notes,
                          limit_seconds=max_seconds)
    if audio.was_cut:
        audio.notes.insert(0, audio.cut_note())
    return audio


def log_mel(chunks: list[np.ndarray], feature_extractor) -> np.ndarray:
    """Whisper log-mel of each chunk, padded to 30 s: [C, n_mels, 3000]."""
    feats = feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="np")
    return feats["input_features"].astype(np.float32)
