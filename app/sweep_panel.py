"""The Scale lab's "Scale sweep results" panel: load the results of `python -m model.sweep` (or run a
small sweep here, over the bundled clips or an uploaded annotation file and its clips) and see
each task's metric against the LoRA scale, the tables, and every answer of any row per scale.

A sweep run here takes its turn at the model through the app's ModelGate, like every model job,
and the session's Stop ends it after the row in progress."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator, Mapping

import gradio as gr

from model import sweep
from model.annotation import BUNDLED_DATA, load_annotation
from model.errors import ConfigError, SalmonnError, SettingsError
from model.pipeline import Pipeline
from model.sweep_report import figure, markdown, summarise

from .presets import EXAMPLES_DIR
from .runner import ModelGate, StopRegistry

# A run here generates at most this many tokens (rows x scales x max new tokens): the whole bundled
# set at 5 scales and 160 tokens fits, and Stop ends any run after its current row.
MAX_SWEEP_TOKENS = 20_000
AUDIO_TYPES = [".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus"]

INTRO = """\
Every row of an annotation file (official SALMONN format) answered at every LoRA scale and scored
per task: WER for speech recognition, BLEU for translation, accuracy for short answers, the
following rate for stories and descriptions, and every reference answer's perplexity. Run
`python -m model.sweep` for a full sweep on any checkpoint and load its `sweep.json` here, or run a
small one below (the first rows of each task)."""


# ----------------------------------------------------------------------------------- results

def read_results(path: str | Path) -> dict:
    """A sweep results file, checked enough to draw: a ConfigError says what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"Could not read the results file ({err}).") from None
    if not isinstance(data, dict) or data.get("format") != sweep.FORMAT:
        raise ConfigError("This is not a scale sweep results file (sweep.json from `python -m model.sweep`).")
    missing = [k for k in ("model", "generate", "scales", "rows", "results") if k not in data]
    if missing:
        raise ConfigError(f"The results file has no {', '.join(missing)}.")
    return data


def row_choices(data: dict) -> list[tuple[str, int]]:
    return [(f"{i + 1}. {r['task']} · {Path(r['path']).name} · {r['prompt'][:48]}", i) for i, r in enumerate(data["rows"])]


def score_text(family: str, entry: dict) -> str:
    """One answer's score in words, for the per-row table."""
    if family == "wer":
        return f"WER {100 * entry['errors'] / max(1, entry['ref_words']):.0f} %"
    if family == "bleu":
        return f"BLEU {entry['bleu']:.1f}"
    if family == "accuracy":
        return "right" if entry["correct"] else "wrong"
    if family in ("story", "description"):
        return "follows" if entry["follows"] else "does not follow"
    return ""


def answers_table(data: dict, index) -> list[list]:
    """[scale, answer, score, reference perplexity, words] for row `index`, one line per scale."""
    if index is None or not data or not 0 <= int(index) < len(data["rows"]):
        return []
    row = data["rows"][int(index)]
    lines = []
    for scale in data["scales"]:
        entry = data["results"].get(f"{row['id']}@{scale:g}")
        if entry is None:
            lines.append([f"{scale:g}", "(not answered)", "", "", ""])
            continue
        ppl = entry.get("perplexity")
        lines.append([f"{scale:g}", entry["answer"], score_text(row["family"], entry),
                      f"{ppl:.2f}" if ppl is not None else "", entry["words"]])
    return lines


def shown(data: dict, status: str) -> tuple:
    """(status, plot, tables, row picker, answers of its first row, data) for a results dict."""
    summary = summarise(data)
    choices = row_choices(data)
    first = choices[0][1] if choices else None
    return (status, figure(data, summary), markdown(data, summary),
            gr.Dropdown(choices=choices, value=first), answers_table(data, first), data)


# ----------------------------------------------------------------------------------- a run here

