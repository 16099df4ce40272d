"""Scale sweep: every row of an annotation file answered at several LoRA scales and scored per task,
the paper's picture of trained-task accuracy against emergent abilities as the LoRA scale changes.

    python -m model.sweep --out runs/sweep                               # SALMONN-tiny, bundled clips
    python -m model.sweep --variant instruction --out runs/sweep-it      # its instruction-tuned weights
    python -m model.sweep --config decode_config.yaml --data my.json --scales 0,1,2,3,4 --out runs/13b

The annotation file is the official SALMONN format, {"annotation": [{"path", "text", "task", "Q"}]}
(model/annotation.py; "text" is the reference answer). Each clip is encoded once, and each row is
answered at all its scales in one batch (`Pipeline.answer_many`); the reference answer's perplexity
comes from `Pipeline.score`. Metrics per task: model/metrics.py.

Writes to --out: sweep.json (every answer and score, saved after each row: a second run with the
same --out skips what is done, so Ctrl+C loses at most the row in progress), sweep.md (task x scale
tables) and sweep.png (metric against scale, one panel per metric family).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import metrics
from .annotation import BUNDLED_DATA, Row, load_annotation
from .config import GenerateConfig
from .errors import ConfigError, SalmonnError, SettingsError

RESULTS_FILE = "sweep.json"
FORMAT = "salmonn-scale-sweep/1"


# ----------------------------------------------------------------------------------- scales

def default_scales(trained: float) -> list[float]:
    """0 to the trained scale in 5 steps (0, 1, 2, 3, 4 for SALMONN's 4.0)."""
    return [round(trained * k / 4, 6) for k in range(5)]


def parse_scales(text: str) -> list[float]:
    """"0,1,2.5" -> [0.0, 1.0, 2.5] in the given order without repeats; the range is the pipeline's
    to check (`Pipeline.check_scale`)."""
    scales: list[float] = []
    for part in str(text).replace(";", ",").replace(" ", ",").split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise SettingsError(f"LoRA scales: {part.strip()!r} is not a number; give a comma list, e.g. 0,1,2,3,4.") from None
        if value not in scales:
            scales.append(value)
    if not scales:
        raise SettingsError("LoRA scales: give at least one, e.g. 0,1,2,3,4.")
    return scales


def scale_key(scale: float) -> str:
    return f"{scale:g}"


# ----------------------------------------------------------------------------------- results file

class SweepStore:
    """Every answer and score of a sweep, keyed "<row id>@<scale>", saved as JSON after each row.

    Opening a folder that holds a sweep resumes it: rows done at a scale are skipped. A sweep of
    another model or other decoding settings is refused (its answers would not be comparable)."""

    def __init__(self, folder: str | Path | None, run: dict):
        self.folder = Path(folder) if folder else None
        self.run = run
        self.results: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            self._resume()

    @property
    def path(self) -> Path | None:
        return self.folder / RESULTS_FILE if self.folder else None

    def _resume(self) -> None:
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{self.path} is not a sweep results file ({err}); give another --out.") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise ConfigError(f"{self.path} is not a sweep results file; give another --out.")
        for key in ("model", "generate"):
            if old.get(key) != self.run[key]:
                raise ConfigError(f"{self.path} holds a sweep with another {key} ({old.get(key)}, now {self.run[key]}); "
                                  "give another --out, or delete it to start again.")
        self.results = dict(old.get("results") or {})

    def pending(self, row: Row, scales: Sequence[float]) -> list[float]:
        return [s for s in scales if f"{row.id}@{scale_key(s)}" not in self.results]

    def add(self, row: Row, entries: dict[float, dict]) -> None:
        for scale, entry in entries.items():
            self.results[f"{row.id}@{scale_key(scale)}"] = entry

    def data(self, rows: Sequence[Row], scales: Sequence[float]) -> dict:
        """The file's content: results in row order, then scale order (the same however it was run)."""
        order = {r.id: i for i, r in enumerate(rows)}

        def rank(key: str):
            rid, _, scale = key.rpartition("@")
            return order.get(rid, len(order)), rid, float(scale)

        from .sweep_report import summarise

        results = {k: self.results[k] for k in sorted(self.results, key=rank)}
        data = {"format": FORMAT, **self.run, "scales": list(scales), "rows": [r.as_dict() for r in rows],
                "results": results}
        return {**data, "summary": summarise(data)}

    def save(self, rows: Sequence[Row], scales: Sequence[float]) -> None:
        if self.path is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data(rows, scales), indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.path)       # atomic: an interrupted save never leaves half a file


