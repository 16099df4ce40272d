"""SALMONN Studio app, end to end through gradio_client against the app served on localhost with the
tiny random-weight model, plus the plot builders and the launcher's error exit."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import pytest
import torch

gr_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from app import lab, plots, presets  # noqa: E402
from app.ui import build_app, gate_of, launch  # noqa: E402
from model.config import Limit  # noqa: E402
from model.pipeline import Pipeline  # noqa: E402
from model.random_tiny import tiny_config  # noqa: E402
from tests.test_mic import virtual_mic  # noqa: E402,F401 - the live-microphone fixture

EXAMPLE = str(presets.EXAMPLES_DIR / "speech.wav")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_pipeline(root: Path, seed: int = 0) -> Pipeline:
    pipe = Pipeline.from_config(tiny_config(root))
    # peft starts LoRA B at zero, which would make every LoRA scale give the same answer; random B
    # makes the scale matter, so the tests can see that the chosen scale is really applied.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return pipe


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def pipe(tiny_root):
    return tiny_pipeline(tiny_root)


@pytest.fixture(scope="module")
def server(pipe):
    demo = build_app(pipe)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture()
def client(server):
    return Client(server, verbose=False)


def ask(client, question, scale, max_new=24, **kw):
    args = dict(question=question, path=handle_file(EXAMPLE), model_name="tiny-test", scale=scale, beams=1,
                sample=False, temperature=1.0, top_p=0.9, top_k=0, rep=1.0, max_new=max_new, seed=-1)
    args.update(kw)
    job = client.submit(**args, api_name="/ask")
    updates = [out for out in job]
    return updates, job.outputs()[-1]


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


# ------------------------------------------------------------------------------------------ app

def test_upload_shows_what_the_model_hears(client):
    heard, summary, spec, attn, window, bar, chat, sent, details = client.predict(
        handle_file(EXAMPLE), "tiny-test", "all", "average", api_name="/load_audio")
    assert "16 kHz mono" in summary and "Audio tokens:" in summary
    from PIL import Image

    spec_img, attn_img = Image.open(spec), Image.open(attn)
    assert spec_img.width == attn_img.width == int(plots.FIG_WIDTH * plots.DPI)
    assert Path(heard).is_file() and chat == []
    assert bar and bar["type"] == "matplotlib"


def test_the_summary_says_when_an_abrupt_start_got_a_lead_in(client, pipe, monkeypatch, tmp_path):
    # speech.wav starts speaking after 0.02 s; a model with a 0.25 s lead-in pads it, and says so
    summary = client.predict(handle_file(EXAMPLE), "tiny-test", "all", "average", api_name="/load_audio")[1]
    assert "quiet added" not in summary
    wav, rate = sf.read(EXAMPLE, dtype="float32")
    sf.write(tmp_path / "abrupt.wav", 0.9 * wav, rate)    # new audio: not in the app's or pipeline's cache
    monkeypatch.setattr(pipe.model, "cfg", pipe.model.cfg.replace(lead_in_seconds=0.25))
    summary = client.predict(handle_file(str(tmp_path / "abrupt.wav")), "tiny-test", "all", "average",
                             api_name="/load_audio")[1]
    assert "0.23 s of quiet added in front" in summary


def test_preset_streamed_answer_and_scale_reported(client, pipe):
    client.predict(handle_file(EXAMPLE), "tiny-test", "all", "average", api_name="/load_audio")
    prompt, note = client.predict(presets.PRESETS_BY_KEY["asr"].label, api_name="/preset")
    assert prompt == "Recognize the speech and give me the transcription." and "Level 1" in note
    assert "4 beams" in note
    # the suggestion button: transcription at the trained scale with 4 beams; a story at half scale, greedy
    trained = pipe.trained_scale
    assert client.predict(presets.PRESETS_BY_KEY["asr"].label, api_name="/suggested") == (trained, 4, 0.0)   # no CTC head: no guidance
    assert client.predict(presets.PRESETS_BY_KEY["story"].label, api_name="/suggested") == (round(trained / 2, 1), 1, 0.0)

    updates, (chat, _, sent, details) = ask(client, prompt, scale=1.3)
    assert len(updates) >= 3, "the answer should arrive as a stream of partial updates"
    assert text_of(chat[0]) == prompt and chat[1]["role"] == "assistant"
    assert "LoRA scale 1.3" in text_of(chat[1])
    assert details["lora_scale"] == pytest.approx(1.3) and details["num_tokens"] > 0
    assert "<SpeechHere>" in sent and prompt in sent

    # A follow-up turn at another scale: the used scale is reported, and the history is in the prompt.
    _, (chat2, _, sent2, details2) = ask(client, "Say it again.", scale=0.0)
    assert len(chat2) == 4 and "LoRA scale 0" in text_of(chat2[3])
    assert details2["lora_scale"] == 0.0
    assert prompt in sent2 and "Say it again." in sent2

    # Regenerate replaces the last turn (same question, current settings); Clear empties the chat.
    job = client.submit(handle_file(EXAMPLE), "tiny-test", 2.0, 1, False, 1.0, 0.9, 0, 1.0, 12, -1, 0.0,
                        api_name="/regenerate")
    chat3, _, sent3, details3 = job.result(timeout=60)
    assert len(chat3) == 4 and text_of(chat3[2]) == "Say it again." and details3["lora_scale"] == 2.0
    assert sent3 == sent2
    chat4, _, _ = client.predict(api_name="/clear")
    assert chat4 == []


def test_decoding_controls_change_the_answer(client):
    client.predict(handle_file(EXAMPLE), "tiny-test", "all", "average", api_name="/load_audio")
    _, (chat, *_) = ask(client, "Describe the audio.", scale=2.0, max_new=5)
    _, (chat_long, *_, details) = ask(client, "Describe the audio.", scale=2.0, max_new=20)
    assert details["generate"]["max_new_tokens"] == 20 and details["num_tokens"] > 5
    assert "5 tokens" in text_of(chat[1])


def test_offensive_words_are_blocked_unless_the_box_is_cleared(client, monkeypatch):
    """The box (on by default) sends the word list as the answer's bad_words; the details show how many
    (keeping them out of answers is decoding's, tested there and through the API)."""
    client.predict(handle_file(EXAMPLE), "tiny-test", "all", "average", api_name="/load_audio")
    monkeypatch.setattr(presets, "OFFENSIVE_WORDS", ("alpha", "beta", "gamma"))
    _, (*_, details) = ask(client, "Describe the audio.", scale=2.0, max_new=4)
    assert details["generate"]["blocked_words"] == 3 and "bad_words" not in details["generate"]
    _, (*_, details) = ask(client, "Describe the audio.", scale=2.0, max_new=4, clean=False)
    assert details["generate"]["blocked_words"] == 0


def test_stop_cancels_generation(client):
    client.predict(handle_file(EXAMPLE), "tiny-test", "all", "average", api_name="/load_audio")
    job = client.submit(question="Tell me a very long story.", path=handle_file(EXAMPLE), model_name="tiny-test",
                        scale=2.0, beams=1, sample=False, temperature=1.0, top_p=0.9, top_k=0, rep=1.0,
                        max_new=1024, seed=-1, api_name="/ask")
    # wait for the first streamed tokens, then stop
    deadline = time.time() + 30
    while time.time() < deadline and len(job.outputs()) < 2:
        time.sleep(0.05)
    t0 = time.time()
    client.predict(api_name="/stop")
    chat, _, _, details = job.result(timeout=30)
    assert time.time() - t0 < 5
    assert details["stopped"] is True and details.get("num_tokens", 0) < 1024
    assert "stopped" in text_of(chat[-1])


def test_errors_are_messages_not_crashes(client, tmp_path):
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    out = client.predict(handle_file(str(bad)), "tiny-test", "all", "average", api_name="/load_audio")
    assert out[1].startswith("⚠️")
    _, (chat, *_) = ask(client, "Describe the audio.", scale=2.0, path=handle_file(str(bad)))
    assert text_of(chat[-1]).startswith("⚠️")
    # the app still answers afterwards
    _, (chat, *_) = ask(client, "Describe the audio.", scale=2.0)
    assert "LoRA scale 2" in text_of(chat[-1])


def test_scale_lab_one_answer_per_scale(client):
    html_out, raw, status = client.predict(handle_file(EXAMPLE), "Write a story.", "0, 1, 2, 3", 1, False, 1.0, 0.9,
                                           0, 1.0, 16, -1, 0.0, api_name="/scale_lab")
    assert status.startswith("✅ Done: 4 answers")
    answers = raw["tiny-test"]
    assert [a["lora_scale"] for a in answers] == [0.0, 1.0, 2.0, 3.0]
    assert len({a["text"] for a in answers}) > 1, "different LoRA scales should change the answer"
    assert html_out.count("lab-answer") == 4


def test_perplexity_sweep(client):
    items = presets.DEFAULT_LAB_ITEMS[:2]
    plot, table, status = client.predict(items, "0, 2, 4", api_name="/perplexity")
    assert status.startswith("✅ Done: 2 of 2 clips measured")
    rows = table["data"]
    assert len(rows) == 2 * 3 and all(float(r[3]) > 1.0 for r in rows)
    assert plot["type"] == "matplotlib"


def test_two_models_compared_in_lab(pipe, tmp_path):
    other = tiny_pipeline(tmp_path / "b", seed=1)
    *_, results = lab.compare_scales({"a": pipe, "b": other}, EXAMPLE, "Describe the audio.", [0.0, 2.0])
    assert list(results) == ["a", "b"] and all(len(v.answers) == 2 for v in results.values())
    *_, (curves, table, done, total) = lab.perplexity_sweep({"a": pipe, "b": other}, presets.DEFAULT_LAB_ITEMS[:1],
                                                            [0.0, 2.0])
    assert done == total == 2
    assert set(curves) == {"a", "b"} and len(table) == 4
    demo = build_app(pipe, {"instruction-tuned": other})   # builds with a model picker
    assert demo is not None


def test_safe_serving_defaults(server, pipe):
    from app.ui import ASSETS_DIR, launch_kwargs

    kw = launch_kwargs()
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["max_file_size"] == "50mb"
    assert kw["allowed_paths"] == [str(ASSETS_DIR / "examples")]     # nothing else of ours is served
    assert server.startswith("http://127.0.0.1:")
    demo = build_app(pipe, queue_size=5)
    assert gate_of(demo).max_waiting == 5 and demo._queue.max_size is not None   # a bounded queue


# ------------------------------------------------------------------------------------------ plots

class FakeTokens:
    """AudioTokens-like geometry: 16 windows of 17 frames (0.34 s), 5 s of audio."""

    def __init__(self, seconds=5.0, windows=16, layers=2, heads=3, chunks=1):
        rng = np.random.default_rng(0)
        attn = rng.random((windows, layers, heads, 1, 17)).astype(np.float32)
        self.cross_attentions = attn / attn.sum(-1, keepdims=True)
        self.window_seconds = 0.34
        per_chunk = windows // chunks
        self.window_starts = np.concatenate([c * 30.0 + np.arange(per_chunk) * 0.34 for c in range(chunks)])
        self.chunk_starts = np.arange(chunks) * 30.0
        self.seconds = seconds
        self.mel = rng.random((80, int(seconds * 100))).astype(np.float32)


def test_attention_timeline_places_frames_in_seconds():
    tok = FakeTokens()
    rows, labels = plots.attention_rows(tok.cross_attentions, "all", "average")
    assert rows.shape == (2, 16, 17) and labels == ["L1 · H avg", "L2 · H avg"]
    t_end = plots.view_end(tok)
    assert t_end == pytest.approx(5.1)      # the audio's end, extended to its window's end
    matrix, dt = plots.attention_timeline(rows, tok.window_starts, tok.window_seconds, t_end)
    assert dt == pytest.approx(0.02)
    assert matrix.shape == (2, 255)         # 15 windows x 17 frames of 20 ms cover 0 .. 5.1 s
    # window k's frames sit in columns 17k .. 17k+16 and each window sums to one
    k = 7
    np.testing.assert_allclose(matrix[0, 17 * k: 17 * (k + 1)], rows[0, k], rtol=1e-6)
    np.testing.assert_allclose(matrix.reshape(2, 15, 17).sum(-1), 1.0, rtol=1e-5)
    r_all, l_all = plots.attention_rows(tok.cross_attentions, "all", "all")
    assert r_all.shape[0] == 6 and len(l_all) == 6
    r_one, _ = plots.attention_rows(tok.cross_attentions, "2", "3")
    np.testing.assert_allclose(r_one[0], tok.cross_attentions[:, 1, 2, 0])


def test_chunk_gap_is_empty_and_long_audio_marked():
    tok = FakeTokens(seconds=45.0, windows=176, chunks=2)
    rows, _ = plots.attention_rows(tok.cross_attentions, "average", "average")
    matrix, dt = plots.attention_timeline(rows, tok.window_starts, tok.window_seconds, plots.view_end(tok))
    gap = slice(int(round(29.92 / dt)), int(round(30.0 / dt)))
    assert np.isnan(matrix[0, gap]).all() and not np.isnan(matrix[0, :100]).any()
    fig, axis = plots.spectrogram_figure(tok)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (s)" and ax.get_xlim()[1] == pytest.approx(45.0, abs=0.4)
    assert "2 chunks" in ax.get_title(loc="left")
    assert any(abs(line.get_xdata()[0] - 30.0) < 1e-9 for line in ax.get_lines())   # the chunk boundary


def test_images_align_and_clicks_map_to_windows():
    tok = FakeTokens()
    spec_fig, spec_axis = plots.spectrogram_figure(tok, selected=3)
    attn_fig, attn_axis = plots.attention_figure(tok, "all", "all", selected=3)
    spec, attn = plots.render(spec_fig), plots.render(attn_fig)
    assert spec.shape[1] == attn.shape[1] == 1000 and spec.shape[2] == 3 and spec.dtype == np.uint8
    assert spec_axis.to_dict() == attn_axis.to_dict()          # same time axis in both pictures
    assert attn_fig.axes[0].get_xlabel() == "time (s)"
    for k in (0, 7, 14):
        centre = tok.window_starts[k] + tok.window_seconds / 2
        x = spec_axis.x0_px + centre / spec_axis.t1 * (spec_axis.x1_px - spec_axis.x0_px)
        assert plots.window_at(tok, spec_axis.time_at(x)) == k
    assert plots.window_at(tok, 100.0) is None
    bar = plots.window_bar_figure(tok, 7, "average", "average")
    heights = [p.get_height() for p in bar.axes[0].patches]
    assert len(heights) == 17 and sum(heights) == pytest.approx(1.0, rel=1e-5)
    assert bar.axes[0].get_xlim() == pytest.approx((7 * 0.34, 8 * 0.34))


# ------------------------------------------------------------------------------------------ data, launcher

def test_presets_cover_the_paper_levels_and_examples_exist():
    from app.make_examples import check

    keys = {p.key for p in presets.PRESETS}
    assert {"asr", "en2zh", "aac", "phones", "emotion", "music", "overlap", "speaker", "gender"} <= keys
    assert {"en2de", "en2ja", "keywords", "sqqa", "slots", "story", "sac"} <= keys
    for p in presets.PRESETS:
        assert (presets.EXAMPLES_DIR / p.example).is_file(), p.example
    assert presets.PRESETS_BY_KEY["story"].prompt.startswith("Based on the audio, write a story in detail.")
    assert check() == []
    limit = Limit("LoRA scale", 0.0, 8.0)
    assert lab.parse_scales("0, 1,2.5", limit) == [0.0, 1.0, 2.5]
    with pytest.raises(Exception, match="LoRA scale must be a number from 0 to 8"):
        lab.parse_scales("9", limit)


def test_launcher_bad_path_exits_2_with_message(tiny_root, tmp_path, capsys):
    import launch_app

    rc = launch_app.main(["--tiny-test-model", str(tiny_root), "--ckpt", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pth" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ desktop microphone

def test_desktop_mic_panel_records_into_the_audio_box(virtual_mic, pipe):
    """Real capture from a virtual PulseAudio microphone (tests/test_mic.py's fixture): the panel is
    offered when a device exists, and a take that ends on silence comes back as (rate, samples)."""
    import subprocess

    from app import mic_panel
    from tests.test_mic import DEVICE, SINK

    devices = mic_panel.input_devices()
    assert any(d["name"] == DEVICE for d in devices)
    demo = build_app(pipe, desktop_mic=None)
    labels = [b.get("props", {}).get("label") for b in demo.config["components"]]
    assert "Desktop microphone (this computer)" in labels and "Input device" in labels
    assert "Input device" not in [b.get("props", {}).get("label")
                                  for b in build_app(pipe, desktop_mic=False).config["components"]]

    panel = mic_panel.DesktopMic()
    device = next(d["index"] for d in devices if d["name"] == DEVICE)
    panel.start("s1", device, stop_on_silence=True, silence_s=1.0, max_seconds=15)
    time.sleep(0.3)
    subprocess.run(["paplay", f"--device={SINK}", EXAMPLE], check=True, timeout=20)
    deadline, audio = time.time() + 10, None
    while time.time() < deadline:
        db, recording, seconds, audio = panel.poll("s1")
        if not recording:
            break
        time.sleep(0.1)
    assert audio is not None, "the take should end by itself after the clip's trailing silence"
    rate, wav = audio
    assert 3.0 < len(wav) / rate < 10.0 and np.abs(wav).max() > 0.05
    assert pipe.prepare(audio).seconds > 3.0
    assert panel.poll("s1")[1] is False and panel.stop("s1") is None


def test_perplexity_legend_fits_and_tells_the_checkpoints_apart():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    curves = {name: {label: [(s, 2.0 + s + k) for s in (0.0, 2.0, 4.0)] for k, label in
                     enumerate(i.label for i in presets.LAB_ITEMS[:4])}
              for name in ("activation-tuned", "instruction-tuned")}
    fig = plots.perplexity_figure(curves, 4.0)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert {"activation-tuned", "instruction-tuned"} <= set(labels)
    assert set(curves["activation-tuned"]) <= set(labels)
    box, page = legend.get_window_extent(canvas.get_renderer()), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
    styles = {line.get_linestyle() for line in fig.axes[0].get_lines() if line.get_marker() == "o"}
    assert len(styles) == 2, "each checkpoint has its own line style"
