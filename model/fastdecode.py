"""The LLM forward passes of one answer behind two small runners with the same interface:

- DynamicRunner: transformers' DynamicCache (grows by concatenation). Any device, padded rows.
- StaticRunner: a StaticCache (preallocated, updated in place), so one decode step has fixed shapes
  and fixed tensor addresses. On CUDA that step is captured once as a CUDA graph and replayed per
  token: the ~10 kernel launches per layer and all Python overhead leave the per-token path.
  A RunnerPool keeps static runners (per rows x cache-length bucket) across answers, so the graph is
  captured once, not per answer; the LoRA scale it reads is a device tensor, set per answer.

prefill(embeds [B, S, H], positions [B, S]) -> logits [B, V] of the last position;
feed(tokens [B]) -> logits [B, V] of the next position; kv(n) -> keys/values of the first n positions.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from .kvcache import KV
from .llm import LoraScale, current_scale, lora_layers, lora_scale

MIN_STATIC_LEN = 256        # the smallest static cache; lengths round up to a power of two from here
# Every static step reads the whole preallocated cache (masked, no flash attention): allowed only while
# that is at most this fraction of the weights' bytes; a longer budget decodes on the dynamic cache.
STATIC_KV_SHARE = 1 / 8


def _base(llm):
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def device_guard(device: torch.device):
    """Make `device` the thread's current CUDA device (a thread starts on cuda:0, and streams, events
    and graphs made without a device go there); nothing off CUDA."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def single_device(llm) -> torch.device | None:
    """The one device holding every weight of `llm`, or None (split or offloaded by a device map)."""
    devices = {p.device for p in llm.parameters()}
    return devices.pop() if len(devices) == 1 else None


def static_length(length: int) -> int:
    """The static cache length for `length` positions: a power of two from MIN_STATIC_LEN, so a few
    runners (and their graphs) serve every answer."""
    size = MIN_STATIC_LEN
    while size < length:
        size *= 2
    return size


def _kv_bytes_per_position(llm) -> int:
    config = _base(llm).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = llm.get_input_embeddings().weight.element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


class DynamicRunner:
    def __init__(self, llm, mask: torch.Tensor | None, past: KV | None = None):
        from transformers import DynamicCache

        self.llm = llm
        config = _base(llm).config
        self.cache = DynamicCache(past, config=config) if past else DynamicCache(config=config)
        self.mask = mask
        self.pos = None

    def prefill(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.llm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=pos,
                       past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.pos = pos[:, -1:]
        return out.logits[:, -1]

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        out = self.llm(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                       past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    def kv(self, length: int) -> KV:
        return [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in self.cache.layers]


class StaticRunner:
    """Unpadded rows only (no attention mask: the causal mask comes from the cache position).
    `start` readies it for an answer; one runner serves many answers of its rows and length."""

    def __init__(self, llm, rows: int, max_len: int, past: KV | None = None, graph: bool = False):
        from transformers import StaticCache

        self.llm = llm
        config = _base(llm).config
        weight = llm.get_input_embeddings().weight
        self.device, self.rows, self.max_len = weight.device, rows, max_len
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(rows, config.num_key_value_heads, head_dim, weight.dtype, weight.device)
        self.nbytes = rows * max_len * _kv_bytes_per_position(llm)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=weight.device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=weight.device)
        self.layers = lora_layers(llm)
        # what the graph multiplies LoRA by: a device tensor, so a new scale needs no re-capture
        self.scale = LoraScale([1.0] * rows) if self.layers else None
        self.logits = None
        self.wants_graph = self.use_graph = graph
        self.graph = None
        self.graph_error = None
        self.answers = 0
        self._fresh = True
        self.start(past)

    def start(self, past: KV | None = None) -> None:
        """Ready for a new answer from `past` (keys/values of its first positions) at the LoRA scale
        the caller has set."""
        n = past[0][0].shape[2] if past else 0
        if n >= self.max_len:
            raise ValueError(f"{n} cached positions do not fit a static cache of {self.max_len}")
        for i, layer in enumerate(self.cache.layers):
            if not self._fresh:    # another answer's keys: zeros as in a new cache, so tokens match it
                layer.keys.zero_()
                layer.values.zero_()
            if past:
                layer.keys[:, :, :n].copy_(past[i][0])
                layer.values[:, :, :n].copy_(past[i][1])
            layer.cumulative_length.fill_(n)
        if self.scale is not None:
            self.scale.set(current_scale(self.llm, self.rows, self.layers))
        self._fresh = False
        self.answers += 1

    def prefill(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.llm(inputs_embeds=embeds, position_ids=pos, past_key_values=self.cache, use_cache=True,
                       logits_to_keep=1)
        self.pos.copy_(pos[:, -1:])
        return out.logits[:, -1]

    def _step(self) -> None:
        self.pos.add_(1)
        self.logits = self.llm(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache,
                               use_cache=True).logits[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), undo the warm-up's cache
        advance, then capture one step, at this runner's scale tensors. Any failure leaves the eager
        static path in place. Streams and the graph are made on the model's device explicitly."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        pos = self.pos.clone()

        def undo():
            for layer, n in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(n)
            self.pos.copy_(pos)

        with device_guard(self.device), lora_scale(self.llm, self.scale, self.layers):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):
                    self._step()
                torch.cuda.current_stream(self.device).wait_stream(side)
                undo()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step()
                self.graph = graph
            except Exception as err:  # noqa: BLE001 - fall back to eager static decoding
                self.graph_error = f"{type(err).__name__}: {err}"
                self.use_graph = False
                torch.cuda.synchronize(self.device)
                undo()

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tokens[:, None])
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:       # at the scale tensors a graph would read (equal numerics; so the CPU tests them)
            with lora_scale(self.llm, self.scale, self.layers):
                self._step()
        return self.logits

    def kv(self, length: int) -> KV:
        # copies: the static buffers are reused by the next answer
        return [(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone()) for layer in self.cache.layers]


