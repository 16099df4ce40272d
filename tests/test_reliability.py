"""Reliability and security. A corpus of bad inputs (generated here, nothing stored) through
the pipeline API and through gradio_client against the running app; many clients at once; faults
(cancel, out of memory, hostile checkpoints); and the safe serving defaults.

Everything runs on the tiny random model with a few new tokens per answer, so the file stays fast."""
from __future__ import annotations

import gc
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app import presets  # noqa: E402
from app.runner import ModelGate, generate_config  # noqa: E402
from app.ui import build_app, gate_of, launch, launch_kwargs  # noqa: E402
from model import decoding  # noqa: E402
from model.config import GenerateConfig  # noqa: E402
from model.errors import OutOfMemory, SalmonnError  # noqa: E402
from model.pipeline import Pipeline  # noqa: E402
from tests.conftest import randomize_lora  # noqa: E402
from model.random_tiny import tiny_config  # noqa: E402

EXAMPLE = str(presets.EXAMPLES_DIR / "speech.wav")
UPLOAD_CAP = "50mb"                       # the app's default; the pipeline is given the same cap
UPLOAD_CAP_BYTES = 50 * 2**20
GREEDY = GenerateConfig(max_new_tokens=4, num_beams=1, do_sample=False)
HAS_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


# ------------------------------------------------------------------------------------------ audio makers

def tone(seconds: float, rate: int = 16000, freq: float = 440.0, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wav = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels > 1:   # a different tone per channel, so mixing is not a no-op
        wav = np.stack([(amp * np.sin(2 * np.pi * freq * (1 + c / 4) * t)).astype(np.float32)
                        for c in range(channels)], axis=1)
    return wav


def write(path: Path, data: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    sf.write(path, data, rate, subtype=subtype)
    return path


def pcm_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """A WAV written byte by byte (fast for big files): uint8 or int16 mono samples."""
    bits = samples.dtype.itemsize * 8
    data = samples.tobytes()
    header = (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * bits // 8, bits // 8, bits)
              + b"data" + struct.pack("<I", len(data)))
    path.write_bytes(header + data)
    return path


def encoded(path: Path, *codec: str, seconds: float = 1.0, channels: int = 1) -> Path:
    """A sine encoded by ffmpeg (mp3, m4a, webm, ...)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=f=440:d={seconds}",
                    "-ac", str(channels), *codec, str(path)], check=True, timeout=60)
    return path


def silent_video(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red:s=16x16:d=0.5",
                    "-c:v", "libvpx", str(path)], check=True, timeout=60)
    return path


def video_with_audio(path: Path, video_s: float, audio_s: float) -> Path:
    """An MP4 whose audio track is shorter than its video (the container says video_s)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", f"color=c=blue:s=32x32:d={video_s}",
                    "-f", "lavfi", "-i", f"sine=f=440:d={audio_s}", "-c:v", "mpeg4", "-c:a", "aac", str(path)],
                   check=True, timeout=60)
    return path


def png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, format="PNG")
    return path


