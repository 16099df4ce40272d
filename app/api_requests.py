"""The OpenAI-compatible API's requests, read and checked for their form: chat messages with text and
audio parts (one audio per conversation; data URLs only, nothing is fetched), the settings they set
(passed on as sent: the pipeline checks their values), stop strings, and transcription forms. Errors
are `ApiError`s with OpenAI's error types and HTTP statuses."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from . import presets

MAX_CHOICES = 8


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ChatRequest:
    """A checked chat request: one audio, the turns before, the question, and the settings."""
    model: str
    audio: bytes
    history: list[tuple[str, str]]
    question: str
    overrides: dict                       # GenerateConfig fields the request sets
    scale: object                         # as sent; the pipeline checks it
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)


def _decode_audio(part: dict, cap: int) -> bytes:
    """The bytes of an `input_audio` part or an `audio_url` data URL (other URLs are never fetched)."""
    if part.get("type") == "input_audio":
        data = (part.get("input_audio") or {}).get("data")
    else:
        url = str((part.get("audio_url") or {}).get("url") or "")
        if not url.startswith("data:"):
            raise ApiError(400, "audio_url must be a data: URL (data:audio/wav;base64,...); the server fetches "
                                "nothing from the network.", param="messages")
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "audio_url data URLs must be base64-encoded.", param="messages")
    if not isinstance(data, str):
        raise ApiError(400, "An audio part has no data: give base64-encoded audio.", param="messages")
    if len(data) * 3 // 4 > cap:
        raise ApiError(413, f"The audio is larger than the limit of {cap / 2**20:.0f} MB.", param="messages")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "The audio data is not valid base64.", param="messages") from None


def _text_and_audio(content, cap: int) -> tuple[str, bytes | None]:
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ApiError(400, "Message content must be a string or a list of content parts.", param="messages")
    texts, audio = [], None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text") or ""))
        elif kind in ("input_audio", "audio_url"):
            if audio is not None:
                raise ApiError(400, "SALMONN hears one audio per conversation; this message has two.", param="messages")
            audio = _decode_audio(part, cap)
        else:
            raise ApiError(400, f"Unsupported content part type {kind!r}: use text, input_audio or audio_url.",
                           param="messages")
    return " ".join(t for t in texts if t.strip()), audio


def _conversation(messages, cap: int) -> tuple[bytes, list[tuple[str, str]], str]:
    """(audio, earlier (question, answer) turns, the last question). System messages are not part of
    SALMONN's prompt template and are left out."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list.", param="messages")
    audio, turns = None, []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"Unsupported message role {role!r}.", param="messages")
        text, heard = _text_and_audio(message.get("content"), cap)
        if heard is not None:
            if audio is not None or role != "user":
                raise ApiError(400, "SALMONN hears one audio per conversation, in a user message.", param="messages")
            audio = heard
        if role in ("user", "assistant"):
            turns.append((role, text))
    if audio is None:
        raise ApiError(400, "No audio: add an input_audio (or audio_url) content part to a user message.",
                       param="messages")
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "The last message must be the user's question.", param="messages")
    history, pending = [], None
    for role, text in turns[:-1]:
        if role == "user":
            pending = text if pending is None else f"{pending} {text}"
        else:
            history.append((pending or "", text))
            pending = None
    question = turns[-1][1] if pending is None else f"{pending} {turns[-1][1]}"
    return audio, history, question


def _settings(body: dict) -> tuple[dict, object]:
    """GenerateConfig fields the request sets, and its LoRA scale, as sent: the pipeline checks them
    (its messages name each setting and its range). Temperature 0 decodes greedily, as
    OpenAI-compatible servers do; without a temperature the model's default decoding applies."""
    overrides: dict = {}
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            overrides["max_new_tokens"] = body[name]
            break
    temperature = body.get("temperature")
    if temperature is not None:
        greedy = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
        overrides["do_sample"] = not greedy
        if not greedy:
            overrides["temperature"] = temperature
    for name in ("top_p", "top_k", "seed", "num_beams", "repetition_penalty", "ctc_weight", "bad_words"):
        if body.get(name) is not None:
            overrides[name] = body[name]
    if body.get("min_tokens") is not None:        # vLLM's name: no EOS before this many tokens
        overrides["min_length"] = body["min_tokens"]
    return overrides, body.get("lora_scale")


def parse_chat(body: dict, models: list[str], cap: int) -> ChatRequest:
    model = body.get("model") or models[0]
    if model not in models:
        raise ApiError(404, f"The model {model!r} does not exist; loaded: {', '.join(models)}.", "not_found_error",
                       "model")
    audio, history, question = _conversation(body.get("messages"), cap)
    overrides, scale = _settings(body)
    overrides.setdefault("num_beams", 1)    # as the studio's chat: one beam, decoded in the shared batch
    n = body.get("n") or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be a whole number from 1 to {MAX_CHOICES} (got {n!r}).", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings.", param="stop")
    options = body.get("stream_options") or {}
    return ChatRequest(model, audio, history, question, overrides, scale, n, bool(body.get("stream")),
                       bool(options.get("include_usage")), stop)


class StopText:
    """Cuts an answer at the first stop string, holding back any tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def cut(self, text: str) -> tuple[str, bool]:
        """(text up to the first stop string, whether one was found)."""
        hits = [text.find(s) for s in self.stops if s in text]
        return (text[:min(hits)], True) if hits else (text, False)

    def safe(self, text: str) -> str:
        """The part of an unfinished answer that no later stop string can take back."""
        return text[:len(text) - self.hold] if self.hold else text


def transcription_request(form, data: bytes, models: list[str]) -> tuple[ChatRequest, str]:
    """The speech-recognition preset's prompt and suggested decoding (scale, beams, CTC guidance)."""
    model = form.get("model") or models[0]
    if model not in models:
        model = models[0] if model in ("whisper-1", "salmonn") else model
    if model not in models:
        raise ApiError(404, f"The model {model!r} does not exist; loaded: {', '.join(models)}.", "not_found_error",
                       "model")
    fmt = form.get("response_format") or "json"
    if fmt not in ("json", "text", "verbose_json"):
        raise ApiError(400, f"response_format {fmt!r} is not supported: use json, text or verbose_json.",
                       param="response_format")
    language = (form.get("language") or "en").lower()
    if language not in ("en", "english"):
        raise ApiError(400, f"language {language!r}: the speech-recognition prompt transcribes English; "
                            "omit language or give 'en'.", param="language")
    preset = presets.PRESETS_BY_KEY["asr"]
    overrides: dict = {}
    try:
        temperature = float(form.get("temperature") or 0)
    except ValueError:
        raise ApiError(400, "temperature must be a number.", param="temperature") from None
    if temperature > 0:
        overrides.update(do_sample=True, temperature=temperature, num_beams=1)
    return ChatRequest(model, data, [], preset.prompt, overrides, None), fmt
