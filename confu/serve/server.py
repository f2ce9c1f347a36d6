"""`confu serve`: an OpenAI-compatible HTTP server over one `Decoder`.

The engine decodes one request at a time (batch 1), so requests queue on one lock; the queue is bounded and a
full one answers 429 with Retry-After. Each request decodes through `Decoder.rounds`, round by round (its step
records give the spec-decode statistics): between rounds the server checks whether the client is still
connected and cancels the generation when it is not, streaming or not. Stop sequences are matched on the
decoded text; streamed text holds back what could still become a stop sequence or is an incomplete UTF-8
character.

The HTTP layer is the standard library's `ThreadingHTTPServer` (one thread per connection, HTTP/1.1
keep-alive; SSE streams close their connection at `data: [DONE]`).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.tree import TreeConfig
from confu.errors import ConfuError
from confu.serve.metrics import ServerMetrics, SpecDecodeStats
from confu.serve.protocol import (
    CompletionRequest,
    Defaults,
    RequestError,
    ResponseIds,
    full_response,
    parse_request,
    stream_chunk,
    usage,
    usage_chunk,
)

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 1
# How often a queued request checks that its client is still there.
QUEUE_POLL_S = 0.2


@dataclass(frozen=True)
class ServeConfig:
    model_name: str
    defaults: Defaults
    tree: TreeConfig
    contemplate: int | None = None
    max_queue: int = 16  # requests waiting beyond the one generating


class ClientGone(Exception):
    """The client closed its connection: its generation is cancelled."""


class EngineSlot:
    """The one generation lock, with a bounded number of waiters."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self._engine = threading.Lock()
        self._counts = threading.Lock()

    @contextmanager
    def hold(self, client_gone: Callable[[], bool]) -> Iterator[None]:
        with self._counts:
            if self.running + self.waiting >= 1 + self.max_queue:
                raise RequestError(f"the server is busy ({self.waiting} requests queued); retry shortly", status=429,
                                   error_type="rate_limit_exceeded", code="queue_full")
            self.waiting += 1
        try:
            while not self._engine.acquire(timeout=QUEUE_POLL_S):
                if client_gone():
                    raise ClientGone
        finally:
            with self._counts:
                self.waiting -= 1
        with self._counts:
            self.running += 1
        try:
            yield
        finally:
            with self._counts:
                self.running -= 1
            self._engine.release()


class StopText:
    """Decoded text of the generated tokens, released up to what is final (stop sequences cut the text)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = 0  # characters released
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, new_tokens: list[int]) -> str:
        """Text released by `new_tokens`; sets `stopped` when a stop sequence appeared."""
        self.tokens.extend(new_tokens)
        text = self._text()
        longest = max((len(s) for s in self.stops), default=0)
        hits = [i for i in (text.find(s, max(0, self.sent - longest)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text, min(hits))
        end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes as U+FFFD until it completes
        held = max((k for s in self.stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        return self._release(text, end - held)

    def flush(self) -> str:
        """Everything not yet released (the generation ended)."""
        return self._release(self._text(), None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class Generation:
    """One request's decoding: yields text pieces; afterwards holds the outcome for the response."""

    def __init__(self, app: ServerApp, req: CompletionRequest, arrival: float):
        self.app, self.req, self.arrival = app, req, arrival
        self.stats = SpecDecodeStats(depth=app.cfg.tree.depth)
        self.completion_tokens = 0
        self.finish_reason = "abort"
        self.ttft_s: float | None = None
        self.text = StopText(app.decoder.target.tokenizer, req.stop)

    def pieces(self, client_gone: Callable[[], bool]) -> Iterator[str]:
        app, req = self.app, self.req
        cfg = GenerationConfig(max_new_tokens=req.max_tokens, sampling=req.sampling, tree=app.cfg.tree,
                               contemplate=app.cfg.contemplate, seed=req.seed)
        rounds = app.decoder.rounds(req.prompt_ids, cfg)
        try:
            for tokens, step, reason in rounds:
                if step is None and self.ttft_s is None:  # the prefill's token
                    self.ttft_s = time.perf_counter() - self.arrival
                if step is not None and step.tree_nodes:
                    self.stats.observe_round(step.accepted, step.tree_nodes)
                self.completion_tokens += len(tokens)
                piece = self.text.add(tokens)
                if piece:
                    yield piece
                if self.text.stopped:
                    self.finish_reason = "stop"
                    return
                if reason:  # the engine's: "eos" ends the turn; "max_new_tokens" and "context" are the length
                    self.finish_reason = "stop" if reason == "eos" else "length"
                elif client_gone():
                    raise ClientGone
            tail = self.text.flush()
            if tail:
                yield tail
        finally:
            rounds.close()
            app.metrics.record(self.finish_reason, len(req.prompt_ids), self.completion_tokens, self.stats,
                               time.perf_counter() - self.arrival, self.ttft_s)

    def usage(self) -> dict[str, int]:
        return usage(len(self.req.prompt_ids), self.completion_tokens)