def put(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def wav_bytes(data: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ the corpus

@dataclass
class Case:
    """One hostile or unusual input. `error`: the message expected (regex); None = accepted, and then
    `expect` (regex) must appear in what the app says about the audio (or the prompt sent, for
    prompt cases) and `prompt_ok` must hold for the text sent to the LLM."""
    name: str
    make: Callable[[Path], object] | None = None      # the audio (a file, or an array for API-only cases)
    prompt: object = "Describe the audio."
    error: str | None = None
    expect: str | None = None
    prompt_ok: Callable[[str], bool] | None = None
    settings: dict = field(default_factory=dict)       # UI names: beams, max_new, temperature, rep, seed, scale
    gradio: bool = True                                # False: cannot be sent through the UI/client at all
    app_error: str | None = None                       # the app's message when it differs (Gradio's own checks)
    ffmpeg: bool = False


def _valid(d: Path) -> Path:
    return write(d / "valid.wav", tone(1.0), 16000)


def _no_controls(text: str) -> bool:
    import unicodedata

    return not any(unicodedata.category(ch)[0] == "C" and ch not in "\n\t" for ch in text)


CASES = [
    # --- files that are not (usable) audio
    Case("empty_file", lambda d: put(d / "empty.wav", b""), error=r"empty \(0 bytes\)"),
    Case("zero_frames", lambda d: write(d / "zero.wav", np.zeros(0, np.float32), 16000), error=r"no samples|zero length"),
    Case("one_sample", lambda d: write(d / "one.wav", np.full(1, 0.3, np.float32), 16000), error=r"too short"),
    Case("ten_ms", lambda d: write(d / "10ms.wav", tone(0.01), 16000), error=r"too short \(10 ms\).*at least 0\.1 s"),
    Case("digital_silence", lambda d: write(d / "silence.wav", np.zeros(32000, np.float32), 16000),
         error=r"silent \(only digital silence\).*pick another file"),
    Case("dither_only", lambda d: write(d / "dither.wav", (np.random.default_rng(0).standard_normal(32000) * 3e-5)
                                        .astype(np.float32), 16000, "PCM_16"), error=r"silent \(peak -\d+ dBFS"),
    Case("dc_offset_only", lambda d: write(d / "dc.wav", np.full(32000, 0.4, np.float32), 16000), error=r"silent"),
    Case("nan_samples", lambda d: write(d / "nan.wav", np.where(np.arange(16000) % 100 == 0, np.nan, tone(1.0))
                                        .astype(np.float32), 16000, "FLOAT"), error=r"NaN or infinite"),
    Case("inf_samples", lambda d: write(d / "inf.wav", np.where(np.arange(16000) == 5, np.inf, tone(1.0))
                                        .astype(np.float32), 16000, "FLOAT"), error=r"NaN or infinite"),
    Case("text_named_wav", lambda d: put(d / "text.wav", "hello, I am a text file\n" * 40),
         error=r"not audio that can be decoded.*Accepted: wav", ffmpeg=True),
    Case("png_named_wav", lambda d: png(d / "image.wav"), error=r"not audio.*(no audio stream|not an audio format)",
         ffmpeg=True),
    Case("random_bytes", lambda d: put(d / "noise.wav", np.random.default_rng(1).bytes(5000)), error=r"not audio|damaged", ffmpeg=True),
    Case("truncated_header", lambda d: put(d / "trunc.wav", wav_bytes(tone(1.0), 16000)[:30]), error=r"damaged or truncated|not audio", ffmpeg=True),
    Case("silent_video", lambda d: silent_video(d / "video.webm"), error=r"no audio stream", ffmpeg=True),
    Case("rate_500_hz", lambda d: write(d / "500hz.wav", tone(1.0, rate=500, freq=100), 500),
         error=r"Unsupported sample rate 500 Hz.*8 to 192 kHz"),
    Case("over_size_limit", lambda d: pcm_wav(d / "big.wav", np.tile((tone(1.0) * 32767).astype(np.int16), 1700), 16000),
         error=r"too large \(5\d\.\d MB\); the limit is 50 MB|exceeds the maximum file size"),
    # --- audio that is odd but fine: answered, and what was done is said
    Case("wav_8bit", lambda d: write(d / "u8.wav", tone(1.0), 16000, "PCM_U8"), expect=r"16000 Hz, 1 ch"),
    Case("wav_24bit", lambda d: write(d / "s24.wav", tone(1.0, 48000), 48000, "PCM_24"), expect=r"48000 Hz"),
    Case("wav_float32", lambda d: write(d / "f32.wav", tone(1.0, 44100), 44100, "FLOAT"), expect=r"44100 Hz"),
    Case("wav_float_over_full_scale", lambda d: write(d / "hot.wav", tone(1.0, amp=6.0), 16000, "FLOAT"),
         expect=r"beyond full scale \(peak 6\).*scaled down"),
    Case("clipped", lambda d: write(d / "clipped.wav", np.clip(tone(1.0, amp=4.0), -1, 1), 16000, "PCM_16"),
         expect=r"clipped \(\d+\.\d% of samples"),
    *[Case(f"rate_{r}", (lambda r: lambda d: write(d / f"r{r}.wav", tone(1.0, r), r, "PCM_16"))(r),
           expect=rf"{r} Hz") for r in (8000, 11025, 22050, 32000, 44100, 48000, 96000, 192000)],
    *[Case(f"channels_{c}", (lambda c: lambda d: write(d / f"c{c}.wav", tone(1.0, channels=c), 16000, "PCM_16"))(c),
           expect=rf"{c} ch") for c in (2, 4, 6, 8)],
    Case("flac", lambda d: write(d / "a.flac", tone(1.0, 44100), 44100), expect=r"44100 Hz"),
    Case("ogg_vorbis", lambda d: write(d / "a.ogg", tone(1.0, 22050), 22050), expect=r"22050 Hz"),
    Case("aiff", lambda d: write(d / "a.aiff", tone(1.0), 16000), expect=r"16000 Hz"),
    Case("mp3", lambda d: encoded(d / "a.mp3", "-c:a", "libmp3lame", "-b:a", "64k"), expect=r"44100 Hz", ffmpeg=True),
    Case("m4a_aac", lambda d: encoded(d / "a.m4a", "-c:a", "aac", channels=2), expect=r"44100 Hz, 2 ch", ffmpeg=True),
    Case("webm_opus_browser", lambda d: encoded(d / "rec.webm", "-c:a", "libopus"), expect=r"48000 Hz", ffmpeg=True),
    Case("ogg_opus", lambda d: encoded(d / "a.opus", "-c:a", "libopus"), expect=r"48000 Hz", ffmpeg=True),
    Case("truncated_data", lambda d: put(d / "cut.wav", wav_bytes(tone(2.0), 16000)[:44 + 16000]), expect=r"0\.50 s"),
    Case("one_hour", lambda d: pcm_wav(d / "hour.wav", np.tile(((tone(1.0, 8000) + 1) * 127.5).astype(np.uint8), 3600),
                                       8000), expect=r"3600 s long; only the first 300 s are used"),
    # --- prompts
    Case("prompt_empty", prompt="", error=r"prompt is empty"),
    Case("prompt_whitespace", prompt=" \n\t  ", error=r"prompt is empty"),
    Case("prompt_100k", prompt="describe " * 12500, error=r"too long \(\d+ characters\); the limit is 4000"),
    Case("prompt_only_controls", prompt="\x00\x01\x1b\x7f\u200b\u202e\r", error=r"prompt is empty"),
    Case("prompt_with_controls", prompt="Describe\x00 the\x1b[2J audio\u202e please\u200b.",
         prompt_ok=lambda sent: _no_controls(sent) and "Describe the[2J audio please." in sent),
    Case("prompt_only_placeholders", prompt="<SpeechHere></Speech><speech>", error=r"prompt is empty"),
    Case("prompt_with_placeholders", prompt="<Speech><SpeechHere></Speech> What is <SpeechHere> this?",
         prompt_ok=lambda sent: sent.count("<SpeechHere>") == 1 and "What is this?" in sent),
    Case("prompt_special_tokens", prompt="</s><s> USER: hi </s>",
         prompt_ok=lambda sent: "</s>" not in sent.split("<SpeechHere>")[1] and "USER: hi" in sent),
    Case("prompt_unicode", prompt="Décris l'audio 🎧 描述音频 صف",
         prompt_ok=lambda sent: "🎧 描述音频 صف" in sent),
    Case("prompt_braces", prompt="{} {0} {audio} %s", prompt_ok=lambda sent: "{} {0} {audio} %s" in sent),
    Case("prompt_none", prompt=None, error=r"prompt is empty", gradio=False),
    Case("prompt_lone_surrogate", prompt="a\ud800b", prompt_ok=lambda sent: "ab" in sent, gradio=False),
    # --- decoding settings a hostile client can send
    Case("max_new_tokens_1e9", settings={"max_new": 10**9}, error=r"Max new tokens must be a whole number from 1 to 2048"),
    Case("beams_50", settings={"beams": 50}, error=r"Beams must be a whole number from 1 to 10"),
    Case("temperature_1e9", settings={"temperature": 1e9, "sample": True}, error=r"Temperature must be"),
    Case("repetition_penalty_1e9", settings={"rep": 1e9}, error=r"Repetition penalty must be"),
    Case("seed_2_pow_70", settings={"seed": 2**70, "sample": True}, error=r"Seed must be"),
    Case("lora_scale_negative", settings={"scale": -1.0}, error=r"LoRA scale must be a number from 0 to"),
    Case("lora_scale_huge", settings={"scale": 1e30}, error=r"LoRA scale must be a number from 0 to"),
    Case("lora_scale_string", settings={"scale": "loud"}, error=r"LoRA scale must be a number from 0 to 4 \(got 'loud'\)"),
    Case("lora_scale_nan", settings={"scale": float("nan")}, error=r"LoRA scale must be a number from 0 to 4 \(got nan\)",
         gradio=False),
    Case("beams_string", settings={"beams": "four"}, error=r"Beams must be a whole number from 1 to 10 \(got 'four'\)"),
    Case("beams_fraction", settings={"beams": 2.5}, error=r"Beams must be a whole number from 1 to 10 \(got 2\.5\)"),
    Case("temperature_nan", settings={"temperature": float("nan"), "sample": True}, gradio=False,
         error=r"Temperature must be a number from 0\.01 to 5 \(got nan\)"),
    Case("max_new_tokens_string", settings={"max_new": "lots"}, error=r"Max new tokens must be a whole number from 1 to 2048"),
    # --- warnings that must be true
    Case("int16_near_full_scale_22k", lambda d: write(d / "loud16.wav", tone(1.0, 22050, amp=32763 / 32768), 22050,
                                                      "PCM_16"), expect=r"^(?!.*beyond full scale)"),
    Case("video_with_shorter_audio", lambda d: video_with_audio(d / "clip.mp4", video_s=3.0, audio_s=2.23),
         expect=r"^(?!.*(was cut|are used)).*2\.2\d s, 44100 Hz", ffmpeg=True),
    # --- arrays (the API and the desktop microphone path)
    Case("array_inf", lambda d: (16000, np.full(16000, np.inf, np.float32)), error=r"NaN or infinite", gradio=False),
    Case("array_3d", lambda d: (16000, np.zeros((2, 2, 2), np.float32)), error=r"1-D .* or 2-D", gradio=False),
    Case("array_bad_rate", lambda d: ("fast", tone(1.0)), error=r"sample rate must be a number", gradio=False),
    Case("array_int16_stereo", lambda d: (44100, (tone(1.0, 44100, channels=2) * 32767).astype(np.int16)),
         expect=r"44100 Hz, 2 ch", gradio=False),
]
assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


def api_generate(settings: dict) -> GenerateConfig:
    names = {"beams": "num_beams", "max_new": "max_new_tokens", "temperature": "temperature",
             "rep": "repetition_penalty", "seed": "seed", "sample": "do_sample"}
    return replace(GREEDY, **{names[k]: v for k, v in settings.items() if k in names})


def need_ffmpeg(case: Case) -> None:
    if case.ffmpeg and not HAS_FFMPEG:
        pytest.skip("needs ffmpeg")


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    # trim_to_audio: the number of audio tokens follows the clip's length. The random tiny model
    # hardly hears what is in a clip, but it does hear how long it is: so answers differ per clip,
    # which the load test needs to see cross-talk.
    p = Pipeline.from_config(tiny_config(tmp_path_factory.mktemp("tiny"), trim_to_audio=True))
    randomize_lora(p.model)
    p.max_file_bytes = UPLOAD_CAP_BYTES        # what launch_app.py sets from --max-file-size
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> audio source, made once for both passes."""
    d = tmp_path_factory.mktemp("corpus")
    out = {"valid": _valid(d)}
    for case in CASES:
        if case.make is not None and not (case.ffmpeg and not HAS_FFMPEG):
            out[case.name] = case.make(d)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo, **kw) -> str:
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True, **kw)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(pipe):
    """The app on localhost with a line long enough for the load test (20 clients)."""
    demo = build_app(pipe, queue_size=24)
    url = serve(demo, max_file_size=UPLOAD_CAP)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app[1], verbose=False)


def ask_args(path, question="Describe the audio.", **ui) -> dict:
    args = dict(question=question, path=handle_file(str(path)) if path is not None else None,
                model_name="tiny-test", scale=1.0, beams=1, sample=False, temperature=1.0, top_p=0.9, top_k=0,
                rep=1.0, max_new=4, seed=-1)
    args.update(ui)
    return args


def ask(client, path, question="Describe the audio.", timeout=120, **ui):
    """(last assistant message text, prompt sent, details) of one /ask, after clearing the chat."""
    client.predict(api_name="/clear")
    job = client.submit(**ask_args(path, question, **ui), api_name="/ask")
    chat, _, sent, details = job.result(timeout=timeout)
    return text_of(chat[-1]), sent, details


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def answered(text: str) -> bool:
    return "*(LoRA scale " in text      # the footer of every real answer


# ------------------------------------------------------------------------------------------ corpus: pipeline API

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corpus_through_the_pipeline(case, pipe, corpus):
    need_ffmpeg(case)
    source = corpus.get(case.name, corpus["valid"])
    settings = dict(case.settings)
    scale = settings.pop("scale", 1.0)
    gen = api_generate(settings)
    if case.error:
        with pytest.raises(SalmonnError, match=case.error):
            pipe.answer(source, case.prompt, lora_scale=scale, generate=gen)
    else:
        answer = pipe.answer(source, case.prompt, lora_scale=scale, generate=gen)
        assert answer.num_tokens > 0 and not answer.stopped
        if case.expect:
            audio = pipe.prepare(source)
            said = audio.describe() + " " + " ".join(audio.notes)
            assert re.search(case.expect, said), said
        if case.prompt_ok:
            assert case.prompt_ok(answer.prompt), answer.prompt
    # ... and a valid request right after works
    assert pipe.answer(corpus["valid"], "Describe the audio.", generate=GREEDY).num_tokens > 0


# ------------------------------------------------------------------------------------------ corpus: the running app

@pytest.mark.parametrize("case", [c for c in CASES if c.gradio], ids=lambda c: c.name)
def test_corpus_through_the_app(case, client, corpus):
    need_ffmpeg(case)
    ui = dict(case.settings)
    path = corpus.get(case.name, corpus["valid"])
    error = case.app_error or case.error
    try:
        text, sent, details = ask(client, path, case.prompt, **ui)
    except (ValueError, AppError) as err:
        # gradio_client refuses an upload over the cap before sending it; Gradio refuses slider
        # values out of range with its own message (an error reply, not a crash)
        assert re.search(error, str(err)), err
        text = None
    if text is not None and case.error:
        assert text.startswith("⚠️") and not answered(text), text
        assert re.search(error, text), text
    elif text is not None:
        assert answered(text), text
        if case.expect:
            assert re.search(case.expect, details["audio"] + text), (details["audio"], text)
        if case.prompt_ok:
            assert case.prompt_ok(sent), sent
    text, _, _ = ask(client, corpus["valid"], max_new=2)
    assert answered(text) and "⚠️" not in text, text


def test_server_refuses_uploads_over_the_cap(app):
    """The cap holds on the server too, for clients that do not check it first."""
    _, url = app
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.wav", b"\0" * (UPLOAD_CAP_BYTES + 1), "audio/wav")},
                   timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text


# ------------------------------------------------------------------------------------------ load

def test_twenty_clients_at_once_each_get_their_own_answer(app, pipe, tmp_path):
    """20 clients, each with its own clip (own tone and length), at once: every one is answered with
    its own clip's answer (what the pipeline gives for that clip alone), none is lost, and the app
    still answers afterwards."""
    _, url = app
    n = 20
    seconds = [1.0 + 0.35 * i for i in range(n)]        # one more audio token (0.34 s) each
    clips = [write(tmp_path / f"client{i}.wav", tone(s, freq=200 + 90 * i), 16000) for i, s in enumerate(seconds)]
    gen = generate_config(pipe.default_generate, num_beams=1, do_sample=False, temperature=1.0, top_p=0.9,
                          top_k=0, repetition_penalty=1.0, max_new_tokens=6)
    expected = [pipe.answer(c, "Describe the audio.", lora_scale=1.0, generate=gen).text for c in clips]
    assert len(set(expected)) >= n // 2, "the clips should give different answers, or cross-talk would not show"
    clients = [Client(url, verbose=False) for _ in range(n)]
    start = threading.Barrier(n)

    def one(i):
        start.wait(timeout=60)
        job = clients[i].submit(**ask_args(clips[i], max_new=6), api_name="/ask")
        chat, _, _, details = job.result(timeout=180)
        return text_of(chat[-1]), details

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n), timeout=240))
    assert time.monotonic() - t0 < 240
    for i, (text, details) in enumerate(results):
        assert answered(text), (i, text)
        assert text.startswith(expected[i] or "*(empty answer)*"), (i, text, expected[i])
        assert details["audio"].startswith(f"{seconds[i]:.2f} s"), (i, details["audio"])
    assert demo_idle(app[0])
    text, _, _ = ask(clients[0], clips[0], max_new=6)
    assert text.startswith(expected[0] or "*(empty answer)*")


def demo_idle(demo, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not gate_of(demo)._line:
            return True
        time.sleep(0.05)
    return False


def test_busy_past_the_line_says_how_many_are_ahead(pipe, corpus):
    """Beam searches run one at a time. Line of 1: the running request, one waiting (told its place),
    the next refused with a message."""
    demo = build_app(pipe, queue_size=1)
    url = serve(demo)
    try:
        a, b, c = (Client(url, verbose=False) for _ in range(3))
        with pipe._lock:                     # the model is busy (held here), so requests pile up
            job_a = a.submit(**ask_args(corpus["valid"], beams=2), api_name="/ask")
            assert wait_for(lambda: len(gate_of(demo)._line) == 1)
            job_b = b.submit(**ask_args(corpus["valid"], beams=2), api_name="/ask")
            assert wait_for(lambda: len(gate_of(demo)._line) == 2)
            assert wait_for(lambda: any("1 ahead of you" in str(o) for o in job_b.outputs()))
            chat, *_ = c.predict(**ask_args(corpus["valid"], beams=2), api_name="/ask")
            busy = text_of(chat[-1])
            assert busy.startswith("⚠️ The model is busy: 2 requests ahead of you") and "try again" in busy
            # a bad file does not wait in line: it is answered at once, even now
            chat, *_ = c.predict(**ask_args(corpus["empty_file"]), api_name="/ask")
            assert re.search(r"⚠️ The audio file is empty", text_of(chat[-1])), chat[-1]
        for job in (job_a, job_b):
            assert answered(text_of(job.result(timeout=60)[0][-1]))
        chat, *_ = c.predict(**ask_args(corpus["valid"]), api_name="/ask")
        assert answered(text_of(chat[-1]))
    finally:
        demo.close()


def test_the_shared_batch_is_bounded_with_a_message(pipe, corpus, monkeypatch):
    """Greedy answers share one batch: past its rows and the waiting line, a request is refused."""
    demo = build_app(pipe, queue_size=1)
    url = serve(demo)
    monkeypatch.setattr(pipe, "max_batch_rows", 1)
    try:
        a, b, c = (Client(url, verbose=False) for _ in range(3))
        with pipe._lock:                     # the batch cannot step, so rows wait
            jobs = [x.submit(**ask_args(corpus["valid"]), api_name="/ask") for x in (a, b)]
            assert wait_for(lambda: all(len(j.outputs()) >= 2 for j in jobs))     # both past the checks
            chat, *_ = c.predict(**ask_args(corpus["valid"]), api_name="/ask")
            assert text_of(chat[-1]).startswith("⚠️ The model is busy: 2 answers are being written or waiting")
        for job in jobs:
            assert answered(text_of(job.result(timeout=60)[0][-1]))
    finally:
        demo.close()


def wait_for(cond, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_model_gate_is_first_come_first_served():
    gate = ModelGate(max_waiting=3)
    tickets = [gate.join() for _ in range(4)]
    assert [gate.ahead(t) for t in tickets] == [0, 1, 2, 3]
    with pytest.raises(SalmonnError, match="busy: 4 requests ahead"):
        gate.join()
    order = []

    def run(i):
        gate.wait(tickets[i])
        order.append(i)
        gate.leave(tickets[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in (3, 1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.leave(tickets[0])
    for t in threads:
        t.join(timeout=5)
    assert order == [1, 2, 3]


# ------------------------------------------------------------------------------------------ faults

LONG = GenerateConfig(max_new_tokens=2000, num_beams=1, min_length=2000)   # never ends on its own


def test_stream_resumes_on_any_thread_and_an_abandoned_stream_frees_the_model(pipe):
    """Gradio resumes a generator on whichever thread is free: no lock is held across yields."""
    wav = tone(1.0, freq=330)
    stream = pipe.stream(wav, "Describe the audio.", generate=replace(GREEDY, max_new_tokens=12))
    pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    events, i = [], 0
    while not (events and events[-1].done):
        events.append(pools[i % 2].submit(next, stream).result(timeout=30))
        i += 1
    assert events[-1].answer.text == pipe.answer(wav, "Describe the audio.", generate=replace(GREEDY, max_new_tokens=12)).text
    # A stream dropped mid-answer (a closed tab) lets everyone else in at once.
    stream = pipe.stream(wav, "Tell a story.", generate=LONG)
    next(stream)
    del stream
    gc.collect()
    t0 = time.monotonic()
    assert pipe._lock.acquire(timeout=5)
    pipe._lock.release()
    assert time.monotonic() - t0 < 2


def test_stop_ends_greedy_and_beam_search_promptly(pipe):
    wav = tone(1.0, freq=550)
    for beams in (1, 3):
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        t0 = time.monotonic()
        answer = pipe.answer(wav, "Tell a story.", generate=replace(LONG, num_beams=beams), stop=stop)
        assert answer.stopped and answer.num_tokens < 2000, beams
        assert time.monotonic() - t0 < 5, beams
    assert not pipe.answer(wav, "Describe.", generate=GREEDY).stopped


def _endless_generation(monkeypatch, pipe):
    """No EOS until max_new_tokens, a few ms a token, alone or in the shared batch: an answer that is
    surely cut mid-stream."""
    real, real_step, real_bias = decoding.decode_steps, pipe.batch._step, decoding.token_bias

    def decode_steps(model, embeds, mask, gen, **kwargs):
        for step in real(model, embeds, mask, replace(gen, min_length=gen.max_new_tokens), **kwargs):
            time.sleep(0.005)
            yield step

    def step():
        time.sleep(0.005)
        real_step()

    monkeypatch.setattr(decoding, "decode_steps", decode_steps)
    monkeypatch.setattr(pipe.batch, "_step", step)
    monkeypatch.setattr(decoding, "token_bias", lambda model, vocab, gen: (real_bias(model, vocab, gen)[1],) * 2)   # EOS banned


def test_cancel_mid_stream_frees_the_model_then_ask_again(app, pipe, corpus, monkeypatch):
    demo, url = app
    _endless_generation(monkeypatch, pipe)
    c = Client(url, verbose=False)
    for how in ("stop button", "cancel"):
        job = c.submit(**ask_args(corpus["valid"], "Tell a very long story.", max_new=1024), api_name="/ask")
        assert wait_for(lambda: len(job.outputs()) >= 3), "the answer should start streaming"
        t0 = time.monotonic()
        if how == "cancel":
            job.cancel()
        else:
            c.predict(api_name="/stop")
            chat, _, _, details = job.result(timeout=30)
            assert details["stopped"] is True and "stopped" in text_of(chat[-1])
        assert demo_idle(demo, within=5), how
        assert wait_for(lambda: pipe.batch.active + pipe.batch.waiting == 0, within=5), how   # its row retired
        assert pipe._lock.acquire(timeout=5), how         # the model is free
        pipe._lock.release()
        assert time.monotonic() - t0 < 5, how
        text, _, _ = ask(c, corpus["valid"])
        assert answered(text), (how, text)


def test_a_client_that_goes_away_mid_stream_frees_the_model(app, pipe, corpus, monkeypatch):
    """A closed browser tab: the event stream drops mid-answer, without any cancel request."""
    demo, url = app
    _endless_generation(monkeypatch, pipe)
    base = f"{url}gradio_api"
    uploaded = httpx.post(f"{base}/upload", files={"files": ("v.wav", Path(corpus["valid"]).read_bytes(), "audio/wav")},
                          timeout=30).json()[0]
    fn = next(d["id"] for d in httpx.get(f"{url}config", timeout=10).json()["dependencies"]
              if d.get("api_name") == "ask")
    session = uuid.uuid4().hex[:12]
    data = ["Tell a very long story.", None, {"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "tiny-test",
            1.0, 1, False, 1.0, 0.9, 0, 1.0, 1024, -1, 0.0, "upload"]
    joined = httpx.post(f"{base}/queue/join", json={"data": data, "fn_index": fn, "session_hash": session}, timeout=10)
    assert joined.status_code == 200, joined.text
    updates = 0
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session}, timeout=30) as stream:
        for line in stream.iter_lines():
            updates += "process_generating" in line
            if updates >= 5:
                break                                  # ... and the connection closes mid-answer
    assert updates >= 5 and pipe.batch.active, "the answer should be streaming"
    assert wait_for(lambda: pipe.batch.active + pipe.batch.waiting == 0, within=15)
    assert pipe._lock.acquire(timeout=5)
    pipe._lock.release()
    monkeypatch.undo()
    text, _, _ = ask(Client(url, verbose=False), corpus["valid"])
    assert answered(text), text


def _oom_during_generation(monkeypatch, model, after_tokens=2):
    """decode_steps raises a CUDA-style out-of-memory error after a few tokens, once."""
    real = decoding.decode_steps
    calls = []

    def decode_steps(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            yield from real(*args, **kwargs)
            return
        for i, step in enumerate(real(*args, **kwargs)):
            if i == after_tokens:
                big = torch.empty(1024)     # something the failed step holds; freed with its frames
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB ({big.numel()})")
            yield step

    monkeypatch.setattr(decoding, "decode_steps", decode_steps)
    return calls


def test_out_of_memory_is_a_message_and_the_next_request_works(pipe, corpus, monkeypatch):
    calls = _oom_during_generation(monkeypatch, pipe.model)
    with pytest.raises(OutOfMemory, match=r"Out of memory while answering: try shorter audio.*fewer new tokens"):
        pipe.answer(corpus["valid"], "Describe the audio.", generate=GREEDY)
    assert pipe._lock.acquire(timeout=1)
    pipe._lock.release()
    again = pipe.answer(corpus["valid"], "Describe the audio.", generate=GREEDY)
    monkeypatch.undo()
    assert len(calls) == 2 and again.text == pipe.answer(corpus["valid"], "Describe the audio.", generate=GREEDY).text
    # while encoding, too
    real = pipe.model.encode_audio
    monkeypatch.setattr(pipe.model, "encode_audio", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory.")))
    with pytest.raises(OutOfMemory, match="while encoding the audio"):
        pipe.encode(tone(1.3, freq=777))
    monkeypatch.setattr(pipe.model, "encode_audio", real)
    assert pipe.encode(tone(1.3, freq=777)).tokens is not None


def _oom_in_the_shared_batch(monkeypatch, pipe, at_step=2):
    """The shared batch's decode step raises a CUDA-style out-of-memory error, once."""
    real = pipe.batch._step
    calls = []

    def step():
        calls.append(1)
        if len(calls) == at_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        real()

    monkeypatch.setattr(pipe.batch, "_step", step)
    return calls


def test_out_of_memory_in_the_app(client, pipe, corpus, monkeypatch):
    _oom_in_the_shared_batch(monkeypatch, pipe)
    text, _, _ = ask(client, corpus["valid"], "Describe the audio slowly.")
    assert "⚠️ Out of memory while answering" in text and "ask again" in text and not answered(text), text
    text, _, _ = ask(client, corpus["valid"], "Describe the audio slowly.")
    assert answered(text), text


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = Path(f"/tmp/salmonn_pwned_{uuid.uuid4().hex}")


def _launcher(argv, capsys):
    import launch_app

    rc = launch_app.main(argv)
    return rc, capsys.readouterr().err


def test_hostile_checkpoints_and_configs_are_refused_by_the_launcher(pipe, tmp_path, capsys):
    """Files from the user are loaded without running code: a pickle payload never runs, a corrupt
    file is a message, and neither gives a half-working UI (exit code 2 before any server)."""
    import pickle

    root = Path(pipe.cfg.whisper_path).parent
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Payload()}, evil)
    raw_pickle = tmp_path / "raw.pth"
    raw_pickle.write_bytes(pickle.dumps({"model": {"x": _Payload()}}))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(evil.read_bytes()[:200])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for path, message in [(evil, r"refused"), (raw_pickle, r"refused|not a PyTorch checkpoint|damaged"),
                          (corrupt, r"damaged|not a PyTorch checkpoint|could not"), (bad_st, r"safetensors")]:
        rc, err = _launcher(["--tiny-test-model", str(root), "--ckpt", str(path), "--port", str(free_port())], capsys)
        assert rc == 2 and re.search(message, err) and path.name in err and "Traceback" not in err, (path, err)
    evil_yaml = tmp_path / "decode_config.yaml"
    evil_yaml.write_text(f"model: !!python/object/apply:os.system ['touch {PWNED}']\n")
    rc, err = _launcher(["--config", str(evil_yaml), "--port", str(free_port())], capsys)
    assert rc == 2 and "error:" in err and "Traceback" not in err, err
    assert not PWNED.exists(), "a payload ran"


