"""`confu serve --match`: draft candidates matched in earlier requests' text (the bounded history) and the request's
own, per request on or off, counted per source in each response and in /metrics; the output stays plain
decoding's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from confu.bench.serve_load import LoadConfig, scrape_metrics
from confu.cli.generate import load_decoder
from confu.cli.serve import served_method
from confu.engine.matcher import MATCH_SOURCE
from tests.test_serve import MODEL, post, running, serve_config

BODY = {"prompt": "The river finds", "max_tokens": 16}


@pytest.fixture(scope="module")
def match_server(tiny_llama_dir) -> Iterator[str]:
    decoder = load_decoder(str(tiny_llama_dir), "none", match=True, match_history=4096)
    assert served_method(decoder) == MATCH_SOURCE
    with running(decoder, serve_config(method=served_method(decoder), match=True)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def plain_server(tiny_llama_dir) -> Iterator[str]:
    with running(load_decoder(str(tiny_llama_dir), "none"), serve_config()) as base_url:
        yield base_url


def test_a_repeated_request_is_drafted_from_the_first_and_answered_alike(match_server, plain_server):
    plain = post(plain_server, "/v1/completions", BODY).json()["choices"][0]["text"]
    before = scrape_metrics(LoadConfig(base_url=match_server, model=MODEL))
    replies = [post(match_server, "/v1/completions", BODY).json() for _ in range(2)]
    after = scrape_metrics(LoadConfig(base_url=match_server, model=MODEL))
    assert [r["choices"][0]["text"] for r in replies] == [plain, plain]
    stats = [r["spec_decode"] for r in replies]
    assert stats[1]["num_accepted_tokens_by_source"].get(MATCH_SOURCE, 0) >= 8, stats[1]
    assert sum(stats[1]["num_accepted_tokens_by_source"].values()) == stats[1]["num_accepted_tokens"]
    for key in ("num_draft_tokens_by_source", "num_accepted_tokens_by_source"):
        name = f'confu:spec_decode_{key}_total{{source="{MATCH_SOURCE}"}}'
        assert after.get(name, 0.0) - before.get(name, 0.0) == sum(s[key].get(MATCH_SOURCE, 0) for s in stats)


def test_a_request_may_turn_matches_off(match_server):
    post(match_server, "/v1/completions", BODY)
    off = post(match_server, "/v1/completions", {**BODY, "match": False}).json()
    assert off["spec_decode"]["num_draft_tokens"] == 0 and not off["spec_decode"]["num_draft_tokens_by_source"]


@pytest.mark.parametrize(("server", "body"), [("match_server", {**BODY, "match": "yes"}),
                                              ("plain_server", {**BODY, "match": True})])
def test_match_requests_that_cannot_be_served_are_400s(request, server, body):
    reply = post(request.getfixturevalue(server), "/v1/completions", body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "match"
