"""An OpenAI-compatible API beside the studio: `POST /v1/chat/completions` (text and audio content
parts, streaming), `POST /v1/audio/transcriptions` and `GET /v1/models`.

Greedy and sampled answers decode in each model's shared batch (`Pipeline.stream_shared`), beside
the studio's own chat, each at its own LoRA scale; beam search runs on its own. SALMONN's own knobs
come as extra body fields (`lora_scale`, `num_beams`, `top_k`, `repetition_penalty`, `ctc_weight`, and
vLLM's `bad_words`: words never to emit).
Every check on a request is the pipeline's (the same messages the studio shows), answered as OpenAI's
error JSON with its status: 400 bad audio or settings, 401 a missing or wrong key, 404 an unknown
model, 413 over the size cap, 429 (with Retry-After) when too many requests are in flight.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from model.errors import Busy, OutOfMemory, SalmonnError
from model.pipeline import Answer, Pipeline
from model.pipeline import Request as Checked

from . import presets
from .api_requests import ApiError, ChatRequest, StopText, parse_chat, transcription_request

class Api:
    """The /v1 routes over loaded pipelines ({model name: pipeline}). `api_key`: required on every
    request when given. At most `max_rows` + `max_waiting` requests are in flight; more get 429."""

    def __init__(self, pipes: Mapping[str, Pipeline], api_key: str | None = None, max_waiting: int = 16,
                 max_body_bytes: int | None = None):
        self.pipes = dict(pipes)
        self.api_key = api_key or None
        first = next(iter(self.pipes.values()))
        self.cap = max_body_bytes or first.max_file_bytes
        self.max_waiting = max(0, int(max_waiting))
        self.created = int(time.time())

    def asgi(self):
        """The API alone as an ASGI app (`--api-only`, benchmarks)."""
        from fastapi import FastAPI

        app = FastAPI(title="SALMONN Studio API", docs_url=None, redoc_url=None)
        self.mount(app)
        return app

    def mount(self, app) -> None:
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"])

    # ------------------------------------------------------------------ checks shared by every route
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", "authentication_error")

    async def _body(self, request: Request) -> bytes:
        size = request.headers.get("content-length")
        limit = self.cap * 4 // 3 + 2**20          # base64 grows audio by a third; room for the JSON
        if size is not None and size.isdigit() and int(size) > limit:
            raise ApiError(413, f"The request is larger than the limit of {limit / 2**20:.0f} MB.")
        body = await request.body()
        if len(body) > limit:
            raise ApiError(413, f"The request is larger than the limit of {limit / 2**20:.0f} MB.")
        return body

    def _admit(self, pipe: Pipeline, rows: int = 1):
        """Room in the pipeline's shared batch (shared with the studio's chat), or 429."""
        try:
            return pipe.reserve(rows, self.max_waiting)
        except Busy as err:
            raise ApiError(429, str(err), "rate_limit_error", headers={"Retry-After": "2"}) from None

    # ------------------------------------------------------------------ routes
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as err:
            return err.response()
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "salmonn-studio",
                 "lora_trained_scale": pipe.trained_scale} for name, pipe in self.pipes.items()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        try:
            self._authorize(request)
            try:
                body = json.loads(await self._body(request))
            except ValueError:
                raise ApiError(400, "The request body is not valid JSON.") from None
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object.")
            req = parse_chat(body, list(self.pipes), self.cap)
            pipe = self.pipes[req.model]
            checked = await run_in_threadpool(self._checked, pipe, req)
            room = self._admit(pipe, req.n)
        except ApiError as err:
            return err.response()
        except SalmonnError as err:
            return ApiError(400, str(err)).response()
        streams = Choices(pipe, checked, req.n, req.stop)
        if req.stream:
            return StreamingResponse(self._released(self._chunks(streams, req), room), media_type="text/event-stream")
        try:
            answers = await streams.collect(request)
        except SalmonnError as err:
            return ApiError(503 if isinstance(err, OutOfMemory) else 400, str(err)).response()
        finally:
            room.release()
        return JSONResponse(completion(req, answers, streams))

    @staticmethod
    def _checked(pipe: Pipeline, req: ChatRequest) -> Checked:
        """The pipeline's own checks (its front door), before anything waits for the model."""
        if len(req.audio) > pipe.max_file_bytes:
            raise ApiError(413, f"The audio is larger than the limit of {pipe.max_file_bytes / 2**20:.0f} MB.")
        try:
            gen = replace(pipe.default_generate, **req.overrides)
        except TypeError as err:      # a setting the decoder does not know
            raise ApiError(400, str(err)) from None
        return pipe.check_request(req.audio, req.question, req.history, req.scale, gen, "upload")

    @staticmethod
    async def _released(chunks: AsyncIterator[str], room) -> AsyncIterator[str]:
        with room:
            async for chunk in chunks:
                yield chunk

    async def _chunks(self, streams: "Choices", req: ChatRequest) -> AsyncIterator[str]:
        base = {"id": streams.id, "object": "chat.completion.chunk", "created": streams.created, "model": req.model}

        def chunk(**fields) -> str:
            return f"data: {json.dumps({**base, **fields})}\n\n"

        for i in range(req.n):
            yield chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            async for i, delta, answer in streams.deltas():
                if answer is None:
                    yield chunk(choices=[{"index": i, "delta": {"content": delta}, "finish_reason": None}])
                else:
                    if delta:
                        yield chunk(choices=[{"index": i, "delta": {"content": delta}, "finish_reason": None}])
                    yield chunk(choices=[{"index": i, "delta": {}, "finish_reason": finish_reason(answer, streams.gen)}])
        except SalmonnError as err:
            yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'invalid_request_error'}})}\n\n"
        else:
            if req.include_usage:
                yield chunk(choices=[], usage=usage(streams.answers))
        yield "data: [DONE]\n\n"

    async def transcriptions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            await self._body(request)
            form = await request.form(max_part_size=self.cap)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "Send the audio as the multipart field 'file'.", param="file")
            data = await upload.read()
            req, fmt = transcription_request(form, data, list(self.pipes))
            pipe = self.pipes[req.model]
            scale, beams, ctc = presets.PRESETS_BY_KEY["asr"].suggested(pipe.trained_scale)
            if not req.overrides.get("do_sample"):     # the preset's decoding, unless the client samples
                req.overrides.update(num_beams=beams, ctc_weight=ctc if pipe.has_ctc_head else 0.0)
            req.scale = scale
            checked = await run_in_threadpool(self._checked, pipe, req)
            room = self._admit(pipe)
        except ApiError as err:
            return err.response()
        except SalmonnError as err:
            return ApiError(400, str(err)).response()
        try:
            (answer,) = await Choices(pipe, checked).collect(request)
        except SalmonnError as err:
            return ApiError(503 if isinstance(err, OutOfMemory) else 400, str(err)).response()
        finally:
            room.release()
        if fmt == "text":
            return PlainTextResponse(answer.text)
        if fmt == "verbose_json":
            seconds = round(checked.audio.seconds, 3)
            return JSONResponse({"task": "transcribe", "language": "english", "duration": seconds,
                                 "text": answer.text, "segments": [{"id": 0, "start": 0.0, "end": seconds,
                                                                    "text": answer.text}],
                                 "lora_scale": answer.lora_scale, "timings": answer.timings})
        return JSONResponse({"text": answer.text})


