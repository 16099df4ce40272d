"""Scale lab: one audio + prompt answered at several LoRA scales (one batched pass per model), and
perplexity of reference answers versus LoRA scale for bundled clips; `Lab` holds the tab's handlers."""
from __future__ import annotations

import html
import math
import threading
import time
from contextlib import closing
from typing import Iterator, Mapping, Sequence

import gradio as gr

from model import sweep
from model.config import GenerateConfig, Limit
from model.errors import PromptError, SettingsError
from model.pipeline import BatchEvent, Pipeline

from . import plots
from .presets import EXAMPLES_DIR, LAB_ITEMS_BY_LABEL, PRESETS_BY_KEY, PRESETS_BY_LABEL
from .studio import session_of, warn

MAX_SCALES = 12


MAX_LAB_TOKENS = 8192     # scales x beams x max new tokens x checkpoints: no lab run holds the model for minutes


def parse_scales(text: str, limit: Limit) -> list[float]:
    """"0, 1, 2.5" -> [0.0, 1.0, 2.5] (`model.sweep.parse_scales`); each within the pipeline's
    LoRA-scale limit; at most MAX_SCALES."""
    scales = [limit.check(value) for value in sweep.parse_scales(text or "")]
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


class Lab:
    """The Scale lab's handlers (mixed into the studio): every checkpoint's answers at every scale,
    and the perplexity sweep, each streamed as it goes, waiting in line, and stopped on demand."""

    def run_lab(self, path, prompt, scales_text, beams, sample, temperature, top_p, top_k, rep, max_new, seed,
                ctc=0.0, clean=True, request: gr.Request = None):
        """Yields (answers, raw results, status)."""
        if not path:
            gr.Warning("Upload or record some audio on the Chat tab first (or click an example there).")
            yield gr.skip(), gr.skip(), gr.skip()
            return
        try:       # every check before the request waits for the model
            scales = parse_scales(scales_text, self.pipeline.scale_limit)
            gen = self.gen_from(beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc, clean)
            for p in self.pipes.values():
                p.check_generate(gen)
                p.prompt_text(prompt)
            gen = self.pipeline.check_generate(gen)
            check_budget(scales, gen, len(self.pipes))
            audio = self.pipeline.prepare(path)
        except Exception as err:  # noqa: BLE001
            yield f"<p>⚠️ {warn(err)}</p>", None, ""
            return
        session, progress, t0 = session_of(request), {}, None
        stop = self.stops.start(session)
        ticket = None
        try:
            ticket = self.gate.join()
            for status in self.take_turn(stop, ticket):
                yield gr.skip(), gr.skip(), status
            t0 = time.monotonic()
            with closing(compare_scales(self.pipes, audio, prompt, scales, generate=gen, stop=stop)) as runs:
                for progress in runs:
                    yield (answers_html(progress, scales, self.trained_of), gr.skip(),
                           self._lab_status(progress, scales, t0))
        except Exception as err:  # noqa: BLE001
            yield answers_html(progress, scales, self.trained_of) + f"<p>⚠️ {warn(err)}</p>", None, ""
            return
        finally:     # also when Gradio closes this generator (cancelled, tab closed): the model is freed
            if ticket is not None:
                self.gate.leave(ticket)
            self.stops.finish(session, stop)
        yield (answers_html(progress, scales, self.trained_of), answers_json(progress),
               self._lab_status(progress, scales, t0, stopped=stop.is_set()))

    def _lab_status(self, progress, scales, t0, stopped=False) -> str:
        done = sum(sum(e.finished) for e in progress.values())
        total = len(scales) * len(self.pipes)
        took = f" in {time.monotonic() - t0:.1f} s" if t0 is not None else ""
        if stopped:
            return f"⏹ Stopped: {done} of {total} answers finished{took}."
        if done == total and all(e.answers for e in progress.values()):
            return f"✅ Done: {total} answers{took}."
        running = next((n for n, e in progress.items() if not e.answers), "")
        return f"⏳ Answering{f' ({running})' if len(self.pipes) > 1 else ''}: {done} of {total} answers finished{took}…"

    def run_sweep(self, items, scales_text, request: gr.Request = None):
        """Perplexity vs LoRA scale, drawn as each clip is measured. Yields (plot, table, status)."""
        try:
            scales = parse_scales(scales_text, self.pipeline.scale_limit)
            check_items(items)
        except Exception as err:  # noqa: BLE001
            yield gr.skip(), gr.skip(), f"⚠️ {warn(err)}"
            return
        session = session_of(request)
        stop = self.stops.start(session)
        ticket, done, total, t0 = None, 0, len(items) * len(self.pipes), None
        figure, table = gr.skip(), gr.skip()
        try:
            ticket = self.gate.join()
            for status in self.take_turn(stop, ticket):
                yield gr.skip(), gr.skip(), status
            t0 = time.monotonic()
            with closing(perplexity_sweep(self.pipes, items, scales, stop=stop)) as sweep:
                for curves, table, done, total in sweep:
                    figure = plots.perplexity_figure(curves, self.trained)
                    yield figure, table, f"⏳ Measured {done} of {total} clips ({time.monotonic() - t0:.1f} s)…"
        except Exception as err:  # noqa: BLE001
            yield gr.skip(), gr.skip(), f"⚠️ {warn(err)}"
            return
        finally:     # also when Gradio closes this generator (cancelled, tab closed)
            if ticket is not None:
                self.gate.leave(ticket)
            self.stops.finish(session, stop)
        took = f" in {time.monotonic() - t0:.1f} s" if t0 is not None else ""
        word = "⏹ Stopped" if stop.is_set() else "✅ Done"
        yield figure, table, f"{word}: {done} of {total} clips measured{took}."

    @staticmethod
    def lab_preset(label):
        preset = PRESETS_BY_LABEL.get(label)
        return preset.prompt if preset else gr.skip()
