"""Running the pipeline for the UI: decoding settings from the controls, one model job at a time
with a bounded waiting line, and per-session stop buttons.

The pipeline itself generates on its own worker thread (see `Pipeline.stream`), so the UI can drive
a stream from whichever thread Gradio resumes it on, and closing the stream frees the model.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Iterator

from model.config import GenerateConfig
from model.errors import Busy


def generate_config(base: GenerateConfig, *, num_beams, do_sample, temperature, top_p, top_k,
                    repetition_penalty, max_new_tokens, seed=None, ctc_weight=0.0, bad_words=()) -> GenerateConfig:
    """UI control values -> a GenerateConfig, as sent: nothing is clamped or rounded here, so
    `Pipeline.check_generate` refuses a bad value with its message. A missing value keeps the
    default; seed -1 (or empty) means random."""
    given = dict(num_beams=num_beams, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                 repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, ctc_weight=ctc_weight,
                 bad_words=bad_words)
    values = {name: value for name, value in given.items() if value is not None}
    values["seed"] = None if seed in (None, "", -1) else seed
    return dataclasses.replace(base, **values)


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


class ModelGate:
    """One model job at a time for the whole app (one GPU), first come first served, with at most
    `max_waiting` requests waiting behind the running one; past that a request is refused at once
    with a "busy, N ahead" message instead of waiting for minutes."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max(0, int(max_waiting))
        self._line: list[object] = []          # tickets; the first one has the model
        self._cond = threading.Condition()

    def join(self) -> object:
        with self._cond:
            ahead = len(self._line)
            if ahead - 1 >= self.max_waiting and ahead:
                raise Busy(f"The model is busy: {ahead} request{'s' if ahead != 1 else ''} ahead of you, and at "
                           f"most {self.max_waiting} may wait. Please try again in a minute.")
            ticket = object()
            self._line.append(ticket)
            return ticket

    def ahead(self, ticket) -> int:
        with self._cond:
            return self._line.index(ticket) if ticket in self._line else 0

    def wait(self, ticket, timeout: float | None = None) -> bool:
        """True when it is this ticket's turn (within `timeout` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._line and self._line[0] is ticket, timeout)

    def waiting(self, ticket, stop: threading.Event | None = None, every: float = 1.0) -> Iterator[int]:
        """Wait for our turn, yielding how many are ahead whenever it changes (and at least every
        `every` seconds, so the caller can show progress and Gradio can cancel it). Returns early
        when `stop` is set."""
        last, shown_at = None, 0.0
        while not self.wait(ticket, timeout=0.1):
            if stop is not None and stop.is_set():
                return
            ahead = self.ahead(ticket)
            if ahead != last or time.monotonic() - shown_at >= every:
                last, shown_at = ahead, time.monotonic()
                yield ahead

    def leave(self, ticket) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            self._cond.notify_all()

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in turn (blocking while others are ahead)."""
        ticket = self.join()
        try:
            self.wait(ticket)
            return fn(*args, **kwargs)
        finally:
            self.leave(ticket)
