"""The scale sweep (`python -m model.sweep`): files and their shape, resuming, the metrics on hand-made
answers, batched scales, bad annotation files, and the Scale lab's panel over its results."""
from __future__ import annotations

import json
import math
import socket
import threading

import numpy as np
import pytest
import soundfile as sf

from model import metrics, sweep
from model.annotation import BUNDLED_DATA, load_annotation
from model.config import GenerateConfig
from model.errors import ConfigError, SettingsError
from model.answers import Score
from model.sweep_report import summarise

MAX_NEW = 3
TASKS = ["asr", "en2de", "QA", "gender_recognition", "story", "audiocaption"]


def write_clip(path, freq: float, seconds: float = 1.0) -> None:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def annotation(tmp_path_factory):
    """6 rows (one per task family and then some) over 3 clips, paths relative to the file."""
    root = tmp_path_factory.mktemp("sweep-data")
    (root / "clips").mkdir()
    for name, freq in (("a", 300.0), ("b", 500.0), ("c", 800.0)):
        write_clip(root / "clips" / f"{name}.wav", freq)
    rows = [
        {"path": "clips/a.wav", "text": "hello world", "task": "asr"},
        {"path": "clips/a.wav", "text": "hallo welt", "task": "en2de"},
        {"path": "clips/b.wav", "text": "Four.", "task": "QA", "Q": "How many beeps are there?"},
        {"path": "clips/b.wav", "text": "Male.", "task": "gender_recognition"},
        {"path": "clips/c.wav", "text": "the dog and the cat listen to the rain", "task": "story"},
        {"path": "clips/c.wav", "text": "rain and wind", "task": "audiocaption"},
    ]
    path = root / "data.json"
    path.write_text(json.dumps({"annotation": rows}))
    return path


@pytest.fixture()
def use_tiny(monkeypatch, tiny_pipeline):
    """The CLI's model is the tiny random one (the command line cannot describe its shapes)."""
    monkeypatch.setattr(sweep, "load_pipeline", lambda args: tiny_pipeline)
    return tiny_pipeline


def cli(annotation, out, *extra) -> int:
    return sweep.main(["--data", str(annotation), "--out", str(out), "--max-new-tokens", str(MAX_NEW), *extra])


# ----------------------------------------------------------------------------------- files

def test_sweep_writes_json_markdown_and_plot_tasks_by_scales(annotation, tmp_path, use_tiny):
    assert cli(annotation, tmp_path) == 0
    scales = sweep.default_scales(use_tiny.trained_scale)
    assert len(scales) == 5 and scales[0] == 0 and scales[-1] == use_tiny.trained_scale
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["scales"] == scales and [r["task"] for r in data["rows"]] == TASKS
    assert len(data["results"]) == 6 * 5
    assert list(data["summary"]) == TASKS
    assert all(list(t["scales"]) == [f"{s:g}" for s in scales] for t in data["summary"].values())
    families = {t: e["family"] for t, e in data["summary"].items()}
    assert families == dict(zip(TASKS, ["wer", "bleu", "accuracy", "accuracy", "story", "description"]))
    entry = data["results"][f"{data['rows'][0]['id']}@0"]
    assert {"answer", "num_tokens", "words", "errors", "ref_words", "perplexity", "nll", "ref_tokens"} <= set(entry)
    assert entry["num_tokens"] <= MAX_NEW and entry["perplexity"] > 1
    table = (tmp_path / "sweep.md").read_text()
    for title in ("Task metric by LoRA scale", "Perplexity of the reference answers", "Answer length"):
        block = table.split(title)[1].split("###")[0]
        lines = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(lines) == 1 + 6, block                 # header + one line per task
        assert all(line.count("|") == 2 + 1 + 5 for line in lines), block   # task, rows, 5 scales
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000


