"""The OpenAI-compatible API, through the official `openai` client and plain HTTP, on the tiny random
model: chat with audio (streamed = not streamed), transcription, models, LoRA scale per request,
requests decoded together (and equal to each alone), cancel, and every bad input as a 4xx with the
message the studio shows."""
from __future__ import annotations

import base64
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from app import presets  # noqa: E402
from app.api import Api  # noqa: E402
from app.ui import build_app  # noqa: E402
from model import decoding  # noqa: E402
from model.pipeline import Pipeline  # noqa: E402
from tests.conftest import randomize_lora  # noqa: E402
from tests.corpus import CASES, HAS_FFMPEG, serve, tone, wait_for, write  # noqa: E402
from model.random_tiny import tiny_config  # noqa: E402

EXAMPLE = presets.EXAMPLES_DIR / "speech.wav"

LETTERS = r"[A-Za-z]{2,}"      # a word of an answer, as a bad_words entry can name it


def bannable(tokenizer, text: str, n: int = 2) -> list[str]:
    """Up to n words of `text` that bad_words can keep out: ones written as their own tokens there (a random
    model's text glues letters to other tokens, which no token-level ban can tell apart)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    runs = {tuple(ids[i:j]) for i in range(len(ids)) for j in range(i + 1, min(len(ids), i + 4) + 1)}
    found = [w for w in dict.fromkeys(re.findall(LETTERS, text))
             if any(tuple(tokenizer(f, add_special_tokens=False).input_ids) in runs for f in (w, " " + w))]
    return found[:n]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = Pipeline.from_config(tiny_config(tmp_path_factory.mktemp("tiny"), trim_to_audio=True))
    randomize_lora(p.model)
    p.max_file_bytes = 50 * 2**20          # what launch_app.py sets from --max-file-size
    return p


@pytest.fixture(scope="module")
def server(pipe):
    demo = build_app(pipe, queue_size=8)
    url = serve(demo)
    api = Api({"tiny-test": pipe}, max_waiting=8)
    api.mount(demo.app)
    yield url, api
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return [write(d / f"c{i}.wav", tone(1.0 + 0.35 * i, freq=220 + 90 * i), 16000) for i in range(6)]


def audio_part(path: Path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(Path(path).read_bytes()).decode(),
                                                   "format": "wav"}}


def ask(client, path, question="Describe the audio.", **kw):
    messages = [{"role": "user", "content": [audio_part(path), {"type": "text", "text": question}]}]
    return client.chat.completions.create(model="tiny-test", messages=messages, temperature=0,
                                          max_tokens=kw.pop("max_tokens", 8), **kw)


def test_models_lists_the_loaded_checkpoints(client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]


def test_chat_with_audio_streamed_equals_not_streamed(client, pipe):
    resp = ask(client, EXAMPLE)
    text = resp.choices[0].message.content
    assert text and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > resp.usage.prompt_tokens_details.audio_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 8
    stream = ask(client, EXAMPLE, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_lora_scale_per_request_is_reported_and_changes_the_answer(client):
    answers = {}
    for scale in (0.0, 4.0):
        resp = ask(client, EXAMPLE, extra_body={"lora_scale": scale})
        assert resp.model_extra["lora_scale"] == scale
        answers[scale] = resp.choices[0].message.content
    assert answers[0.0] != answers[4.0]


def test_bad_words_are_kept_out_of_the_answer_and_checked(client, pipe):
    plain = ask(client, EXAMPLE).choices[0].message.content
    banned = bannable(pipe.model.tokenizer, plain)
    assert banned, plain
    clean = ask(client, EXAMPLE, extra_body={"bad_words": banned}).choices[0].message.content
    assert clean != plain and not set(re.findall(LETTERS, clean)) & set(banned)
    with pytest.raises(openai.BadRequestError, match="Bad words"):
        ask(client, EXAMPLE, extra_body={"bad_words": "fox"})


def test_multi_turn_about_one_audio(client):
    first = ask(client, EXAMPLE).choices[0].message.content
    messages = [{"role": "user", "content": [audio_part(EXAMPLE), {"type": "text", "text": "Describe the audio."}]},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "Tell me more."}]
    resp = client.chat.completions.create(model="tiny-test", messages=messages, temperature=0, max_tokens=6)
    assert resp.choices[0].message.content and resp.usage.prompt_tokens > ask(client, EXAMPLE).usage.prompt_tokens


def test_transcription_of_a_bundled_clip(client, server, pipe):
    with open(EXAMPLE, "rb") as f:
        text = client.audio.transcriptions.create(model="tiny-test", file=f, response_format="text")
    assert isinstance(text, str) and text.strip()
    with open(EXAMPLE, "rb") as f:
        verbose = client.audio.transcriptions.create(model="tiny-test", file=f, response_format="verbose_json")
    assert verbose.text.strip() == text.strip() and verbose.duration == pytest.approx(4.17, abs=0.5)
    r = httpx.post(f"{server[0]}v1/audio/transcriptions", files={"file": ("a.wav", EXAMPLE.read_bytes())},
                   data={"response_format": "srt"}, timeout=60)
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]


def test_concurrent_requests_are_decoded_together_and_equal_each_alone(client, pipe, clips):
    jobs = [(clips[i], f"Describe the audio {i}.", [0.0, 1.0, 2.0, 4.0][i % 4]) for i in range(6)]
    alone = [ask(client, c, q, extra_body={"lora_scale": s}).choices[0].message.content for c, q, s in jobs]
    start = threading.Barrier(len(jobs))

    def one(job):
        start.wait(timeout=30)
        c, q, s = job
        return ask(client, c, q, extra_body={"lora_scale": s}).choices[0].message.content

    before = pipe.batch.max_batch
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    assert together == alone
    assert pipe.batch.max_batch >= 2 and pipe.batch.max_batch >= before


def never_ends(monkeypatch):
    """EOS banned: every answer runs to its token budget."""
    real = decoding.token_bias

    def bias(model, vocab, gen):
        always, early = real(model, vocab, gen)
        return early, early

    monkeypatch.setattr(decoding, "token_bias", bias)


def test_a_cancelled_stream_frees_its_row_and_the_others_finish_unchanged(client, pipe, clips, monkeypatch):
    never_ends(monkeypatch)
    expected = [ask(client, c, max_tokens=120).choices[0].message.content for c in clips[:3]]
    results = {}

    def full(i):
        results[i] = ask(client, clips[i], max_tokens=120).choices[0].message.content

    threads = [threading.Thread(target=full, args=(i,)) for i in (1, 2)]
    stream = ask(client, clips[0], max_tokens=120, stream=True)
    first = next(iter(stream))
    for t in threads:
        t.start()
    assert wait_for(lambda: pipe.batch.active >= 2, within=30)
    stream.close()                                        # the client goes away mid-answer
    assert first.choices[0].delta.role == "assistant"
    for t in threads:
        t.join(timeout=120)
    assert results == {1: expected[1], 2: expected[2]}
    assert wait_for(lambda: pipe.batch.active == 0, within=10)


def post_chat(url: str, clip, **body) -> httpx.Response:
    messages = [{"role": "user", "content": [audio_part(clip), {"type": "text", "text": "Hi"}]}]
    return httpx.post(f"{url}v1/chat/completions", json={"messages": messages, **body}, timeout=30)


def test_queue_full_is_429_with_retry_after(server, clips, pipe, monkeypatch):
    url, api = server
    monkeypatch.setattr(api, "max_waiting", 0)
    monkeypatch.setattr(pipe, "max_batch_rows", 0)
    r = post_chat(url, clips[0])
    assert r.status_code == 429 and r.headers["retry-after"] and "busy" in r.json()["error"]["message"]


def test_key_required_when_set_and_size_cap(server, clips, monkeypatch):
    url, api = server
    with monkeypatch.context() as m:
        m.setattr(api, "api_key", "s3cret")
        r = httpx.get(f"{url}v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = httpx.get(f"{url}v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert ok.status_code == 200
    monkeypatch.setattr(api, "cap", 1000)
    assert post_chat(url, clips[5]).status_code == 413


API_NAMES = {"beams": "num_beams", "max_new": "max_tokens", "temperature": "temperature", "rep": "repetition_penalty",
             "seed": "seed", "scale": "lora_scale"}


@pytest.mark.parametrize("case", [c for c in CASES if c.error and c.gradio], ids=lambda c: c.name)
def test_bad_inputs_are_4xx_with_the_studios_message(case, server, tmp_path):
    if case.ffmpeg and not HAS_FFMPEG:
        pytest.skip("needs ffmpeg")
    url, _ = server
    path = case.make(tmp_path) if case.make else write(tmp_path / "v.wav", tone(1.0), 16000)
    body = {"messages": [{"role": "user", "content": [audio_part(path), {"type": "text", "text": case.prompt}]}],
            "max_tokens": 2}
    for name, value in case.settings.items():
        if name == "sample":
            continue
        body[API_NAMES[name]] = value
    r = httpx.post(f"{url}v1/chat/completions", json=body, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert re.search(case.error, message) or (r.status_code == 413 and "limit" in message), message
    ok = post_chat(url, write(tmp_path / "ok.wav", tone(1.0), 16000), max_tokens=2)
    assert ok.status_code == 200, ok.text


def test_api_benchmark_smoke(tiny_root, tmp_path):
    from bench.api import main
    from bench.common import in_worker_thread

    results = tmp_path / "RESULTS.md"
    assert in_worker_thread(main, ["--tiny-test", str(tiny_root), "--clients", "3", "--tokens", "4", "--clip", "1",
                                   "--results", str(results)]) == 0
    text = results.read_text()
    assert "3 clients, 1 s clip each, 4 tokens each" in text and "API targets" in text
    assert "decoded together: at most" in text
