"""Speculative-decoding statistics per request and the server's Prometheus metrics.

Names follow vLLM's (`vllm:spec_decode_num_drafts`, ... ; here `confu:`), and every sample carries the served
model's name as its `model_name` label, as vLLM's do, so dashboards built for vLLM read confu's. The metrics are
prometheus_client's, in a registry of the server's own (not the process-wide default one): two servers in one
process, as in the tests, keep separate counts. Counters are exposed with the `_total` suffix, as
prometheus_client writes them.

Per source of draft candidates (a draft "head", "match"es in the text so far), `num_draft_tokens_by_source` and
`num_accepted_tokens_by_source` split the two counts.

Spec-decode counting, per verification round that had a draft tree (`StepRecord`): `num_drafts` += 1,
`num_draft_tokens` += the tree's nodes (every token the target verified as a draft, as vLLM counts a chain's k),
`num_accepted_tokens` += tokens accepted from the tree that reached the reply (not those past max_tokens, EOS or
a stop sequence), `num_accepted_tokens_per_pos[i]` += 1 when the accepted path reached depth i + 1. Mean
acceptance length = 1 + accepted / drafts, the τ of `confu generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

# Request latency and time to first token, seconds: a CPU engine needs the long tail.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


@dataclass
class SpecDecodeStats:
    """One request's acceptance statistics, in the shape of vLLM's spec-decode metrics."""

    depth: int  # the tree's depth: positions a draft can have accepted
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    # acceptance length (accepted + 1, the bonus token included) -> number of rounds
    acceptance_length_histogram: dict[int, int] = field(default_factory=dict)
    # per source of draft candidates ("head", "match"): tree nodes verified, and accepted
    draft_tokens_by_source: dict[str, int] = field(default_factory=dict)
    accepted_tokens_by_source: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accepted_per_pos = self.accepted_per_pos or [0] * self.depth

    def observe_round(self, accepted: int, drafted: int, accepted_sources: Sequence[str] = (),
                      nodes_by_source: dict[str, int] | None = None) -> None:
        """A round that verified `drafted` nodes and accepted `accepted`; the sources of its nodes and of the
        accepted ones (in path order; only the first `accepted` count)."""
        for source, n in (nodes_by_source or {}).items():
            self.draft_tokens_by_source[source] = self.draft_tokens_by_source.get(source, 0) + n
        for source in accepted_sources[:accepted]:
            self.accepted_tokens_by_source[source] = self.accepted_tokens_by_source.get(source, 0) + 1
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for pos in range(min(accepted, self.depth)):
            self.accepted_per_pos[pos] += 1
        length = accepted + 1
        self.acceptance_length_histogram[length] = self.acceptance_length_histogram.get(length, 0) + 1

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(self.accepted_per_pos),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "acceptance_length_histogram": {str(k): v for k, v in sorted(self.acceptance_length_histogram.items())},
            "num_draft_tokens_by_source": dict(sorted(self.draft_tokens_by_source.items())),
            "num_accepted_tokens_by_source": dict(sorted(self.accepted_tokens_by_source.items())),
        }


class ServerMetrics:
    """Everything `/metrics` shows, each sample labelled with the served model's name."""

    def __init__(self, depth: int, model_name: str, running: Callable[[], float], waiting: Callable[[], float]):
        p = "confu:"
        r = self.registry = CollectorRegistry()
        model = {"model_name": model_name}

        def labelled(metric_type, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
            """The metric, with `model_name` bound (labels beyond it are bound per sample)."""
            metric = metric_type(p + name, doc, ["model_name", *labels], registry=r, **kwargs)
            return metric.labels(**model) if not labels else partial(metric.labels, **model)

        self.num_drafts = labelled(Counter, "spec_decode_num_drafts", "Verification rounds that checked a draft.")
        self.num_draft_tokens = labelled(Counter, "spec_decode_num_draft_tokens",
                                         "Draft tokens verified (tree nodes).")
        self.num_accepted_tokens = labelled(Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = labelled(Counter, "spec_decode_num_accepted_tokens_per_pos",
                                         "Draft tokens accepted at each position.", ("position",))
        self.draft_tokens_by_source = labelled(Counter, "spec_decode_num_draft_tokens_by_source",
                                               "Draft tokens verified, by what proposed them.", ("source",))
        self.accepted_tokens_by_source = labelled(Counter, "spec_decode_num_accepted_tokens_by_source",
                                                  "Draft tokens accepted, by what proposed them.", ("source",))
        self.request_success = labelled(Counter, "request_success", "Finished requests by finish reason.",
                                        ("finished_reason",))
        self.request_errors = labelled(Counter, "request_errors", "Requests answered with an error, by HTTP status.",
                                       ("status",))
        self.prompt_tokens = labelled(Counter, "prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = labelled(Counter, "generation_tokens", "Tokens generated for finished requests.")
        self.latency = labelled(Histogram, "e2e_request_latency_seconds", "Request latency, arrival to last token.",
                                buckets=LATENCY_BUCKETS)
        self.ttft = labelled(Histogram, "time_to_first_token_seconds", "Arrival to the first generated token.",
                             buckets=LATENCY_BUCKETS)
        labelled(Gauge, "num_requests_running", "Requests generating now (0 or 1).").set_function(running)
        labelled(Gauge, "num_requests_waiting", "Requests queued for the engine.").set_function(waiting)
        for pos in range(depth):  # every position is listed from the start, as vLLM does
            self.accepted_per_pos(position=str(pos))

    def record(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, stats: SpecDecodeStats,
               latency_s: float, ttft_s: float | None) -> None:
        self.request_success(finished_reason=finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.num_drafts.inc(stats.num_drafts)
        self.num_draft_tokens.inc(stats.num_draft_tokens)
        self.num_accepted_tokens.inc(stats.num_accepted_tokens)
        for pos, count in enumerate(stats.accepted_per_pos):
            self.accepted_per_pos(position=str(pos)).inc(count)
        for source, count in stats.draft_tokens_by_source.items():
            self.draft_tokens_by_source(source=source).inc(count)
        for source, count in stats.accepted_tokens_by_source.items():
            self.accepted_tokens_by_source(source=source).inc(count)
        self.latency.observe(latency_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def error(self, status: int) -> None:
        self.request_errors(status=str(status)).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format the scraper's Accept header asks for (Prometheus text by default), and
        its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
