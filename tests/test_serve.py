"""`confu serve` on 127.0.0.1 (uvicorn on a background thread, port 0) against a tiny random target and draft:
the official `openai` client, streaming and not, with greedy output equal to `confu generate`; SSE framing and
usage; stop sequences and seeds; usage and statistics of drafted rounds cut by a stop or max_tokens; every
malformed input and unsupported parameter; the model card, /health and the API key; a full queue; concurrent
clients; a client leaving mid-generation or while queued; /metrics counters equal to the sum of the per-response
statistics; the load run."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from confu.bench.serve_load import LoadConfig, percentile, run_load, scrape_metrics
from confu.cli import main
from confu.cli.generate import load_decoder
from confu.cli.serve import served_method
from confu.engine.checkpoint import new_draft, save_draft
from confu.engine.convert import load_draft
from confu.engine.generate import Decoder, GenerationConfig, GenerationResult
from confu.engine.target import Target
from confu.engine.tree import DraftTree, TreeConfig
from confu.serve.generation import ServeConfig
from confu.serve.protocol import Defaults
from confu.serve.server import make_server, serve_in_thread
from tests.helpers import OracleProposer, decoder_with

MODEL = "tiny"
TREE = TreeConfig(total_nodes=8, depth=3, topk=3)
MAX_TOKENS = 24
PROMPT = "Why is the sky blue?"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def draft_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    target = Target.load(str(tiny_llama_dir))
    return save_draft(new_draft(target, "eagle3", draft_vocab_size=256, seed=0),
                      tmp_path_factory.mktemp("serve") / "draft")


@pytest.fixture(scope="module")
def decoder(tiny_llama_dir, draft_dir) -> Decoder:
    """The decoder `confu generate --target TINY --draft DRAFT` builds."""
    return load_decoder(str(tiny_llama_dir), str(draft_dir))


def serve_config(max_queue: int = 16, **extra) -> ServeConfig:
    return ServeConfig(model_name=MODEL, defaults=Defaults(max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, top_k=0),
                       tree=TREE, auto_tree=False, max_queue=max_queue, **extra)  # fixed trees: every round drafts


@contextmanager
def running(decoder: Decoder, cfg: ServeConfig) -> Iterator[str]:
    with serve_in_thread(make_server(decoder, cfg, "127.0.0.1", 0)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def server(decoder, draft_dir) -> Iterator[str]:
    with running(decoder, serve_config(method=served_method(decoder), draft=str(draft_dir))) as base_url:
        yield base_url


def client_for(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def post(base_url: str, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base_url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120)


def sse_events(payload: str) -> list[str]:
    """The data of each event; asserts the framing: `data: ...` lines, one blank line after each event."""
    assert payload.endswith("\n\n")
    events = payload[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e[len("data: "):] for e in events]


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def raw_post(base_url: str, path: str, body: dict) -> socket.socket:
    """A POST on a bare socket, which the test can close whenever it likes."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(address(base_url), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def confu_generate(capsys, tiny_llama_dir, draft_dir, prompt: str, raw: bool, max_tokens: int = MAX_TOKENS) -> dict:
    """`confu generate --json` with the server's tree and budget."""
    capsys.readouterr()
    argv = ["generate", "--target", str(tiny_llama_dir), "--draft", str(draft_dir), "--prompt", prompt, "--json",
            "--max-new-tokens", str(max_tokens), "--tree-nodes", str(TREE.total_nodes), "--depth", str(TREE.depth),
            "--topk", str(TREE.topk)] + (["--raw"] if raw else [])
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def reference(decoder: Decoder, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> GenerationResult:
    # the server's fixed trees (auto sizing would make the number of drafting rounds depend on timing)
    return decoder.generate(prompt_ids, GenerationConfig(max_new_tokens=max_tokens, tree=TREE, auto_tree=False))


def text_of(decoder: Decoder, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    ids = decoder.target.tokenizer(prompt).input_ids
    return decoder.target.tokenizer.decode(reference(decoder, ids, max_tokens).tokens, skip_special_tokens=True)


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- endpoints, through the official client ---------------------------------------------------------------------


def test_health_models_and_unknown_routes(server, draft_dir):
    decoding = {"method": "eagle3", "draft": str(draft_dir)}  # what serves the model, told to every client
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": MODEL, **decoding}
    client = client_for(server)
    listed = client.models.list().data
    assert [m.id for m in listed] == [MODEL] and listed[0].model_extra == {"max_model_len": 256, **decoding}
    assert client.models.retrieve(MODEL) == listed[0]
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found"
    for reply in (httpx.get(server + "/v1/nothing"), post(server, "/v1/nothing", {})):
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
    reply = httpx.get(server + "/v1/completions")
    assert reply.status_code == 405 and reply.json()["error"]["message"]


@pytest.mark.parametrize("chat", [True, False])
def test_openai_client_greedy_equals_confu_generate(server, decoder, tiny_llama_dir, draft_dir, capsys, chat):
    expected = confu_generate(capsys, tiny_llama_dir, draft_dir, PROMPT, raw=not chat)
    client = client_for(server)
    if chat:
        plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        text, stream = plain.choices[0].message.content, client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    else:
        plain = client.completions.create(model=MODEL, prompt=PROMPT)
        text, stream = plain.choices[0].text, client.completions.create(
            model=MODEL, prompt=PROMPT, stream=True, stream_options={"include_usage": True})
    assert text == expected["text"]
    assert plain.usage.completion_tokens == expected["new_tokens"]
    assert plain.choices[0].finish_reason == ("stop" if expected["stop_reason"] == "eos" else "length")
    parts, usage = [], None
    for chunk in stream:
        parts.extend((c.delta.content if chat else c.text) or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(parts) == expected["text"]
    assert usage.completion_tokens == expected["new_tokens"] and usage.prompt_tokens == plain.usage.prompt_tokens
    spec = plain.model_extra["spec_decode"]  # confu's extra field reaches the client
    assert sum(spec["acceptance_length_histogram"].values()) == spec["num_drafts"] > 0


def test_spec_decode_statistics_are_the_step_records(server, decoder):
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}).json()
    ids = list(decoder.target.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
    drafted = [s for s in reference(decoder, ids).steps if s.tree_nodes]
    spec = reply["spec_decode"]
    assert spec["num_drafts"] == len(drafted) > 0
    assert spec["num_draft_tokens"] == sum(s.tree_nodes for s in drafted)
    assert spec["num_accepted_tokens"] == sum(s.accepted for s in drafted)
    assert spec["num_accepted_tokens_per_pos"] == [sum(s.accepted > i for s in drafted) for i in range(TREE.depth)]
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_tokens"] / spec["num_drafts"],
                                                           abs=1e-4)


def test_openai_client_errors(server):
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)


