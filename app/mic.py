"""Desktop live microphone through sounddevice (PortAudio).

`MicRecorder` captures from an input device on PortAudio's own thread; the UI (or CLI) polls
`level_db()` for a meter and calls `stop()` (push-to-talk release) or waits for the automatic
stop (`silence_stop` after speech, or `max_seconds`). `audio()` returns `(rate, float32 mono)`,
which `Pipeline.prepare` accepts as is (it resamples to 16 kHz itself, so we record at whatever
rate the device likes best instead of forcing 16 kHz on hardware that may not support it).

sounddevice is optional: without it (or without libportaudio2) the app still starts, and every
entry point here raises `MicError` saying what to install.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from model.errors import SalmonnError

try:
    import sounddevice as sd
    _IMPORT_ERROR: Exception | None = None
except Exception as err:         # OSError when libportaudio2 is missing, ImportError without the package
    sd = None
    _IMPORT_ERROR = err

LEVEL_WINDOW_S = 0.1             # the meter and the silence detector look at the last ~100 ms
FLOOR_DB = -100.0                # what level_db() reports for digital silence (finite, for UI meters)

# PortAudio error codes we turn into specific messages (see portaudio.h).
_PA_INVALID_DEVICE = -9996
_PA_INVALID_SAMPLE_RATE = -9997
_PA_DEVICE_UNAVAILABLE = -9985


class MicError(SalmonnError):
    """The microphone could not be used; the message says why and what to do."""


def available() -> bool:
    return sd is not None


def unavailable_reason() -> str:
    return ("Live microphone is unavailable: sounddevice/PortAudio could not be loaded "
            f"({_IMPORT_ERROR}). Install the system library (Debian/Ubuntu: apt-get install libportaudio2) "
            "and `pip install sounddevice`, or upload an audio file instead.")


def _require():
    if sd is None:
        raise MicError(unavailable_reason())
    return sd


def refresh_devices() -> None:
    """Re-scan devices: PortAudio enumerates them only once, at initialisation (plugged-in
    microphones or a sound server started later are invisible until this). No stream may be open."""
    _require()
    sd._terminate()
    sd._initialize()


def list_input_devices() -> list[dict]:
    """Devices that can record: index, name, channels, default samplerate, hostapi, is-default."""
    _require()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as err:
        raise MicError(f"Could not list audio devices: {err}") from None
    try:
        default_in = sd.query_devices(kind="input")["index"]
    except sd.PortAudioError:              # no default input device at all
        default_in = -1
    return [{"index": d["index"], "name": d["name"], "channels": d["max_input_channels"],
             "samplerate": int(d["default_samplerate"]), "hostapi": hostapis[d["hostapi"]]["name"],
             "default": d["index"] == default_in}
            for d in devices if d["max_input_channels"] > 0]


def _db(x: np.ndarray) -> float:
    if x.size == 0:
        return FLOOR_DB
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return max(FLOOR_DB, 20.0 * np.log10(rms)) if rms > 0 else FLOOR_DB


class MicRecorder:
    """Record from one input device; thread-safe, reusable (each start() begins a new take).

    silence_stop: stop by itself after this many seconds below `silence_db` that follow speech
    (sound above `silence_db`); leading silence never stops it. max_seconds always caps a take.
    `stop_reason` says why it ended: "stopped" (stop() called), "silence", "max_seconds", or
    "device" (the device ended the stream, e.g. unplugged).
    """

    def __init__(self, device: int | str | None = None, samplerate: int | None = None, channels: int = 1,
                 max_seconds: float = 60.0, silence_stop: float | None = None, silence_db: float = -45.0):
        self.device = device
        self.requested_rate = samplerate
        self.channels = channels
        self.max_seconds = max_seconds
        self.silence_stop = silence_stop
        self.silence_db = silence_db
        self.samplerate: int | None = None       # the rate actually used (may fall back)
        self.stop_reason: str | None = None
        self.heard_speech = False
        self.overflows = 0                       # blocks PortAudio dropped because we were too slow
        self._stream = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._reset()

    def _reset(self) -> None:
        with self._lock:
            self._blocks: collections.deque[np.ndarray] = collections.deque()
            self._frames = 0
            self._recent: collections.deque[np.ndarray] = collections.deque()   # last ~100 ms, for the meter
            self._recent_frames = 0
            self._silent_frames = 0
            self.heard_speech = False
            self.stop_reason = None
            self.overflows = 0
        self._done.clear()

    # ------------------------------------------------------------------ device / stream
    def _device_info(self) -> dict:
        try:
            info = sd.query_devices(self.device, kind="input")
        except ValueError as err:              # a name or index that matches no input device
            raise MicError(f"Microphone {self.device!r} not found ({err}). "
                           f"Available inputs: {[d['name'] for d in list_input_devices()] or 'none'}.") from None
        except sd.PortAudioError:
            raise MicError("No microphone found: the system reports no default input device. "
                           "Connect one, or pick a device explicitly.") from None
        if info["max_input_channels"] < 1:
            raise MicError(f"Device {info['name']!r} cannot record (it has no input channels).")
        return info

    def _open(self, info: dict, rate: int):
        # Ask for at most what the device has; we mix down to mono ourselves.
        channels = max(1, min(self.channels, info["max_input_channels"]))
        stream = sd.InputStream(device=info["index"], samplerate=rate, channels=channels, dtype="float32",
                                blocksize=max(1, rate // 50),      # 20 ms blocks: a responsive meter
                                callback=self._callback, finished_callback=self._finished)
        self.samplerate = rate
        self._max_frames = int(self.max_seconds * rate)
        self._window = max(1, int(LEVEL_WINDOW_S * rate))
        return stream

    def start(self) -> "MicRecorder":
        """Begin a new take (push-to-talk: call on press). A no-op while already recording."""
        _require()
        if self.recording:
            return self
        self.close()
        self._reset()
        info = self._device_info()
        default_rate = int(info["default_samplerate"])
        rate = int(self.requested_rate or default_rate)
        try:
            try:
                stream = self._open(info, rate)
            except sd.PortAudioError as err:
                if _code(err) != _PA_INVALID_SAMPLE_RATE or rate == default_rate:
                    raise
                stream = self._open(info, default_rate)   # the device can't do that rate: use its own
            stream.start()
        except sd.PortAudioError as err:
            raise MicError(_explain(err, info["name"])) from None
        self._stream = stream
        return self

    def stop(self) -> tuple[int, np.ndarray]:
        """End the take (push-to-talk: call on release) and return what was captured."""
        if self._stream is not None and self.stop_reason is None and self._stream.active:
            self.stop_reason = "stopped"
        self.close()
        return self.audio()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()        # not abort(): deliver the last buffered block (the take's tail)
            finally:
                stream.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the take ends by itself (silence / max_seconds); True if it did."""
        return self._done.wait(timeout)

    @property
    def recording(self) -> bool:
        return self._stream is not None and self._stream.active

    def __enter__(self) -> "MicRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ audio thread
    def _callback(self, indata, frames, time_info, status) -> None:
        # Runs on PortAudio's thread: only copy and count here, never block or raise (except CallbackStop).
        if status.input_overflow:
            self.overflows += 1
        mono = indata.mean(axis=1) if indata.shape[1] > 1 else indata[:, 0].copy()
        with self._lock:
            room = self._max_frames - self._frames
            mono = mono[:room]
            self._blocks.append(mono)
            self._frames += len(mono)
            self._recent.append(mono)
            self._recent_frames += len(mono)
            while self._recent_frames - len(self._recent[0]) >= self._window:
                self._recent_frames -= len(self._recent.popleft())
            level = _db(np.concatenate(self._recent)[-self._window:])
            if level > self.silence_db:
                self.heard_speech = True
                self._silent_frames = 0
            else:
                self._silent_frames += len(mono)
            if self._frames >= self._max_frames:
                self.stop_reason = "max_seconds"
            elif (self.silence_stop is not None and self.heard_speech
                  and self._silent_frames >= self.silence_stop * self.samplerate):
                self.stop_reason = "silence"
            else:
                return
        raise sd.CallbackStop

    def _finished(self) -> None:
        if self.stop_reason is None:       # neither we nor the callback stopped it: the device did
            self.stop_reason = "device"
        self._done.set()

    # ------------------------------------------------------------------ readers (any thread)
    def level_db(self) -> float:
        """RMS level of the last ~100 ms in dBFS (FLOOR_DB when silent or not started)."""
        with self._lock:
            if not self._recent:
                return FLOOR_DB
            recent = np.concatenate(self._recent)[-self._window:]
        return _db(recent)

    @property
    def seconds(self) -> float:
        return self._frames / self.samplerate if self.samplerate else 0.0

    def audio(self) -> tuple[int, np.ndarray]:
        """(rate, float32 mono) of the take so far; exactly what Pipeline.prepare accepts."""
        with self._lock:
            samples = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.float32)
        return (self.samplerate or int(self.requested_rate or 16000), samples.astype(np.float32, copy=False))


