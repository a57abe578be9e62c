"""The ASGI application of ``tagstream serve`` (FastAPI): ``POST /v1/classify``,
``/openapi.json``, ``/healthz``, ``/readyz`` and ``/metrics`` on one port.

The model loads on a thread once the server is up, so the probes answer during the whole
start-up, as the worker's do: ``/readyz`` turns 200 once the model has scored its warm-up
request, and ``/v1/classify`` answers 503 (with ``Retry-After``) until then. A model that
cannot load or warm up calls ``on_fatal`` (the command stops the server, exit code 3).

Every request passes :class:`RequestGuard` first: a body over
``TAGSTREAM_SERVE_MAX_REQUEST_BYTES`` is answered 413 before the application sees a byte of
it, and every answer is counted by route and status.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import __version__
from worker.config.serve import ServeBatching, ServeSettings
from worker.config.settings import BatchSettings, TaggingSettings
from worker.contract.scorer import Scorer
from worker.observability.health import Check, HealthState
from worker.pipeline.observer import Observer
from worker.serve.api import (
    MAX_REPORTED_PROBLEMS,
    PAYLOAD_FIELD_NAMES,
    ClassifyPayload,
    ClassifyResult,
    ErrorBody,
    Problem,
    RequestError,
    ScoringFailedError,
    location,
    results,
    score_requests,
)
from worker.serve.batcher import QueueFullError, RequestBatcher
from worker.serve.metrics import UNMATCHED_PATH, ServeMetrics

log = structlog.get_logger(__name__)

JSON: Final = "application/json"
# Seconds a 429 or 503 asks the caller to wait: a few batches' worth on a GPU, and about
# one on a CPU; long enough that retries do not hammer a full queue.
RETRY_AFTER_S: Final = 1
# How often the event loop beats the health state's poll component: a loop blocked this
# long (times the health settings' factor) fails /healthz.
LOOP_BEAT_S: Final = 1.0
CLASSIFY_PATH: Final = "/v1/classify"
ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorBody, "description": "The body is not JSON (or not UTF-8)."},
    413: {"model": ErrorBody, "description": "The body is over TAGSTREAM_SERVE_MAX_REQUEST_BYTES."},
    422: {"model": ErrorBody, "description": "A field breaks the contract; 'problems' names it."},
    429: {"model": ErrorBody, "description": "The queue is full; retry after 'Retry-After' s."},
    503: {"model": ErrorBody, "description": "The model is not ready, or failed for now."},
}
PROBE_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    503: {"description": "Not live / not ready; the JSON body says why."}
}


@dataclass(frozen=True, slots=True)
class ServeContext:
    """What the application is built from (``worker/commands/serve.py`` makes one)."""

    serve: ServeSettings
    tagging: TaggingSettings
    batch: BatchSettings
    health: HealthState
    registry: CollectorRegistry
    observer: Observer
    # Builds the scorer and scores one warm-up request; runs on a thread, may raise.
    load_scorer: Callable[[], Scorer]
    # The model could not be loaded, or the device failed for good: stop serving (called
    # on the event loop).
    on_fatal: Callable[[BaseException], None]


class _State:
    """The request batcher, once the model is ready."""

    def __init__(self) -> None:
        self.batcher: RequestBatcher | None = None


def error_response(
    status: int, error: str, problems: list[Problem], *, retry: bool = False
) -> Response:
    body = ErrorBody(error=error, problems=problems).model_dump()
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _check_response(check: Check) -> Response:
    return Response(orjson.dumps(check.body), status_code=200 if check.ok else 503, media_type=JSON)


def build_app(context: ServeContext) -> ASGIApp:
    """The FastAPI application behind :class:`RequestGuard`."""
    state = _State()
    metrics = ServeMetrics(context.registry)
    metrics.track_pending(lambda: 0 if state.batcher is None else state.batcher.pending)
    app = FastAPI(
        title="tagstream",
        version=__version__,
        summary="Zero-shot text classification on the tagstream worker's micro-batcher.",
        lifespan=_lifespan(context, state),
        docs_url=None,
        redoc_url=None,
    )
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    _add_classify(app, context, state)
    _add_probes(app, context)
    paths = frozenset(str(getattr(route, "path", "")) for route in app.routes) - {""}
    return RequestGuard(app, context.serve.serve_max_request_bytes, metrics, paths)


async def _invalid_body(_request: Request, exc: Exception) -> Response:
    """FastAPI's validation of the payload, answered as every other error: 400 when the
    body is not JSON at all, 422 naming the fields otherwise."""
    problems: list[Problem] = []
    unparsable = False
    if isinstance(exc, RequestValidationError):
        for error in exc.errors():
            unparsable = unparsable or error.get("type") == "json_invalid"
            problems.append(Problem(field=_body_field(error), message=str(error.get("msg"))))
    problems = list(dict.fromkeys(problems))[:MAX_REPORTED_PROBLEMS]
    if unparsable:
        return error_response(400, "invalid JSON", problems)
    return error_response(422, "invalid request", problems)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (a body it cannot decode, an unknown path or method)."""
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else HTTPStatus.BAD_REQUEST
    detail = str(getattr(exc, "detail", "bad request"))
    field = "body" if status == HTTPStatus.BAD_REQUEST else "request"
    return error_response(status, detail, [Problem(field=field, message=detail)])


