"""The one API the app uses: audio + prompt + settings in; streamed text, the spectrogram features
and the Q-Former window attention out.

Audio tokens are cached per audio (content hash), so a new prompt, a new LoRA scale or a follow-up
turn never re-runs the encoders. The LLM's keys/values of each answered prompt (+ answer) are cached
per (audio, LoRA scale) too (kvcache.py), so a re-ask, a follow-up turn or a scale-lab rerun only
prefills its new tokens. One model call runs at a time (a lock), because the LoRA scale is model state.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .answers import (_PLACEHOLDER_TEXT, Answer, BatchEvent, Encoding, Request, Score, StreamEvent, TextStream,
                      clean_prompt)
from .audio import MAX_FILE_BYTES, AudioSource, PreparedAudio, prepare_audio
from .batching import BatchDecoder
from .config import GENERATE_LIMITS, MAX_BAD_WORD_CHARS, MAX_BAD_WORDS, GenerateConfig, Limit, SALMONNConfig
from .decoding import generate
from .errors import ConfigError, SettingsError
from .fastdecode import device_guard
from .guards import AnyEvent, CountedLock, MemoryGuard, ModelLock, file_id, release_memory, snapshot
from .kvcache import PrefixCache, sequence_ids, slice_kv, stack_kv
from .many import ManyAnswers
from .shared import _POLL_S, _STOP_GRACE_S, SharedAnswers
from .salmonn import SALMONN

__all__ = ["Answer", "BatchEvent", "Encoding", "Pipeline", "Request", "Score", "StreamEvent"]   # the API's types

class Pipeline(SharedAnswers, ManyAnswers):
    def __init__(self, model: SALMONN, cache_size: int = 16, prefix_cache: bool = True,
                 prefix_cache_bytes: int = 1 << 30):
        self.model = model
        self.cfg: SALMONNConfig = model.cfg
        self._cache: OrderedDict[str, Encoding] = OrderedDict()
        self._file_keys: OrderedDict[tuple, str] = OrderedDict()     # file (path, size, mtime) -> audio key
        self._cache_size = cache_size
        self._lock = ModelLock(CountedLock(), self)
        self._batch: BatchDecoder | None = None
        self.max_batch_rows = 16          # answers decoded together in the shared batch
        self._reserved = 0                # answers given room in it (see `reserve`)
        self._room_lock = threading.Lock()
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
        turns on one model under one lock, each swapping its own weights in (29 MB for SALMONN-tiny,
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
        other._lock = ModelLock(self._lock.lock, other)
        with self._lock:
            if self._weights is None:        # the model's current weights are this pipeline's own
                self._weights = snapshot(self.model)
                self._lock.lock.active = self._weights
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
        # Every check on user audio happens here (see model/audio.py).
        audio = prepare_audio(source, self.cfg.max_audio_seconds, self.cfg.min_audio_seconds,
                              max_bytes=self.max_file_bytes, strict=True, origin=origin)
        if isinstance(source, (str, Path)):       # so `cached` finds its encoding without decoding it again
            self._file_keys[file_id(source)] = audio.key
            while len(self._file_keys) > 4 * self._cache_size:
                self._file_keys.popitem(last=False)
        return audio

    def cached(self, path: str | Path) -> Encoding | None:
        """The encoding of a file encoded before (still unchanged), at once and without waiting for the
        model; None otherwise. For redrawing what the model sees."""
        try:
            key = self._file_keys.get(file_id(path))
        except OSError:
            return None
        return self._cache.get(key) if key is not None else None

    def check_request(self, audio, prompt: str, history: Sequence[tuple[str, str]] = (),
                      lora_scale: float | None = None, generate: GenerateConfig | None = None,
                      origin: str = "file") -> "Request":
        """The front door: every check on one answer's request, once, before it waits for the model:
        the decoding settings, the LoRA scale, the prompt and earlier turns, then the audio (a file
        already encoded is not decoded again). `stream` and `stream_shared` take the result as it is."""
        gen = self.check_generate(generate or self.default_generate)
        scale = self.check_scale(lora_scale)
        text = self.prompt_text(prompt, history)
        if not isinstance(audio, (Encoding, PreparedAudio)):
            audio = (self.cached(audio) if isinstance(audio, (str, Path)) else None) or self.prepare(audio, origin)
        return Request(audio, text, scale, gen)

    def encode(self, source: AudioSource | PreparedAudio | Encoding) -> Encoding:
        if isinstance(source, Encoding):
            return source
        audio = self.prepare(source)
        with self._lock, MemoryGuard(self, "encoding the audio"):
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
        words = gen.bad_words
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or len(words) > MAX_BAD_WORDS or not all(
                isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in words):
            raise SettingsError(f"Bad words must be a list of at most {MAX_BAD_WORDS} words, each 1 to "
                                f"{MAX_BAD_WORD_CHARS} characters (got {words!r:.200}).")
        gen = dataclasses.replace(gen, do_sample=bool(gen.do_sample), bad_words=tuple(w.strip() for w in words), **values)
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
        either = AnyEvent(stop, halt)
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

    def stream(self, audio, prompt: str = "", history: Sequence[tuple[str, str]] = (), lora_scale: float | None = None,
               generate: GenerateConfig | None = None, stop: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Answer one prompt about one audio, yielding text as it is generated (on a worker thread:
        see `_on_worker`). After `stop` is set the stream ends within about half a second. `audio` may
        be a checked `Request` (then the other request arguments are not used)."""
        # Checks first, on the caller's thread: bad input fails at once, without waiting for the model.
        req = audio if isinstance(audio, Request) else self.check_request(audio, prompt, history, lora_scale, generate)
        audio, text, scale, gen = req.audio, req.text, req.scale, req.gen
        stop = stop or threading.Event()
        shown = [""]

        def produce(either):
            if either.is_set():            # stopped or abandoned while waiting for the model
                yield StreamEvent("", "", True, Answer("", text, scale, 0, True, {}))
                return
            with MemoryGuard(self, "answering", gen=gen):
                yield from self._stream_locked(audio, text, scale, gen, either)

        def give_up():
            count = len(self.model.tokenizer(shown[0], add_special_tokens=False).input_ids)
            return StreamEvent("", shown[0], True, Answer(shown[0], text, scale, count, True, {}))

        for event in self._on_worker(produce, stop, give_up):
            shown[0] = event.text
            yield event

    def _stream_locked(self, audio, text: str, scale: float, gen: GenerateConfig, stop) -> Iterator[StreamEvent]:
        """One answer (`decoding.generate`), on the worker thread that holds the lock, its text streamed
        as it grows: each token, or with beam search the part every beam that could still win agrees on."""
        t0 = time.perf_counter()
        cached = (audio.audio if isinstance(audio, Encoding) else audio).key in self._cache
        enc = self.encode(audio)
        m = self.model
        embeds, mask, _ = m.assemble([enc.tokens.embeds], [text])
        row = self._row_ids(enc, text)
        greedy = gen.num_beams == 1
        past, reused = self._reusable(enc, [row], [scale]) if greedy else (None, 0)
        timings = {"encode_s": round(time.perf_counter() - t0, 4), "audio_cached": cached, "prompt_tokens": len(row),
                   "audio_tokens": int(enc.tokens.embeds.shape[0]), "reused_tokens": reused}
        record: dict = {}
        progress = generate(m, embeds[:, reused:], None if greedy else mask, gen, [scale], stop=stop, past=past,
                            record=record, trace=timings.setdefault("decode", {}),
                            guide=m.ctc_guide([enc.tokens.embeds], gen), stream=True)
        text_stream = TextStream(m, t0, grow_only=not greedy)   # beams only ever add to what is shown
        for last in progress:
            if last.done:
                break
            event = text_stream.update(last.tokens[0])
            if event is not None:
                yield event
        if greedy:
            self._remember(enc, [row], [scale], last.fed, record, [0])
        yield text_stream.finish(last.tokens[0], text, scale, last.stopped, timings,
                                 "first_token_s" if greedy else "first_text_s")

    def answer(self, audio, prompt: str, **kwargs) -> Answer:
        event = None
        for event in self.stream(audio, prompt, **kwargs):
            pass
        return event.answer
