"""Prefix KV cache: the LLM's keys/values for [BOS] + before + audio + after (+ an answer's tokens),
kept per (audio, LoRA scale), so a re-ask, a follow-up turn or a scale-lab rerun only prefills the
tokens that are new.

LoRA on q/v changes every layer's keys and values, so an entry is only valid for the same audio and
the same scale. Within that, the longest common prefix of two token sequences is reused: audio
positions appear in a sequence as negative ids (-1 - i), so they only match the same audio position.
Bounded memory: least-recently-used entries go first, by count and by bytes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: keys, values [1, kv_heads, length, head_dim]


def sequence_ids(before: Sequence[int], audio_tokens: int, after: Sequence[int]) -> tuple[int, ...]:
    """A row's positions as ids: the text tokens, and -1 - i for the i-th audio token."""
    return tuple(before) + tuple(-1 - i for i in range(audio_tokens)) + tuple(after)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PrefixEntry:
    audio: str
    scale: float
    ids: tuple[int, ...]      # the positions that `kv` covers
    kv: KV
    nbytes: int


class PrefixCache:
    def __init__(self, max_entries: int = 16, max_bytes: int = 1 << 30):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def lookup(self, audio: str, scale: float, ids: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `ids`, and that length.

        At most len(ids) - 1 positions are reused: the last prompt position must run again to give
        the logits of the first answer token."""
        best, best_n = None, 0
        for entry in self._entries.values():
            if entry.audio == audio and entry.scale == scale:
                n = min(common_prefix(entry.ids, ids), len(ids) - 1)
                if n > best_n:
                    best, best_n = entry, n
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self._entries.move_to_end((best.audio, best.scale, best.ids))
        return best, best_n

    def store(self, audio: str, scale: float, ids: Sequence[int], kv: KV) -> None:
        """Keep `kv` (positions `ids`). Entries that are a prefix of the new one are dropped: it
        serves every lookup they would."""
        ids = tuple(ids)
        if not ids or not kv:
            return
        if kv[0][0].shape[2] != len(ids):      # a mismatch would silently shift every later answer
            raise ValueError(f"KV cache entry covers {kv[0][0].shape[2]} positions but {len(ids)} ids were given")
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        # A row's slice of a batch's (or a preallocated) KV tensor keeps the whole tensor alive: keep an
        # owned copy, so the bytes held are the bytes counted.
        kv = [(_owned(k), _owned(v)) for k, v in kv]
        for key in [k for k, e in self._entries.items()
                    if e.audio == audio and e.scale == scale and ids[: len(e.ids)] == e.ids]:
            self.nbytes -= self._entries.pop(key).nbytes
        key = (audio, scale, ids)
        self._entries[key] = PrefixEntry(audio, scale, ids, kv, nbytes)
        self.nbytes += nbytes
        while self._entries and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes


def _owned(t: torch.Tensor) -> torch.Tensor:
    if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def slice_kv(kv: KV, length: int) -> KV:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


def stack_kv(parts: Sequence[KV], length: int) -> KV:
    """Rows' prefixes (each [1, h, >=length, d]) as one batch [B, h, length, d]."""
    return [(torch.cat([p[i][0][:, :, :length] for p in parts]), torch.cat([p[i][1][:, :, :length] for p in parts]))
            for i in range(len(parts[0]))]
