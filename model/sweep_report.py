"""A scale sweep's results (the JSON `model.sweep` writes) as per-task numbers per LoRA scale, as
markdown tables and as a figure: metric against LoRA scale, one panel per metric family, one line
per task. Plain functions of that JSON, so the app draws a loaded file the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from . import metrics

# family -> (name in tables, unit, better); following rates share one panel
METRICS = {
    "wer": ("WER", "%", "↓"),
    "bleu": ("BLEU", "", "↑"),
    "accuracy": ("accuracy", "%", "↑"),
    "story": ("following rate", "%", "↑"),
    "description": ("following rate", "%", "↑"),
}
FILES = ("sweep.json", "sweep.md", "sweep.png")


def _key(scale: float) -> str:
    return f"{scale:g}"


def task_metric(family: str, rows: Sequence[dict], entries: Sequence[dict]) -> float | None:
    """The task's own metric over its answered rows (`entries[i]` answers `rows[i]`); None for the
    "other" family or no rows."""
    if not entries or family not in METRICS:
        return None
    if family == "wer":
        return 100 * sum(e["errors"] for e in entries) / max(1, sum(e["ref_words"] for e in entries))
    if family == "bleu":
        return metrics.bleu([r["text"] for r in rows], [e["answer"] for e in entries])
    flag = "correct" if family == "accuracy" else "follows"
    return 100 * sum(bool(e[flag]) for e in entries) / len(entries)


def summarise(data: dict) -> dict[str, dict]:
    """{task: {"family", "rows", "scales": {scale: {"n", "metric", "perplexity", "words"}}}} in the
    order tasks first appear; cells cover the rows answered so far."""
    by_task: dict[str, list[dict]] = {}
    for row in data["rows"]:
        by_task.setdefault(row["task"], []).append(row)
    results = data["results"]
    summary = {}
    for task, rows in by_task.items():
        family = metrics.family_of(task)
        cells = {}
        for scale in data["scales"]:
            done = [(r, results[f"{r['id']}@{_key(scale)}"]) for r in rows if f"{r['id']}@{_key(scale)}" in results]
            scored = [e for _, e in done if "nll" in e]
            cells[_key(scale)] = {
                "n": len(done),
                "metric": task_metric(family, [r for r, _ in done], [e for _, e in done]),
                "perplexity": metrics.perplexity([e["nll"] for e in scored], [e["ref_tokens"] for e in scored])
                if scored else None,
                "words": sum(e["words"] for _, e in done) / len(done) if done else None,
            }
        summary[task] = {"family": family, "rows": len(rows), "scales": cells}
    return summary


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None or value != value:        # None or NaN
        return "–"
    return f"{value:.{digits}f}{' ' + unit if unit else ''}"


def _table(title: str, summary: dict, scales: Sequence[float], trained: float, cell, tasks=None,
           label=lambda task: task) -> list[str]:
    heads = [f"{_key(s)} (trained)" if s == trained else _key(s) for s in scales]
    lines = [f"### {title}", "", "| task | rows | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(scales)]
    for task in tasks or summary:
        entry = summary[task]
        values = [cell(entry["family"], entry["scales"][_key(s)]) for s in scales]
        lines.append(f"| {label(task)} | {entry['rows']} | " + " | ".join(values) + " |")
    return lines + [""]


def markdown(data: dict, summary: dict | None = None) -> str:
    """Task x scale tables: each task's metric, the references' perplexity, the answers' length."""
    summary = summary or summarise(data)
    model, gen, scales = data["model"], data["generate"], data["scales"]
    trained = model["trained_scale"]
    decoding = "greedy" if gen["num_beams"] == 1 else f"{gen['num_beams']} beams"
    clips = len({r["path"] for r in data["rows"]})
    lines = [f"## Scale sweep: {model['name']}" + (f" ({model['checkpoint']})" if model["checkpoint"] else ""),
             "", f"{len(data['rows'])} rows over {clips} clips, {len(data['results'])} answers; {decoding}, at most "
             f"{gen['max_new_tokens']} new tokens; trained LoRA scale {trained:g}. Rules: model/metrics.py.", ""]
    scored = [t for t, e in summary.items() if e["family"] in METRICS]
    if scored:
        def name(task):
            metric, unit, better = METRICS[summary[task]["family"]]
            return f"{task} · {metric} {better}"

        lines += _table("Task metric by LoRA scale", summary, scales, trained,
                        lambda family, cell: _fmt(cell["metric"], METRICS[family][1]), scored, name)
    lines += _table("Perplexity of the reference answers (teacher forcing) ↓", summary, scales, trained,
                    lambda family, cell: _fmt(cell["perplexity"], digits=2))
    lines += _table("Answer length (words, mean)", summary, scales, trained,
                    lambda family, cell: _fmt(cell["words"]))
    return "\n".join(lines)


def figure(data: dict, summary: dict | None = None) -> Figure:
    """Metric against LoRA scale: one panel per metric family present, then perplexity and length."""
    summary = summary or summarise(data)
    panels: list[tuple[str, list[str], str]] = []     # (title, tasks, value key)
    for families, title in ((("wer",), "WER (%) ↓"), (("bleu",), "BLEU ↑"), (("accuracy",), "accuracy (%) ↑"),
                            (("story", "description"), "following rate (%) ↑")):
        tasks = [t for t, e in summary.items() if e["family"] in families]
        if tasks:
            panels.append((title, tasks, "metric"))
    panels += [("reference perplexity ↓ (log)", list(summary), "perplexity"), ("answer length (words)", list(summary), "words")]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.5), dpi=80)
    colors = {t: f"C{i % 10}" for i, t in enumerate(summary)}
    trained = data["model"]["trained_scale"]
    for i, (title, tasks, key) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for task in tasks:
            points = [(float(s), c[key]) for s, c in summary[task]["scales"].items() if c[key] is not None and c[key] == c[key]]
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[task], label=task)
        ax.axvline(trained, color="0.5", linestyle="--", linewidth=1)
        if key == "perplexity":
            ax.set_yscale("log")
        elif "%" in title and "WER" not in title:
            ax.set_ylim(-5, 105)          # rates: the whole range, so 0 % and 100 % read as such
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("LoRA scale (dashed: trained)")
        ax.grid(alpha=0.3)
    handles = {t: None for t in summary}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in handles and handles[line.get_label()] is None:
                handles[line.get_label()] = line
    shown = [(h, t) for t, h in handles.items() if h is not None]
    if shown:
        fig.legend([h for h, _ in shown], [t for _, t in shown], loc="lower center", ncol=min(6, len(shown)), fontsize=9)
    name = data["model"]["name"] + (f" · {data['model']['checkpoint']}" if data["model"]["checkpoint"] else "")
    fig.suptitle(f"Scale sweep: {name}", fontsize=12)
    fig.tight_layout(rect=(0, 0.09 if rows == 1 else 0.05, 1, 0.95))
    return fig


def write_reports(data: dict, folder: str | Path) -> list[Path]:
    """sweep.md and sweep.png beside sweep.json in `folder`; returns the three paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(data)
    paths = [folder / name for name in FILES]
    paths[1].write_text(markdown(data, summary) + "\n", encoding="utf-8")
    figure(data, summary).savefig(paths[2])
    return paths
