"""`confu serve` on 127.0.0.1 against a tiny random target: endpoints, SSE framing, usage, greedy output equal
to `Decoder.generate`, bad requests, a full queue, concurrent clients, a disconnect mid-stream, and /metrics
counters equal to the sum of the per-response statistics."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.tree import TreeConfig
from confu.serve.protocol import Defaults
from confu.serve.server import ServeConfig, make_server
from tests.helpers import load_target

MODEL = "tiny"
TREE = TreeConfig(total_nodes=8, depth=3, topk=3)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def decoder(tiny_llama_dir) -> Decoder:
    target = load_target(tiny_llama_dir)
    return Decoder.for_head(target, new_draft(target, "eagle3", draft_vocab_size=256, seed=0))


def serve_config(max_queue: int = 16) -> ServeConfig:
    return ServeConfig(model_name=MODEL, defaults=Defaults(max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, top_k=0),
                       tree=TREE, max_queue=max_queue)


@contextmanager
def running(decoder: Decoder, cfg: ServeConfig) -> Iterator:
    server = make_server(decoder, cfg, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(decoder):
    with running(decoder, serve_config()) as srv:
        yield srv


def request(server, method: str, path: str, body: dict | bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), payload


def post(server, path: str, body: dict | bytes) -> tuple[int, dict]:
    status, _, payload = request(server, "POST", path, body)
    return status, json.loads(payload)


def sse_events(payload: bytes) -> list[str]:
    """The data of each event; asserts the framing: `data: ...` lines, one blank line after each event."""
    text = payload.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e[len("data: "):] for e in events]


def greedy_result(decoder: Decoder, prompt_ids: list[int], max_tokens: int = MAX_TOKENS):
    return decoder.generate(prompt_ids, GenerationConfig(max_new_tokens=max_tokens, tree=TREE))


def greedy_reference(decoder: Decoder, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    return greedy_result(decoder, prompt_ids, max_tokens).tokens


def chat_ids(decoder: Decoder, messages: list[dict]) -> list[int]:
    return list(decoder.target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False))


def decode(decoder: Decoder, tokens: list[int]) -> str:
    return decoder.target.tokenizer.decode(tokens, skip_special_tokens=True)


def metrics(server) -> dict[str, float]:
    status, headers, payload = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = {}
    for line in payload.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]


# -- endpoints ------------------------------------------------------------------------------------------------


def test_health_models_and_unknown_routes(server):
    status, _, payload = request(server, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"
    status, _, payload = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(payload)["data"]] == [MODEL]
    status, _, payload = request(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(payload)


def test_chat_greedy_equals_generate(server, decoder):
    status, body = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
    assert status == 200 and body["object"] == "chat.completion"
    ref = greedy_result(decoder, chat_ids(decoder, MESSAGES))
    tokens = ref.tokens
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": decode(decoder, tokens)}
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"] == {"prompt_tokens": len(chat_ids(decoder, MESSAGES)), "completion_tokens": len(tokens),
                             "total_tokens": len(chat_ids(decoder, MESSAGES)) + len(tokens)}
    spec = body["spec_decode"]  # the generation's own step records
    drafted = [s for s in ref.steps if s.tree_nodes]
    assert spec["num_drafts"] == len(drafted) > 0
    assert spec["num_draft_tokens"] == sum(s.tree_nodes for s in drafted)
    assert spec["num_accepted_tokens"] == sum(s.accepted for s in drafted)
    assert spec["num_accepted_tokens_per_pos"] == [sum(s.accepted > i for s in drafted) for i in range(TREE.depth)]
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_tokens"] / spec["num_drafts"],
                                                           abs=1e-4)
    assert sum(spec["acceptance_length_histogram"].values()) == spec["num_drafts"]


@pytest.mark.parametrize("chat", [True, False])
def test_stream_equals_generate_with_usage(server, decoder, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    prompt = "Number 3 plus 4 equals"
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 16,
            **({"messages": MESSAGES} if chat else {"prompt": prompt})}
    status, headers, payload = request(server, "POST", path, body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *content, closing, usage = chunks
    assert usage["choices"] == [] and all(c["usage"] is None for c in content + [closing])
    assert closing["choices"][0]["finish_reason"] in ("stop", "length") and "spec_decode" in closing
    if chat:
        assert content[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
        ids = chat_ids(decoder, MESSAGES)
    else:
        text = "".join(c["choices"][0]["text"] for c in content)
        ids = decoder.target.tokenizer(prompt).input_ids
    tokens = greedy_reference(decoder, ids, 16)
    assert text == decode(decoder, tokens)
    assert usage["usage"]["completion_tokens"] == len(tokens) and usage["usage"]["prompt_tokens"] == len(ids)


def test_stream_without_include_usage_has_no_usage(server):
    status, _, payload = request(server, "POST", "/v1/completions",
                                 {"prompt": "The cat writes", "stream": True, "max_tokens": 4})
    chunks = [json.loads(e) for e in sse_events(payload)[:-1]]
    assert status == 200 and all("usage" not in c for c in chunks)


def test_stop_sequences_cut_plain_and_streamed_text(server, decoder):
    ids = decoder.target.tokenizer("Number 3 plus 4 equals").input_ids
    full = decode(decoder, greedy_reference(decoder, ids, 16))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    body = {"prompt": "Number 3 plus 4 equals", "max_tokens": 16, "stop": [stop]}
    status, plain = post(server, "/v1/completions", body)
    assert status == 200 and plain["choices"][0] == {"index": 0, "text": expected, "logprobs": None,
                                                     "finish_reason": "stop"}
    _, _, payload = request(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [json.loads(e) for e in sse_events(payload)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "My friend reads", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}
    first, second = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert first[0] == 200 and first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]


def test_openai_client(server, decoder):
    openai = pytest.importorskip("openai")
    host, port = server.server_address[:2]
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)
    expected = decode(decoder, greedy_reference(decoder, chat_ids(decoder, MESSAGES)))
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert resp.choices[0].message.content == expected
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        parts.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(parts) == expected and usage.completion_tokens == resp.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


# -- bad requests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-4"}, "model"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "10"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "the cat " * 200}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {}, "prompt"),
])
def test_bad_requests_are_openai_style_400s(server, path, body, param):
    status, reply = post(server, path, body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    assert reply["error"]["param"] == param
    assert request(server, "GET", "/health")[0] == 200  # the server is still up


def test_missing_content_length_is_refused(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")


def test_full_queue_answers_429(decoder):
    with running(decoder, serve_config(max_queue=0)) as srv:
        with srv.app.slot.hold(lambda: False):  # the engine is busy
            status, headers, payload = request(srv, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 429 and headers["Retry-After"] == "1"
        assert json.loads(payload)["error"]["code"] == "queue_full"
        assert post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


# -- concurrency, cancellation, metrics ---------------------------------------------------------------------


def test_concurrent_clients_each_get_their_solo_output(server):
    bodies = [{"prompt": p, "max_tokens": 10, **extra} for p in ("The cat writes", "Our team builds")
              for extra in ({}, {"temperature": 0.8, "seed": 3})]
    solo = [post(server, "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies]
    results: dict[int, str] = {}

    def client(i: int) -> None:
        body = bodies[i % len(bodies)]
        if i % 2:
            _, _, payload = request(server, "POST", "/v1/completions", {**body, "stream": True})
            results[i] = "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(payload)[:-1])
        else:
            results[i] = post(server, "/v1/completions", body)[1]["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert {i: results.get(i) for i in range(8)} == {i: solo[i % len(bodies)] for i in range(8)}


class SlowDecoder(Decoder):
    """Sleeps between rounds, so a client can leave while its generation is still running."""

    def rounds(self, prompt_ids, cfg):
        for round_ in super().rounds(prompt_ids, cfg):
            time.sleep(0.05)
            yield round_


def test_disconnect_mid_stream_cancels_the_generation(decoder):
    slow = SlowDecoder(decoder.target, decoder.proposer, decoder.extension)
    with running(slow, serve_config()) as srv:
        body = json.dumps({"prompt": "The cat writes", "max_tokens": 200, "stream": True,
                           "stop": ["\u2603"]}).encode()  # a stop string that never comes: no early end
        with socket.create_connection(srv.server_address[:2], timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while b"data: " not in received:
                received += sock.recv(4096)
        deadline = time.time() + 60
        while time.time() < deadline and metrics(srv).get('confu:request_success_total{finished_reason="abort"}') != 1:
            time.sleep(0.1)
        values = metrics(srv)
        assert values['confu:request_success_total{finished_reason="abort"}'] == 1
        assert values["confu:generation_tokens_total"] < 200
        assert values["confu:num_requests_running"] == 0
        assert post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200  # the engine is free


def test_metrics_counters_equal_the_sum_of_responses(server):
    before = metrics(server)
    stats = []
    for i, prompt in enumerate(["The river finds", "A small robot solves", "Two plus three is"]):
        body = {"prompt": prompt, "max_tokens": 12 + i, "stream": bool(i % 2)}
        if body["stream"]:
            _, _, payload = request(server, "POST", "/v1/completions", body)
            stats.append(json.loads(sse_events(payload)[-2])["spec_decode"])
        else:
            stats.append(post(server, "/v1/completions", body)[1]["spec_decode"])
    after = metrics(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert sum(s["num_drafts"] for s in stats) > 0
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert delta(f"confu:spec_decode_{key}_total") == sum(s[key] for s in stats)
    for pos in range(TREE.depth):
        name = f'confu:spec_decode_num_accepted_tokens_per_pos_total{{position="{pos}"}}'
        assert delta(name) == sum(s["num_accepted_tokens_per_pos"][pos] for s in stats)
    finished = sum(v for k, v in after.items() if k.startswith("confu:request_success_total"))
    finished -= sum(v for k, v in before.items() if k.startswith("confu:request_success_total"))
    assert finished == 3
    assert delta("confu:e2e_request_latency_seconds_count") == 3
    assert delta("confu:time_to_first_token_seconds_count") == 3
    assert delta('confu:time_to_first_token_seconds_bucket{le="+Inf"}') == 3
    assert after["confu:num_requests_running"] == 0 and after["confu:num_requests_waiting"] == 0