class Choices:
    """The n answers of one request, decoded in the shared batch (beam search on its own); each has
    its own stop event, set when the client goes away."""

    def __init__(self, pipe: Pipeline, checked: Checked, n: int = 1, stop: list[str] | None = None):
        self.pipe, self.checked, self.n, self.stop_strings = pipe, checked, n, stop or []
        self.gen, self.scale = checked.gen, checked.scale
        self.stops = [threading.Event() for _ in range(n)]
        self.answers: list[Answer | None] = [None] * n
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _stream(self, i: int):
        req = self.checked
        if req.gen.seed is not None and i:        # n sampled answers: each its own draw
            req = replace(req, gen=replace(req.gen, seed=req.gen.seed + i))
        return self.pipe.stream_shared(req, stop=self.stops[i])

    async def _events(self, i: int, out: asyncio.Queue) -> None:
        it = self._stream(i)
        try:
            while (event := await run_in_threadpool(next, it, None)) is not None:
                await out.put((i, event))
        except BaseException as err:  # noqa: BLE001 - handed to the reader
            await out.put((i, err))
        finally:
            self.stops[i].set()
            await out.put((i, None))

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        out: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._events(i, out)) for i in range(self.n)]
        running = len(tasks)
        try:
            while running:
                i, item = await out.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for stop in self.stops:            # a client gone or an error: every row retires at its next step
                stop.set()

    async def deltas(self) -> AsyncIterator[tuple[int, str, Answer | None]]:
        """(choice, new text, the answer when this choice is done), stop strings applied."""
        cutter = StopText(self.stop_strings)
        sent = [""] * self.n
        async for i, event in self.events():
            if self.answers[i] is not None:
                continue
            text, hit = cutter.cut(event.answer.text if event.done else event.text)
            if event.done or hit:
                answer = event.answer if event.done else Answer(text, "", self.scale, self._count(text))
                self.answers[i] = replace(answer, text=text, stopped=answer.stopped and not hit)
                self.answers[i].timings["stop_string"] = hit
                self.stops[i].set()
                yield i, text[len(sent[i]):], self.answers[i]
            else:
                safe = cutter.safe(text)
                if len(safe) > len(sent[i]):
                    yield i, safe[len(sent[i]):], None
                    sent[i] = safe

    def _count(self, text: str) -> int:
        return len(self.pipe.model.tokenizer(text, add_special_tokens=False).input_ids)

    async def collect(self, request: Request) -> list[Answer]:
        gone = asyncio.create_task(_disconnected(request))
        try:
            async for _ in self.deltas():
                if gone.done():
                    break
        finally:
            gone.cancel()
            for stop in self.stops:
                stop.set()
        return [a for a in self.answers if a is not None]


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


def finish_reason(answer: Answer, gen) -> str:
    if answer.timings.get("stop_string"):
        return "stop"
    return "length" if answer.num_tokens >= gen.max_new_tokens else "stop"


def usage(answers: list[Answer | None]) -> dict:
    done = [a for a in answers if a is not None]
    prompt = done[0].timings.get("prompt_tokens", 0) if done else 0
    completion_tokens = sum(a.num_tokens for a in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"audio_tokens": done[0].timings.get("audio_tokens", 0) if done else 0}}


def completion(req: ChatRequest, answers: list[Answer], streams: Choices) -> dict:
    return {"id": streams.id, "object": "chat.completion", "created": streams.created, "model": req.model,
            "lora_scale": streams.scale,
            "choices": [{"index": i, "message": {"role": "assistant", "content": a.text},
                         "finish_reason": finish_reason(a, streams.gen)} for i, a in enumerate(answers)],
            "usage": usage(answers)}
