"""Real live-microphone tests: a private PulseAudio daemon with a null sink acts as a virtual
microphone. Clips are played into the sink with `paplay`; MicRecorder records the sink's monitor
through PortAudio -> ALSA "pulse" plugin -> PulseAudio. Nothing is mocked on the capture path.

Needs (Debian): pulseaudio, pulseaudio-utils (pactl, paplay), libasound2-plugins (ALSA "pulse"
device), libportaudio2; espeak-ng for the speech tests. Missing pieces skip locally, fail under CI.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import correlate, resample_poly

from app import mic

SINK = "vmic"
DEVICE = "pulse"                 # PortAudio's ALSA device backed by libasound2-plugins
SENTENCE = "please turn on the kitchen lights and play some music"


def _require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} -- CI must run the live-microphone tests")
    pytest.skip(what)


def _alsa_pulse_plugin() -> bool:
    return any(glob.glob(d + "/libasound_module_pcm_pulse.so")
               for d in ("/usr/lib/*/alsa-lib", "/usr/lib/alsa-lib", "/usr/lib64/alsa-lib"))


@pytest.fixture(scope="module")
def virtual_mic():
    missing = [b for b in ("pulseaudio", "pactl", "paplay", "parec") if shutil.which(b) is None]
    _require(not missing, f"missing {missing}: apt-get install pulseaudio pulseaudio-utils")
    _require(_alsa_pulse_plugin(), "ALSA pulse plugin missing: apt-get install libasound2-plugins")
    _require(mic.available(), mic.unavailable_reason())

    tmp = Path(tempfile.mkdtemp(prefix="vmic-"))     # short path: unix sockets allow ~108 chars
    socket = tmp / "native"
    (tmp / "client.conf").write_text("autospawn = no\n")   # never let libpulse start a real daemon
    daemon_env = {**os.environ, "HOME": str(tmp), "XDG_RUNTIME_DIR": str(tmp),
                  "PULSE_RUNTIME_PATH": str(tmp / "runtime"), "PULSE_STATE_PATH": str(tmp / "state")}
    client_env = {"PULSE_SERVER": f"unix:{socket}", "PULSE_CLIENTCONFIG": str(tmp / "client.conf"),
                  "PULSE_COOKIE": str(tmp / "cookie")}
    saved = {k: os.environ.get(k) for k in client_env}
    log = open(tmp / "pulseaudio.log", "w")
    # -n: no default.pa (no hardware modules); runs fine as root too (it only warns).
    proc = subprocess.Popen(
        ["pulseaudio", "--daemonize=no", "--system=false", "-n", "--exit-idle-time=-1", "--disallow-exit",
         "--use-pid-file=no", "--disable-shm=yes", "--realtime=no", "--high-priority=no", "--log-target=stderr",
         f"--load=module-native-protocol-unix auth-anonymous=1 auth-cookie-enabled=0 socket={socket}"],
        env=daemon_env, stdout=log, stderr=subprocess.STDOUT)
    keeper = None
    os.environ.update(client_env)      # the ALSA plugin (libpulse) in this process and paplay read these
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("PulseAudio did not start:\n" + (tmp / "pulseaudio.log").read_text()[-3000:])
            time.sleep(0.2)
        for cmd in (["load-module", "module-null-sink", f"sink_name={SINK}", "rate=48000", "channels=1"],
                    ["set-default-sink", SINK], ["set-default-source", f"{SINK}.monitor"]):
            subprocess.run(["pactl", *cmd], check=True, capture_output=True)
        # An idle null sink renders in 2 s blocks, so a new recording would get its first audio
        # up to 2 s late, in one burst that overflows ALSA's buffer. A low-latency listener keeps
        # it ticking every 10 ms, like a real microphone.
        keeper = subprocess.Popen(["parec", f"--device={SINK}.monitor", "--latency-msec=10", "--raw"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mic.refresh_devices()          # PortAudio probed devices before the daemon existed
        names = [d["name"] for d in mic.list_input_devices()]
        assert DEVICE in names, f"PortAudio has no {DEVICE!r} input: {names}"
        yield tmp
    finally:
        for p in (keeper, proc) if keeper else (proc,):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
        try:
            mic.refresh_devices()      # forget the dead daemon's device (autospawn still off here)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- helpers
def _tone_clip(path: Path, rate: int = 48000) -> np.ndarray:
    """0.6 s 440 Hz, 0.6 s 880 Hz, 0.6 s both: distinctive enough to align and check."""
    t = np.arange(int(0.6 * rate)) / rate
    parts = [np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t),
             0.5 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 880 * t))]
    fade = np.minimum(1, np.minimum(t, t[::-1]) / 0.01)              # 10 ms ramps: no clicks
    clip = (0.5 * np.concatenate([p * fade for p in parts])).astype(np.float32)
    sf.write(path, clip, rate, subtype="PCM_16")
    return clip


def _play(path: Path) -> subprocess.Popen:
    return subprocess.Popen(["paplay", f"--device={SINK}", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _live(rec: mic.MicRecorder) -> mic.MicRecorder:
    """Wait for the first captured block (so timings below measure recording, not stream start)."""
    deadline = time.monotonic() + 5
    while rec.seconds == 0:
        assert time.monotonic() < deadline, "no audio arrived from the virtual microphone"
        time.sleep(0.01)
    return rec


def _record_playback(clip_path: Path, **kwargs) -> tuple[mic.MicRecorder, float, list[float]]:
    """Record while the clip plays (after 0.5 s of lead-in); returns recorder, lead-in level, meter."""
    rec = _live(mic.MicRecorder(device=DEVICE, **kwargs).start())
    time.sleep(0.5)
    quiet = rec.level_db()
    player = _play(clip_path)
    levels, deadline = [], time.monotonic() + 20
    while not rec.wait(0.05) and time.monotonic() < deadline:
        levels.append(rec.level_db())
    out, _ = player.communicate(timeout=10)
    assert player.returncode == 0, out
    rec.stop()
    return rec, quiet, levels


def _align(recorded: np.ndarray, rate: int, clip: np.ndarray, clip_rate: int) -> tuple[int, float, np.ndarray]:
    """Best lag of the clip inside the recording and its normalised correlation (1 = identical)."""
    ref = resample_poly(clip, rate, clip_rate).astype(np.float64)
    rec = recorded.astype(np.float64)
    assert len(rec) >= len(ref), f"recording ({len(rec)}) shorter than the clip ({len(ref)})"
    xc = correlate(rec, ref, mode="valid", method="fft")
    energy = np.concatenate([[0.0], np.cumsum(rec ** 2)])
    window = np.sqrt(energy[len(ref):] - energy[:-len(ref)]) * np.linalg.norm(ref) + 1e-12
    score = xc / window
    lag = int(np.argmax(score))
    return lag, float(score[lag]), ref


def _peaks(x: np.ndarray, rate: int, n: int = 2) -> list[float]:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    top = []
    for i in np.argsort(spec)[::-1]:
        if all(abs(freqs[i] - f) > 50 for f in top):
            top.append(float(freqs[i]))
        if len(top) == n:
            return top
    return top


def _dbfs(x: np.ndarray) -> float:
    return mic._db(x)


# ---------------------------------------------------------------------- tests
def test_without_portaudio_clear_error(monkeypatch):
    monkeypatch.setattr(mic, "sd", None)
    assert not mic.available()
    with pytest.raises(mic.MicError, match="libportaudio2"):
        mic.list_input_devices()
    with pytest.raises(mic.MicError, match="sounddevice"):
        mic.MicRecorder().start()


def test_lists_virtual_device(virtual_mic):
    devices = {d["name"]: d for d in mic.list_input_devices()}
    pulse = devices[DEVICE]
    assert pulse["channels"] >= 1 and pulse["samplerate"] > 0 and isinstance(pulse["index"], int)
    assert sum(d["default"] for d in devices.values()) <= 1


def test_tone_pattern_captured_and_stops_on_silence(virtual_mic, tmp_path):
    clip = _tone_clip(tmp_path / "tones.wav")
    rec, quiet, levels = _record_playback(tmp_path / "tones.wav", silence_stop=0.8, max_seconds=20)
    rate, wav = rec.audio()
    assert wav.dtype == np.float32 and wav.ndim == 1 and rate == rec.samplerate

    # Stop-on-silence ended the take, not the cap or the test's own timeout.
    assert rec.stop_reason == "silence", (rec.stop_reason, len(wav) / rate)
    assert len(wav) / rate < 0.5 + 1.8 + 0.8 + 3.0
    assert _dbfs(wav[-int(0.5 * rate):]) < rec.silence_db

    # Meter: silent before playback, well above the floor during it.
    assert quiet < rec.silence_db, quiet
    assert max(levels) > -15, max(levels)            # the clip plays at ~-9 dBFS RMS

    # What was recorded is the clip: aligned correlation, and the right tone in each part.
    lag, score, ref = _align(wav, rate, clip, 48000)
    assert score > 0.8, score
    seg = int(0.6 * rate)
    inner = slice(int(0.1 * rate), seg - int(0.1 * rate))        # skip the edges of each part
    parts = [wav[lag + k * seg:][inner] for k in range(3)]
    assert abs(_peaks(parts[0], rate, 1)[0] - 440) < 10
    assert abs(_peaks(parts[1], rate, 1)[0] - 880) < 10
    assert sorted(round(f / 10) * 10 for f in _peaks(parts[2], rate, 2)) == [440, 880]
    # Level after the clip ends is back below the threshold (that is what stopped it).
    assert _dbfs(wav[lag + len(ref) + int(0.1 * rate):]) < rec.silence_db


def test_push_to_talk_and_max_seconds(virtual_mic):
    rec = mic.MicRecorder(device=DEVICE)
    _live(rec.start())
    assert rec.recording and rec.start() is rec           # second press while held: no-op
    time.sleep(0.6)
    rate, wav = rec.stop()                                 # release
    assert rec.stop_reason == "stopped" and not rec.recording
    assert 0.4 * rate < len(wav) <= 0.8 * rate

    capped = mic.MicRecorder(device=DEVICE, max_seconds=0.5).start()
    assert capped.wait(10), "max_seconds did not stop the recording"
    rate, wav = capped.stop()
    assert capped.stop_reason == "max_seconds" and len(wav) == int(0.5 * rate)

    with mic.MicRecorder(device=DEVICE) as again:          # a new take starts empty
        time.sleep(0.2)
    assert again.stop_reason == "stopped" and len(again.audio()[1]) < 0.5 * again.samplerate


def test_device_errors(virtual_mic):
    with pytest.raises(mic.MicError, match="not found"):
        mic.MicRecorder(device="no-such-microphone").start()
    default_rate = {d["name"]: d for d in mic.list_input_devices()}[DEVICE]["samplerate"]
    rec = _live(mic.MicRecorder(device=DEVICE, samplerate=1_000_000).start())   # unsupported: falls back
    rate, wav = rec.stop()
    assert rate == default_rate and len(wav) > 0


# ---------------------------------------------------------------------- speech (espeak-ng)
@pytest.fixture(scope="module")
def spoken(virtual_mic, tmp_path_factory):
    """The sentence spoken by espeak-ng into the virtual mic and recorded until silence."""
    _require(shutil.which("espeak-ng") is not None, "espeak-ng missing: apt-get install espeak-ng")
    path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), SENTENCE], check=True, capture_output=True)
    rec, _, levels = _record_playback(path, silence_stop=1.0, max_seconds=30)
    assert rec.stop_reason == "silence", rec.stop_reason
    clip, clip_rate = sf.read(path, dtype="float32")
    return rec.audio(), (clip_rate, clip), levels


def test_speech_captured_for_pipeline(spoken):
    from model.audio import SAMPLE_RATE, prepare_audio

    (rate, wav), (clip_rate, clip), levels = spoken
    _, score, _ = _align(wav, rate, clip, clip_rate)
    assert score > 0.8, score
    assert max(levels) > -35
    prepared = prepare_audio((rate, wav))                  # what Pipeline.prepare does with a mic take
    assert prepared.original_rate == rate and prepared.wav.dtype == np.float32
    assert abs(len(prepared.wav) - len(wav) * SAMPLE_RATE / rate) <= 2


@pytest.fixture(scope="module")
def trained_config():
    from model.errors import SalmonnError

    try:
        from model.defaults import default_config
    except ImportError as err:
        pytest.skip(f"model/defaults.py with default_config() is not available yet ({err})")
    try:
        cfg = default_config()
    except SalmonnError as err:          # it refuses to build a config without its trained weights
        pytest.skip(f"trained weights absent: {err}")
    paths = {"ckpt": cfg.ckpt, "whisper_path": cfg.whisper_path, "llama_path": cfg.llama_path}
    absent = [f"{k}={v!r}" for k, v in paths.items() if not v or not Path(v).exists()]
    if absent:
        pytest.skip(f"trained weights absent from assets: {', '.join(absent)}")
    return cfg


def test_pipeline_answers_about_the_whole_mic_take(trained_config, spoken):
    """The desktop-mic take feeds the default model end to end: every window of the take becomes
    audio tokens (one per query) and the model answers."""
    import math

    from model.pipeline import Pipeline

    (rate, wav), _, _ = spoken
    pipe = Pipeline.from_config(trained_config)
    enc = pipe.encode((rate, wav))
    seconds = len(wav) / rate
    assert enc.audio.seconds == pytest.approx(seconds, abs=0.01)
    windows = math.ceil(math.ceil(seconds * 50) / 17)                              # trim_to_audio windows
    assert len(enc.tokens.window_starts) == windows
    assert enc.tokens.embeds.shape[0] == windows * trained_config.qformer.num_query_tokens
    answer = pipe.answer((rate, wav), "Recognize the speech and give me the transcription.")
    assert answer.num_tokens > 0 and answer.text.strip()
