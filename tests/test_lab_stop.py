"""The Scale lab and the perplexity sweep stop on demand: Stop, a cancelled request or a closed tab
frees the model for the next user within seconds and gives back the memory the run grew; a run
larger than the lab's bound is refused before it costs anything; progress is shown as it goes.

Runs on the tiny random model, slowed down per step so that an uncancelled run would take minutes."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from app import lab, presets  # noqa: E402
from app.ui import build_app, gate_of  # noqa: E402
from model import decoding  # noqa: E402
from model.config import GenerateConfig  # noqa: E402
from model.pipeline import Pipeline  # noqa: E402
from tests.conftest import randomize_lora  # noqa: E402
from tests.corpus import answered, ask, demo_idle, serve, tone, wait_for, write  # noqa: E402
from model.random_tiny import tiny_config  # noqa: E402

STEP_S = 0.1       # per decoding step: a lab run of 1024 tokens would take over 100 s


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = Pipeline.from_config(tiny_config(tmp_path_factory.mktemp("tiny")))
    randomize_lora(p.model)
    return p


@pytest.fixture(scope="module")
def app(pipe):
    demo = build_app(pipe, queue_size=8)
    url = serve(demo)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write(tmp_path_factory.mktemp("clip") / "clip.wav", tone(1.5, freq=330), 16000)


def slow_endless_decoding(monkeypatch):
    """No EOS before max_new_tokens, STEP_S a step."""
    real = decoding.decode_steps

    def decode_steps(model, embeds, mask, gen, **kwargs):
        for step in real(model, embeds, mask, replace(gen, min_length=gen.max_new_tokens), **kwargs):
            time.sleep(STEP_S)
            yield step

    monkeypatch.setattr(decoding, "decode_steps", decode_steps)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024


def lab_args(clip, scales="0, 1, 2, 3, 4", max_new=1024, beams=1):
    return (handle_file(str(clip)), "Write a story.", scales, beams, False, 1.0, 0.9, 0, 1.0, max_new, -1, 0.0)


def model_is_free(demo, pipe) -> bool:
    if not demo_idle(demo, within=5):
        return False
    if not pipe._lock.acquire(timeout=5):
        return False
    pipe._lock.release()
    return True


def test_stream_many_reports_progress_and_stops_mid_batch(pipe, monkeypatch):
    slow_endless_decoding(monkeypatch)
    stop = threading.Event()
    gen = GenerateConfig(max_new_tokens=1024, num_beams=1)
    events = []
    t0 = time.monotonic()
    for event in pipe.stream_many(tone(1.0), "Tell a story.", lora_scales=[0.0, 1.0, 2.0], generate=gen, stop=stop,
                                  every=0.2):
        events.append(event)
        if len(events) == 3:
            stop.set()
    assert time.monotonic() - t0 < 10
    assert len(events) >= 4 and all(len(e.texts) == 3 for e in events)
    assert not any(any(e.finished) for e in events[:-1]), "no row ends before max_new_tokens here"
    assert len(events[1].texts[0]) >= len(events[0].texts[0]), "texts grow as they are written"
    final = events[-1].answers
    assert [a.lora_scale for a in final] == [0.0, 1.0, 2.0]
    assert all(a.stopped and 0 < a.num_tokens < 1024 for a in final)
    assert pipe._lock.acquire(timeout=2)
    pipe._lock.release()


def test_stream_many_gives_the_same_answers_as_answer_many(pipe):
    gen = GenerateConfig(max_new_tokens=8, num_beams=1)
    for beams in (1, 2):
        g = replace(gen, num_beams=beams)
        *_, last = pipe.stream_many(tone(1.0, freq=500), "Describe the audio.", lora_scales=[0.0, 2.0], generate=g)
        direct = pipe.answer_many(tone(1.0, freq=500), "Describe the audio.", lora_scales=[0.0, 2.0], generate=g)
        assert [a.text for a in last.answers] == [a.text for a in direct], beams
        assert not any(a.stopped for a in last.answers)


@pytest.mark.parametrize("how", ["cancel", "stop button"])
def test_a_lab_run_stopped_mid_run_frees_the_model_and_its_memory(app, pipe, clip, monkeypatch, how):
    demo, url = app
    c = Client(url, verbose=False)
    c.predict(*lab_args(clip, max_new=64), api_name="/scale_lab")     # warm: one-time allocations
    before = rss_bytes()
    slow_endless_decoding(monkeypatch)
    job = c.submit(*lab_args(clip), api_name="/scale_lab")
    assert wait_for(lambda: any("⏳ Answering" in str(o) for o in job.outputs()), within=30), job.outputs()
    assert wait_for(lambda: any("writing…" in str(o) for o in job.outputs()), within=30), "answers stream as written"
    t0 = time.monotonic()
    if how == "cancel":
        job.cancel()
    else:
        c.predict(api_name="/stop")
        html_out, raw, status = job.result(timeout=10)
        assert status.startswith("⏹ Stopped") and "stopped" in html_out, status
        assert all(a["stopped"] for a in raw["tiny-test"])
    assert model_is_free(demo, pipe), how
    assert time.monotonic() - t0 < 5, how
    after = rss_bytes()
    assert after <= 1.2 * before, (before, after)
    monkeypatch.undo()
    text, _, _ = ask(c, clip)
    assert answered(text), text


def test_a_perplexity_sweep_cancelled_mid_run_frees_the_model(app, pipe, monkeypatch):
    demo, url = app
    real = pipe.model.target_logprobs

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "target_logprobs", slow)
    items = [i.label for i in presets.LAB_ITEMS]
    assert len(items) >= 6
    c = Client(url, verbose=False)
    job = c.submit(items, "0, 1, 2, 3, 4", api_name="/perplexity")
    assert wait_for(lambda: any("Measured 1 of" in str(o) for o in job.outputs()), within=30), job.outputs()
    t0 = time.monotonic()
    job.cancel()
    assert model_is_free(demo, pipe)
    assert time.monotonic() - t0 < 5


def test_a_lab_run_over_the_bound_is_refused_before_it_costs_anything(app, pipe, clip, monkeypatch):
    _, url = app
    calls = []
    monkeypatch.setattr(decoding, "decode_steps", lambda *a, **k: calls.append(1) or iter(()))
    monkeypatch.setattr(pipe.model, "encode_audio", lambda *a, **k: calls.append(1))
    scales = ", ".join(str(s / 4) for s in range(12))
    html_out, raw, status = Client(url, verbose=False).predict(*lab_args(clip, scales=scales, max_new=2048),
                                                               api_name="/scale_lab")
    assert raw is None and not calls
    assert f"at most {lab.MAX_LAB_TOKENS:,} tokens per run" in html_out
    assert "12 scales × 2048 tokens × 1 checkpoint = 24,576" in html_out, html_out
    gen = GenerateConfig(max_new_tokens=200, num_beams=4)
    with pytest.raises(Exception, match="5 scales × 4 beams × 205 tokens × 2 checkpoints = 8,200"):
        lab.check_budget([0, 1, 2, 3, 4], replace(gen, max_new_tokens=205), 2)
    lab.check_budget([0, 1, 2, 3, 4], gen, 2)            # 8,000: allowed


def test_a_lab_run_whose_tab_closes_frees_the_model(app, pipe, clip, monkeypatch):
    """The browser tab closes mid-run: the event stream drops, without any cancel request."""
    import uuid

    import httpx

    demo, url = app
    slow_endless_decoding(monkeypatch)
    base = f"{url}gradio_api"
    uploaded = httpx.post(f"{base}/upload", files={"files": ("c.wav", clip.read_bytes(), "audio/wav")},
                          timeout=30).json()[0]
    fn = next(d["id"] for d in httpx.get(f"{url}config", timeout=10).json()["dependencies"]
              if d.get("api_name") == "scale_lab")
    session = uuid.uuid4().hex[:12]
    data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "Write a story.", "0, 1, 2, 3, 4", 1, False, 1.0,
            0.9, 0, 1.0, 1024, -1, 0.0, True]
    joined = httpx.post(f"{base}/queue/join", json={"data": data, "fn_index": fn, "session_hash": session}, timeout=10)
    assert joined.status_code == 200, joined.text
    updates = 0
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session}, timeout=30) as stream:
        for line in stream.iter_lines():
            updates += "process_generating" in line and "writing" in line
            if updates >= 2:
                break                                  # ... and the connection closes mid-run
    assert updates >= 2 and gate_of(demo)._line, "the lab should be streaming"
    assert demo_idle(demo, within=15)
    assert pipe._lock.acquire(timeout=5)
    pipe._lock.release()