def annotation_rows(files, per_task: int) -> tuple[list[sweep.Row], str]:
    """The rows to sweep: the first `per_task` rows of each task, from the uploaded annotation JSON
    (its clips must be uploaded with it, matched by file name, or be bundled examples) or from the
    bundled set. Returns (rows, where they came from)."""
    files = [Path(f) for f in files or []]
    notes = [f for f in files if f.suffix.lower() == ".json"]
    if len(notes) > 1:
        raise ConfigError("Upload one annotation JSON (with the clips it names).")
    if notes:
        clips = {f.name: f for f in files if f.suffix.lower() != ".json"}

        def resolve(path: str) -> Path:      # never a path of the server's own: uploads and examples only
            name = Path(path).name
            found = clips.get(name) or (EXAMPLES_DIR / name if (EXAMPLES_DIR / name).is_file() else None)
            if found is None:
                raise ConfigError(f"audio file not found: {path} is neither among the uploaded clips nor a bundled "
                                  "example; upload it together with the annotation file.")
            return found

        rows, source = load_annotation(notes[0], resolve=resolve), notes[0].name
    else:
        rows, source = load_annotation(BUNDLED_DATA), "the bundled clips"
    taken: dict[str, int] = {}
    picked = []
    for r in rows:
        if taken.get(r.task, 0) < per_task:
            taken[r.task] = taken.get(r.task, 0) + 1
            picked.append(r)
    return picked, source


def check_run(pipe: Pipeline, files, scales_text: str, per_task, max_new):
    """Everything a run needs, checked before it waits for the model: (rows, scales, settings, source)."""
    try:
        per_task = int(per_task)
    except (TypeError, ValueError):
        raise SettingsError(f"Rows per task must be a whole number (got {per_task!r}).") from None
    if per_task < 1:
        raise SettingsError(f"Rows per task must be at least 1 (got {per_task}).")
    scales = [pipe.check_scale(s) for s in sweep.parse_scales(scales_text)]
    gen = pipe.check_generate(dataclasses.replace(pipe.default_generate, num_beams=1, max_new_tokens=max_new))
    rows, source = annotation_rows(files, per_task)
    asked = len(rows) * len(scales) * gen.max_new_tokens
    if asked > MAX_SWEEP_TOKENS:
        raise SettingsError(f"A sweep here generates at most {MAX_SWEEP_TOKENS:,} tokens ({len(rows)} rows × "
                            f"{len(scales)} scales × {gen.max_new_tokens} tokens = {asked:,}); use fewer rows per task, "
                            "scales or new tokens, or run `python -m model.sweep`.")
    return rows, scales, gen, source


def progress_line(done: int, total: int, t0: float) -> str:
    took = time.monotonic() - t0
    eta = f", about {took / done * (total - done):.0f} s left" if done else ""
    return f"⏳ Sweeping: {done} of {total} rows answered at every scale ({took:.0f} s{eta})."


def load_results(path) -> tuple:
    """The "load a results file" handler: (status, plot, tables, row picker, answers, data)."""
    if not path:
        return (gr.skip(),) * 6
    try:
        data = read_results(path)
        return shown(data, f"Loaded {Path(path).name}: {len(data['rows'])} rows × {len(data['scales'])} scales.")
    except Exception as err:  # noqa: BLE001 - a malformed file is the user's to fix
        text = str(err) if isinstance(err, SalmonnError) else f"The results file is malformed ({type(err).__name__}: {err})."
        gr.Warning(text)
        return (f"⚠️ {text}",) + (gr.skip(),) * 5


def run_in_turn(pipe: Pipeline, rows, scales, gen, source: str, gate: ModelGate, stop) -> Iterator[tuple]:
    """A checked sweep, run when it is this request's turn at the model: yields (status, plot, tables,
    row picker, answers, data, download), progress first, the results last (also when stopped)."""
    skip = (gr.skip(),) * 6
    folder = tempfile.mkdtemp(prefix="sweep-", dir=os.environ.get("GRADIO_TEMP_DIR"))
    store = sweep.SweepStore(folder, sweep.run_info(pipe, gen, source))
    ticket, t0 = None, time.monotonic()
    try:
        ticket = gate.join()
        for ahead in gate.waiting(ticket, stop):
            yield (f"⏳ Waiting for the model: {ahead} ahead of you…",) + skip
        t0 = time.monotonic()
        yield (progress_line(0, len(rows), t0),) + skip
        with closing(sweep.run_sweep(pipe, rows, scales, gen, store, stop=stop)) as steps:
            for step in steps:
                yield (progress_line(step.rows_done, step.rows_total, t0),) + skip
    except Exception as err:  # noqa: BLE001 - shown to the user
        text = str(err) if isinstance(err, SalmonnError) else f"Internal error ({type(err).__name__}): {err}"
        gr.Warning(text)
        yield (f"⚠️ {text}",) + skip
        return
    finally:      # also when Gradio closes this generator: the model is freed for the next in line
        if ticket is not None:
            gate.leave(ticket)
    paths = sweep.write_reports(store, rows, scales)
    done = sum(1 for r in rows if not store.pending(r, scales))
    line = (f"⏹ Stopped: {done} of {len(rows)} rows kept" if stop.is_set() else
            f"✅ Done: {len(rows)} rows of {source} × {len(scales)} scales") + f" in {time.monotonic() - t0:.0f} s."
    yield shown(store.data(rows, scales), line) + (str(paths[0]),)


