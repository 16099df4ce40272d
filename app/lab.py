"""Scale lab: one audio + prompt answered at several LoRA scales (one batched pass per model), and
perplexity of reference answers versus LoRA scale for bundled clips."""
from __future__ import annotations

import html
import math
import threading
from typing import Iterator, Mapping, Sequence

from model.config import GenerateConfig, Limit
from model.errors import PromptError, SettingsError
from model.pipeline import BatchEvent, Pipeline

from .presets import EXAMPLES_DIR, LAB_ITEMS_BY_LABEL, PRESETS_BY_KEY

MAX_SCALES = 12


MAX_LAB_TOKENS = 8192     # scales x beams x max new tokens x checkpoints: no lab run holds the model for minutes


def parse_scales(text: str, limit: Limit) -> list[float]:
    """"0, 1, 2.5" -> [0.0, 1.0, 2.5]; each within the pipeline's LoRA-scale limit; at most MAX_SCALES."""
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise SettingsError("Give at least one LoRA scale, e.g. 0, 1, 2, 3, 4.")
    scales = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise SettingsError(f"{p!r} is not a number; give LoRA scales as a comma list, e.g. 0, 1, 2, 3, 4.") from None
        scales.append(limit.check(value))
    if len(scales) > MAX_SCALES:
        raise SettingsError(f"At most {MAX_SCALES} scales at once (got {len(scales)}).")
    return scales


def check_budget(scales: Sequence[float], gen: GenerateConfig, checkpoints: int) -> None:
    """Refuse, before it waits for the model, a lab run larger than MAX_LAB_TOKENS."""
    asked = len(scales) * gen.num_beams * gen.max_new_tokens * checkpoints
    if asked > MAX_LAB_TOKENS:
        beams = f" × {gen.num_beams} beams" if gen.num_beams > 1 else ""
        raise SettingsError(
            f"The Scale lab generates at most {MAX_LAB_TOKENS:,} tokens per run (LoRA scales{' × beams' if beams else ''}"
            f" × max new tokens × checkpoints); this run asks for {len(scales)} scales{beams} × {gen.max_new_tokens} "
            f"tokens × {checkpoints} checkpoint{'s' if checkpoints > 1 else ''} = {asked:,}. Use fewer scales or "
            "fewer max new tokens.")


def compare_scales(pipelines: Mapping[str, Pipeline], audio, prompt: str, scales: Sequence[float],
                   generate=None, stop: threading.Event | None = None) -> Iterator[dict[str, BatchEvent]]:
    """Every model answers at every scale (`stream_many`: one batched pass per model), reporting
    progress: {model: its latest BatchEvent} for the models started so far. Ends early on `stop`."""
    stop = stop or threading.Event()
    progress: dict[str, BatchEvent] = {}
    for name, pipe in pipelines.items():
        if stop.is_set():
            return
        for event in pipe.stream_many(audio, prompt, lora_scales=list(scales), generate=generate, stop=stop):
            progress[name] = event
            yield dict(progress)


def answers_html(progress: Mapping[str, BatchEvent], scales: Sequence[float], trained: Mapping[str, float]) -> str:
    """Cards side by side: one column per scale, one row per model, each with its text so far and
    whether it is still being written. Text is escaped."""
    rows = []
    for name, event in progress.items():
        cards = []
        for i, scale in enumerate(scales):
            answer = event.answers[i] if event.answers else None
            text = answer.text if answer else event.texts[i]
            if answer is None:
                status = "done" if event.finished[i] else "writing…"
            else:
                status = f"{answer.num_tokens} tokens" + (" · stopped" if answer.stopped else "")
            rel = scale / trained[name] if trained[name] else float("nan")
            at_trained = math.isclose(scale, trained[name])
            badge = "trained scale" if at_trained else ("LoRA off" if scale == 0 else f"{rel:.2g}× trained")
            border = "#3b75af" if at_trained else "#cccccc"
            body = html.escape(text) if text else ("<i>(empty answer)</i>" if answer or event.finished[i] else "")
            cards.append(
                f'<div style="flex:1 1 180px;min-width:160px;border:2px solid {border};border-radius:8px;'
                f'padding:8px;margin:4px;">'
                f'<div style="font-weight:600">scale {scale:g} <span style="font-weight:400;'
                f'opacity:.7">· {badge}</span></div>'
                f'<div style="white-space:pre-wrap;overflow-wrap:anywhere;margin-top:6px" class="lab-answer">{body}</div>'
                f'<div style="opacity:.6;font-size:.85em;margin-top:6px" class="lab-status">{status}</div></div>')
        title = f'<div style="font-weight:600;margin:8px 4px 0">{html.escape(name)}</div>' if len(trained) > 1 else ""
        rows.append(f'{title}<div style="display:flex;flex-wrap:wrap">{"".join(cards)}</div>')
    return "".join(rows)


def answers_json(progress: Mapping[str, BatchEvent]) -> dict:
    return {name: [{"lora_scale": a.lora_scale, "text": a.text, "num_tokens": a.num_tokens, "stopped": a.stopped,
                    "prompt": a.prompt, "timings": a.timings} for a in event.answers]
            for name, event in progress.items() if event.answers}


def check_items(item_labels: Sequence[str]) -> None:
    if not item_labels:
        raise PromptError("Pick at least one clip/task to measure.")
    unknown = [label for label in item_labels if label not in LAB_ITEMS_BY_LABEL]
    if unknown:
        raise PromptError(f"Unknown lab item {unknown[0]!r}.")


def perplexity_sweep(pipelines: Mapping[str, Pipeline], item_labels: Sequence[str], scales: Sequence[float],
                     stop: threading.Event | None = None):
    """Teacher-forced perplexity of each item's reference answer at each scale, per model, one item
    (all scales in one batch) at a time; ends early on `stop`.

    Yields after each item (curves {model: {item: [(scale, ppl)]}}, table rows [model, item, scale, ppl,
    nll], items done, items in all)."""
    check_items(item_labels)
    total = len(pipelines) * len(item_labels)
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    table = []
    for name, pipe in pipelines.items():
        curves[name] = {}
        for label in item_labels:
            if stop is not None and stop.is_set():
                return
            item = LAB_ITEMS_BY_LABEL[label]
            prompt = PRESETS_BY_KEY[item.preset].prompt
            scores = pipe.score(str(EXAMPLES_DIR / item.example), prompt, item.reference, lora_scales=list(scales))
            curves[name][label] = [(s.lora_scale, s.perplexity) for s in scores]
            table += [[name, label, s.lora_scale, round(s.perplexity, 3), round(s.nll, 4)] for s in scores]
            yield curves, table, len(table) // len(scales), total
