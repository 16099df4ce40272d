"""Faults and defaults: Stop, cancel and a closed tab free the model; out of memory is a message and
the next request works; hostile checkpoints and configs are refused by the launcher; the server is
local-only with no share link unless asked, serves only its own files, and keeps user data only in
its temp cache."""
from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio_client")
import httpx
from gradio_client import Client, handle_file

from app.ui import build_app, launch_kwargs
from model import decoding
from model.config import GenerateConfig
from model.errors import OutOfMemory
from tests.corpus import (EXAMPLE, GREEDY, UPLOAD_CAP, UPLOAD_CAP_BYTES, answered, app, ask, ask_args,  # noqa: F401
                          client, corpus, demo_idle, free_port, pcm_wav, pipe, serve, text_of, tone, wait_for)



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
            1.0, 1, False, 1.0, 0.9, 0, 1.0, 1024, -1, 0.0, True, "upload"]
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


def _oom_during_generation(monkeypatch, after_tokens=2):
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
    calls = _oom_during_generation(monkeypatch)
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