# -- SSE framing, usage, stop, seed ---------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False])
def test_sse_framing_and_usage(server, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 16,
            **({"messages": MESSAGES} if chat else {"prompt": PROMPT})}
    reply = post(server, path, body)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    *content, closing, usage = [json.loads(e) for e in events[:-1]]
    assert usage["choices"] == [] and all(c["usage"] is None for c in content + [closing])
    assert closing["choices"][0]["finish_reason"] in ("stop", "length") and "spec_decode" in closing
    assert {c["id"] for c in content + [closing, usage]} == {closing["id"]}
    if chat:
        assert content[0]["object"] == "chat.completion.chunk"
        assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]

    without = post(server, path, {**body, "stream_options": None})
    assert all("usage" not in json.loads(e) for e in sse_events(without.text)[:-1])


def test_stop_sequences_cut_plain_and_streamed_text(server, decoder):
    prompt = "Number 3 plus 4 equals"
    full = text_of(decoder, prompt, 16)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    client = client_for(server)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=[stop])
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


class ChainProposer(OracleProposer):
    """Proposes the reference continuation as a chain as deep as the round allows: every round accepts all of
    it, so a round adds depth + 1 tokens and a stop or max_tokens can fall inside it."""

    def propose(self, max_nodes, depth):
        pos = len(self.seen) + 1  # tokens up to and including the root
        chain = self.reference[pos: pos + min(depth, max_nodes)]
        return DraftTree.from_parents(chain, list(range(-1, len(chain) - 1)), [-1.0 - d for d in range(len(chain))])


def accepted_within(tokens: int, depth: int) -> int:
    """Draft tokens in a reply of `tokens` when the prefill gives the first and every round accepts `depth`."""
    accepted, left = 0, tokens - 1
    while left > 0:
        accepted += min(depth, left)
        left -= depth + 1
    return accepted


@pytest.fixture(scope="module")
def chain_server(decoder, draft_dir) -> Iterator[tuple[str, list[int]]]:
    """A server whose every round accepts a chain of TREE.depth tokens; yields it and the greedy reply to the
    raw PROMPT (40 tokens)."""
    target = decoder.target
    prompt_ids = target.tokenizer(PROMPT).input_ids
    reply = Decoder(target).generate(prompt_ids, GenerationConfig(max_new_tokens=40)).tokens
    assert len(reply) == 40, "the reference must outlast every request below"
    ChainProposer.reference = prompt_ids + reply
    with running(decoder_with(target, load_draft(draft_dir, target), ChainProposer), serve_config()) as base_url:
        yield base_url, reply