def test_resuming_after_an_interruption_writes_the_same_file(annotation, tmp_path, use_tiny, monkeypatch, capsys):
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert cli(annotation, full, "--scales", "0,1,2") == 0
    assert cli(annotation, parts, "--scales", "0,1,2", "--limit", "2") == 0
    real, calls = sweep.sweep_row, []

    def interrupted(*args, **kwargs):      # Ctrl+C while the second row of this run is answered
        calls.append(args[2].id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "sweep_row", interrupted)
    assert cli(annotation, parts, "--scales", "0,1,2") == 130
    assert "run the same command again" in capsys.readouterr().err
    kept = json.loads((parts / "sweep.json").read_text())
    assert len(kept["results"]) == 3 * 3                 # 2 rows of the first run + 1 of this one
    monkeypatch.setattr(sweep, "sweep_row", lambda *a, **k: calls.append(a[2].id) or real(*a, **k))
    calls.clear()
    assert cli(annotation, parts, "--scales", "0,1,2") == 0
    assert len(calls) == 3, "only the rows not yet done are answered"
    for name in ("sweep.json", "sweep.md"):
        assert (parts / name).read_text() == (full / name).read_text(), name


def test_a_resumed_sweep_must_have_the_same_decoding(annotation, tmp_path, use_tiny, capsys):
    assert cli(annotation, tmp_path, "--scales", "0", "--limit", "1") == 0
    assert sweep.main(["--data", str(annotation), "--out", str(tmp_path), "--max-new-tokens", "5"]) == 2
    assert "another generate" in capsys.readouterr().err


def test_stop_ends_the_sweep_after_the_row_in_progress(annotation, tiny_pipeline):
    rows = load_annotation(annotation)
    store = sweep.SweepStore(None, sweep.run_info(tiny_pipeline, GenerateConfig(max_new_tokens=MAX_NEW, num_beams=1),
                                                  annotation))
    stop = threading.Event()
    steps = []
    for step in sweep.run_sweep(tiny_pipeline, rows, [0.0, 1.0], GenerateConfig(max_new_tokens=MAX_NEW, num_beams=1),
                                store, stop=stop):
        steps.append(step)
        stop.set()
    assert len(steps) == 1 and len(store.results) == 2
    assert steps[0].rows_total == 6


# ----------------------------------------------------------------------------------- metrics

def test_wer_and_its_normalisation():
    assert metrics.wer(["a b c d"], ["a x c"]) == 0.5          # one substitution + one deletion over 4 words
    assert metrics.wer(["Turn on the lights, Nina."], ["turn on the  lights nina"]) == 0.0
    assert metrics.wer(["It is 4 o'clock"], ["it is four o'clock"]) == 0.0
    assert metrics.wer(["a b", "c d e f"], ["a b", "c"]) == 0.5   # corpus: 3 edits over 6 words
    assert metrics.words("Twenty-one Grüße!") == ["twenty", "one", "grüße"]
    assert metrics.words("我爱你") == ["我", "爱", "你"]           # a character error rate for Chinese
    assert metrics.words("13 cats") == ["13", "cats"]


def test_bleu_matches_its_definition():
    # 5/6 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams match; same length, so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)
    assert metrics.bleu(["Der Hund schläft ."], ["Der Hund schläft ."]) == pytest.approx(100)
    assert metrics.bleu(["the cat sat on the mat"], [""]) == 0.0
    assert metrics.bleu_tokenizer(["我爱你们"]) == "zh" and metrics.bleu_tokenizer(["こんにちは"]) == "char"
    assert metrics.bleu(["我爱你们"], ["我爱你们"]) == pytest.approx(100)


