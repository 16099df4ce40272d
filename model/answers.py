"""What the pipeline answers with, and the prompt's one clean-up: an encoded audio, an answer, its
streamed events, a checked request, a batch's progress, a teacher-forced score."""
from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .audio import PreparedAudio
from .config import GenerateConfig
from .errors import PromptError
from .salmonn import AudioTokens

_PLACEHOLDER_TEXT = re.compile(r"</?Speech(Here)?>", re.IGNORECASE)
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 2048         # per answer; a hostile request must not hold the GPU for hours
MAX_BEAMS = 10


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


@dataclass(frozen=True)
class Request:
    """One answer's request, checked (`Pipeline.check_request`): the audio (prepared, or encoded), the
    full prompt text, the LoRA scale and the decoding settings."""
    audio: PreparedAudio | Encoding
    text: str
    scale: float
    gen: GenerateConfig


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


class TextStream:
    """A growing answer's token ids as streamed text: an event for each longer text (an incomplete
    multi-byte character waits for the rest; `grow_only`: only text that extends what is shown, as a
    beam prefix must), then the answer, with the timings of first and last token."""

    def __init__(self, model, t0: float, grow_only: bool = False):
        self.model, self.t0, self.grow_only = model, t0, grow_only
        self.shown, self.t_first = "", None

    def update(self, ids: Sequence[int]) -> StreamEvent | None:
        self.t_first = self.t_first or time.perf_counter() - self.t0
        now = self.model.decode_text(ids)
        if now.endswith("\ufffd") or now == self.shown or (self.grow_only and not now.startswith(self.shown)):
            return None
        delta, self.shown = (now[len(self.shown):] if now.startswith(self.shown) else now), now
        return StreamEvent(delta=delta, text=now)

    def finish(self, ids: Sequence[int], text: str, scale: float, stopped: bool, timings: dict,
               first_key: str = "first_token_s") -> StreamEvent:
        """The last event: the whole answer, with `first_key`, total_s and tokens_per_s in `timings`."""
        total = time.perf_counter() - self.t0
        first = self.t_first or total
        timings.update({first_key: round(first, 4), "total_s": round(total, 4),
                        "tokens_per_s": round(max(len(ids) - 1, 0) / max(total - first, 1e-9), 2)})
        final = self.model.decode_text(ids)
        return StreamEvent(delta=final[len(self.shown):] if final.startswith(self.shown) else "", text=final,
                           done=True, answer=Answer(final, text, scale, len(ids), stopped, timings))

