"""The one API the app uses: audio + prompt + settings in; streamed text, the spectrogram features
and the Q-Former window attention out.

Audio tokens are cached per audio (content hash), so a new prompt, a new LoRA scale or a follow-up
turn never re-runs the encoders. The LLM's keys/values of each answered prompt (+ answer) are cached
per (audio, LoRA scale) too (kvcache.py), so a re-ask, a follow-up turn or a scale-lab rerun only
prefills its new tokens. One model call runs at a time (a lock), because the LoRA scale is model state.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import queue
import re
import threading
import time
import traceback
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .audio import MAX_FILE_BYTES, AudioSource, PreparedAudio, prepare_audio
from .batching import BatchDecoder
from .config import GENERATE_LIMITS, GenerateConfig, Limit, SALMONNConfig
from .errors import ConfigError, OutOfMemory, PromptError, SettingsError
from .fastdecode import device_guard
from .kvcache import PrefixCache, sequence_ids, slice_kv, stack_kv
from .llm import lora_scale as use_lora_scale
from .salmonn import SALMONN, AudioTokens

_PLACEHOLDER_TEXT = re.compile(r"</?Speech(Here)?>", re.IGNORECASE)
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 2048         # per answer; a hostile request must not hold the GPU for hours
MAX_BEAMS = 10
_POLL_S = 0.05                # how often a waiting stream looks at its stop event
_STOP_GRACE_S = 0.5           # after Stop, how long to wait for the model before answering "stopped"


@dataclass
class Encoding:
    """One audio, prepared and encoded (cached)."""
    audio: PreparedAudio
    tokens: AudioTokens
    seconds_to_encode: float


@dataclass
class Answer:
    text: str
    prompt: str               # the full text sent to the LLM (template filled, audio placeholder inside)
    lora_scale: float
    num_tokens: int
    stopped: bool = False     # cut short by the stop button
    timings: dict = field(default_factory=dict)


@dataclass
class StreamEvent:
    delta: str                # new text since the last event
    text: str                 # the answer so far
    done: bool = False
    answer: Answer | None = None


@dataclass
class BatchEvent:
    """Progress of a batch of answers (one per row): each row's text so far and whether it has ended;
    the last event of a batch carries its answers."""
    texts: list[str]
    finished: list[bool]
    answers: list[Answer] | None = None


@dataclass
class Score:
    """Teacher-forced log-probabilities of a reference answer."""
    lora_scale: float
    tokens: list[str]
    logprobs: list[float]

    @property
    def nll(self) -> float:
        return float(-np.mean(self.logprobs)) if self.logprobs else float("nan")

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


def clean_prompt(text: str, max_chars: int = MAX_PROMPT_CHARS, specials: Sequence[str] = ()) -> str:
    """User text -> a safe instruction: no audio placeholder tags, no tokenizer special tokens (`specials`,
    e.g. "</s>": typed text must not end a turn), no control or invisible format characters, bounded length."""
    if text is None:
        raise PromptError("The prompt is empty: type a question or pick a task preset.")
    text = str(text)
    if len(text) > 4 * max_chars:        # refuse before any per-character work
        raise PromptError(f"The prompt is too long ({len(text)} characters); the limit is {max_chars}.")
    text = _PLACEHOLDER_TEXT.sub(" ", text)
    for token in specials:
        text = text.replace(token, " ")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = re.sub(r"[ \t]+", " ", text).strip()
    if not text:
        raise PromptError("The prompt is empty: type a question or pick a task preset.")
    if len(text) > max_chars:
        raise PromptError(f"The prompt is too long ({len(text)} characters); the limit is {max_chars}.")
    return text


class _AnyEvent:
    """Set when any of its events is: the user's Stop, or the stream's consumer having gone."""

    def __init__(self, *events: threading.Event):
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _until(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


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


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and _OOM_TEXT.search(str(err)) is not None)


class _MemoryGuard:
    """Turns running out of memory into a message, after freeing what the failed step held, so the
    next request works: the traceback's frames hold the step's tensors, so we clear them first."""

    def __init__(self, pipe: "Pipeline", doing: str, gen: GenerateConfig | None = None, audio=None):
        self.pipe, self.doing, self.gen, self.audio = pipe, doing, gen, audio

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not _is_out_of_memory(err):
            return False
        traceback.clear_frames(tb)
        if self.pipe.prefix_cache is not None:    # cached keys/values are the first memory to give back
            self.pipe.prefix_cache.clear()
        runners = getattr(self.pipe.model, "runners", None)
        if runners is not None:
            runners.clear()
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


def _snapshot(model: SALMONN) -> dict[str, torch.Tensor]:
    """The model's own trained weights (as `set_trainable` takes them back), its CTC head included."""
    from .checkpoint import CTC_PREFIX

    weights = {name: p.detach().clone() for name, p in model.trainable_parameters().items()}
    if model.ctc_head is not None:
        weights.update({CTC_PREFIX + n: p.detach().clone() for n, p in model.ctc_head.named_parameters()})
    return weights