def run_info(pipe, gen: GenerateConfig, data: str | Path) -> dict:
    """What identifies a sweep's answers: the model (name, checkpoint file, trained scale) and decoding."""
    ckpt = pipe.cfg.ckpt
    return {"model": {"name": pipe.cfg.name, "checkpoint": Path(ckpt).name if ckpt else "",
                      "trained_scale": pipe.trained_scale},
            "generate": json.loads(json.dumps(dataclasses.asdict(gen))),   # as the file holds it (tuples as lists)
            "data": str(data)}


# ----------------------------------------------------------------------------------- running

@dataclass
class Progress:
    rows_done: int
    rows_total: int
    row: Row
    entries: dict[float, dict]


def clip_references(rows: Sequence[Row]) -> dict[str, dict[str, list[str]]]:
    """{audio: {"transcripts": [...], "captions": [...]}}: what a story or description of the clip must
    not merely copy (the following rules in model/metrics.py)."""
    refs: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        mine = refs.setdefault(r.audio, {"transcripts": [], "captions": []})
        if r.family == "wer":
            mine["transcripts"].append(r.text)
        elif r.family == "description":
            mine["captions"].append(r.text)
    return refs


def answer_at_scales(pipe, enc, prompt: str, scales: list[float], gen: GenerateConfig,
                     stop: threading.Event | None):
    """The answers at every scale in one batch; None when `stop` cut them short."""
    if stop is None:
        return pipe.answer_many(enc, prompt, lora_scales=scales, generate=gen)
    last = None
    with closing(pipe.stream_many(enc, prompt, lora_scales=scales, generate=gen, stop=stop)) as events:
        for last in events:
            pass
    if stop.is_set() or last is None or not last.answers or any(a.stopped for a in last.answers):
        return None
    return last.answers


def sweep_row(pipe, enc, row: Row, scales: list[float], gen: GenerateConfig, refs: dict,
              stop: threading.Event | None = None) -> dict[float, dict] | None:
    """{scale: entry} for one row: the answer, its scores and the reference's perplexity."""
    answers = answer_at_scales(pipe, enc, row.prompt, scales, gen, stop)
    if answers is None:
        return None
    scores = pipe.score(enc, row.prompt, row.text, lora_scales=scales) if row.text.strip() else [None] * len(scales)
    entries = {}
    for scale, answer, score in zip(scales, answers, scores):
        entry = {"answer": answer.text, "num_tokens": answer.num_tokens,
                 **metrics.score_answer(row.family, row.text, answer.text, refs["transcripts"], refs["captions"])}
        if score is not None:      # rounded: a resumed run writes the same file
            entry.update(perplexity=round(score.perplexity, 4), nll=round(score.nll, 5), ref_tokens=len(score.logprobs))
        entries[scale] = entry
    return entries


def run_sweep(pipe, rows: Sequence[Row], scales: Sequence[float], gen: GenerateConfig, store: SweepStore,
              stop: threading.Event | None = None) -> Iterator[Progress]:
    """Answer and score every row not yet in `store` at `scales`, clip by clip (each encoded once),
    saving after each row; yields after each. Ends early when `stop` is set (the row in progress is
    not kept)."""
    scales = [pipe.check_scale(s) for s in scales]
    todo = [r for r in rows if store.pending(r, scales)]
    clips = list(dict.fromkeys(r.audio for r in todo))
    todo.sort(key=lambda r: clips.index(r.audio))          # a clip's rows one after another
    refs = clip_references(rows)
    done, encoded = 0, {}
    for row in todo:
        if stop is not None and stop.is_set():
            return
        if row.audio not in encoded:
            encoded = {row.audio: encode_row(pipe, row)}    # one clip held at a time
        entries = sweep_row(pipe, encoded[row.audio], row, store.pending(row, scales), gen, refs[row.audio], stop)
        if entries is None:
            return
        store.add(row, entries)
        store.save(rows, scales)
        done += 1
        yield Progress(done, len(todo), row, entries)


