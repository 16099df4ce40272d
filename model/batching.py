"""Continuous batching: answers for many users decoded together, one row each.

Each row brings its own prompt embeddings (audio tokens spliced in), LoRA scale and sampling
settings. A decoder thread admits waiting rows at step boundaries (each prefilled alone, then its
keys/values joined to the batch, left-padded) and retires rows as they end (EOS, their token budget,
or a cancel), so a new request never waits for a running batch to finish. Every step feeds one token
per row with a per-row LoRA scale (`llm.LoraScale`) and picks each row's next token with that row's
own logits processors, so a row's answer does not depend on who else is in the batch.

Beam search is not batched here: it runs on its own through the pipeline.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import GenerateConfig
from .decoding import Picker
from .fastdecode import device_guard
from .llm import LoraScale, lora_layers, lora_scale

IDLE_S = 2.0            # the decoder thread ends after this long without rows (a new request restarts it)
_YIELD_S = 0.2          # at most this long, between steps, the decoder lets other model jobs take the lock


@dataclass
class Row:
    """One answer being decoded: its tokens go to `out` (then None, or an exception)."""
    embeds: torch.Tensor              # [1, S, H]: the whole prompt, audio tokens included
    scale: float
    gen: GenerateConfig
    picker: Picker
    stop: object                      # anything with is_set(): the client's Stop or disconnect
    past: list | None = None          # keys/values of the prompt's first positions (a cached prefix)
    on_finish: Callable | None = None  # on_finish(kv, fed ids): the keys/values of a row that ended by itself
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0
    ended: bool = False               # ended by itself: EOS or its token budget
    position: int = 0                 # the position of the next token fed to the LLM
    next_token: int = 0

    def halted(self) -> bool:
        return self.cancelled.is_set() or bool(self.stop is not None and self.stop.is_set())


class BatchDecoder:
    """Decodes rows together on one thread. `lock` is the model's lock: held for each admit + step,
    and let go between steps while another job (an encoding, a beam search, the Scale lab) waits for it.
    `max_rows` bounds the batch; rows beyond it wait for a free place."""

    def __init__(self, model, lock, max_rows: int = 16):
        self.model, self.lock, self.max_rows = model, lock, max_rows
        self._pending: list[Row] = []
        self._rows: list[Row] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._cache = None             # the batch's DynamicCache
        self._mask: torch.Tensor | None = None
        self._layers = None            # the LLM's LoRA layers, found once
        self._scales: LoraScale | None = None   # the current rows' per-row scales
        self.steps = 0                 # decode steps run (for tests and benchmarks)
        self.max_batch = 0             # the most rows decoded together so far

    # ------------------------------------------------------------------ the requests' side
    def submit(self, embeds: torch.Tensor, scale: float, gen: GenerateConfig, stop=None, guide=None,
               past=None, on_finish: Callable | None = None) -> Row:
        """Decode one answer in the shared batch. The returned row's `out` queue gets its token ids
        (EOS included when it comes), then None (or the exception that ended the batch); set its
        `cancelled` (or `stop`) to retire it at the next step.
        `past`: keys/values of the first positions of `embeds` (only the rest is prefilled).
        `on_finish(kv, fed_ids)`: called with the row's keys/values (the prompt and the answer tokens
        `fed_ids` the LLM was fed) when the row ends by itself."""
        if gen.num_beams != 1:
            raise ValueError("beam search is not batched; the pipeline runs it on its own")
        row = Row(embeds, float(scale), gen, Picker.for_row(self.model, gen, guide), stop, past, on_finish)
        with self._cond:
            self._pending.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="salmonn-batch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return row

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._rows)

    # ------------------------------------------------------------------ the decoder thread
    def _run(self) -> None:
        try:
            self._loop()
        finally:       # whatever ended it, the next request starts a new thread
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._rows:
                    self._cond.wait_for(lambda: self._pending, timeout=IDLE_S)
                    if not self._pending:
                        return
                room = self.max_rows - len(self._rows)
                new, self._pending = self._pending[:room], self._pending[room:]
            with device_guard(self.model.llm_device), self.lock:     # a new thread starts on cuda:0
                try:
                    self._admit(new)
                    self._step()
                except BaseException as err:  # noqa: BLE001 - every row of this batch hears of it
                    self._fail(new, err)
            self._let_others_in()

    def _let_others_in(self) -> None:
        waiting = getattr(self.lock, "waiting", lambda: 0)
        deadline = time.monotonic() + _YIELD_S
        while waiting() and time.monotonic() < deadline:
            time.sleep(0.001)

    def _fail(self, new: list[Row], err: BaseException) -> None:
        with self._cond:
            rows, self._rows = self._rows + [r for r in new if r not in self._rows], []
        self._cache, self._mask = None, None
        for row in rows:
            row.out.put(err)

    def _admit(self, new: list[Row]) -> None:
        """Prefill each new row alone (at its own scale), hand out its first token, join it to the batch."""
        from transformers import DynamicCache

        llm = self.model.llama_model
        for row in new:
            if row.halted():
                row.out.put(None)
                continue
            length = row.embeds.shape[1]
            reused = row.past[0][0].shape[2] if row.past else 0
            cache = DynamicCache(row.past, config=llm.config) if row.past else DynamicCache(config=llm.config)
            pos = torch.arange(reused, length, device=row.embeds.device)[None]
            mask = torch.ones(1, length, dtype=torch.long, device=row.embeds.device)
            with lora_scale(llm, row.scale), torch.no_grad():
                logits = llm(inputs_embeds=row.embeds[:, reused:], attention_mask=mask, position_ids=pos,
                             past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            row.position = length
            if self._emit(row, int(row.picker.pick(logits)[0])):
                self._join(row, cache)
            elif row.on_finish is not None:
                row.on_finish([(layer.keys, layer.values) for layer in cache.layers], [])

    def _emit(self, row: Row, token: int) -> bool:
        """Hand `token` to the row's reader; False when the row has ended with it."""
        row.out.put(token)
        row.produced += 1
        row.next_token = token
        if token == self.model.tokenizer.eos_token_id or row.produced >= row.gen.max_new_tokens:
            row.ended = True
            row.out.put(None)
            return False
        return True

    def _join(self, row: Row, cache) -> None:
        layers = cache.layers
        new_len = layers[0].keys.shape[2]
        if self._cache is None:
            self._cache = cache
            self._mask = torch.ones(1, new_len, dtype=torch.long, device=layers[0].keys.device)
        else:
            old_len = self._mask.shape[1]
            width = max(old_len, new_len)
            self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(self._mask.new_ones(1, new_len), width)])
            for mine, theirs in zip(self._cache.layers, layers):
                mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)])
                mine.values = torch.cat([_pad_left(mine.values, width, dim=2), _pad_left(theirs.values, width, dim=2)])
        with self._cond:
            self._rows.append(row)
            self.max_batch = max(self.max_batch, len(self._rows))

    def _keep(self, keep: list[int], end_others: bool = True) -> None:
        """Keep only these rows (the others' readers get their end marker, unless they already have
        it); drop the columns no remaining row uses (its left padding)."""
        if len(keep) == len(self._rows):
            return
        with self._cond:
            for i, row in enumerate(self._rows):
                if i not in keep:
                    row.cancelled.set()
                    if end_others:
                        row.out.put(None)
            self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        first = int(self._mask[index].any(dim=0).nonzero()[0])
        self._mask = self._mask[index, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def _step(self) -> None:
        """Feed every row its last token; each picks its next one."""
        self._keep([i for i, row in enumerate(self._rows) if not row.halted()])
        rows = self._rows
        if not rows:
            return
        llm = self.model.llama_model
        device = self._mask.device
        ids = torch.tensor([[r.next_token] for r in rows], device=device)
        pos = torch.tensor([[r.position] for r in rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        scales = [r.scale for r in rows]
        if len(set(scales)) == 1:
            scale = scales[0]
        else:   # the same rows step after step: keep their scales on the device instead of copying them each step
            if self._scales is None or self._scales.floats() != scales:
                self._scales = LoraScale(scales)
            scale = self._scales
        if self._layers is None:
            self._layers = lora_layers(llm)
        with lora_scale(llm, scale, self._layers), torch.no_grad():
            logits = llm(input_ids=ids, attention_mask=self._mask, position_ids=pos, past_key_values=self._cache,
                         use_cache=True).logits[:, -1]
        self.steps += 1
        keep = []
        for i, row in enumerate(rows):
            row.position += 1
            if row.halted():
                row.out.put(None)
            elif self._emit(row, int(row.picker.pick(logits[i:i + 1])[0])):
                keep.append(i)
            elif row.on_finish is not None:       # prompt + every answer token but the last were fed
                fed = row.produced - 1
                start = self._mask.shape[1] - (row.embeds.shape[1] + fed)
                row.on_finish([(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:])
                               for layer in self._cache.layers], row.picker.generated[0, :fed].tolist())
        self._keep(keep, end_others=False)    # rows that ended got their end marker from _emit


def _pad_left(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """Zeros in front along `dim` up to `width` (keys/values: dim 2; masks: dim 1)."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
