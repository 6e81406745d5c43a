"""The OpenAI-compatible HTTP API over an ``Engine`` (Starlette; served by uvicorn).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (each with ``stream``: server-sent
events ending in ``data: [DONE]``), and ``GET /api/status`` (requests running and waiting) for operators and
tests. Every error has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and status: 400 for a
bad request (malformed JSON, unknown fields, bad values, a prompt too long), 404 for an unknown model, 429 when too
many requests run and wait, 503 when the swarm lacks blocks (they are named). A client that goes away mid-stream
cancels its generation at once, which closes its session on the servers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corolla.api.engine import Completion, Engine, EngineBusy, SamplingParams, TokenEvent
from corolla.core.errors import BlocksNotServedError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20
MAX_N = 8
MAX_TOP_LOGPROBS = 20

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "presence_penalty",
                 "frequency_penalty", "stream", "stream_options", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- request parsing


async def _body(request: Request, allowed: set[str]) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise _bad(f"the request body has {len(raw)} bytes; the most this API reads is {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code="unknown_parameter")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"{name} must be a number from {low:g} to {high:g}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: int) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}, got {value!r}", param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops):
        raise _bad("stop must be a string or a list of at most 4 non-empty strings", param="stop")
    return tuple(stops)


class Api:
    def __init__(self, engine: Engine, model_names: tuple[str, ...], swarm_info=None):
        self.engine = engine
        self.names = model_names  # the first is the id /v1/models reports; all are accepted as "model"
        self.swarm_info = swarm_info  # an optional callable returning the swarm's JSON for /api/swarm
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/api/status", self.status, methods=["GET"]),
        ]

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.names[0], "object": "model", "created": self.created, "owned_by": "corolla"}]})

    async def status(self, request: Request) -> Response:
        engine = self.engine
        return JSONResponse({"model": self.names[0], "running": engine.running, "waiting": engine.waiting,
                             "served": engine.served, "max_sessions": engine.max_sessions})

    # ---------------------------------------------------------------- shared parsing

    def _common(self, body: dict, max_tokens_names: tuple[str, ...]) -> tuple[SamplingParams, int, bool, bool]:
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("model is required: the id GET /v1/models lists", param="model")
        if model not in self.names:
            raise ApiError(404, f"the model {model!r} does not exist here; this API serves {self.names[0]!r}",
                           param="model", code="model_not_found")
        max_tokens = None
        for name in max_tokens_names:
            max_tokens = _integer(body, name, max_tokens, 1, self.engine.max_context) if name in body else max_tokens
        params = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 16 if "prompt" in body else 256,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            seed=_integer(body, "seed", None, -2**63, 2**63 - 1),
            stop=_stops(body),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        )
        if params.top_p == 0.0:
            params.top_p = 1e-9  # the most likely token only
        n = _integer(body, "n", 1, 1, MAX_N)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options may only hold include_usage", param="stream_options")
        return params, n, stream, bool(options.get("include_usage", False))

    def _check_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        limit = self.engine.max_context
        if len(prompt_ids) + params.max_tokens > limit:
            raise _bad(f"this model's context is {limit} tokens; the prompt has {len(prompt_ids)} and max_tokens asks "
                       f"for {params.max_tokens} more", param="max_tokens",
                       code="context_length_exceeded")

    # ---------------------------------------------------------------- chat

    async def chat(self, request: Request) -> Response:
        try:
            body = await _body(request, CHAT_FIELDS)
            params, n, stream, usage = self._common(body, ("max_tokens", "max_completion_tokens"))
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _bad("messages must be a non-empty list", param="messages")
            for message in messages:
                if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant",
                                                                                   "developer") \
                        or not isinstance(message.get("content"), str):
                    raise _bad("each message needs a role (system, developer, user or assistant) and string content",
                               param="messages")
            messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                        for m in messages]
            if body.get("logprobs"):
                params.top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            elif body.get("top_logprobs") is not None:
                raise _bad("top_logprobs needs logprobs: true", param="top_logprobs")
            prompt_ids = self.engine.chat_ids(messages)
            self._check_length(prompt_ids, params)
        except ApiError as error:
            return error.response()
        return await self._respond(request, "chat", [prompt_ids] * n, params, stream, usage, echo=None, n=n)

    # ---------------------------------------------------------------- completions

    async def completions(self, request: Request) -> Response:
        try:
            body = await _body(request, COMPLETION_FIELDS)
            params, n, stream, usage = self._common(body, ("max_tokens",))
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or len(prompts) > MAX_N or \
                    not all(isinstance(p, str) for p in prompts):
                raise _bad(f"prompt must be a string or a list of at most {MAX_N} strings", param="prompt")
            logprobs = body.get("logprobs")
            if logprobs is not None:
                params.top_logprobs = _integer(body, "logprobs", None, 0, 5)
            echo = body.get("echo", False)
            if not isinstance(echo, bool):
                raise _bad("echo must be true or false", param="echo")
            params.prompt_logprobs = echo and params.top_logprobs is not None  # an echo's logprobs score the prompt
            if len(prompts) * n > MAX_N:
                raise _bad(f"prompts x n may be at most {MAX_N}", param="n")
            ids = [self.engine.text_ids(p) for p in prompts]
            for prompt_ids in ids:
                self._check_length(prompt_ids, params)
        except ApiError as error:
            return error.response()
        expanded = [prompt_ids for prompt_ids in ids for _ in range(n)]
        echoes = [p for p in prompts for _ in range(n)] if echo else None
        return await self._respond(request, "text", expanded, params, stream, usage, echo=echoes, n=n)

    # ---------------------------------------------------------------- running

    async def _respond(self, request: Request, kind: str, prompts: list[list[int]], params: SamplingParams,
                       stream: bool, usage: bool, echo: Optional[list[str]], n: int) -> Response:
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            self._reserve(len(prompts))
        except EngineBusy as exc:
            return self._failure(exc).response()
        if not stream:
            cancelled = threading.Event()
            loop = asyncio.get_running_loop()
            try:
                completions = await asyncio.gather(*(
                    loop.run_in_executor(self.engine.executor, self.engine.complete, ids, self._params_for(params, i),
                                         None, cancelled)
                    for i, ids in enumerate(prompts)))
            except Exception as exc:
                cancelled.set()
                return self._failure(exc).response()
            finally:
                cancelled.set()
            return JSONResponse(self._whole(kind, ident, created, completions, params, echo, n))
        return StreamingResponse(self._stream(request, kind, ident, created, prompts, params, usage, echo, n),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _reserve(self, count: int) -> None:
        taken = 0
        try:
            for _ in range(count):
                self.engine.reserve()
                taken += 1
        except EngineBusy:
            for _ in range(taken):
                self.engine.release()
            raise

    @staticmethod
    def _params_for(params: SamplingParams, index: int) -> SamplingParams:
        """Choice ``index`` of a seeded request draws from its own seed, so the choices differ yet repeat."""
        if params.seed is None or index == 0:
            return params
        return SamplingParams(**{**params.__dict__, "seed": (params.seed + index) % 2**63})

    def _failure(self, exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, EngineBusy):
            return ApiError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded")
        if isinstance(exc, BlocksNotServedError):
            return ApiError(503, f"the swarm cannot serve this model now: {exc}", kind="server_error",
                            code="blocks_not_served")
        if isinstance(exc, ValueError):
            return _bad(str(exc))
        logger.exception("a completion failed")
        return ApiError(500, f"the completion failed: {type(exc).__name__}: {exc}", kind="server_error")

    def _whole(self, kind: str, ident: str, created: int, completions: list[Completion], params: SamplingParams,
               echo: Optional[list[str]], n: int) -> dict:
        choices = []
        for index, completion in enumerate(completions):
            if kind == "chat":
                choice = {"index": index, "message": {"role": "assistant", "content": completion.text},
                          "finish_reason": completion.finish_reason,
                          "logprobs": self._chat_logprobs(completion.events) if params.top_logprobs is not None else None}
            else:
                prefix = echo[index] if echo else ""
                scored = completion.prompt_events or []  # an echoed prompt's tokens come first, from offset 0
                choice = {"index": index, "text": prefix + completion.text, "finish_reason": completion.finish_reason,
                          "logprobs": self._text_logprobs(scored + completion.events, 0 if scored else len(prefix))
                          if params.top_logprobs is not None else None}
            choices.append(choice)
        prompt_tokens = sum(c.prompt_tokens for c in completions[::n])  # each prompt once, whatever n
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": self.names[0], "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _token(self, token_id: int) -> str:
        return self.engine.token_text(token_id)

    def _chat_logprobs(self, events: list[TokenEvent]) -> dict:
        def entry(token_id, logprob):
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(e.token_id, e.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in (e.top or [])]} for e in events]}

    def _text_logprobs(self, events: list[TokenEvent], offset: int) -> dict:
        tokens, offsets, position = [], [], offset
        for e in events:
            tokens.append(self._token(e.token_id))
            offsets.append(position)
            position += len(e.text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [None if e.logprob is None else {self._token(t): lp for t, lp in (e.top or [])}
                                 for e in events],  # an echoed prompt's first token has neither
                "text_offset": offsets}

    async def _stream(self, request: Request, kind: str, ident: str, created: int, prompts: list[list[int]],
                      params: SamplingParams, usage: bool, echo: Optional[list[str]], n: int):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        chunk_type = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices: list, extra: Optional[dict] = None) -> str:
            payload = {"id": ident, "object": chunk_type, "created": created, "model": self.names[0],
                       "choices": choices, **(extra or {})}
            return f"data: {json.dumps(payload)}\n\n"

        def worker(index: int, ids: list[int]) -> Completion:
            def on_token(event: TokenEvent) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, ("token", index, event))

            def on_prompt(events: list[TokenEvent]) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, ("prompt", index, events))
            return self.engine.complete(ids, self._params_for(params, index), on_token, cancelled, on_prompt)

        # an echo scored (logprobs) waits for the prompt's pass: each choice's echo comes once its scores do
        echoed = set() if echo and params.scores_prompt else set(range(len(prompts)))

        def echo_chunk(index: int, events: Optional[list[TokenEvent]]) -> str:
            echoed.add(index)
            return chunk([{"index": index, "text": echo[index], "finish_reason": None,
                           "logprobs": None if events is None else self._text_logprobs(events, 0)}])

        async def run(index: int, ids: list[int]) -> None:
            try:
                completion = await loop.run_in_executor(self.engine.executor, worker, index, ids)
                await queue.put(("done", index, completion))
            except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
                await queue.put(("error", index, exc))

        tasks = [asyncio.create_task(run(i, ids)) for i, ids in enumerate(prompts)]
        finished: dict[int, Completion] = {}
        try:
            if kind == "chat":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(prompts))])
            elif echo and not params.scores_prompt:
                yield chunk([{"index": i, "text": echo[i], "logprobs": None, "finish_reason": None}
                             for i in range(len(prompts))])
            while len(finished) < len(prompts):
                try:
                    what, index, item = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancelled.set()
                        return
                    continue
                if what == "error":
                    error = self._failure(item)
                    yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind, 'param': None, 'code': error.code}})}\n\n"
                    cancelled.set()
                    return
                if what == "prompt":
                    yield echo_chunk(index, item)
                    continue
                if index not in echoed:  # no token came (the prompt's scores come with the completion)
                    yield echo_chunk(index, item.prompt_events if what == "done" else None)
                if what == "done":
                    finished[index] = item
                    final = {"index": index, "finish_reason": item.finish_reason, "logprobs": None}
                    final.update({"delta": {}} if kind == "chat" else {"text": ""})
                    yield chunk([final])
                    continue
                event: TokenEvent = item
                logprobs = None
                if params.top_logprobs is not None:
                    logprobs = self._chat_logprobs([event]) if kind == "chat" else self._text_logprobs([event], 0)
                body = {"delta": {"content": event.text}} if kind == "chat" else {"text": event.text}
                yield chunk([{"index": index, **body, "logprobs": logprobs, "finish_reason": None}])
            if usage:
                prompt_tokens = sum(finished[i].prompt_tokens for i in range(0, len(prompts), n))
                completion_tokens = sum(len(c.token_ids) for c in finished.values())
                yield chunk([], {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client gone (the generator closed) or an error: stop every choice now
            for task in tasks:
                task.cancel()


def create_app(engine: Engine, model_names: tuple[str, ...], extra_routes: Optional[list] = None) -> Starlette:
    api = Api(engine, model_names)

    async def not_found(request: Request, exc: Any) -> Response:
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def not_allowed(request: Request, exc: Any) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    app = Starlette(routes=api.routes() + list(extra_routes or []),
                    exception_handlers={404: not_found, 405: not_allowed})
    app.state.api = api
    return app