def encode_row(pipe, row: Row):
    """The row's clip, encoded; a clip the pipeline refuses is named with its row."""
    try:
        return pipe.encode(pipe.prepare(row.audio))
    except SalmonnError as err:
        raise ConfigError(f"{row.path} (task {row.task}): {err}") from None


# ----------------------------------------------------------------------------------- command line

def write_reports(store: SweepStore, rows: Sequence[Row], scales: Sequence[float]) -> list[Path]:
    from .sweep_report import write_reports as write

    return write(store.data(rows, scales), store.folder)


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_args

    parser = argparse.ArgumentParser(prog="python -m model.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data", default=None,
                        help="annotation JSON in the official format (default: the bundled clips, assets/sweep/examples.json)")
    parser.add_argument("--scales", default=None, help="LoRA scales, comma list (default: 0 to the trained scale in 5 steps)")
    parser.add_argument("--out", default="runs/sweep", help="folder for sweep.json/.md/.png; an existing sweep there is resumed")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows (a quick look)")
    parser.add_argument("--num-beams", type=int, default=1, help="beams (default 1: greedy, the fastest)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default: the config's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.limit is not None and args.limit < 1:
            raise SettingsError(f"--limit must be at least 1 (got {args.limit}).")
        scales = parse_scales(args.scales) if args.scales is not None else None
        rows = load_annotation(args.data or BUNDLED_DATA, limit=args.limit)
        pipe = load_pipeline(args)
        scales = [pipe.check_scale(s) for s in (scales or default_scales(pipe.trained_scale))]
        gen = dataclasses.replace(pipe.default_generate, num_beams=args.num_beams)
        if args.max_new_tokens is not None:
            gen = dataclasses.replace(gen, max_new_tokens=args.max_new_tokens)
        gen = pipe.check_generate(gen)
        store = SweepStore(args.out, run_info(pipe, gen, args.data or "assets/sweep/examples.json (bundled)"))
        return run_with_progress(pipe, rows, scales, gen, store)
    except SalmonnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def load_pipeline(args):
    from .cli import config_from_args
    from .pipeline import Pipeline

    return Pipeline.from_config(config_from_args(args), progress=lambda msg: print(f"[load] {msg}", file=sys.stderr))


def run_with_progress(pipe, rows: list[Row], scales: list[float], gen: GenerateConfig, store: SweepStore) -> int:
    """The sweep with a progress bar on stderr; Ctrl+C keeps every finished row. Prints the tables."""
    from tqdm import tqdm

    pending = sum(1 for r in rows if store.pending(r, scales))
    print(f"[sweep] {len(rows)} rows x {len(scales)} scales ({', '.join(map(scale_key, scales))}); "
          f"{len(rows) - pending} rows already done in {store.path}", file=sys.stderr)
    t0, stopped = time.perf_counter(), False
    with tqdm(total=pending, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for step in run_sweep(pipe, rows, scales, gen, store):
                bar.set_postfix_str(f"{step.row.task} · {Path(step.row.path).name}", refresh=False)
                bar.update(1)
        except KeyboardInterrupt:
            stopped = True
    store.save(rows, scales)
    paths = write_reports(store, rows, scales)
    print(paths[1].read_text(encoding="utf-8"))
    took = f"{time.perf_counter() - t0:.0f} s"
    if stopped:
        print(f"[sweep] stopped after {took}; finished rows are kept in {store.path}: run the same command "
              "again to go on.", file=sys.stderr)
        return 130
    print(f"[sweep] done in {took}: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
