"""The engine side of `confu serve`: one `Decoder`, the slot that serializes requests on it, and one request's
decoding, round by round, as text pieces.

The engine decodes one request at a time (batch 1). Requests wait for the `EngineSlot` in arrival order; the
queue is bounded and a full one answers 429 with Retry-After. Decoding steps through `Decoder.rounds` on one
dedicated engine thread: the event loop stays free to answer /health, /metrics and the queue, and every round of a
generation runs on the same thread (torch's grad mode is per thread, and the decode generator enters
`torch.no_grad()` on its first round). Between rounds a request whose client left is cancelled. Stop sequences
are matched on the decoded text; streamed text holds back what could still become a stop sequence or is an
incomplete UTF-8 character.

A reply counts what plain decoding would have generated, whatever the method: a round of several tokens (a
draft's) that a stop sequence, EOS or max_tokens cuts short counts its tokens up to the cut only, in `usage` and in
the spec-decode statistics alike.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.tree import TreeConfig
from confu.serve.metrics import ServerMetrics, SpecDecodeStats
from confu.serve.protocol import CompletionRequest, Defaults, RequestError, check_model, parse_request, usage

# How often a queued request checks that its client is still there.
QUEUE_POLL_S = 0.2

T = TypeVar("T")
ClientGoneCheck = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class ServeConfig:
    model_name: str
    defaults: Defaults
    tree: TreeConfig
    auto_tree: bool = True  # `tree` bounds per-round sizing (`--tree-nodes auto`)
    contemplate: int | None = None
    zero_future: bool = False  # ConFu probe (`GenerationConfig.zero_future`)
    max_queue: int = 16  # requests waiting beyond the one generating
    method: str = "plain"  # what decodes: "plain", or the draft's method ("eagle3", "confu"); told to clients
    draft: str | None = None  # the draft directory, as given
    api_key: str | None = None  # required as `Authorization: Bearer <key>` on /v1 routes when set
    match: bool = False  # the decoder proposes matches in the text so far (`--match`); a request may turn them off


class ClientGone(Exception):
    """The client closed its connection: its generation is cancelled."""


class EngineSlot:
    """The one generation slot, first come first served, with at most `max_queue` waiters.

    It lives on the event loop (no thread touches it) and is not owned by a task: a streaming response releases
    it from the task that sends the stream, not the one that acquired it.
    """

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, client_gone: ClientGoneCheck) -> None:
        if self.running + self.waiting >= 1 + self.max_queue:
            raise RequestError(f"the server is busy ({self.waiting} requests queued); retry shortly", status=429,
                               error_type="rate_limit_exceeded", code="queue_full")
        if not self.running:
            self.running = 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            while not turn.done():
                await asyncio.wait([turn], timeout=QUEUE_POLL_S)
                if not turn.done() and await client_gone():
                    raise ClientGone
        except BaseException:
            if turn.done():  # handed the slot just as this request gave up: pass it on
                self.release()
            else:
                self._waiters.remove(turn)
                turn.cancel()
            raise

    def release(self) -> None:
        """Hands the slot to the first waiter (`running` stays 1), or frees it."""
        if self._waiters:
            self._waiters.popleft().set_result(None)
        else:
            self.running = 0


class StopText:
    """Decoded text of the generated tokens, released up to what is final (stop sequences cut the text)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = 0  # characters released
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop sequence in the unreleased part of `text` (and its overlap) begins, or None."""
        longest = max((len(s) for s in self.stops), default=0)
        hits = [i for i in (text.find(s, max(0, self.sent - longest)) for s in self.stops) if i >= 0]
        return min(hits, default=None)

    def add(self, new_tokens: list[int]) -> str:
        """Text released by `new_tokens`; sets `stopped` when a stop sequence appeared, and then keeps only the
        new tokens up to the one that completed it (the ones plain decoding, a token at a time, would have made)."""
        kept = len(self.tokens)
        self.tokens.extend(new_tokens)
        text = self._text()
        stop = self._stop_at(text)
        if stop is not None:
            while len(self.tokens) > kept + 1:
                shorter = self.tokenizer.decode(self.tokens[:-1], skip_special_tokens=True)
                earlier = self._stop_at(shorter)
                if earlier is None:
                    break
                self.tokens.pop()
                text, stop = shorter, earlier
            self.stopped = True
            return self._release(text, stop)
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


class Engine:
    """What every request shares: the decoder, its engine thread and slot, the metrics."""

    def __init__(self, decoder: Decoder, cfg: ServeConfig):
        self.decoder, self.cfg = decoder, cfg
        self.slot = EngineSlot(cfg.max_queue)
        self.metrics = ServerMetrics(cfg.tree.depth, cfg.model_name, lambda: self.slot.running,
                                     lambda: self.slot.waiting)
        self.started = int(time.time())
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="confu-engine")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def parse(self, raw: bytes, chat: bool) -> CompletionRequest:
        t = self.decoder.target
        req = parse_request(raw, chat, self.cfg.model_name, t.tokenizer, t.vocab_size, t.max_context,
                            self.cfg.defaults)
        if req.match and not self.cfg.match:
            raise RequestError("'match' needs a server started with --match", param="match")
        return req

    def decoding(self) -> dict[str, Any]:
        """How the model is served: the method and the draft (None for plain decoding)."""
        return {"method": self.cfg.method, "draft": self.cfg.draft}

    def model_card(self, model_id: str | None = None) -> dict[str, Any]:
        """`/v1/models/{model_id}` (the one model served; any other id is a 404), with vLLM's max_model_len and
        confu's `decoding()`."""
        if model_id is not None:
            check_model(model_id, self.cfg.model_name, status=404)
        return {"id": self.cfg.model_name, "object": "model", "created": self.started, "owned_by": "confu",
                "max_model_len": self.decoder.target.max_context, **self.decoding()}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}


