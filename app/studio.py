"""The studio's state over loaded pipelines, and what every handler shares: the models, the line for
model jobs that run one at a time (beam searches, Scale-lab runs, sweeps), per-session Stop events,
the room in the shared batch (greedy and sampled chat answers), and how errors reach the user.

The handlers themselves live beside it: `view.View` (what the model sees), `chat.Chat` (answers) and
`lab.Lab` (the Scale lab); `ui.build_app` lays them out and wires them.
"""
from __future__ import annotations

import logging
from typing import Iterator, Mapping

import gradio as gr

from model.errors import SalmonnError
from model.pipeline import Pipeline

from . import presets
from .runner import ModelGate, StopRegistry, generate_config

log = logging.getLogger("salmonn.app")


def warn(err: Exception) -> str:
    """Show an error to the user as a toast; return the text for inline display."""
    if isinstance(err, SalmonnError):
        text = str(err)
    else:   # a bug, not a user mistake: keep the traceback in the server log only
        log.exception("unexpected error")
        text = f"Internal error ({type(err).__name__}): {err}"
    gr.Warning(text)
    return text


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


class Studio:
    """The loaded pipelines ({name: pipeline}, the first one the default) and the app's shared state.
    `queue_size`: how many model jobs may wait in line, and how many chat answers beyond the shared
    batch's rows."""

    def __init__(self, pipeline: Pipeline, extra_pipelines: Mapping[str, Pipeline] | None = None, *,
                 primary_name: str | None = None, queue_size: int = 16):
        self.name0 = primary_name or pipeline.cfg.name or "model"
        self.pipes: dict[str, Pipeline] = {self.name0: pipeline}
        for name, pipe in (extra_pipelines or {}).items():
            self.pipes[name if name not in self.pipes else f"{name} (2)"] = pipe
        self.names = list(self.pipes)
        self.pipeline = pipeline
        self.trained = pipeline.trained_scale
        self.trained_of = {n: p.trained_scale for n, p in self.pipes.items()}
        self.gen0 = pipeline.default_generate
        self.guidable = any(p.has_ctc_head for p in self.pipes.values())     # a checkpoint with a CTC head
        self.stops = StopRegistry()
        self.gate = ModelGate(queue_size)     # one model job at a time; a bounded line with a "busy, N ahead" message
        self.slots = queue_size + 2           # Gradio runs this many model events at once: the gate orders them

    def pipe_of(self, name) -> Pipeline:
        return self.pipes.get(name) or self.pipeline

    def gen_from(self, beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc=0.0, clean=True):
        """The decoding controls' values as settings (checked by the pipeline); `clean`: block offensive words."""
        return generate_config(self.gen0, num_beams=beams, do_sample=sample, temperature=temperature, top_p=top_p,
                               top_k=top_k, repetition_penalty=rep, max_new_tokens=max_new, seed=seed,
                               ctc_weight=ctc, bad_words=presets.OFFENSIVE_WORDS if clean is not False else ())

    def take_turn(self, stop, ticket) -> Iterator[str]:
        """While a model job waits in line: how many are ahead, as a status line."""
        for ahead in self.gate.waiting(ticket, stop):
            yield f"⏳ Waiting for the model: {ahead} ahead of you…"

    def stop_answer(self, request: gr.Request):
        """Stop this browser session's running answer, lab run or sweep."""
        self.stops.stop(session_of(request))