# ------------------------------------------------------------------------------------------ defaults

def own_non_loopback_ipv4() -> list[str]:
    """This machine's own IPv4 addresses other than loopback (no traffic leaves the machine)."""
    try:
        import psutil

        return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                if a.family == socket.AF_INET and not a.address.startswith("127.")]
    except ImportError:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        return [a for a in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", out) if not a.startswith("127.")]


def test_not_reachable_off_loopback_and_no_share_unless_asked(app):
    _, url = app
    port = int(url.rsplit(":", 1)[1].strip("/"))
    assert httpx.get(url, timeout=10).status_code == 200            # it is up, on loopback
    addresses = own_non_loopback_ipv4()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=3).close()
    kw = launch_kwargs()
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["max_file_size"] == UPLOAD_CAP
    import launch_app

    args = launch_app.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.auth is None


def test_files_outside_the_allowed_paths_are_refused(app):
    _, url = app
    base = f"{url}gradio_api"
    repo_file = Path(__file__).resolve().parents[1] / "launch_app.py"
    for path in ("/etc/passwd", str(repo_file), "../../../../etc/passwd"):
        r = httpx.get(f"{base}/file={path}", timeout=10)
        assert r.status_code in (403, 404) and "root:" not in r.text, (path, r.status_code)
    assert httpx.get(f"{base}/file={Path(EXAMPLE).resolve()}", timeout=10).status_code == 200   # our examples are
    # A hostile API call naming a server file as its audio is refused before our code sees it.
    for path in ("/etc/passwd", str(repo_file)):
        data = ["Describe.", {"path": path, "meta": {"_type": "gradio.FileData"}}, "tiny-test", 1.0, 1, False, 1.0,
                0.9, 0, 1.0, 4, -1, 0.0]
        event = httpx.post(f"{base}/call/ask", json={"data": data}, timeout=10).json()["event_id"]
        with httpx.stream("GET", f"{base}/call/ask/{event}", timeout=30) as stream:
            reply = "".join(stream.iter_text())
        assert "event: error" in reply and "root:" not in reply, reply