def _code(err) -> int | None:
    return err.args[1] if len(err.args) > 1 and isinstance(err.args[1], int) else None


def _explain(err, name: str) -> str:
    code = _code(err)
    if code == _PA_DEVICE_UNAVAILABLE:
        return f"Microphone {name!r} is busy or unavailable (another program may be using it): {err}"
    if code == _PA_INVALID_DEVICE:
        return f"Microphone {name!r} is not a valid input device any more (unplugged?): {err}"
    if code == _PA_INVALID_SAMPLE_RATE:
        return f"Microphone {name!r} supports neither the requested nor its default sample rate: {err}"
    return f"Could not record from {name!r}: {err}"


def record_until_silence(device: int | str | None = None, silence_stop: float = 1.5, max_seconds: float = 30.0,
                         silence_db: float = -45.0, samplerate: int | None = None,
                         on_level=None) -> tuple[int, np.ndarray]:
    """Record one utterance: returns after `silence_stop` s of silence following speech, or at
    `max_seconds`. `on_level(db)` is called ~10x a second (e.g. to draw a CLI meter)."""
    rec = MicRecorder(device=device, samplerate=samplerate, max_seconds=max_seconds,
                      silence_stop=silence_stop, silence_db=silence_db)
    rec.start()
    try:
        while not rec.wait(0.1):
            if on_level is not None:
                on_level(rec.level_db())
    finally:
        rec.close()
    return rec.audio()


if __name__ == "__main__":      # python -m app.mic [--list] [out.wav]
    import sys

    if "--list" in sys.argv:
        for d in list_input_devices():
            print(f"{'*' if d['default'] else ' '} {d['index']:3d} {d['name']} ({d['channels']} ch, "
                  f"{d['samplerate']} Hz, {d['hostapi']})")
        sys.exit(0)
    print("Speak; recording stops after 1.5 s of silence.", file=sys.stderr)
    rate, wav = record_until_silence(
        on_level=lambda db: print(f"\r{'#' * int(max(0, db + 60) // 2):30s} {db:6.1f} dBFS", end="", file=sys.stderr))
    print(f"\n{len(wav) / rate:.2f} s at {rate} Hz", file=sys.stderr)
    if len(sys.argv) > 1:
        import soundfile as sf
        sf.write(sys.argv[-1], wav, rate)
