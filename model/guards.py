"""What keeps the one model safe to share: its lock (which also swaps in the trained weights of the
pipeline that takes it, when pipelines share one model), Stop and abandon events, and out-of-memory
errors turned into a message after freeing what the failed step held."""
from __future__ import annotations

import ctypes
import gc
import re
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import GenerateConfig
from .errors import OutOfMemory
from .salmonn import SALMONN

if TYPE_CHECKING:
    from .pipeline import Pipeline

class AnyEvent:
    """Set when any of its events is: the user's Stop, or the stream's consumer having gone."""

    def __init__(self, *events: threading.Event):
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def release_memory() -> None:
    """Hand freed memory back to the system: Python's garbage, the CUDA allocator's cache and glibc's
    free heap pages (which glibc otherwise keeps, so the process's memory would only ever grow)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


# Out of memory as other layers report it: the CUDA runtime ("CUDA error: out of memory"), cuBLAS and
# cuDNN workspaces, bitsandbytes (cudaErrorMemoryAllocation), and the CPU allocator: plain RuntimeErrors.
_OOM_TEXT = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation|"
                       r"DefaultCPUAllocator: can't allocate memory", re.IGNORECASE)


def file_id(path: str | Path) -> tuple:
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and _OOM_TEXT.search(str(err)) is not None)


class MemoryGuard:
    """Turns running out of memory into a message, after freeing what the failed step held, so the
    next request works: the traceback's frames hold the step's tensors, so we clear them first."""

    def __init__(self, pipe: "Pipeline", doing: str, gen: GenerateConfig | None = None, audio=None):
        self.pipe, self.doing, self.gen, self.audio = pipe, doing, gen, audio

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not is_out_of_memory(err):
            return False
        traceback.clear_frames(tb)
        if self.pipe.prefix_cache is not None:    # cached keys/values are the first memory to give back
            self.pipe.prefix_cache.clear()
        self.pipe.model.runners.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        gpu = self.pipe.model.llm_device.type == "cuda"
        tips = ["try shorter audio"]
        if self.gen is not None:
            if self.gen.num_beams > 1:
                tips.append(f"fewer beams (now {self.gen.num_beams})")
            tips.append(f"fewer new tokens (now {self.gen.max_new_tokens})")
        raise OutOfMemory(f"Out of {'GPU ' if gpu else ''}memory while {self.doing}: {', '.join(tips)}, or clear "
                          "the chat. The model is still loaded; you can ask again.") from None


def snapshot(model: SALMONN) -> dict[str, torch.Tensor]:
    """The model's own trained weights (as `set_trainable` takes them back), its CTC head included."""
    from .checkpoint import CTC_PREFIX

    weights = {name: p.detach().clone() for name, p in model.trainable_parameters().items()}
    if model.ctc_head is not None:
        weights.update({CTC_PREFIX + n: p.detach().clone() for n, p in model.ctc_head.named_parameters()})
    return weights


def restore(model: SALMONN, weights: dict[str, torch.Tensor]) -> None:
    from .checkpoint import set_trainable

    set_trainable(model, weights)


class CountedLock:
    """The model's reentrant lock. It knows how many threads wait for it, so the shared batch can step
    aside between decode steps while another job (an encoding, a beam search, the Scale lab) waits,
    and whose trained weights are in the model (`active`), for pipelines that share one model."""

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0
        self.active = None      # whose trained weights the model holds now (pipelines sharing it swap them)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire(True, timeout)
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def waiting(self) -> int:
        return self._waiting


class ModelLock:
    """The model's lock; taking it also swaps in this pipeline's trained weights when the model is
    shared with a variant and the other one ran last. Reentrant, like the RLock it wraps."""

    def __init__(self, lock: CountedLock, pipe: "Pipeline"):
        self.lock, self.pipe = lock, pipe

    def waiting(self) -> int:
        return self.lock.waiting()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self.lock.acquire(blocking, timeout):
            return False
        try:
            weights = self.pipe._weights
            if weights is not None and self.lock.active is not weights:
                restore(self.pipe.model, weights)
                self.lock.active = weights
        except BaseException:
            self.lock.release()
            raise
        return True

    def release(self) -> None:
        self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
