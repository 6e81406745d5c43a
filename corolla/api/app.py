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
import concurrent.futures
import hashlib
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
DEFAULT_MAX_TOKENS = 256  # a chat request without max_tokens (a completion's is 16, OpenAI's); less if less fits

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "presence_penalty",
                 "frequency_penalty", "stream", "stream_options", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- request parsing


async def _body(request: Request, allowed: set[str]) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _bad(f"the request body has {declared} bytes; the most this API reads is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for piece in request.stream():  # (never more than the limit held, whatever the header said)
        size += len(piece)
        if size > MAX_BODY_BYTES:
            raise _bad(f"the request body has more than {MAX_BODY_BYTES} bytes, the most this API reads")
        chunks.append(piece)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad("the request body is not valid JSON here: it nests too deeply") from None
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
        raise _bad("stop must be a string or a list of at most 4 strings of 1 to 256 characters", param="stop")
    return tuple(_text(s, "stop") for s in stops)


def _text(value: str, param: str) -> str:
    """``value`` if it is text the tokenizer can take: JSON can carry unpaired surrogates (``\\ud800``), which are
    no characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"{param} holds {value[exc.start:exc.end]!r} at character {exc.start}, an unpaired surrogate and "
                   "not a character", param=param) from None
    return value


def _content(content) -> str:
    """A message's content: a string, or OpenAI's list of parts, of which this API (a text model's) takes text
    parts, joined."""
    if isinstance(content, str):
        return _text(content, "messages")
    if isinstance(content, list) and content and all(isinstance(part, dict) for part in content):
        kinds = [part.get("type") for part in content]
        other = next((kind for kind in kinds if kind != "text"), None)
        if other is not None:
            raise _bad(f"this model reads text only: a message part of type {other!r} cannot be used",
                       param="messages")
        if all(isinstance(part.get("text"), str) for part in content):
            return _text("".join(part["text"] for part in content), "messages")
    raise _bad("a message's content must be a string or a non-empty list of text parts "
               '({"type": "text", "text": ...})', param="messages")


def _prompts(prompt, vocab_size: int) -> tuple[list[str], Optional[list[list[int]]]]:
    """A completion's prompts as OpenAI takes them: a string, a list of strings, a list of token ids, or a list of
    such lists. Returns (the strings, None) or ([], the token ids)."""
    def is_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in value)

    shape = f"prompt must be a string, a list of at most {MAX_N} strings, a list of token ids or a list of at most " \
            f"{MAX_N} such lists"
    if isinstance(prompt, str):
        return [prompt], None
    if is_ids(prompt):
        token_prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > MAX_N:
            raise _bad(shape, param="prompt")
        return prompt, None
    elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        token_prompts = prompt
    else:
        raise _bad(shape, param="prompt")
    if len(token_prompts) > MAX_N:
        raise _bad(shape, param="prompt")
    for ids in token_prompts:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _bad(f"prompt holds token id {bad}; this model's ids run from 0 to {vocab_size - 1}", param="prompt")
    return [], token_prompts


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false", param=name)
    return value


class Api:
    def __init__(self, engine: Engine, model_names: tuple[str, ...], swarm_info=None):
        self.engine = engine
        self.names = model_names  # the first is the id /v1/models reports; all are accepted as "model"
        self.swarm_info = swarm_info  # an optional callable returning the swarm's JSON for /api/swarm
        self.created = int(time.time())
        # chat templates and tokenizing take long for long prompts: off the event loop, one at a time
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="api-tokenizer")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/api/status", self.status, methods=["GET"]),
        ]

    def _model_entry(self) -> dict:
        return {"id": self.names[0], "object": "model", "created": self.created, "owned_by": "corolla"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_entry()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.names:
            return ApiError(404, f"the model {name!r} does not exist here; this API serves {self.names[0]!r}",
                            param="model", code="model_not_found").response()
        return JSONResponse(self._model_entry())

    async def _tokenized(self, fn, argument) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, argument)

    async def status(self, request: Request) -> Response:
        engine = self.engine
        return JSONResponse({"model": self.names[0], "running": engine.running, "waiting": engine.waiting,
                             "served": engine.served, "max_sessions": engine.max_sessions,
                             "max_waiting": engine.max_waiting})

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
            max_tokens=max_tokens if max_tokens is not None else 16 if "prompt" in body else DEFAULT_MAX_TOKENS,
            max_tokens_given=max_tokens is not None,
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
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise _bad("stream_options is only allowed with stream: true", param="stream_options")
        options = options or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options may only hold include_usage", param="stream_options")
        return params, n, stream, bool(options.get("include_usage", False))

    def _check_length(self, prompt_ids: list[int], params: SamplingParams, what: str) -> None:
        """The prompt and the tokens asked for fit the model's context; without max_tokens, the default shrinks to
        what fits."""
        limit = self.engine.max_context
        room = limit - len(prompt_ids)
        if not params.max_tokens_given and room >= 1:
            params.max_tokens = min(params.max_tokens, room)
        if len(prompt_ids) + params.max_tokens > limit:
            raise _bad(f"this model's context is {limit} tokens; the prompt has {len(prompt_ids)}" +
                       (f" and max_tokens asks for {params.max_tokens} more" if params.max_tokens_given else
                        ", leaving no room for a completion"),
                       param="max_tokens" if params.max_tokens_given else what, code="context_length_exceeded")

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
                                                                                   "developer"):
                    raise _bad("each message needs a role (system, developer, user or assistant) and content",
                               param="messages")
            messages = [{"role": "system" if m["role"] == "developer" else m["role"],
                         "content": _content(m.get("content"))} for m in messages]
            if _flag(body, "logprobs"):
                params.top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            elif body.get("top_logprobs") is not None:
                raise _bad("top_logprobs needs logprobs: true", param="top_logprobs")
            prompt_ids = await self._tokenized(self.engine.chat_ids, messages)
            self._check_length(prompt_ids, params, "messages")
        except ApiError as error:
            return error.response()
        return await self._respond(request, "chat", [prompt_ids] * n, params, stream, usage, echo=None, n=n)

    # ---------------------------------------------------------------- completions

    async def completions(self, request: Request) -> Response:
        try:
            body = await _body(request, COMPLETION_FIELDS)
            params, n, stream, usage = self._common(body, ("max_tokens",))
            prompts, token_prompts = _prompts(body.get("prompt"), self.engine.model.config.vocab_size)
            logprobs = body.get("logprobs")
            if logprobs is not None:
                params.top_logprobs = _integer(body, "logprobs", None, 0, 5)
            echo = _flag(body, "echo")
            params.prompt_logprobs = echo and params.top_logprobs is not None  # an echo's logprobs score the prompt
            if len(token_prompts or prompts) * n > MAX_N:
                raise _bad(f"prompts x n may be at most {MAX_N}", param="n")
            if token_prompts is not None:  # token ids: their text is what an echo shows
                ids = token_prompts
                prompts = [await self._tokenized(self.engine.prompt_text, p) for p in ids]
            else:
                ids = [await self._tokenized(self.engine.text_ids, _text(p, "prompt")) for p in prompts]
            if not all(ids):
                raise _bad("prompt must not be empty: an empty prompt gives no tokens to continue", param="prompt")
            for prompt_ids in ids:
                self._check_length(prompt_ids, params, "prompt")
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
            places = self._reserve(len(prompts))
        except (ApiError, EngineBusy) as exc:
            return self._failure(exc).response()
        run = _Generations(self, request, prompts, params, places, scores_echo=echo is not None and params.scores_prompt)
        handed = False
        try:
            if not stream:
                completions = await run.results()
                if completions is None:  # the client went away
                    return Response(status_code=499)
                return JSONResponse(self._whole(kind, ident, created, completions, params, echo, n))
            # the first token (or the prompt's scores) before the headers: an error known by then gets its status
            first = await run.next_event()
            if first is None:
                return Response(status_code=499)
            if first[0] == "error":
                return self._failure(first[2]).response()
            handed = True
            return _EventStream(self._stream(run, first, kind, ident, created, params, usage, echo, n), run.close,
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        except Exception as exc:
            return self._failure(exc).response()
        finally:
            if not handed:
                run.close()

    def _reserve(self, count: int) -> "_Places":
        """Places for ``count`` generations: a request that could never run (more than the API runs and keeps waiting)
        is a bad request; one that cannot run now is told to retry (429)."""
        engine = self.engine
        if count > engine.max_sessions + engine.max_waiting:
            raise _bad(f"this request asks for {count} completions (prompts x n); this API generates {engine.max_sessions}"
                       f" at once and keeps {engine.max_waiting} waiting", param="n")
        taken = 0
        try:
            for _ in range(count):
                engine.reserve()
                taken += 1
        except EngineBusy:
            for _ in range(taken):
                engine.release()
            raise
        return _Places(engine, count)

    @staticmethod
    def _params_for(params: SamplingParams, index: int) -> SamplingParams:
        """Choice ``index`` of a seeded request draws from its own seed, so the choices differ yet repeat (a hash of
        the request's seed and the index: seed + index would make seed 7's second choice seed 8's first)."""
        if params.seed is None or index == 0:
            return params
        digest = hashlib.sha256(f"{params.seed}/{index}".encode()).digest()
        return SamplingParams(**{**params.__dict__, "seed": int.from_bytes(digest[:8], "big") % 2**63})

    def _failure(self, exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, EngineBusy):
            return ApiError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
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
        return self.engine.token_display(token_id)

    def _chat_logprobs(self, events: list[TokenEvent]) -> dict:
        def entry(token_id, logprob):  # bytes: the token's own (part of a character, for some), as OpenAI's
            return {"token": self._token(token_id), "logprob": logprob, "bytes": list(self.engine.token_bytes(token_id))}

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

    async def _stream(self, run: "_Generations", first: tuple, kind: str, ident: str, created: int,
                      params: SamplingParams, usage: bool, echo: Optional[list[str]], n: int):
        count = len(run.prompts)
        chunk_type = "chat.completion.chunk" if kind == "chat" else "text_completion"
        sent = [0] * count  # characters of each choice's completion sent so far
        position = [len(echo[i]) if echo else 0 for i in range(count)]  # each choice's next token's text offset

        def chunk(choices: list, extra: Optional[dict] = None) -> str:
            payload = {"id": ident, "object": chunk_type, "created": created, "model": self.names[0],
                       "choices": choices, **(extra or {})}
            return f"data: {json.dumps(payload)}\n\n"

        def text(piece: str) -> dict:  # a choice's new text, as each kind of chunk carries it
            return {"delta": {"content": piece}} if kind == "chat" else {"text": piece}

        # an echo scored (logprobs) waits for the prompt's pass: each choice's echo comes once its scores do
        echoed = set() if echo and params.scores_prompt else set(range(count))

        def echo_chunk(index: int, events: Optional[list[TokenEvent]]) -> str:
            echoed.add(index)
            return chunk([{"index": index, "text": echo[index], "finish_reason": None,
                           "logprobs": None if events is None else self._text_logprobs(events, 0)}])

        finished: dict[int, Completion] = {}
        try:
            if kind == "chat":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(count)])
            elif echo and not params.scores_prompt:
                yield chunk([{"index": i, "text": echo[i], "logprobs": None, "finish_reason": None}
                             for i in range(count)])
            item = first
            while item is not None:
                what, index, value = item
                if what == "error":
                    error = self._failure(value)
                    yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind, 'param': None, 'code': error.code}})}\n\n"
                    return
                if what == "prompt":
                    yield echo_chunk(index, value)
                elif what == "token":
                    event: TokenEvent = value
                    logprobs = None
                    if params.top_logprobs is not None:
                        logprobs = self._chat_logprobs([event]) if kind == "chat" else \
                            self._text_logprobs([event], position[index])
                    position[index] += len(event.text)
                    if event.stream_text or logprobs is not None:
                        sent[index] += len(event.stream_text)
                        yield chunk([{"index": index, **text(event.stream_text), "logprobs": logprobs,
                                      "finish_reason": None}])
                else:  # done
                    if index not in echoed:  # no token came (the prompt's scores come with the completion)
                        yield echo_chunk(index, value.prompt_events)
                    rest = value.text[sent[index]:]  # what was held back in case it began a stop sequence
                    if rest:
                        yield chunk([{"index": index, **text(rest), "logprobs": None, "finish_reason": None}])
                    finished[index] = value
                    yield chunk([{"index": index, "finish_reason": value.finish_reason, "logprobs": None,
                                  **({"delta": {}} if kind == "chat" else {"text": ""})}])
                    if len(finished) == count:
                        break
                item = await run.next_event()
            if item is None:  # the client went away
                return
            if usage:
                prompt_tokens = sum(finished[i].prompt_tokens for i in range(0, count, n))
                completion_tokens = sum(len(c.token_ids) for c in finished.values())
                yield chunk([], {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            run.close()  # a client gone (the generator closed) or an error: stop every choice now


class _Places:
    """The places a request took for its generations (``Engine.reserve``). Each generation takes one over as it
    starts (``Engine.complete`` then accounts for it); ``close`` gives back those none took, however the request
    ended: a client that left before its stream began, a cancelled task, an error."""

    def __init__(self, engine: Engine, count: int):
        self.engine, self.left, self.closed = engine, count, False
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.closed or self.left == 0:
                raise EngineBusy("the request ended before its generation started")
            self.left -= 1

    def close(self) -> None:
        with self._lock:
            left, self.left, self.closed = self.left, 0, True
        for _ in range(left):
            self.engine.release()


class _Generations:
    """A request's generations, run on the engine's threads: their events (``next_event``), or all their completions
    (``results``); either gives up when the client disconnects. ``close`` stops what still runs and gives back the
    places no generation took."""

    POLL_S = 0.5  # how often a wait checks whether the client is still there

    def __init__(self, api: "Api", request: Request, prompts: list[list[int]], params: SamplingParams,
                 places: _Places, scores_echo: bool):
        self.api, self.request, self.prompts, self.places = api, request, prompts, places
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def worker(index: int, ids: list[int]) -> Completion:
            def put(what: str, value) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (what, index, value))

            places.take()
            return api.engine.complete(ids, api._params_for(params, index), lambda event: put("token", event),
                                       self.cancelled, (lambda events: put("prompt", events)) if scores_echo else None)

        async def run(index: int, ids: list[int]) -> None:
            try:
                completion = await loop.run_in_executor(api.engine.executor, worker, index, ids)
                await self.queue.put(("done", index, completion))
            except Exception as exc:  # noqa: BLE001 - reported to the client
                await self.queue.put(("error", index, exc))

        self.tasks = [asyncio.create_task(run(i, ids)) for i, ids in enumerate(prompts)]

    async def next_event(self) -> Optional[tuple]:
        """The next ("token" | "prompt" | "done" | "error", choice, value); None once the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), self.POLL_S)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.close()
                    return None

    async def results(self) -> Optional[list[Completion]]:
        """Every choice's completion in order (raising the first error); None once the client has gone."""
        completions: dict[int, Completion] = {}
        while len(completions) < len(self.prompts):
            item = await self.next_event()
            if item is None:
                return None
            what, index, value = item
            if what == "error":
                raise value
            if what == "done":
                completions[index] = value
        return [completions[i] for i in range(len(self.prompts))]

    def close(self) -> None:
        self.cancelled.set()
        for task in self.tasks:
            task.cancel()
        self.places.close()


class _EventStream(StreamingResponse):
    """A streamed response that runs ``on_close`` when it ends, also when its body never began (a client that left
    before the first byte: its generator is never started, so its own ``finally`` never runs)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(engine: Engine, model_names: tuple[str, ...], extra_routes: Optional[list] = None) -> Starlette:
    api = Api(engine, model_names)

    async def not_found(request: Request, exc: Any) -> Response:
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def not_allowed(request: Request, exc: Any) -> Response:
        allowed = (getattr(exc, "headers", None) or {}).get("Allow")
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}"
                        + (f" (only {allowed})" if allowed else ""),
                        headers={"Allow": allowed} if allowed else None).response()

    app = Starlette(routes=api.routes() + list(extra_routes or []),
                    exception_handlers={404: not_found, 405: not_allowed})
    app.state.api = api
    return app
