"""Speculative-decoding statistics per request and the server's Prometheus metrics.

Names follow vLLM's (`vllm:spec_decode_num_drafts`, ... ; here `confu:`), so dashboards built for vLLM read
confu's. Counters are exposed with the `_total` suffix, as prometheus_client writes them. The exposition is
written here (text format 0.0.4): a handful of counters, gauges and histograms does not need a dependency.

Spec-decode counting, per verification round that had a draft tree (`StepRecord`): `num_drafts` += 1,
`num_draft_tokens` += the tree's nodes (every token the target verified as a draft, as vLLM counts a chain's k),
`num_accepted_tokens` += tokens accepted from the tree, `num_accepted_tokens_per_pos[i]` += 1 when the accepted
path reached depth i + 1. Mean acceptance length = 1 + accepted / drafts, the τ of `confu generate`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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

    def __post_init__(self) -> None:
        self.accepted_per_pos = self.accepted_per_pos or [0] * self.depth

    def observe_round(self, accepted: int, drafted: int) -> None:
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
        }


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, label_names
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        super().__init__(name, help_text, label_names)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self.values) or ({(): 0.0} if not self.label_names else {})
        return self.header() + [f"{self.name}_total{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(values.items())]


class Gauge(Metric):
    """A value read when the metrics are scraped."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1

    def render(self) -> list[str]:
        with self._lock:
            lines = [f'{self.name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                                                 strict=True)]
            return self.header() + lines + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]


class ServerMetrics:
    """Everything `/metrics` shows."""

    def __init__(self, depth: int, running: Callable[[], float], waiting: Callable[[], float]):
        p = "confu:"
        self.depth = depth
        self.num_drafts = Counter(p + "spec_decode_num_drafts", "Verification rounds that checked a draft.")
        self.num_draft_tokens = Counter(p + "spec_decode_num_draft_tokens",
                                        "Draft tokens verified (tree nodes).")
        self.num_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each position.", ("position",))
        self.request_success = Counter(p + "request_success", "Finished requests by finish reason.",
                                       ("finished_reason",))
        self.request_errors = Counter(p + "request_errors", "Requests answered with an error, by HTTP status.",
                                      ("status",))
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated for finished requests.")
        self.latency = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last token.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to the first generated token.")
        self.running = Gauge(p + "num_requests_running", "Requests generating now (0 or 1).", running)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued for the engine.", waiting)
        for pos in range(depth):  # every position is listed from the start, as vLLM does
            self.accepted_per_pos.inc(0, str(pos))

    def record(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, stats: SpecDecodeStats,
               latency_s: float, ttft_s: float | None) -> None:
        self.request_success.inc(1, finish_reason)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.num_drafts.inc(stats.num_drafts)
        self.num_draft_tokens.inc(stats.num_draft_tokens)
        self.num_accepted_tokens.inc(stats.num_accepted_tokens)
        for pos, count in enumerate(stats.accepted_per_pos):
            self.accepted_per_pos.inc(count, str(pos))
        self.latency.observe(latency_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def render(self) -> str:
        metrics = (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.accepted_per_pos,
                   self.request_success, self.request_errors, self.prompt_tokens, self.generation_tokens,
                   self.latency, self.ttft, self.running, self.waiting)
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
