"""A bounded load run against `confu serve`: `clients` concurrent clients, each sending `requests_per_client`
requests one after another, streaming and not, to both completion endpoints. Reports requests/s, latency and time
to first token percentiles and errors, and checks the server's `/metrics` counters against the sum of the
per-response statistics (`spec_decode`, `usage`).

The clients are plain `http.client` connections on threads: the load generator needs no HTTP library beyond the
standard one, and a thread per client is what "N concurrent clients" means. Latency runs from sending the request
to the last byte of the response. Time to first token is measured by the client on streaming requests (the first
event with text); for every request the server's own measurement is in its TTFT histogram, whose mean is
reported too. The engine decodes one request at a time, so both include the time spent queued.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

# Short prompts of different kinds, so the load mixes prompt lengths and acceptance behaviour.
LOAD_PROMPTS = (
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is the capital of Japan?",
    "Explain what a hash table is in two sentences.",
    "Give three tips for learning a new language.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Name four planets of the solar system.",
    "Summarize the plot of Cinderella.",
    "What is the difference between weather and climate?",
)
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # http://host:port
    model: str
    clients: int = 8
    requests_per_client: int = 5
    max_tokens: int = 32
    timeout_s: float = 600.0


@dataclass
class RequestResult:
    chat: bool
    stream: bool
    status: int = 0
    error: str = ""
    latency_s: float = 0.0
    ttft_s: float | None = None  # streaming requests only
    completion_tokens: int = 0
    spec_decode: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def _connection(cfg: LoadConfig) -> http.client.HTTPConnection:
    url = urlsplit(cfg.base_url)
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=cfg.timeout_s)


def _request_body(cfg: LoadConfig, prompt: str, chat: bool, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_tokens, "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _read_stream(resp: http.client.HTTPResponse, result: RequestResult, start: float) -> None:
    """Reads SSE events to `data: [DONE]`: the first text's time, the closing chunk's statistics, the usage."""
    done = False
    while line := resp.readline():
        data = line.decode().strip()
        if not data.startswith("data: "):
            continue
        data = data[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            result.error = event["error"]["message"]
            continue
        for choice in event.get("choices", []):
            text = choice.get("text") or choice.get("delta", {}).get("content")
            if text and result.ttft_s is None:
                result.ttft_s = time.perf_counter() - start
        if "spec_decode" in event:
            result.spec_decode = event["spec_decode"]
        if event.get("usage"):
            result.completion_tokens = event["usage"]["completion_tokens"]
    if not done and not result.error:
        result.error = "the stream ended without data: [DONE]"


def send_request(cfg: LoadConfig, prompt: str, chat: bool, stream: bool) -> RequestResult:
    result = RequestResult(chat=chat, stream=stream)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    conn = _connection(cfg)
    start = time.perf_counter()
    try:
        conn.request("POST", path, body=json.dumps(_request_body(cfg, prompt, chat, stream)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        result.status = resp.status
        if resp.status != 200:
            result.error = resp.read().decode(errors="replace")[:300]
        elif stream:
            _read_stream(resp, result, start)
        else:
            reply = json.loads(resp.read())
            result.completion_tokens = reply["usage"]["completion_tokens"]
            result.spec_decode = reply["spec_decode"]
    except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
        result.error = f"{type(err).__name__}: {err}"
    finally:
        result.latency_s = time.perf_counter() - start
        conn.close()
    return result


def scrape_metrics(cfg: LoadConfig) -> dict[str, float]:
    """`/metrics` of the model `cfg.model` as {sample name with its labels but `model_name`, as in the exposition:
    value}."""
    conn = _connection(cfg)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            others = dict(sample.labels)
            if others.pop("model_name", cfg.model) != cfg.model:
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(others.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def counter_check(before: dict[str, float], after: dict[str, float], results: list[RequestResult]) -> dict:
    """Each counter's growth over the run next to the sum of what the responses reported."""
    done = [r for r in results if r.ok]
    stats = [r.spec_decode for r in done if r.spec_decode is not None]
    depth = max((len(s["num_accepted_tokens_per_pos"]) for s in stats), default=0)
    expected = {f"confu:spec_decode_{key}_total": sum(s[key] for s in stats) for key in SPEC_COUNTERS}
    for pos in range(depth):
        name = f'confu:spec_decode_num_accepted_tokens_per_pos_total{{position="{pos}"}}'
        expected[name] = sum(s["num_accepted_tokens_per_pos"][pos] for s in stats)
    expected["confu:generation_tokens_total"] = sum(r.completion_tokens for r in done)
    expected["confu:e2e_request_latency_seconds_count"] = len(done)
    expected["confu:time_to_first_token_seconds_count"] = len(done)
    finished = [k for k in after if k.startswith("confu:request_success_total")]
    growth = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in expected}
    growth["confu:request_success_total (all reasons)"] = sum(after[k] - before.get(k, 0.0) for k in finished)
    expected["confu:request_success_total (all reasons)"] = len(done)
    return {name: {"metrics": growth[name], "responses": value, "equal": growth[name] == value}
            for name, value in expected.items()}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "mean": sum(values) / len(values) if values else None}


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """One warm-up request (not counted), then the run; returns the report."""
    send_request(cfg, LOAD_PROMPTS[0], chat=True, stream=False)
    before = scrape_metrics(cfg)
    results: list[RequestResult] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for j in range(cfg.requests_per_client):
            prompt = LOAD_PROMPTS[(index * cfg.requests_per_client + j) % len(LOAD_PROMPTS)]
            result = send_request(cfg, prompt, chat=index % 2 == 0, stream=(index + j) % 2 == 1)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(cfg.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - start
    after = scrape_metrics(cfg)

    done = [r for r in results if r.ok]
    stats = [r.spec_decode for r in done if r.spec_decode]
    drafts = sum(s["num_drafts"] for s in stats)
    ttft_sum = after["confu:time_to_first_token_seconds_sum"] - before["confu:time_to_first_token_seconds_sum"]
    checks = counter_check(before, after, results)
    tokens = sum(r.completion_tokens for r in done)
    return {
        "clients": cfg.clients, "requests_per_client": cfg.requests_per_client, "max_tokens": cfg.max_tokens,
        "requests": len(results), "streaming": sum(r.stream for r in results), "errors": len(results) - len(done),
        "error_samples": sorted({f"{r.status}: {r.error}" for r in results if not r.ok})[:5],
        "wall_s": wall_s, "requests_per_s": len(done) / wall_s, "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "latency_s": _spread([r.latency_s for r in done]),
        "ttft_s": _spread([r.ttft_s for r in done if r.ttft_s is not None]),
        "server_ttft_mean_s": ttft_sum / len(done) if done else None,
        "mean_acceptance_length": 1 + sum(s["num_accepted_tokens"] for s in stats) / drafts if drafts else 1.0,
        "counters": checks, "counters_consistent": all(c["equal"] for c in checks.values()),
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render_load_console(report: dict[str, Any]) -> str:
    lat, ttft = report["latency_s"], report["ttft_s"]
    lines = [
        f"{report['requests']} requests ({report['streaming']} streaming) from {report['clients']} clients x "
        f"{report['requests_per_client']}, max_tokens {report['max_tokens']}: {report['errors']} errors, "
        f"{report['wall_s']:.1f} s",
        f"requests/s {report['requests_per_s']:.3f}, completion tokens/s {report['tokens_per_s']:.2f}",
        f"latency p50 {_seconds(lat['p50'])}, p95 {_seconds(lat['p95'])}",
        f"time to first token (streaming, client) p50 {_seconds(ttft['p50'])}, p95 {_seconds(ttft['p95'])}; "
        f"server mean {_seconds(report['server_ttft_mean_s'])}",
        f"mean acceptance length {report['mean_acceptance_length']:.3f}",
        "counters " + ("consistent with the responses" if report["counters_consistent"] else "INCONSISTENT:"),
    ]
    lines += [f"  {name}: metrics {c['metrics']:g}, responses {c['responses']:g}"
              for name, c in report["counters"].items() if not c["equal"]]
    lines += [f"  error: {e}" for e in report["error_samples"]]
    return "\n".join(lines)
