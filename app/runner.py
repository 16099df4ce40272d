"""Running the pipeline for the UI: decoding settings from the controls, streaming through a worker
thread, and per-session stop buttons.

Why a worker thread: `Pipeline.stream` holds the pipeline's lock across its yields, and Gradio runs
each step of a sync generator on whichever pool thread is free. Driving the stream from one thread
of our own keeps the lock's acquire and release on the same thread, lets a stop take effect at the
next token (the worker sees the event and returns, releasing the lock) even if the browser tab has
gone, and lets the UI return at once on stop even while a beam search is still finishing.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Iterator

from model.config import GenerateConfig
from model.pipeline import Pipeline, StreamEvent

_POLL_S = 0.05


def generate_config(base: GenerateConfig, *, num_beams, do_sample, temperature, top_p, top_k,
                    repetition_penalty, max_new_tokens, seed=None) -> GenerateConfig:
    """UI control values -> a GenerateConfig (validated and clamped to sane ranges)."""
    return dataclasses.replace(
        base,
        num_beams=max(1, int(num_beams or 1)),
        do_sample=bool(do_sample),
        temperature=max(0.05, float(temperature if temperature is not None else base.temperature)),
        top_p=min(1.0, max(0.05, float(top_p if top_p is not None else base.top_p))),
        top_k=max(0, int(top_k or 0)),
        repetition_penalty=max(1.0, float(repetition_penalty or 1.0)),
        max_new_tokens=max(1, int(max_new_tokens or base.max_new_tokens)),
        seed=None if seed in (None, "", -1) else int(seed),
    )


class StopRegistry:
    """One stop event per browser session, so Stop only stops that session's answer."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def stop(self, session: str) -> bool:
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]


def stream_in_thread(pipe: Pipeline, audio, prompt: str, *, history=(), lora_scale=None,
                     generate: GenerateConfig | None = None, stop: threading.Event | None = None
                     ) -> Iterator[StreamEvent]:
    """Like `pipe.stream`, but the generation runs on a worker thread.

    Exceptions from the pipeline are re-raised here. When `stop` is set the worker ends at the next
    token; if it has not delivered its final event shortly after, we finish on our own with the
    text so far (marked stopped) and let the worker end in the background."""
    stop = stop or threading.Event()
    events: queue.Queue = queue.Queue()
    done = object()

    def work():
        try:
            for ev in pipe.stream(audio, prompt, history=history, lora_scale=lora_scale, generate=generate, stop=stop):
                events.put(ev)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            events.put(err)
        finally:
            events.put(done)

    worker = threading.Thread(target=work, name="salmonn-stream", daemon=True)
    worker.start()
    text = ""
    stop_seen_at = None
    try:
        while True:
            try:
                item = events.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():
                    stop_seen_at = stop_seen_at or time.monotonic()
                    if time.monotonic() - stop_seen_at > 0.5:   # e.g. a beam search that cannot stop mid-way
                        yield StreamEvent(delta="", text=text, done=True, answer=None)
                        return
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            text = item.text
            yield item
    finally:
        # The consumer went away (closed generator, cancelled event): make the worker stop too.
        if worker.is_alive():
            stop.set()