class ServerApp:
    """What every handler thread shares: the decoder, its slot, the metrics."""

    def __init__(self, decoder: Decoder, cfg: ServeConfig):
        self.decoder, self.cfg = decoder, cfg
        self.slot = EngineSlot(cfg.max_queue)
        self.metrics = ServerMetrics(cfg.tree.depth, lambda: self.slot.running, lambda: self.slot.waiting)
        self.started = int(time.time())

    def parse(self, raw: bytes, chat: bool) -> CompletionRequest:
        t = self.decoder.target
        return parse_request(raw, chat, self.cfg.model_name, t.tokenizer, t.vocab_size, t.max_context,
                             self.cfg.defaults)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.started,
                                            "owned_by": "confu"}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ConfuHTTPServer
    streaming = False  # an SSE response has begun: errors can only be events now

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing -------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _error(self, err: RequestError) -> None:
        self.server.app.metrics.request_errors.inc(1, str(err.status))
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
        self._json(err.status, err.body(), headers)

    def _client_gone(self) -> bool:
        """True once the client closed its side (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # an unread body would be taken for the next request
            raise RequestError("a request body with Content-Length is required", status=411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)
        return self.rfile.read(int(length))

    # -- routes ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        app = self.server.app
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(200, app.models())
        elif path == "/metrics":
            self._send(200, app.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._error(RequestError(f"no route GET {path}", status=404, code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        if path not in routes:
            self.close_connection = True
            self._error(RequestError(f"no route POST {path}", status=404, code="not_found"))
            return
        arrival = time.perf_counter()
        self.streaming = False
        try:
            req = self.server.app.parse(self._body(), chat=routes[path])
            with self.server.app.slot.hold(self._client_gone):
                gen = Generation(self.server.app, req, arrival)
                if req.stream:
                    self._stream(gen)
                else:
                    self._complete(gen)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # nobody to answer: the generation is already cancelled
        except RequestError as err:
            self._fail(err)
        except ConfuError as err:  # the engine refused the request
            self._fail(RequestError(str(err)))
        except Exception as err:  # a bug must cost one request, not the server
            self.log_error("generation failed: %r", err)
            self._fail(RequestError(f"internal error: {type(err).__name__}: {err}", status=500,
                                    error_type="internal_error"))

    def _fail(self, err: RequestError) -> None:
        """An error response, or an error event when a stream has already begun."""
        if not self.streaming:
            self._error(err)
            return
        self.server.app.metrics.request_errors.inc(1, str(err.status))
        self._event(err.body())
        self._event("[DONE]")

    def _complete(self, gen: Generation) -> None:
        ids = ResponseIds(gen.req.chat, gen.req.model)
        with closing(gen.pieces(self._client_gone)) as pieces:
            text = "".join(pieces)
        self._json(200, full_response(ids, text, gen.finish_reason, gen.usage(), gen.stats.to_json()))

    def _event(self, payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, gen: Generation) -> None:
        req, ids = gen.req, ResponseIds(gen.req.chat, gen.req.model)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        self.streaming = True
        first = True
        with closing(gen.pieces(self._client_gone)) as pieces:
            for piece in pieces:
                self._event(stream_chunk(ids, piece, first=first, include_usage=req.include_usage))
                first = False
        closing_chunk = stream_chunk(ids, None, gen.finish_reason, first=first, include_usage=req.include_usage)
        self._event({**closing_chunk, "spec_decode": gen.stats.to_json()})
        if req.include_usage:
            self._event(usage_chunk(ids, gen.usage()))
        self._event("[DONE]")


class ConfuHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ServerApp, verbose: bool = False):
        self.app, self.verbose = app, verbose
        super().__init__(address, Handler)


def make_server(decoder: Decoder, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = False) -> ConfuHTTPServer:
    """A bound server (port 0 picks a free one: `server.server_address`); run it with `serve_forever()`."""
    return ConfuHTTPServer((host, port), ServerApp(decoder, cfg), verbose)
