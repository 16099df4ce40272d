"""Scale lab: one audio + prompt answered at several LoRA scales (one batched pass per model), and
perplexity of reference answers versus LoRA scale for bundled clips."""
from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

from model.errors import PromptError
from model.pipeline import Answer, Pipeline

from .presets import EXAMPLES_DIR, LAB_ITEMS_BY_LABEL, PRESETS_BY_KEY

MAX_SCALES = 12


def parse_scales(text: str, maximum: float) -> list[float]:
    """"0, 1, 2.5" -> [0.0, 1.0, 2.5]; each in [0, maximum]; at most MAX_SCALES."""
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise PromptError("Give at least one LoRA scale, e.g. 0, 1, 2, 3, 4.")
    scales = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise PromptError(f"{p!r} is not a number; give LoRA scales as a comma list, e.g. 0, 1, 2, 3, 4.") from None
        if not math.isfinite(value) or value < 0 or value > maximum:
            raise PromptError(f"LoRA scale {p} is outside 0 to {maximum:g} (twice the trained scale).")
        scales.append(value)
    if len(scales) > MAX_SCALES:
        raise PromptError(f"At most {MAX_SCALES} scales at once (got {len(scales)}).")
    return scales


def compare_scales(pipelines: Mapping[str, Pipeline], audio, prompt: str, scales: Sequence[float],
                   generate=None) -> dict[str, list[Answer]]:
    """Every model answers at every scale; `answer_many` batches one model's scales in one pass."""
    return {name: pipe.answer_many(audio, prompt, lora_scales=list(scales), generate=generate)
            for name, pipe in pipelines.items()}


def answers_html(results: Mapping[str, Sequence[Answer]], trained: Mapping[str, float]) -> str:
    """Cards side by side: one column per scale, one row per model. Text is escaped."""
    rows = []
    for name, answers in results.items():
        cards = []
        for a in answers:
            rel = a.lora_scale / trained[name] if trained[name] else float("nan")
            badge = "trained scale" if math.isclose(a.lora_scale, trained[name]) else (
                "LoRA off" if a.lora_scale == 0 else f"{rel:.2g}× trained")
            border = "#3b75af" if math.isclose(a.lora_scale, trained[name]) else "#cccccc"
            text = html.escape(a.text) if a.text else "<i>(empty answer)</i>"
            cards.append(
                f'<div style="flex:1 1 180px;min-width:160px;border:2px solid {border};border-radius:8px;'
                f'padding:8px;margin:4px;">'
                f'<div style="font-weight:600">scale {a.lora_scale:g} <span style="font-weight:400;'
                f'opacity:.7">· {badge}</span></div>'
                f'<div style="white-space:pre-wrap;overflow-wrap:anywhere;margin-top:6px" class="lab-answer">{text}</div>'
                f'<div style="opacity:.6;font-size:.85em;margin-top:6px">{a.num_tokens} tokens</div></div>')
        title = f'<div style="font-weight:600;margin:8px 4px 0">{html.escape(name)}</div>' if len(results) > 1 else ""
        rows.append(f'{title}<div style="display:flex;flex-wrap:wrap">{"".join(cards)}</div>')
    return "".join(rows)


def answers_json(results: Mapping[str, Sequence[Answer]]) -> dict:
    return {name: [{"lora_scale": a.lora_scale, "text": a.text, "num_tokens": a.num_tokens,
                    "prompt": a.prompt, "timings": a.timings} for a in answers]
            for name, answers in results.items()}


def perplexity_sweep(pipelines: Mapping[str, Pipeline], item_labels: Sequence[str], scales: Sequence[float]
                     ) -> tuple[dict[str, dict[str, list[tuple[float, float]]]], list[list]]:
    """Teacher-forced perplexity of each item's reference answer at each scale, per model.

    Returns (curves {model: {item: [(scale, ppl)]}}, table rows [model, item, scale, ppl, nll])."""
    if not item_labels:
        raise PromptError("Pick at least one clip/task to measure.")
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    table = []
    for name, pipe in pipelines.items():
        curves[name] = {}
        for label in item_labels:
            item = LAB_ITEMS_BY_LABEL.get(label)
            if item is None:
                raise PromptError(f"Unknown lab item {label!r}.")
            prompt = PRESETS_BY_KEY[item.preset].prompt
            scores = pipe.score(str(EXAMPLES_DIR / item.example), prompt, item.reference, lora_scales=list(scales))
            curves[name][label] = [(s.lora_scale, s.perplexity) for s in scores]
            table += [[name, label, s.lora_scale, round(s.perplexity, 3), round(s.nll, 4)] for s in scores]
    return curves, table