def _restore(model: SALMONN, weights: dict[str, torch.Tensor]) -> None:
    from .checkpoint import set_trainable

    set_trainable(model, weights)
    model._active_weights = weights


class _CountedLock:
    """A reentrant lock that knows how many threads wait for it, so the shared batch can step aside
    between decode steps while another job (an encoding, a beam search, the Scale lab) waits."""

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

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


class _ModelLock:
    """The model's lock; taking it also swaps in this pipeline's trained weights when the model is
    shared with a variant and the other one ran last. Reentrant, like the RLock it wraps."""

    def __init__(self, lock: _CountedLock, pipe: "Pipeline"):
        self.lock, self.pipe = lock, pipe

    def waiting(self) -> int:
        return self.lock.waiting()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self.lock.acquire(blocking, timeout):
            return False
        try:
            weights = self.pipe._weights
            if weights is not None and getattr(self.pipe.model, "_active_weights", None) is not weights:
                _restore(self.pipe.model, weights)
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


class Pipeline:
    def __init__(self, model: SALMONN, cache_size: int = 16, prefix_cache: bool = True,
                 prefix_cache_bytes: int = 1 << 30):
        self.model = model
        self.cfg: SALMONNConfig = model.cfg
        self._cache: OrderedDict[str, Encoding] = OrderedDict()
        self._cache_size = cache_size
        self._lock = _ModelLock(_CountedLock(), self)
        self._batch: BatchDecoder | None = None
        self.max_batch_rows = 16          # answers decoded together in the shared batch
        self._weights: dict[str, torch.Tensor] | None = None   # set when the model is shared (variant)
        self.max_file_bytes = MAX_FILE_BYTES     # the app lowers it to its upload cap
        # None turns prefix reuse off (benchmarks measure both ways)
        self.prefix_cache = PrefixCache(max_entries=4 * cache_size, max_bytes=prefix_cache_bytes) if prefix_cache else None

    @classmethod
    def from_config(cls, cfg: SALMONNConfig, progress=None) -> "Pipeline":
        return cls(SALMONN.from_config(cfg, progress=progress))

    def variant(self, ckpt: str | Path) -> "Pipeline":
        """A pipeline with other trained weights (Q-Former, projection, LoRA: e.g. the instruction-tuned
        checkpoint beside the activation-tuned one) over the same loaded encoders and LLM. The two take
        turns on one model under one lock, each swapping its own weights in (11 MB for SALMONN-tiny,
        tens of MB for 13B) instead of holding a second LLM in memory. Each keeps its own caches."""
        from .checkpoint import checkpoint_weights

        ckpt = Path(ckpt)
        if not ckpt.is_file():
            raise ConfigError(f"model.ckpt does not exist: {ckpt}")
        weights, _ = checkpoint_weights(self.model, ckpt)      # strict: a mismatch names the keys
        other = Pipeline(self.model, cache_size=self._cache_size, prefix_cache=self.prefix_cache is not None,
                         prefix_cache_bytes=self.prefix_cache.max_bytes if self.prefix_cache else 1 << 30)
        other.cfg = self.cfg.replace(ckpt=str(ckpt))
        other._weights = weights
        other._lock = _ModelLock(self._lock.lock, other)
        with self._lock:
            if self._weights is None:        # the model's current weights are this pipeline's own
                self._weights = _snapshot(self.model)
                self.model._active_weights = self._weights
        return other

    # ------------------------------------------------------------------ facts for the model panel
    @property
    def trained_scale(self) -> float:
        return self.cfg.trained_lora_scale

    @property
    def has_ctc_head(self) -> bool:
        """Whether this pipeline's checkpoint carries a CTC head (CTC-guided transcription)."""
        if self._weights is not None:        # shared with a variant: its own weights say, not the model's now
            from .checkpoint import CTC_PREFIX

            return any(k.startswith(CTC_PREFIX) for k in self._weights)
        return self.model.ctc_head is not None

    @property
    def default_generate(self) -> GenerateConfig:
        return dataclasses.replace(self.cfg.generate)

    def info(self) -> dict:
        m = self.model
        params = sum(p.numel() for p in m.parameters())
        info = {
            "name": self.cfg.name,
            "speech_encoder": f"Whisper encoder ({m.speech_encoder.name}, d={m.speech_encoder.dim})",
            "audio_encoder": f"{m.audio_encoder.name} (d={m.audio_encoder.dim})" if m.audio_encoder else
                             "none: speech encoder only",
            "speech_only": m.speech_only,
            "llm": f"{type(m.llama_model.get_base_model()).__name__} from {self.cfg.llama_path}",
            "checkpoint": self.cfg.ckpt or "none (untrained connection modules)",
            "device": str(m.llm_device),
            "dtype": str(m.llm_dtype).replace("torch.", "") + (" (8-bit LLM weights)" if m.cfg.load_in_8bit else ""),
            "parameters": params,
            "trainable_parameters": sum(p.numel() for p in m.trainable_parameters().values()),
            "ctc_head": self.has_ctc_head,
            "lora": f"rank {self.cfg.lora.rank}, alpha {self.cfg.lora.alpha:g}, trained scale {self.trained_scale:g}",
            "window": f"{m.window_qformer.window_frames} frames ({m.window_qformer.window_frames / 50:.2f} s), "
                      f"{self.cfg.qformer.num_query_tokens} token(s) per window",
        }
        if m.llm_device.type == "cuda":
            info["gpu_memory_gb"] = round(torch.cuda.memory_allocated(m.llm_device) / 2**30, 2)
        else:
            try:
                import resource
                info["process_memory_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            except ImportError:  # pragma: no cover - Windows
                pass
        return info

    # ------------------------------------------------------------------ audio
    def prepare(self, source: AudioSource | PreparedAudio, origin: str = "file") -> PreparedAudio:
        """`origin` ("file", "upload" or "microphone") words the messages about the audio for where it came from."""
        if isinstance(source, PreparedAudio):
            return source
        # The front door: every check on user audio happens here (see model/audio.py).
        return prepare_audio(source, self.cfg.max_audio_seconds, self.cfg.min_audio_seconds,
                             max_bytes=self.max_file_bytes, strict=True, origin=origin)

    def encode(self, source: AudioSource | PreparedAudio | Encoding) -> Encoding:
        if isinstance(source, Encoding):
            return source
        audio = self.prepare(source)
        with self._lock, _MemoryGuard(self, "encoding the audio"):
            hit = self._cache.get(audio.key)
            if hit is not None:
                self._cache.move_to_end(audio.key)
                return hit
            start = time.perf_counter()
            tokens = self.model.encode_audio(audio.wav, output_attentions=True)
            enc = Encoding(audio=audio, tokens=tokens, seconds_to_encode=time.perf_counter() - start)
            self._cache[audio.key] = enc
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return enc

    def is_cached(self, source: AudioSource | PreparedAudio) -> bool:
        return self.prepare(source).key in self._cache

    def clear_caches(self) -> None:
        """Forget encoded audio and cached prompt prefixes (e.g. after changing the model's weights)."""
        with self._lock:
            self._cache.clear()
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def _row_ids(self, enc: Encoding, text: str) -> tuple[int, ...]:
        before, after = self.model.prompt.split(text)
        return sequence_ids(before, enc.tokens.embeds.shape[0], after)

    def _reusable(self, enc: Encoding, rows: Sequence[tuple[int, ...]], scales: Sequence[float]):
        """(past keys/values for all rows, positions reused): the longest prefix every row has cached.
        Only for unpadded batches (rows of one length), where cached positions line up."""
        if self.prefix_cache is None or len({len(r) for r in rows}) != 1:
            return None, 0
        found = [self.prefix_cache.lookup(enc.audio.key, s, ids) for ids, s in zip(rows, scales)]
        n = min(count for _, count in found)
        if n == 0:
            return None, 0
        if len(found) == 1:
            return slice_kv(found[0][0].kv, n), n
        return stack_kv([entry.kv for entry, _ in found], n), n

    def _remember(self, enc: Encoding, rows, scales, answers, record: dict, pads: Sequence[int]) -> None:
        """Cache each row's prompt + the answer tokens the LLM has been fed, at that row's scale."""
        if self.prefix_cache is None or "kv" not in record:
            return
        fed = record["fed"]
        for i, (ids, scale) in enumerate(zip(rows, scales)):
            kv = [(k[i:i + 1, :, pads[i]:], v[i:i + 1, :, pads[i]:]) for k, v in record["kv"]]
            self.prefix_cache.store(enc.audio.key, scale, tuple(ids) + tuple(answers[i][:fed]), kv)

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
        specials = [t for t in self.model.tokenizer.all_special_tokens if t]
        questions = [clean_prompt(q, specials=specials) for q, _ in history] + [clean_prompt(prompt, specials=specials)]
        # earlier answers may (in theory) contain the placeholder tag; the audio goes in once only
        answers = [_PLACEHOLDER_TEXT.sub(" ", a or "") for _, a in history]
        return self.model.prompt.conversation(questions, answers)

    def check_generate(self, gen: GenerateConfig) -> GenerateConfig:
        """Decoding settings checked against `GENERATE_LIMITS` (hostile API calls can send anything):
        the one place that refuses a bad setting, with a message naming it and its range. Returns the
        settings with whole numbers as int."""
        values = {name: limit.check(getattr(gen, name)) for name, limit in GENERATE_LIMITS.items()
                  if not (name == "seed" and gen.seed is None)}
        if not isinstance(gen.do_sample, (bool, np.bool_)):
            raise SettingsError(f"Sampling must be true or false (got {gen.do_sample!r}).")
        gen = dataclasses.replace(gen, do_sample=bool(gen.do_sample), **values)
        if gen.ctc_weight and not self.has_ctc_head:
            raise SettingsError("CTC weight: this checkpoint has no CTC head (SALMONN-tiny's carry one), so "
                                "transcripts cannot be CTC-guided; set it to 0.")
        return gen

    @property
    def scale_limit(self) -> Limit:
        """The LoRA scales offered: 0 (LoRA off) to twice the trained scale; far past it the logits
        overflow into nonsense."""
        return Limit("LoRA scale", 0.0, round(max(2 * self.trained_scale, 1.0), 6))

    def check_scale(self, scale) -> float:
        """A LoRA scale as a float within `scale_limit` (None: the trained scale)."""
        return self.trained_scale if scale is None else self.scale_limit.check(scale)

    # ------------------------------------------------------------------ answering
    def _on_worker(self, produce: Callable, stop: threading.Event, give_up: Callable | None = None) -> Iterator:
        """Run `produce(halt)` (a generator) on a worker thread that holds the model's lock, and yield
        what it yields. So the consumer may be resumed on any thread (Gradio does that), and closing
        (or abandoning) this generator sets `halt`, which `produce` checks at every step: the worker
        stops there and releases the model. When `stop` is set and the worker has not ended within
        _STOP_GRACE_S (a long step: encoding, prefill), `give_up()` is yielded last and the stream ends
        while the worker finishes in the background."""
        halt = threading.Event()                  # set when nobody listens any more
        either = _AnyEvent(stop, halt)
        events: queue.Queue = queue.Queue()
        done = object()

        def work():
            try:
                with device_guard(self.model.llm_device), self._lock:    # a new thread starts on cuda:0
                    try:
                        for item in produce(either):
                            events.put(item)
                    finally:
                        if either.is_set():       # a cut-short job: give its memory back now
                            release_memory()
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                events.put(err)
            finally:
                events.put(done)

        threading.Thread(target=work, name="salmonn-worker", daemon=True).start()
        stop_seen = None
        try:
            while True:
                try:
                    item = events.get(timeout=_POLL_S)
                except queue.Empty:
                    if stop.is_set() and give_up is not None:
                        stop_seen = stop_seen or time.monotonic()
                        if time.monotonic() - stop_seen > _STOP_GRACE_S:
                            yield give_up()
                            return
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            halt.set()

    def stream(self, audio, prompt: str, history: Sequence[tuple[str, str]] = (), lora_scale: float | None = None,
               generate: GenerateConfig | None = None, stop: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Answer one prompt about one audio, yielding text as it is generated (on a worker thread:
        see `_on_worker`). After `stop` is set the stream ends within about half a second."""
        # Checks first, on the caller's thread: bad input fails at once, without waiting for the model.
        gen = self.check_generate(generate or self.default_generate)
        scale = self.check_scale(lora_scale)
        text = self.prompt_text(prompt, history)
        if not isinstance(audio, Encoding):
            audio = self.prepare(audio)
        stop = stop or threading.Event()
        shown = [""]

        def produce(either):
            if either.is_set():            # stopped or abandoned while waiting for the model
                yield StreamEvent("", "", True, Answer("", text, scale, 0, True, {}))
                return
            with _MemoryGuard(self, "answering", gen=gen):
                yield from self._stream_locked(audio, prompt, history, scale, gen, either)

        def give_up():
            count = len(self.model.tokenizer(shown[0], add_special_tokens=False).input_ids)
            return StreamEvent("", shown[0], True, Answer(shown[0], text, scale, count, True, {}))

        for event in self._on_worker(produce, stop, give_up):
            shown[0] = event.text
            yield event

    @property
    def batch(self) -> BatchDecoder:
        """The shared batch in which greedy and sampled answers of every user decode together."""
        if self._batch is None:
            self._batch = BatchDecoder(self.model, self._lock, max_rows=self.max_batch_rows)
        return self._batch

    def stream_shared(self, audio, prompt: str, history: Sequence[tuple[str, str]] = (),
                      lora_scale: float | None = None, generate: GenerateConfig | None = None,
                      stop: threading.Event | None = None) -> Iterator[StreamEvent]:
        """As `stream`, but decoded in the shared batch beside other users' answers (`batch`), each at
        its own LoRA scale and settings, so many users are answered at once. Beam search runs on its own
        (`stream`). Closing the stream, or `stop`, retires the answer at the next step."""
        gen = self.check_generate(generate or self.default_generate)
        if gen.num_beams > 1:
            yield from self.stream(audio, prompt, history, lora_scale, gen, stop)
            return
        scale = self.check_scale(lora_scale)
        text = self.prompt_text(prompt, history)
        if not isinstance(audio, Encoding):
            audio = self.prepare(audio)
        t0 = time.perf_counter()
        cached = (audio.audio if isinstance(audio, Encoding) else audio).key in self._cache
        with _MemoryGuard(self, "answering", gen=gen):
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
        with _MemoryGuard(self, "answering", gen=gen):
            yield from self._read_row(row, text, scale, timings, t0)

    def _read_row(self, row, text: str, scale: float, timings: dict, t0: float) -> Iterator[StreamEvent]:
        """A shared-batch row's tokens as text events, then the answer. Polls, so a Stop is seen even
        while the batch waits for the model."""
        m = self.model
        eos = m.tokenizer.eos_token_id
        ids: list[int] = []
        shown, t_first, stop_seen = "", None, None
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
                t_first = t_first or time.perf_counter() - t0
                if item == eos:
                    continue
                ids.append(item)
                now = m.decode_text(ids)
                if now.endswith("\ufffd") or now == shown:      # wait for the rest of a multi-byte character
                    continue
                delta = now[len(shown):] if now.startswith(shown) else now
                shown = now
                yield StreamEvent(delta=delta, text=shown)
        finally:
            row.cancelled.set()
        total = time.perf_counter() - t0
        timings.update(first_token_s=round(t_first or total, 4), total_s=round(total, 4),
                       tokens_per_s=round(max(len(ids) - 1, 0) / max(total - (t_first or 0), 1e-9), 2))
        final = m.decode_text(ids)
        yield StreamEvent(delta=final[len(shown):] if final.startswith(shown) else "", text=final, done=True,
                          answer=Answer(final, text, scale, len(ids), not row.ended, timings))

    def _stream_locked(self, audio, prompt: str, history, lora_scale: float, gen: GenerateConfig,
                       stop) -> Iterator[StreamEvent]:
        """The generation itself, on the worker thread (which holds the lock)."""
        scale = self.check_scale(lora_scale)
        text = self.prompt_text(prompt, history)
        with self._lock:
            t0 = time.perf_counter()
            prepared = self.prepare(audio) if not isinstance(audio, Encoding) else audio.audio
            cached = prepared.key in self._cache
            enc = self.encode(audio if isinstance(audio, Encoding) else prepared)
            m = self.model
            embeds, mask, _ = m.assemble([enc.tokens.embeds], [text])
            timings = {"encode_s": round(time.perf_counter() - t0, 4), "audio_cached": cached,
                       "prompt_tokens": len(self._row_ids(enc, text)), "audio_tokens": int(enc.tokens.embeds.shape[0])}
            guide = m.ctc_guide([enc.tokens.embeds], gen)
            with use_lora_scale(m.llama_model, scale), torch.no_grad():
                if gen.num_beams > 1:
                    yield from self._stream_beams(embeds, mask, gen, stop, text, scale, timings, t0, guide)
                    return
                row = self._row_ids(enc, text)
                past, reused = self._reusable(enc, [row], [scale])
                timings.update(prompt_tokens=len(row), reused_tokens=reused)
                record: dict = {}
                seen: list[int] = []           # every token the decoder yielded (EOS included)
                ids: list[int] = []
                shown = ""
                t_first = None
                complete = False
                steps = m.decode_steps(embeds[:, reused:], None, gen, stop=stop, past=past, record=record, guide=guide)
                try:
                    for step in steps:
                        tok = int(step[0])
                        seen.append(tok)
                        if t_first is None:
                            t_first = time.perf_counter() - t0
                        if tok == m.tokenizer.eos_token_id:
                            break
                        ids.append(tok)
                        now = m.decode_text(ids)
                        if now.endswith("\ufffd"):      # an incomplete multi-byte character: wait for the rest
                            continue
                        if now != shown:
                            delta = now[len(shown):] if now.startswith(shown) else now
                            shown = now
                            yield StreamEvent(delta=delta, text=shown)
                    complete = True
                finally:
                    steps.close()
                    if complete:
                        self._remember(enc, [row], [scale], [seen], record, [0])
                total = time.perf_counter() - t0
                timings.update(first_token_s=round(t_first or total, 4), total_s=round(total, 4),
                               tokens_per_s=round(max(len(seen) - 1, 0) / max(total - (t_first or 0), 1e-9), 2))
                final = m.decode_text(ids)
                stopped = bool(stop is not None and stop.is_set())
                yield StreamEvent(delta=final[len(shown):] if final.startswith(shown) else "", text=final, done=True,
                                  answer=Answer(final, text, scale, len(ids), stopped, timings))

    def _stream_beams(self, embeds, mask, gen: GenerateConfig, stop, text: str, scale: float, timings: dict,
                      t0: float, guide=None) -> Iterator[StreamEvent]:
        """Beam search, streaming the part of the answer every beam that could still win agrees on.

        transformers' generate blocks, so it runs on a helper thread (this thread holds the model's lock
        and only waits), and its `AgreedPrefix` observer hands each longer agreed prefix over a queue."""
        m = self.model
        found: queue.Queue = queue.Queue()
        finished = object()
        outcome: dict = {}

        def search():
            try:
                with torch.no_grad(), device_guard(m.llm_device):   # per thread; the LoRA scale is the caller's
                    outcome["ids"] = m.beam_search(embeds, mask, gen, stop=stop, on_prefix=found.put,
                                                   guide=guide)[0].tolist()
            except BaseException as err:  # noqa: BLE001 - raised again on the streaming thread
                outcome["error"] = err
            finally:
                found.put(finished)

        helper = threading.Thread(target=search, name="salmonn-beams", daemon=True)
        helper.start()
        shown, t_first = "", None
        try:
            while (item := found.get()) is not finished:
                now = m.decode_text(item)
                if now.endswith("\ufffd") or len(now) <= len(shown) or not now.startswith(shown):
                    continue
                t_first = t_first or time.perf_counter() - t0
                delta, shown = now[len(shown):], now
                yield StreamEvent(delta=delta, text=shown)
        finally:
            helper.join()      # the model is ours (the lock) until the search has really ended
        if "error" in outcome:
            raise outcome["error"]
        ids = outcome["ids"]
        answer = m.decode_text(ids)
        total = time.perf_counter() - t0
        timings.update(total_s=round(total, 4), first_text_s=round(t_first or total, 4))
        yield StreamEvent(delta=answer[len(shown):] if answer.startswith(shown) else answer, text=answer, done=True,
                          answer=Answer(answer, text, scale, len(ids), bool(stop.is_set()), timings))

    def answer(self, audio, prompt: str, **kwargs) -> Answer:
        event = None
        for event in self.stream(audio, prompt, **kwargs):
            pass
        return event.answer

    def _many_request(self, prompts, lora_scales, history, generate) -> tuple[list[str], list[float], GenerateConfig]:
        """(prompt texts, LoRA scales, settings) of a batch: one prompt or scale stands for every row."""
        gen = self.check_generate(generate or self.default_generate)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        scales = [lora_scales] if lora_scales is None or isinstance(lora_scales, (int, float)) else list(lora_scales)
        rows = max(len(prompts), len(scales))
        if len(prompts) == 1:
            prompts = prompts * rows
        if len(scales) == 1:
            scales = scales * rows
        if len(prompts) != len(scales):
            raise PromptError(f"{len(prompts)} prompts and {len(scales)} LoRA scales: give one of each per row, or one of either.")
        scales = [self.check_scale(s) for s in scales]
        return [self.prompt_text(p, history) for p in prompts], scales, gen

    def answer_many(self, audio, prompts: str | Sequence[str], lora_scales: float | Sequence[float] | None = None,
                    history: Sequence[tuple[str, str]] = (), generate: GenerateConfig | None = None) -> list[Answer]:
        """Several prompts and/or LoRA scales over one audio. Greedy/sampled decoding runs all rows in one
        batch (each row with its own LoRA scale); beam search runs row by row."""
        texts, scales, gen = self._many_request(prompts, lora_scales, history, generate)
        with self._lock, _MemoryGuard(self, "answering", gen=gen):
            for event in self._many_locked(audio, texts, scales, gen, None, None):
                pass
        return event.answers

    def stream_many(self, audio, prompts: str | Sequence[str], lora_scales: float | Sequence[float] | None = None,
                    history: Sequence[tuple[str, str]] = (), generate: GenerateConfig | None = None,
                    stop: threading.Event | None = None, every: float = 0.25) -> Iterator[BatchEvent]:
        """`answer_many` on a worker thread (see `_on_worker`), reporting every `every` seconds each row's
        text so far and which rows have ended; the last event carries the answers. Stop, closing or
        abandoning the stream ends the batch at its next step (stopped rows are marked) and frees the
        model and the memory the batch held."""
        texts, scales, gen = self._many_request(prompts, lora_scales, history, generate)
        if not isinstance(audio, Encoding):
            audio = self.prepare(audio)

        def produce(either):
            with _MemoryGuard(self, "answering", gen=gen):
                yield from self._many_locked(audio, texts, scales, gen, either, every)
            release_memory()               # a batch's cache is large: give it back at once

        yield from self._on_worker(produce, stop or threading.Event())

    def _many_locked(self, audio, texts: list[str], scales: list[float], gen: GenerateConfig, stop,
                     every: float | None) -> Iterator[BatchEvent]:
        """The batch itself (the caller holds the lock). Progress every `every` seconds (None: none)."""
        t0 = time.perf_counter()
        enc = self.encode(audio)
        m = self.model
        rows = len(texts)
        halted = lambda: stop is not None and stop.is_set()  # noqa: E731
        if gen.num_beams > 1:
            answers: list[Answer] = []
            guide = m.ctc_guide([enc.tokens.embeds], gen)      # one clip: its frames serve every search
            for text, scale in zip(texts, scales):
                if halted():
                    answers.append(Answer("", text, scale, 0, stopped=True))
                    continue
                embeds, mask, _ = m.assemble([enc.tokens.embeds], [text])
                with use_lora_scale(m.llama_model, scale), torch.no_grad():
                    ids = m.beam_search(embeds, mask, gen, stop=stop, guide=guide)[0].tolist()
                answers.append(Answer(m.decode_text(ids), text, scale, len(ids), stopped=halted()))
                if every is not None and len(answers) < rows:
                    yield BatchEvent([a.text for a in answers] + [""] * (rows - len(answers)),
                                     [True] * len(answers) + [False] * (rows - len(answers)))
            yield BatchEvent([a.text for a in answers], [True] * rows, answers)
            return
        row_ids = [self._row_ids(enc, t) for t in texts]
        embeds, mask, _ = m.assemble([enc.tokens.embeds] * rows, texts)
        width = embeds.shape[1]
        pads = [width - len(r) for r in row_ids]
        if not any(pads):
            mask = None                  # no padding: no mask to build or check per step
        past, reused = self._reusable(enc, row_ids, scales)
        seen: list[list[int]] = [[] for _ in range(rows)]
        record: dict = {}
        eos = m.tokenizer.eos_token_id
        shown_at = time.perf_counter()
        with use_lora_scale(m.llama_model, m._scale_tensor(scales, rows)), torch.no_grad():
            steps = m.decode_steps(embeds[:, reused:], mask, gen, stop=stop, past=past, record=record,
                                   guide=m.ctc_guide([enc.tokens.embeds], gen, rows_per_clip=rows))
            try:
                for step in steps:
                    for i, tok in enumerate(step.tolist()):
                        seen[i].append(tok)
                    if every is not None and time.perf_counter() - shown_at >= every:
                        shown_at = time.perf_counter()
                        yield BatchEvent([m.decode_text(_until(s, eos)) for s in seen], [eos in s for s in seen])
            finally:
                steps.close()
        stopped = halted()
        if not stopped:                  # a cut-short batch is not worth keeping
            self._remember(enc, row_ids, scales, seen, record, pads)
        timings = {"total_s": round(time.perf_counter() - t0, 4), "reused_tokens": reused}
        answers = [Answer(m.decode_text(_until(s, eos)), text, scale, len(_until(s, eos)),
                          stopped=stopped and eos not in s, timings={**timings, "prompt_tokens": len(r)})
                   for s, text, scale, r in zip(seen, texts, scales, row_ids)]
        yield BatchEvent([a.text for a in answers], [True] * rows, answers)

    def score(self, audio, prompt: str, reference: str, lora_scales: float | Sequence[float] | None = None) -> list[Score]:
        """Teacher-forced log-probability of `reference` (+ EOS) at each LoRA scale, in one batch."""
        scales = [self.check_scale(None if lora_scales is None else lora_scales)] if not isinstance(lora_scales, (list, tuple)) \
            else [self.check_scale(s) for s in lora_scales]
        text = self.prompt_text(prompt)
        tok = self.model.tokenizer
        target = tok(reference.strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
        with self._lock, _MemoryGuard(self, "scoring"):
            enc = self.encode(audio)
            with torch.no_grad():
                logps = self.model.target_logprobs([enc.tokens.embeds] * len(scales), [text] * len(scales),
                                                   [target] * len(scales), scales)
        pieces = [tok.decode([t]) for t in target]
        return [Score(s, pieces, lp.tolist()) for s, lp in zip(scales, logps)]