def test_a_drafted_round_cut_by_max_tokens_counts_what_the_reply_kept(chain_server):
    base_url, reply = chain_server
    for max_tokens in (7, 8, 9):  # the last round cut to 2 and 3 of its 4 tokens, and not cut
        answer = post(base_url, "/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens}).json()
        assert answer["usage"]["completion_tokens"] == max_tokens
        spec = answer["spec_decode"]
        assert spec["num_accepted_tokens"] == accepted_within(max_tokens, TREE.depth), max_tokens
        assert sum(spec["num_accepted_tokens_per_pos"]) == spec["num_accepted_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_inside_a_drafted_round_counts_the_tokens_plain_decoding_makes(chain_server, decoder, stream):
    """A stop completed by the 2nd token of a 4-token round: the reply holds the tokens up to it, as a server
    without a draft (a token a round) would count them, not the whole round."""
    base_url, reply = chain_server
    tokenizer = decoder.target.tokenizer

    def text(n: int) -> str:
        return tokenizer.decode(reply[:n], skip_special_tokens=True)

    # a token k inside a round (k - 1 not a multiple of depth + 1) whose text appears first when it is added
    k = next(k for k in range(6, 30) if (k - 1) % (TREE.depth + 1) and text(k)[len(text(k - 1)):].strip()
             and text(k)[len(text(k - 1)):] not in text(k - 1))
    stop = text(k)[len(text(k - 1)):]
    body = {"prompt": PROMPT, "max_tokens": 30, "stop": [stop], "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    answer = post(base_url, "/v1/completions", body)
    if stream:
        *_, closing, usage = [json.loads(e) for e in sse_events(answer.text)[:-1]]
        spec, usage = closing["spec_decode"], usage["usage"]
    else:
        spec, usage = answer.json()["spec_decode"], answer.json()["usage"]
    assert usage["completion_tokens"] == k
    assert spec["num_accepted_tokens"] == accepted_within(k, TREE.depth)


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "My friend reads", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}
    first, second = post(server, "/v1/completions", body).json(), post(server, "/v1/completions", body).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


# -- bad requests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 1e9}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 10**6}, "max_tokens"),
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
    reply = post(server, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert httpx.get(server + "/health").status_code == 200  # the server is still up


def test_parameters_that_ask_for_nothing_are_accepted(server):
    body = {"prompt": PROMPT, "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0,
            "response_format": {"type": "text"}, "temperature": 2}
    assert post(server, "/v1/completions", body).status_code == 200


def test_missing_content_length_is_refused(server):
    with socket.create_connection(address(server), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")


# -- queue, concurrency, cancellation, metrics ------------------------------------------------------------------


class SlowDecoder:
    """A decoder that sleeps between rounds, so a client can leave, or another arrive, while a generation runs.
    (The server uses a decoder's `target` and `rounds` only.)"""

    def __init__(self, decoder: Decoder):
        self.decoder, self.target = decoder, decoder.target

    def rounds(self, prompt_ids, cfg):
        for round_ in self.decoder.rounds(prompt_ids, cfg):
            time.sleep(0.05)
            yield round_


@pytest.fixture(scope="module")
def slow(decoder) -> SlowDecoder:
    return SlowDecoder(decoder)


# A stop string that never comes: the generation runs its whole budget unless cancelled.
LONG = {"prompt": "The cat writes", "max_tokens": 200, "stop": ["\u2603"]}


def metric(base_url: str, name: str) -> float:
    return scrape_metrics(LoadConfig(base_url=base_url, model=MODEL)).get(name, 0.0)


def test_full_queue_answers_429_with_retry_after(slow):
    with running(slow, serve_config(max_queue=0)) as base_url:
        with raw_post(base_url, "/v1/completions", {**LONG, "stream": True}) as busy:
            assert busy.recv(4096).startswith(b"HTTP/1.1 200")  # the engine is generating
            reply = post(base_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["code"] == "queue_full"
        wait_for(lambda: metric(base_url, "confu:num_requests_running") == 0)
        assert post(base_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_concurrent_clients_each_get_their_solo_output(server):
    requests = [{"prompt": p, "max_tokens": 10, **extra} for p in ("The cat writes", "Our team builds")
                for extra in ({}, {"temperature": 0.8, "seed": 3})]
    client = client_for(server)
    solo = [client.completions.create(model=MODEL, **r).choices[0].text for r in requests]
    results: dict[int, str] = {}

    def one_client(i: int) -> None:
        kwargs = requests[i % len(requests)]
        if i % 2:
            chunks = client.completions.create(model=MODEL, stream=True, **kwargs)
            results[i] = "".join(c.choices[0].text for c in chunks)
        else:
            results[i] = client.completions.create(model=MODEL, **kwargs).choices[0].text

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert {i: results.get(i) for i in range(8)} == {i: solo[i % len(requests)] for i in range(8)}


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_generation(slow, stream):
    with running(slow, serve_config()) as base_url:
        with raw_post(base_url, "/v1/completions", {**LONG, "stream": stream}) as sock:
            if stream:
                received = b""
                while b"data: " not in received:
                    received += sock.recv(4096)
            else:
                wait_for(lambda: metric(base_url, "confu:num_requests_running") == 1)
        wait_for(lambda: metric(base_url, 'confu:request_success_total{finished_reason="abort"}') == 1)
        assert metric(base_url, "confu:generation_tokens_total") < 200
        assert metric(base_url, "confu:num_requests_running") == 0
        assert post(base_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_disconnect_while_queued_is_counted_as_an_abort(slow):
    with running(slow, serve_config()) as base_url:
        with raw_post(base_url, "/v1/completions", {**LONG, "stream": True}) as busy:
            assert busy.recv(4096).startswith(b"HTTP/1.1 200")  # the engine is generating
            with raw_post(base_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}):
                wait_for(lambda: metric(base_url, "confu:num_requests_waiting") == 1)
            wait_for(lambda: metric(base_url, "confu:num_requests_waiting") == 0)
            aborted = 'confu:request_success_total{finished_reason="abort"}'
            wait_for(lambda: metric(base_url, aborted) == 1, timeout_s=10)
            assert metric(base_url, "confu:num_requests_running") == 1, "the queued one left, the running one goes on"
            assert metric(base_url, "confu:prompt_tokens_total") == len(slow.target.tokenizer("hi").input_ids)


def test_api_key_guards_the_v1_routes(decoder):
    with running(decoder, serve_config(api_key="sesame")) as base_url:
        with pytest.raises(openai.AuthenticationError) as err:
            client_for(base_url, api_key="wrong").models.list()
        assert err.value.code == "invalid_api_key"
        reply = post(base_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["code"] == "invalid_api_key"
        answer = client_for(base_url, api_key="sesame").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert answer.usage.completion_tokens == 2
        assert httpx.get(base_url + "/health").status_code == 200  # probes and scrapers need no key
        assert metric(base_url, 'confu:request_errors_total{status="401"}') == 2


def test_serve_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 127.0.0.1)", "(default: 8000)", "(default: 16)", "(default: auto)",
                    "(default: none)", "(default: 128)"):
        assert default in text
    assert "(default: None)" not in text and "--api-key" in text


def test_metrics_counters_equal_the_sum_of_responses(server):
    reply = httpx.get(server + "/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert 'confu:spec_decode_num_drafts_total{model_name="tiny"}' in reply.text  # vLLM's label
    assert 'confu:num_requests_waiting{model_name="tiny"}' in reply.text
    load = LoadConfig(base_url=server, model=MODEL)
    before = scrape_metrics(load)
    stats = []
    for i, prompt in enumerate(["The river finds", "A small robot solves", "Two plus three is", "Hello there"]):
        chat, stream = i >= 2, bool(i % 2)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"max_tokens": 12 + i, "stream": stream,
                **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
        reply = post(server, path, body)
        stats.append(json.loads(sse_events(reply.text)[-2])["spec_decode"] if stream else reply.json()["spec_decode"])
    after = scrape_metrics(load)

    def growth(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert sum(s["num_drafts"] for s in stats) > 0
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert growth(f"confu:spec_decode_{key}_total") == sum(s[key] for s in stats)
    for pos in range(TREE.depth):
        name = f'confu:spec_decode_num_accepted_tokens_per_pos_total{{position="{pos}"}}'
        assert growth(name) == sum(s["num_accepted_tokens_per_pos"][pos] for s in stats)
    finished = [k for k in after if k.startswith("confu:request_success_total")]
    assert sum(after[k] - before.get(k, 0.0) for k in finished) == len(stats)
    assert growth("confu:e2e_request_latency_seconds_count") == len(stats)
    assert growth('confu:time_to_first_token_seconds_bucket{le="+Inf"}') == len(stats)
    assert after["confu:num_requests_running"] == 0 and after["confu:num_requests_waiting"] == 0


def test_load_run_has_no_errors_and_consistent_counters(server):
    report = run_load(LoadConfig(base_url=server, model=MODEL, clients=3, requests_per_client=2, max_tokens=8))
    assert report["requests"] == 6 and report["streaming"] == 3 and report["errors"] == 0
    assert report["counters_consistent"], report["counters"]
    assert report["ttft_s"]["p50"] is not None


def test_percentiles_interpolate_between_ranks_as_numpy_does():
    values = [0.9, 0.1, 0.4, 2.5, 0.3, 1.7, 0.2]
    for q in (0, 25, 50, 90, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([3.0], 95) == 3.0 and percentile([], 50) is None
