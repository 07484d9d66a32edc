"""The draft service's OpenAI-compatible HTTP API, a Starlette app: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models`` and ``GET /health``.

It runs the same sessions as the gRPC servicer (``SessionFactory``, each on a ``SessionThread``, counted in
the same ``SessionRegistry``); the JSON on either side of it is ``openai_codec``'s. Streams are Server-Sent
Events ending ``data: [DONE]``. A caller that disconnects ends its session on both services.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from duo.draft_service import openai_codec
from duo.draft_service.openai_codec import ApiCall, ApiError, ResponseHead
from duo.draft_service.session_factory import SessionFactory
from duo.draft_service.session_thread import SessionThread
from duo.common.errors import Cancelled, DuoError, Unavailable
from duo.common.events import FinishedEvent
from duo.common.rpc import MAX_MESSAGE_BYTES
from duo.common.sessions import SessionRegistry

log = logging.getLogger(__name__)


def build_app(factory: SessionFactory, registry: SessionRegistry, ready: Callable[[], bool],
              auth_token: str | None = None, max_body_bytes: int = MAX_MESSAGE_BYTES) -> Starlette:
    """``ready()``: whether the service can take work (its model loaded and its verifier reachable), for
    ``/health``; ``auth_token``: the bearer token every ``/v1`` call must carry (None: no authentication);
    ``max_body_bytes``: the largest request body (gRPC's largest message)."""
    api = _OpenAiApi(factory, registry, ready, auth_token, max_body_bytes)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    handlers = {DuoError: _error_response, ApiError: _error_response, HTTPException: _http_error,
                Exception: _error_response}  # Exception: anything unexpected, a 500 (Starlette logs it)
    return Starlette(routes=routes, exception_handlers=handlers)


class _OpenAiApi:
    def __init__(self, factory: SessionFactory, registry: SessionRegistry, ready: Callable[[], bool],
                 auth_token: str | None, max_body_bytes: int):
        self._factory = factory
        self._registry = registry
        self._ready = ready
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self._max_body_bytes = max_body_bytes
        self._started = int(time.time())

    async def health(self, request: Request) -> Response:
        """200 while the service can take work; 503 while its model loads or its verifier cannot be reached."""
        if not self._ready():
            raise Unavailable("not ready: the draft model is loading or the verify service cannot be reached")
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(openai_codec.models_list(await self._served_model(), self._started))

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _json(request, self._max_body_bytes)
        call = openai_codec.chat_request(body, self._factory.config.max_new_tokens_limit)
        return await self._generate(request, call, chat=True)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _json(request, self._max_body_bytes)
        return await self._generate(request, openai_codec.completion_request(body), chat=False)

    async def _generate(self, request: Request, call: ApiCall, chat: bool) -> Response:
        received_at = time.perf_counter()
        model = await self._served_model()
        if call.model is not None and call.model != model:
            raise ApiError(404, f"the model {call.model!r} does not exist: this service runs {model!r}",
                           "not_found_error", "model_not_found", "model")
        head = ResponseHead(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), model, chat)
        session = SessionThread(self._factory, self._registry, replace(call.spec, request_id=head.id), received_at)
        try:
            await session.started()
        except BaseException:
            session.leave()
            raise
        if call.stream:
            return _EventStream(_sse(session, head, call.include_usage), on_close=session.leave)
        watcher = asyncio.ensure_future(_until_disconnected(request, session.leave))
        try:
            return JSONResponse(openai_codec.response(head, await _finish(session)))
        finally:
            watcher.cancel()
            session.leave()

    async def _served_model(self) -> str:
        """The target's name, which the answers are the target's (asking the verifier once per connection)."""
        return (await run_in_threadpool(self._factory.target_info)).model_name

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        presented = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(presented, self._expected):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           "authentication_error", "invalid_api_key")


async def _json(request: Request, limit: int):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", "invalid_request_error", "body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}", "invalid_request_error", "invalid_json") from exc


async def _until_disconnected(request: Request, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` once the client disconnects (its request body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    on_gone()


async def _finish(session: SessionThread) -> FinishedEvent:
    async for event in session.events():
        if isinstance(event, FinishedEvent):
            return event
    raise Cancelled("the session ended without finishing")


async def _sse(session: SessionThread, head: ResponseHead, include_usage: bool) -> AsyncIterator[str]:
    """The session as Server-Sent Events; an error after the start is sent as an error event."""
    for chunk in openai_codec.stream_opening(head):
        yield _event(chunk)
    try:
        async for event in session.events():
            if isinstance(event, FinishedEvent):
                for chunk in openai_codec.stream_finish(head, event, include_usage):
                    yield _event(chunk)
            elif event.text_delta:
                yield _event(openai_codec.stream_text(head, event.text_delta))
    except DuoError as exc:
        log.warning("%s: the stream ends with an error: %s", head.id, exc)
        yield _event(openai_codec.stream_error(exc))
    yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """A stream of Server-Sent Events that calls ``on_close`` however it ends: finished, or cut short because
    the client disconnected (Starlette then stops reading the events without closing them)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _error_response(request: Request, exc: Exception) -> Response:
    status, body = openai_codec.error_body(exc)
    return JSONResponse(body, status_code=status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (an unknown route, a wrong method) in the same shape."""
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")
    return await _error_response(request, error)
