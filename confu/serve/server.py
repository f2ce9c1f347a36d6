"""`confu serve`'s HTTP layer: a FastAPI app over one `Engine`, run by uvicorn.

Routes: `/v1/chat/completions` and `/v1/completions` (a JSON body, or an SSE stream that ends with
`data: [DONE]`), `/v1/models` and `/v1/models/{id}` (with the method and draft that serve the model), `/health`
(the same), `/metrics`. Request bodies are read raw and validated by `confu.serve.protocol`, not by FastAPI's
pydantic models: every mistake must be an OpenAI-style 400, which is what OpenAI clients parse. Unknown routes and
methods get the same error shape. With an API key, every /v1 route wants it as a bearer token (401 otherwise, as
vLLM and llama-server answer); /health and /metrics stay open to probes and scrapers.

A request waits for the engine slot before its response starts, so a full queue is a plain 429 and a stream's
200 means its generation has begun. A plain request asks between rounds whether its client is still connected; a
streaming one is cancelled by Starlette when its client disconnects. Either way the generation stops at the end of
the round in flight. A request whose client leaves while it is queued, or decoding, is counted as an abort.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from confu.engine.generate import Decoder
from confu.errors import ConfuError
from confu.serve.generation import ClientGone, Engine, Generation, ServeConfig
from confu.serve.protocol import RequestError, ResponseIds, full_response, stream_chunk, usage_chunk

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 1
# A status nobody reads (the client is gone); nginx's "client closed request", which access logs understand.
CLIENT_CLOSED_REQUEST = 499

log = logging.getLogger("confu.serve")


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that holds the engine slot until it ends: its event generator is closed however the
    response ends (a client that left included), which ends the generation, and the slot is released after."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with aclosing(self.body_iterator):
                await super().__call__(scope, receive, send)
        finally:
            self.release()


def error_response(engine: Engine, err: RequestError) -> JSONResponse:
    engine.metrics.error(err.status)
    headers = {429: {"Retry-After": str(RETRY_AFTER_S)}, 401: {"WWW-Authenticate": "Bearer"}}.get(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class BearerAuth:
    """ASGI middleware: a /v1 request without `Authorization: Bearer <api key>` gets an OpenAI-style 401 (pure
    ASGI, not Starlette's BaseHTTPMiddleware, so streams and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, engine: Engine, api_key: str):
        self.app, self.engine = app, engine
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = RequestError("a valid API key is required: 'Authorization: Bearer <key>'", status=401,
                                   code="invalid_api_key")
                await error_response(self.engine, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def engine_error(err: Exception) -> RequestError:
    """What a failure during generation tells the client: the engine's refusal is the request's fault (400),
    anything else is a bug that costs this request only (500)."""
    if isinstance(err, ConfuError):
        return RequestError(str(err))
    log.error("generation failed", exc_info=err)
    return RequestError(f"internal error: {type(err).__name__}: {err}", status=500, error_type="internal_error")


async def read_body(request: Request) -> bytes:
    if "content-length" not in request.headers and "chunked" not in request.headers.get("transfer-encoding", ""):
        raise RequestError("a request body (with Content-Length, or chunked) is required", status=411)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)
    return bytes(body)


async def complete(gen: Generation, request: Request) -> Response:
    ids = ResponseIds(gen.req.chat, gen.req.model)
    async with aclosing(gen.pieces(request.is_disconnected)) as pieces:
        text = "".join([piece async for piece in pieces])
    return JSONResponse(full_response(ids, text, gen.finish_reason, gen.usage(), gen.stats.to_json()))


async def stream_events(gen: Generation) -> AsyncIterator[str]:
    req, ids = gen.req, ResponseIds(gen.req.chat, gen.req.model)
    try:
        first = True
        async with aclosing(gen.pieces()) as pieces:
            async for piece in pieces:
                yield sse(stream_chunk(ids, piece, first=first, include_usage=req.include_usage))
                first = False
        closing_chunk = stream_chunk(ids, None, gen.finish_reason, first=first, include_usage=req.include_usage)
        yield sse({**closing_chunk, "spec_decode": gen.stats.to_json()})
        if req.include_usage:
            yield sse(usage_chunk(ids, gen.usage()))
    except Exception as err:  # the stream has begun: an error can only be an event now
        failure = engine_error(err)
        gen.engine.metrics.error(failure.status)
        yield sse(failure.body())
    yield sse("[DONE]")


async def completion(engine: Engine, request: Request, chat: bool) -> Response:
    arrival = time.perf_counter()
    try:
        req = engine.parse(await read_body(request), chat)
        gen = Generation(engine, req, arrival)
    except RequestError as err:
        return error_response(engine, err)
    except ConfuError as err:  # the engine refused the request's settings
        return error_response(engine, RequestError(str(err)))
    except ClientDisconnect:  # gone before its body was read: there is no request to count
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    try:
        await engine.slot.acquire(request.is_disconnected)
    except RequestError as err:  # the queue is full
        return error_response(engine, err)
    except ClientGone:  # gone while queued
        gen.record()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if req.stream:
        return EventStream(stream_events(gen), release=engine.slot.release)
    try:
        return await complete(gen, request)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as err:
        return error_response(engine, engine_error(err))
    finally:
        engine.slot.release()


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    # The API is OpenAI's, validated by hand (see the module docstring): FastAPI's generated schema would be empty.
    app = FastAPI(title="confu", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if engine.cfg.api_key:
        app.add_middleware(BearerAuth, engine=engine, api_key=engine.cfg.api_key)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return error_response(engine, RequestError(str(exc.detail), status=exc.status_code, code=code))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.cfg.model_name, **engine.decoding()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return engine.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        try:
            return JSONResponse(engine.model_card(model_id))
        except RequestError as err:
            return error_response(engine, err)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = engine.metrics.render(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await completion(engine, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(engine, request, chat=False)

    return app


def make_server(decoder: Decoder, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "warning", access_log: bool = False) -> uvicorn.Server:
    """A uvicorn server for the app (port 0 picks a free one); `run()` it, or `serve_in_thread`."""
    config = uvicorn.Config(create_app(Engine(decoder, cfg)), host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


@contextmanager
def serve_in_thread(server: uvicorn.Server, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Runs `server` on a background thread; yields its base URL (the bound port) once it listens, and stops it
    on exit."""
    thread = threading.Thread(target=server.run, name="confu-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfuError(f"the server did not start on {server.config.host}:{server.config.port}")
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
