"""Answers in the shared batch (mixed into `Pipeline`): one user's greedy or sampled answer decoded
beside everyone else's (batching.py), streamed as text; beam search goes to `Pipeline.stream`."""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterator, Sequence

from .answers import Encoding, Request, StreamEvent, TextStream
from .batching import BatchDecoder
from .config import GenerateConfig
from .errors import Busy
from .guards import MemoryGuard

_POLL_S = 0.05                # how often a waiting stream looks at its stop event
_STOP_GRACE_S = 0.5           # after Stop, how long to wait for the model before answering "stopped"


class Reservation:
    """Room held for answers in the shared batch; `release` (or leaving the `with` block) gives it back, once."""

    def __init__(self, owner: "SharedAnswers", rows: int):
        self.owner, self.rows = owner, rows

    def release(self) -> None:
        with self.owner._room_lock:
            self.owner._reserved -= self.rows
            self.rows = 0

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


class SharedAnswers:
    """The Pipeline's answers in the shared batch."""

    def reserve(self, rows: int = 1, waiting: int = 16) -> Reservation:
        """Room for `rows` more answers: the shared batch decodes `max_batch_rows` at once and lets
        `waiting` more wait; past that a request is refused at once (`Busy`) instead of waiting for
        minutes. The studio's chat and the API take room here, so together they stay within it."""
        with self._room_lock:
            taken, most = self._reserved, self.max_batch_rows + max(0, int(waiting))
            if taken + rows > most:
                raise Busy(f"The model is busy: {taken} answers are being written or waiting, and at most "
                           f"{most} may. Please try again in a minute.")
            self._reserved += rows
        return Reservation(self, rows)

    @property
    def batch(self) -> BatchDecoder:
        """The shared batch in which greedy and sampled answers of every user decode together."""
        if self._batch is None:
            self._batch = BatchDecoder(self.model, self._lock, max_rows=self.max_batch_rows)
        return self._batch

    def stream_shared(self, audio, prompt: str = "", history: Sequence[tuple[str, str]] = (),
                      lora_scale: float | None = None, generate: GenerateConfig | None = None,
                      stop: threading.Event | None = None) -> Iterator[StreamEvent]:
        """As `stream`, but decoded in the shared batch beside other users' answers (`batch`), each at
        its own LoRA scale and settings, so many users are answered at once. Beam search runs on its own
        (`stream`). Closing the stream, or `stop`, retires the answer at the next step. `audio` may be a
        checked `Request`, as for `stream`."""
        req = audio if isinstance(audio, Request) else self.check_request(audio, prompt, history, lora_scale, generate)
        if req.gen.num_beams > 1:
            yield from self.stream(req, "", stop=stop)
            return
        audio, text, scale, gen = req.audio, req.text, req.scale, req.gen
        t0 = time.perf_counter()
        cached = (audio.audio if isinstance(audio, Encoding) else audio).key in self._cache
        with MemoryGuard(self, "answering", gen=gen):
            enc = self.encode(audio)
            with self._lock:         # the embedding table and CTC head are this pipeline's while it holds the lock
                embeds, _, _ = self.model.assemble([enc.tokens.embeds], [text])
                guide = self.model.ctc_guide([enc.tokens.embeds], gen)
                ids = self._row_ids(enc, text)
                past, reused = self._reusable(enc, [ids], [scale])
        timings = {"encode_s": round(time.perf_counter() - t0, 4), "audio_cached": cached,
                   "prompt_tokens": len(ids), "audio_tokens": int(enc.tokens.embeds.shape[0]), "reused_tokens": reused}

        def remember(kv, fed_ids):
            if self.prefix_cache is not None:
                self.prefix_cache.store(enc.audio.key, scale, tuple(ids) + tuple(fed_ids), kv)

        row = self.batch.submit(embeds, scale, gen, stop, guide, past=past if reused else None, on_finish=remember)
        with MemoryGuard(self, "answering", gen=gen):
            yield from self._read_row(row, text, scale, timings, t0)

    def _read_row(self, row, text: str, scale: float, timings: dict, t0: float) -> Iterator[StreamEvent]:
        """A shared-batch row's tokens as text events, then the answer. Polls, so a Stop is seen even
        while the batch waits for the model."""
        eos = self.model.tokenizer.eos_token_id
        ids: list[int] = []
        text_stream, stop_seen = TextStream(self.model, t0), None
        try:
            while True:
                try:
                    item = row.out.get(timeout=_POLL_S)
                except queue.Empty:
                    if row.halted():
                        stop_seen = stop_seen or time.monotonic()
                        if time.monotonic() - stop_seen > _STOP_GRACE_S:
                            break
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item != eos:
                    ids.append(item)
                event = text_stream.update(ids)
                if event is not None:
                    yield event
        finally:
            row.cancelled.set()
        yield text_stream.finish(ids, text, scale, not row.ended, timings)