class Generation:
    """One request's decoding: `pieces()` yields its text; afterwards this holds the outcome for the response."""

    def __init__(self, engine: Engine, req: CompletionRequest, arrival: float):
        self.engine, self.req, self.arrival = engine, req, arrival
        self.config = GenerationConfig(max_new_tokens=req.max_tokens, sampling=req.sampling, tree=engine.cfg.tree,
                                       auto_tree=engine.cfg.auto_tree, contemplate=engine.cfg.contemplate,
                                       zero_future=engine.cfg.zero_future, seed=req.seed, match=req.match is not False)
        self.stats = SpecDecodeStats(depth=engine.cfg.tree.depth)
        self.finish_reason: str | None = None  # None while decoding; "abort" if it never finished
        self.ttft_s: float | None = None
        self.text = StopText(engine.decoder.target.tokenizer, req.stop)

    def _advance(self, rounds) -> str:
        """One round, on the engine thread: the text it releases. Sets `finish_reason` at the last round (the
        engine names a reason on its last round, so `next` never runs past the end)."""
        tokens, step, reason = next(rounds)
        if step is None and self.ttft_s is None:  # the prefill's token
            self.ttft_s = time.perf_counter() - self.arrival
        before = self.completion_tokens
        piece = self.text.add(tokens)
        if step is not None and step.tree_nodes:
            # The round's accepted draft tokens come first: those that reached the reply are at most its tokens
            # there (the engine's record counts what the target accepted, before max_tokens, EOS or a stop).
            self.stats.observe_round(min(step.accepted, self.completion_tokens - before), step.tree_nodes,
                                     step.accepted_sources, step.nodes_by_source)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif reason:  # the engine's: "eos" ends the turn; "max_new_tokens" and "context" are the length
            self.finish_reason = "stop" if reason == "eos" else "length"
            piece += self.text.flush()
        return piece

    async def pieces(self, client_gone: ClientGoneCheck | None = None) -> AsyncIterator[str]:
        """The generated text in pieces. `client_gone` is asked between rounds; a cancelled task (a streaming
        client that left) stops at the end of the round in flight."""
        rounds = self.engine.decoder.rounds(self.req.prompt_ids, self.config)
        try:
            while self.finish_reason is None:
                piece = await self.engine.run(self._advance, rounds)
                if piece:
                    yield piece
                if self.finish_reason is None and client_gone is not None and await client_gone():
                    raise ClientGone
        finally:
            # Shielded: a cancelled request still waits for its round in flight to end and its decode to close,
            # so the next request starts on a free engine.
            with anyio.CancelScope(shield=True):
                await self.engine.run(rounds.close)
            self.record()

    def record(self) -> None:
        """Counts this request in the metrics, as it ended (an abort: its client left, queued or decoding)."""
        self.engine.metrics.record(self.finish_reason or "abort", len(self.req.prompt_ids), self.completion_tokens,
                                   self.stats, time.perf_counter() - self.arrival, self.ttft_s)

    @property
    def completion_tokens(self) -> int:
        return len(self.text.tokens)

    def usage(self) -> dict[str, int]:
        return usage(len(self.req.prompt_ids), self.completion_tokens)