def test_accuracy_and_following_rules():
    assert metrics.answer_correct("Four.", "There are 4 beeps.")
    assert not metrics.answer_correct("Four.", "There are 3 beeps.")
    assert metrics.answer_correct("No.", "No, it is rain.") and not metrics.answer_correct("No.", "Yes, no doubt.")
    transcript = "the quick brown fox jumps over the lazy dog"
    story = ("Late at night the old keeper heard a strange beeping from the radio. He counted four sharp tones, "
             "each higher than the wind outside. Remembering his training, he climbed the stairs and lit the lamp. "
             "Far out at sea, a small boat saw the light and turned safely toward the harbor.")
    assert metrics.is_story(story, [transcript]) and not metrics.is_story(transcript, [transcript])
    assert metrics.describes("Rain falls on a tin roof.", [transcript])
    assert not metrics.describes("The quick brown fox jumps.", [transcript]) and not metrics.describes("Rain.", [])
    assert metrics.score_answer("wer", "a b c d", "a x c") == {"words": 3, "errors": 2, "ref_words": 4}
    assert metrics.score_answer("accuracy", "Yes.", "yes") == {"words": 1, "correct": True}
    assert metrics.score_answer("other", "x", "an answer") == {"words": 2}


def test_task_families():
    expected = {"asr": "wer", "asr_de": "wer", "phone_recognition": "wer", "translation_ec": "bleu", "en2de": "bleu",
                "QA": "accuracy", "gender_recognition": "accuracy", "emotion_recognition": "accuracy",
                "story": "story", "audio_story_telling": "story", "audiocaption": "description",
                "music_description": "description", "speech_audio": "other", "my_task": "other"}
    assert {t: metrics.family_of(t) for t in expected} == expected


def test_perplexity_from_known_log_probs():
    score = Score(1.0, ["a", "b"], [math.log(0.5), math.log(0.125)])
    assert score.perplexity == pytest.approx(4.0)               # exp of the mean NLL: sqrt(2 * 8)
    # corpus: 1 token at NLL ln 2 and 3 tokens at NLL ln 8 -> exp((ln 2 + 9 ln 2) / 4) = 2 ** 2.5
    assert metrics.perplexity([math.log(2), math.log(8)], [1, 3]) == pytest.approx(2 ** 2.5)
    assert math.isnan(metrics.perplexity([], []))


def test_summary_adds_rows_up_per_task_and_scale():
    rows = [{"id": "r1", "path": "a.wav", "task": "asr", "text": "a b c d"},
            {"id": "r2", "path": "b.wav", "task": "asr", "text": "e f"},
            {"id": "r3", "path": "a.wav", "task": "QA", "text": "Yes."},
            {"id": "r4", "path": "b.wav", "task": "QA", "text": "No."}]
    results = {"r1@0": {"answer": "a x c", "words": 3, "errors": 2, "ref_words": 4, "nll": math.log(2), "ref_tokens": 1},
               "r2@0": {"answer": "e f", "words": 2, "errors": 0, "ref_words": 2, "nll": math.log(8), "ref_tokens": 3},
               "r3@0": {"answer": "yes", "words": 1, "correct": True},
               "r4@0": {"answer": "yes", "words": 1, "correct": False}}
    summary = summarise({"rows": rows, "scales": [0.0, 2.0], "results": results})
    assert summary["asr"]["scales"]["0"]["metric"] == pytest.approx(100 * 2 / 6)
    assert summary["asr"]["scales"]["0"]["perplexity"] == pytest.approx(2 ** 2.5)
    assert summary["QA"]["scales"]["0"] == {"n": 2, "metric": 50.0, "perplexity": None, "words": 1.0}
    assert summary["QA"]["scales"]["2"] == {"n": 0, "metric": None, "perplexity": None, "words": None}


# ----------------------------------------------------------------------------------- batching

