"""The LLM forward passes of one answer behind two small runners with the same interface:

- DynamicRunner: transformers' DynamicCache (grows by concatenation). Any device, padded rows.
- StaticRunner: a StaticCache (preallocated, updated in place), so one decode step has fixed shapes
  and fixed tensor addresses. On CUDA that step is captured once as a CUDA graph and replayed per
  token: the ~10 kernel launches per layer and all Python overhead leave the per-token path.

prefill(embeds [B, S, H], positions [B, S]) -> logits [B, V] of the last position;
feed(tokens [B]) -> logits [B, V] of the next position; kv(n) -> keys/values of the first n positions.
"""
from __future__ import annotations

import torch

from .kvcache import KV


def _base(llm):
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


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
    """Unpadded rows only (no attention mask: the causal mask comes from the cache position)."""

    def __init__(self, llm, rows: int, max_len: int, past: KV | None = None, graph: bool = False):
        from transformers import StaticCache

        self.llm = llm
        config = _base(llm).config
        weight = llm.get_input_embeddings().weight
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(rows, config.num_key_value_heads, head_dim, weight.dtype, weight.device)
        if past:
            n = past[0][0].shape[2]
            for layer, (k, v) in zip(self.cache.layers, past):
                layer.keys[:, :, :n].copy_(k)
                layer.values[:, :, :n].copy_(v)
                layer.cumulative_length.fill_(n)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=weight.device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=weight.device)
        self.logits = None
        self.use_graph = graph
        self.graph = None
        self.graph_error = None

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
        advance, then capture one step. Any failure leaves the eager static path in place."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        pos = self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            for layer, n in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(n)
            self.pos.copy_(pos)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - fall back to eager static decoding
            self.graph_error = f"{type(err).__name__}: {err}"
            self.use_graph = False
            torch.cuda.synchronize()
            for layer, n in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(n)
            self.pos.copy_(pos)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tokens[:, None])
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits

    def kv(self, length: int) -> KV:
        # copies: the static buffers are reused by the next answer
        return [(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone()) for layer in self.cache.layers]
