"""Reliability: the corpus of bad and odd inputs through the pipeline API and through gradio_client
against the running app (every one gets its message, or is answered and told what was done), the
upload cap, and many clients at once. Faults and the serving defaults: test_faults.py."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("gradio_client")
import httpx
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.runner import ModelGate, generate_config
from app.ui import build_app, gate_of
from model.errors import SalmonnError
from tests.corpus import (CASES, GREEDY, UPLOAD_CAP_BYTES, answered, api_generate, app, ask, ask_args,  # noqa: F401
                          client, corpus, demo_idle, need_ffmpeg, pipe, serve, text_of, tone, wait_for, write)



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