def test_batched_scales_equal_one_scale_at_a_time(annotation, tiny_pipeline):
    rows = load_annotation(annotation)
    gen = GenerateConfig(max_new_tokens=6, num_beams=1)
    refs = sweep.clip_references(rows)
    for row in (rows[0], rows[4]):
        enc = sweep.encode_row(tiny_pipeline, row)
        batched = sweep.sweep_row(tiny_pipeline, enc, row, [0.0, 1.0, 2.0], gen, refs[row.audio])
        for scale in (0.0, 1.0, 2.0):
            alone = sweep.sweep_row(tiny_pipeline, enc, row, [scale], gen, refs[row.audio])[scale]
            assert alone["answer"] == batched[scale]["answer"], (row.task, scale)
            assert alone["perplexity"] == pytest.approx(batched[scale]["perplexity"], rel=1e-4)
    assert len({batched[s]["answer"] for s in (0.0, 1.0, 2.0)}) > 1, "the scale matters in this model"


# ----------------------------------------------------------------------------------- bad input

def bad_file(tmp_path, content) -> str:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_bad_annotation_files_are_named_with_their_row(tmp_path):
    write_clip(tmp_path / "ok.wav", 440.0)
    ok = {"path": "ok.wav", "text": "hi"}
    cases = [
        ("{not json", "not valid JSON"),
        ({"rows": []}, 'no "annotation" list'),
        ({"annotation": [ok, {"path": "ok.wav"}]}, "annotation[1] has no 'text'"),
        ({"annotation": [{"text": "hi"}]}, "annotation[0] has no 'path'"),
        ({"annotation": [ok, ok, {"path": "gone.wav", "text": "x"}]}, "annotation[2]: audio file not found: gone.wav"),
        ({"annotation": [{"path": "ok.wav", "text": "x", "task": "my_task"}]},
         "annotation[0] (ok.wav): task 'my_task' has no instruction of its own; give the row a \"Q\""),
        ({"annotation": ["ok.wav"]}, "annotation[0] is not an object"),
    ]
    for content, message in cases:
        with pytest.raises(ConfigError) as err:
            load_annotation(bad_file(tmp_path, content))
        assert message in str(err.value), (content, str(err.value))
    rows = load_annotation(bad_file(tmp_path, {"annotation": [{**ok, "task": "my_task", "Q": "What?"}]}))
    assert rows[0].prompt == "What?" and rows[0].family == "other"