def build_sweep_panel(pipes: Mapping[str, Pipeline], *, gate: ModelGate, stops: StopRegistry,
                      session: Callable[[gr.Request | None], str] | None = None, **events) -> dict:
    """The "Scale sweep results" accordion, in the current Blocks context. Model runs take their turn
    through `gate` and stop with the session's event in `stops`; `events` (e.g. concurrency_id,
    concurrency_limit) go to the run's event. Returns the handlers by name (tests call them)."""
    names = list(pipes)
    first = pipes[names[0]]
    session = session or (lambda request: getattr(request, "session_hash", None) or "default")
    with gr.Accordion("Scale sweep results", open=False, elem_id="sweep"):
        gr.Markdown(INTRO)
        with gr.Row():
            results_in = gr.File(label="Load a results file (sweep.json)", file_types=[".json"], type="filepath")
            data_in = gr.File(label="Or sweep your own clips: an annotation JSON and the clips it names",
                              file_count="multiple", file_types=[".json"] + AUDIO_TYPES, type="filepath")
        with gr.Row():
            model_dd = gr.Dropdown(names, value=names[0], label="Model", visible=len(names) > 1, scale=1)
            scales_tb = gr.Textbox(", ".join(f"{s:g}" for s in sweep.default_scales(first.trained_scale)),
                                   label="LoRA scales", scale=2)
            per_task = gr.Number(1, precision=0, minimum=1, label="Rows per task", scale=1)
            max_new = gr.Number(min(first.default_generate.max_new_tokens, 160), precision=0, minimum=1,
                                label="Max new tokens", scale=1)
            run_btn = gr.Button("Run sweep", variant="primary", elem_id="sweep-run", scale=1)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="sweep-stop", scale=0, min_width=80)
        status = gr.Markdown(elem_id="sweep-status")
        plot = gr.Plot(label="Metric vs LoRA scale", elem_id="sweep-plot")
        with gr.Accordion("Tables (task × scale)", open=False):
            tables = gr.Markdown()
        row_dd = gr.Dropdown(choices=[], label="Row: its answers at every scale", elem_id="sweep-row")
        answers = gr.Dataframe(headers=["LoRA scale", "answer", "score", "reference perplexity", "words"],
                               interactive=False, wrap=True)
        download = gr.File(label="Results of the run here (sweep.json)", interactive=False)
        state = gr.State()

    def run(files, model_name, scales_text, rows_per_task, max_new_tokens, request: gr.Request = None):
        pipe = pipes.get(model_name) or first
        try:       # every check before the request waits for the model
            rows, scales, gen, source = check_run(pipe, files, scales_text, rows_per_task, max_new_tokens)
        except SalmonnError as err:
            gr.Warning(str(err))
            yield (f"⚠️ {err}",) + (gr.skip(),) * 6
            return
        me = session(request)
        stop = stops.start(me)
        try:
            yield from run_in_turn(pipe, rows, scales, gen, source, gate, stop)
        finally:
            stops.finish(me, stop)

    def stop_run(request: gr.Request = None):
        stops.stop(session(request))

    outputs = [status, plot, tables, row_dd, answers, state]
    results_in.upload(load_results, results_in, outputs, api_name="sweep_load", queue=False)
    run_btn.click(run, [data_in, model_dd, scales_tb, per_task, max_new], outputs + [download], api_name="sweep_run",
                  **events)
    stop_btn.click(stop_run, None, None, api_visibility="private", concurrency_limit=None)  # never waits behind the run
    row_dd.change(answers_table, [state, row_dd], answers, api_visibility="private", queue=False)
    return {"load": load_results, "run": run, "stop": stop_run, "pick": answers_table}