def _body_field(error: dict[str, Any]) -> str:
    """Where in the payload a FastAPI validation error is: the model fields and list
    indices of its location, without pydantic's union-member tags (``str``, ``list[str]``)."""
    if error.get("type") == "json_invalid":
        return "body"
    loc = list(error.get("loc", ()))
    parts = [part for part in loc if isinstance(part, int) or part in PAYLOAD_FIELD_NAMES]
    if error.get("type") == "extra_forbidden" and loc:
        parts.append(loc[-1])  # the unknown field's own name
    return location(parts)


def _add_classify(app: FastAPI, context: ServeContext, state: _State) -> None:
    serve, tagging = context.serve, context.tagging

    @app.post(
        CLASSIFY_PATH,
        response_model=ClassifyResult | list[ClassifyResult],
        responses=ERROR_RESPONSES,
        summary="Score texts against candidate labels (Hugging Face zero-shot payload).",
    )
    async def classify(payload: ClassifyPayload) -> Response:
        batcher = state.batcher
        if batcher is None or batcher.crashed is not None:
            problem = Problem(field="model", message="the model is not ready")
            return error_response(503, "not ready", [problem], retry=True)
        try:
            requests, tokens = score_requests(
                payload, tagging, serve.serve_max_inputs, batcher.estimate_tokens
            )
        except RequestError as exc:
            return error_response(422, "invalid request", exc.problems)
        try:
            outcomes = await batcher.classify(requests, tokens)
        except QueueFullError as exc:
            problem = Problem(field="inputs", message=str(exc))
            return error_response(429, "queue full", [problem], retry=True)
        try:
            answers = results(payload, requests, outcomes, tagging)
        except ScoringFailedError as exc:
            status = 503 if exc.transient else 422
            return error_response(status, "scoring failed", [exc.problem], retry=exc.transient)
        body = answers[0] if isinstance(payload.inputs, str) else answers
        return Response(orjson.dumps(body), media_type=JSON)


def _add_probes(app: FastAPI, context: ServeContext) -> None:
    health, registry = context.health, context.registry

    @app.get("/healthz", responses=PROBE_RESPONSES, summary="Liveness, as the worker's.")
    async def healthz() -> Response:
        return _check_response(health.liveness())

    @app.get("/readyz", responses=PROBE_RESPONSES, summary="Ready once the model is warmed.")
    async def readyz() -> Response:
        return _check_response(health.readiness())

    @app.get("/metrics", summary="Prometheus metrics.", response_class=Response)
    async def prometheus(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)


def _lifespan(context: ServeContext, state: _State) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        beat = asyncio.create_task(_beat_loop(context.health))

        def attach(scorer: Scorer) -> None:
            batcher = RequestBatcher(
                scorer,
                context.batch,
                context.observer,
                context.serve.serve_max_pending_texts,
                on_crash=context.on_fatal,
                continuous=context.serve.serve_batching is ServeBatching.CONTINUOUS,
            )
            batcher.start()
            state.batcher = batcher
            context.health.mark_model_ready()
            log.info("model ready", model=scorer.info.name, revision=scorer.info.revision)

        def load() -> None:
            try:
                scorer = context.load_scorer()
            except BaseException as exc:
                loop.call_soon_threadsafe(context.on_fatal, exc)
                return
            loop.call_soon_threadsafe(attach, scorer)

        threading.Thread(target=load, name="tagstream-model-load", daemon=True).start()
        try:
            yield
        finally:
            beat.cancel()
            context.health.mark_shutting_down()
            if state.batcher is not None:
                drained = await state.batcher.drain(context.serve.serve_drain_timeout_s)
                log.info("request batcher drained", complete=drained)

    return lifespan


async def _beat_loop(health: HealthState) -> None:
    while True:
        health.beat_poll()
        await asyncio.sleep(LOOP_BEAT_S)


class RequestGuard:
    """Pure ASGI middleware: bounds the request body and counts every answer."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, metrics: ServeMetrics, paths: frozenset[str]
    ) -> None:
        self.app = app
        # The routes' paths: the only values of the metrics' path label (paths are the
        # caller's choice, and each label value is a series).
        self.paths = paths
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await _too_large(self.max_bytes, counting_send)
                return
            await self.app(scope, _replay(body, receive), counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else UNMATCHED_PATH
            self.metrics.observe_request(path, status, time.monotonic() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes ``max_bytes`` (by its Content-Length,
        before reading, or while reading a chunked one)."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the body read ahead, then the client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _too_large(max_bytes: int, send: Send) -> None:
    message = f"more than TAGSTREAM_SERVE_MAX_REQUEST_BYTES={max_bytes} bytes"
    response = error_response(413, "request too large", [Problem(field="body", message=message)])
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [*response.raw_headers, (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": response.body})