def test_bad_input_exits_2_with_the_message(annotation, tmp_path, use_tiny, capsys):
    cases = [
        (["--data", bad_file(tmp_path, {"annotation": [{"path": "x.wav"}]})], "annotation[0] has no 'text'"),
        (["--data", str(annotation), "--scales", "0,abc"], "'abc' is not a number"),
        (["--data", str(annotation), "--scales", "0,99"], "LoRA scale must be a number from 0 to 4"),
        (["--data", str(annotation), "--limit", "0"], "--limit must be at least 1"),
        (["--data", str(annotation), "--max-new-tokens", "0"], "Max new tokens must be"),
    ]
    for argv, message in cases:
        assert sweep.main(argv + ["--out", str(tmp_path / "out")]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()
    with pytest.raises(SettingsError, match="give at least one"):
        sweep.parse_scales(" , ")
    assert sweep.parse_scales("0, 1;2 2") == [0.0, 1.0, 2.0]


def test_the_bundled_set_covers_the_tasks_and_matches_the_app_texts():
    from app.presets import EXAMPLES, LAB_ITEMS

    rows = load_annotation(BUNDLED_DATA)
    assert {"wer", "bleu", "accuracy", "description", "story"} <= {r.family for r in rows}
    assert {"asr", "en2de", "QA", "audiocaption", "story"} <= {r.task for r in rows}
    assert all(r.path.startswith("../examples/") for r in rows)
    transcripts = {e.file: e.transcript for e in EXAMPLES if e.transcript}
    for r in rows:
        if r.task == "asr":
            assert r.text == transcripts[r.path.split("/")[-1]]
    assert {i.reference for i in LAB_ITEMS if i.preset in ("aac", "music", "story", "en2de")} <= {r.text for r in rows}


# ----------------------------------------------------------------------------------- the app's panel

@pytest.fixture()
def panel(tiny_pipeline):
    import gradio as gr

    from app.runner import ModelGate, StopRegistry
    from app.sweep_panel import build_sweep_panel

    gate = ModelGate(2)
    with gr.Blocks():
        handlers = build_sweep_panel({"tiny": tiny_pipeline}, gate=gate, stops=StopRegistry())
    return {**handlers, "gate": gate}


def test_the_panel_shows_a_results_file(annotation, tmp_path, use_tiny, panel):
    assert cli(annotation, tmp_path, "--scales", "0,2") == 0
    status, fig, tables, picker, answers, data = panel["load"](str(tmp_path / "sweep.json"))
    assert status.startswith("Loaded sweep.json: 6 rows × 2 scales") and len(fig.axes) >= 5
    assert "| asr · WER ↓ | 1 |" in tables
    assert [line[0] for line in answers] == ["0", "2"] and answers[0][2].startswith("WER ")
    assert [line[2] for line in panel["pick"](data, 2)][0] in ("right", "wrong")
    status, *rest = panel["load"](bad_file(tmp_path, {"annotation": []}))
    assert "not a scale sweep results file" in status


def test_the_panel_runs_a_small_sweep_in_turn_and_refuses_a_large_one(annotation, panel, tiny_pipeline):
    clips = [str(annotation.parent / "clips" / f"{n}.wav") for n in "abc"]
    updates = list(panel["run"]([str(annotation)] + clips, "tiny", "0, 2", 1, MAX_NEW))
    final = updates[-1]
    assert final[0].startswith("✅ Done: 6 rows of data.json × 2 scales"), final[0]   # one row per task
    assert final[6].endswith("sweep.json") and len(final[5]["results"]) == 12
    assert any("Sweeping: 1 of 6" in u[0] for u in updates)
    status = list(panel["run"](None, "tiny", "0, 2", 50, 2048))[-1][0]
    assert "at most 20,000 tokens" in status
    status = list(panel["run"]([str(annotation)], "tiny", "0", 1, MAX_NEW))[-1][0]
    assert "annotation[0]: audio file not found: clips/a.wav is neither among the uploaded clips" in status, status


def test_a_panel_run_waits_its_turn_and_stops_keeping_what_is_done(annotation, panel):
    clips = [str(annotation.parent / "clips" / f"{n}.wav") for n in "abc"]
    gate = panel["gate"]
    other = gate.join()                        # another model job holds the model
    run = panel["run"]([str(annotation)] + clips, "tiny", "0, 2", 1, MAX_NEW)
    assert next(run)[0] == "⏳ Waiting for the model: 1 ahead of you…"
    gate.leave(other)
    statuses = []
    for update in run:
        statuses.append(update[0])
        if "Sweeping: 1 of 6" in update[0]:
            panel["stop"](None)                # the session's Stop
    assert statuses[-1].startswith("⏹ Stopped: 1 of 6 rows kept"), statuses
    assert gate.ahead(gate.join()) == 0, "the run left the line"


def test_the_scale_lab_serves_the_panel(annotation, tmp_path, use_tiny):
    """Through the app's API: a results file loads, and a run over uploaded clips comes back with its file."""
    from gradio_client import Client, handle_file

    from app.ui import build_app, launch

    assert cli(annotation, tmp_path, "--scales", "0,2") == 0
    demo = build_app(use_tiny)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, *_ = client.predict(handle_file(str(tmp_path / "sweep.json")), api_name="/sweep_load")
        assert status.startswith("Loaded sweep.json: 6 rows × 2 scales"), status
        files = [handle_file(str(annotation))] + [handle_file(str(annotation.parent / "clips" / f"{n}.wav")) for n in "abc"]
        out = client.predict(files, "tiny-test", "0, 2", 1, MAX_NEW, api_name="/sweep_run")
        assert out[0].startswith("✅ Done: 6 rows of data.json × 2 scales"), out[0]
        assert json.loads(open(out[-1]).read())["format"] == sweep.FORMAT
    finally:
        demo.close()