class RunnerPool:
    """Static runners kept across answers, per (rows, cache length, graph): one CUDA graph capture
    per shape instead of one per answer. A runner is taken out while an answer uses it. Bounded: the
    caches kept hold at most `max_bytes` (default: 2 x STATIC_KV_SHARE of the weights' bytes; least
    recently used go)."""

    def __init__(self, max_entries: int = 4, max_bytes: int | None = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._runners: OrderedDict[tuple, StaticRunner] = OrderedDict()
        self._weight_bytes: dict[int, int] = {}

    def __deepcopy__(self, memo) -> "RunnerPool":
        return RunnerPool(self.max_entries, self.max_bytes)      # runners (and graphs) belong to the original's weights

    def __len__(self) -> int:
        return len(self._runners)

    def clear(self) -> None:
        self._runners.clear()

    def weight_bytes(self, llm) -> int:
        key = id(llm)
        if key not in self._weight_bytes:
            self._weight_bytes[key] = sum(p.numel() * p.element_size() for p in llm.parameters())
        return self._weight_bytes[key]

    def static_pays(self, llm, rows: int, length: int) -> bool:
        """Whether a static cache for `length` positions reads few enough unused bytes per token."""
        kv = rows * static_length(length) * _kv_bytes_per_position(llm)
        return kv <= STATIC_KV_SHARE * self.weight_bytes(llm)

    @staticmethod
    def _key(llm, rows: int, length: int, graph: bool) -> tuple:
        weight = llm.get_input_embeddings().weight     # a moved or re-cast model gets new runners
        return id(llm), weight.device, weight.dtype, weight.data_ptr(), rows, static_length(length), graph

    def take(self, llm, rows: int, length: int, past: KV | None = None, graph: bool = False) -> StaticRunner:
        runner = self._runners.pop(self._key(llm, rows, length, graph), None)
        if runner is None:
            return StaticRunner(llm, rows, static_length(length), past, graph=graph)
        runner.start(past)
        return runner

    def give(self, runner: StaticRunner) -> None:
        """Keep `runner` for later answers (after an answer that ended without an error)."""
        self._runners[self._key(runner.llm, runner.rows, runner.max_len, runner.wants_graph)] = runner
        limit = self.max_bytes if self.max_bytes is not None else 2 * STATIC_KV_SHARE * self.weight_bytes(runner.llm)
        while self._runners and (len(self._runners) > self.max_entries
                                 or sum(r.nbytes for r in self._runners.values()) > limit):
            self._runners.popitem(last=False)