def test_share_only_when_asked_with_a_warning(pipe, capsys, monkeypatch):
    import gradio as gr

    import app.ui as ui

    seen = {}

    def fake_launch(demo, **kw):
        seen.update(kw)
        return None, "http://127.0.0.1:1/", None

    monkeypatch.setattr(ui, "launch", fake_launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    root = str(Path(pipe.cfg.whisper_path).parent)
    rc, err = _launcher(["--tiny-test-model", root], capsys)
    assert rc == 0 and seen["share"] is False and seen["host"] == "127.0.0.1" and "WARNING" not in err
    assert seen["max_file_size"] == UPLOAD_CAP_BYTES
    rc, err = _launcher(["--tiny-test-model", root, "--share"], capsys)
    assert rc == 0 and seen["share"] is True and seen["auth"] is None
    assert "WARNING: --share" in err and "no login required" in err
    rc, err = _launcher(["--tiny-test-model", root, "--share", "--auth", "teacher:s3cret"], capsys)
    assert rc == 0 and seen["auth"] == ("teacher", "s3cret") and "no login required" not in err


def test_user_audio_and_text_stay_in_the_temp_cache_which_is_cleaned(pipe, tmp_path):
    """Nothing of a request reaches the disk outside Gradio's cache, and the cache of this app is
    deleted when it shuts down."""
    from gradio.utils import get_upload_folder

    marker = f"zebra-{uuid.uuid4().hex}"
    noise = (np.random.default_rng(7).standard_normal(16000) * 0.2 * 32767).astype(np.int16)
    clip = pcm_wav(tmp_path / "private.wav", noise, 16000)
    needle = noise[4000:4016].tobytes()
    demo = build_app(pipe, queue_size=2)
    t0 = time.time() - 1
    url = serve(demo)
    try:
        c = Client(url, verbose=False)
        c.predict(handle_file(str(clip)), "tiny-test", "all", "average", api_name="/load_audio")
        chat, *_ = c.predict(**ask_args(clip, f"Describe the audio {marker}."), api_name="/ask")
        assert answered(text_of(chat[-1]))
        cached = {f for s in demo.temp_file_sets for f in s}
        assert any(Path(f).name == "private.wav" and Path(f).exists() for f in cached), cached
    finally:
        demo.close()
    assert not any(Path(f).exists() for f in cached), "the app's temp cache should be deleted on shutdown"
    skip = [Path(get_upload_folder()).resolve(), tmp_path.parent.parent.resolve()]
    roots = [Path(__file__).resolve().parents[1], Path(os.environ.get("TMPDIR", "/tmp"))]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath).resolve()
            if any(here == s or s in here.parents for s in skip) or ".git" in here.parts:
                dirnames[:] = []
                continue
            for name in filenames:
                path = here / name
                try:
                    st = path.stat()
                    if st.st_mtime < t0 or st.st_size > 100 * 2**20 or not path.is_file():
                        continue
                    data = path.read_bytes()
                except OSError:
                    continue
                assert marker.encode() not in data and needle not in data, f"user data written to {path}"
