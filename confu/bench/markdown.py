"""The Markdown report of a `confu bench` run (`report.md`), from `confu.bench.report.summarize`'s output.

Every τ and speed-up is printed with its 95% interval, `x [lo, hi]`; a speed-up whose interval holds 1.0
carries `†`: on that run it cannot be told apart from its baseline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from confu.bench.report import (
    AVG,
    BASELINE_KINDS,
    GREEDY_REFERENCE,
    LATENCY_ROWS,
    column_name,
    fmt,
    order_categories,
    setting_name,
)
from confu.bench.vllm_engine import VLLM

NOT_DISTINGUISHABLE = "†"
MIB = 2**20
KIB = 2**10


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _row_head(s: dict) -> list[str]:
    return [s["method"], "-" if s["tree_nodes"] is None else str(s["tree_nodes"]), f"{s['temperature']:g}"]


def with_interval(x: float | None, ci: Sequence[float] | None, ratio: bool = False) -> str:
    """`x [lo, hi]`; for a ratio (a speed-up) `†` when the interval holds 1.0."""
    if x is None:
        return "-"
    if ci is None:
        return fmt(x)
    mark = NOT_DISTINGUISHABLE if ratio and ci[0] <= 1.0 <= ci[1] else ""
    return f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]{mark}"


def _drafted(summary: dict[str, Any]) -> list[dict]:
    return [s for s in summary["settings"] if s["kind"] not in BASELINE_KINDS]


def headline_table(summary: dict[str, Any]) -> str:
    """AVG over all questions: one row per method and setting."""
    header = ["Method", "Nodes", "T", "τ", "SR vs ar", "SR vs hf", "tokens/s"]
    rows = []
    for s in summary["settings"]:
        a = s["avg"]
        rows.append(_row_head(s) + [with_interval(a["tau"], a["tau_ci"]),
                                    with_interval(a["sr_vs_ar"], a["sr_vs_ar_ci"], ratio=True),
                                    with_interval(a["sr_vs_hf"], a["sr_vs_hf_ci"], ratio=True),
                                    fmt(a["tokens_per_s"], 1)])
    return _table(header, rows)


def tau_sr_table(summary: dict[str, Any], baseline: str) -> str:
    """The paper's Tables 1-3: rows Method / Nodes / T, per category tau and SR, then AVG."""
    cats = summary["categories"]
    header = ["Method", "Nodes", "T"]
    for cat in cats + [AVG]:
        name = AVG if cat == AVG else column_name(cat)
        header += [f"{name} τ", f"{name} SR"]
    rows = []
    for s in summary["settings"]:
        row = _row_head(s)
        for cat in cats + [AVG]:
            m = s["avg"] if cat == AVG else s["per_category"].get(cat)
            if m is None:
                row += ["-", "-"]
                continue
            row += [with_interval(m["tau"], m["tau_ci"]),
                    with_interval(m[f"sr_vs_{baseline}"], m[f"sr_vs_{baseline}_ci"], ratio=True)]
        rows.append(row)
    return _table(header, rows)


def tokens_per_s_table(summary: dict[str, Any]) -> str:
    cats = summary["categories"]
    header = ["Method", "Nodes", "T"] + [column_name(c) for c in cats] + [AVG]
    rows = []
    for s in summary["settings"]:
        cells = [fmt(s["per_category"][c]["tokens_per_s"]) if c in s["per_category"] else "-" for c in cats]
        rows.append(_row_head(s) + cells + [fmt(s["avg"]["tokens_per_s"])])
    return _table(header, rows)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def timing_table(summary: dict[str, Any]) -> str:
    header = ["Method", "Nodes", "T", "rounds", "τ", "draft ms/round", "verify ms/round", "tree nodes",
              "depth", "rounds without draft", "verify tokens", "contemplate slots", "rounds / wall"]
    rows = []
    for s in summary["settings"]:
        t = s["timing"]
        if not t["rounds"]:
            continue
        rows.append(_row_head(s) + [
            str(t["rounds"]), fmt(s["avg"]["tau"]), fmt(t["draft_ms"], 1), fmt(t["verify_ms"], 1),
            fmt(t["tree_nodes"], 1), fmt(t.get("depth"), 1), _percent(t.get("no_draft_share")),
            fmt(t["verify_tokens"], 1), fmt(t["contemplate_slots"], 1), _percent(t["rounds_share_of_wall"]),
        ])
    return _table(header, rows)


def latency_table(summary: dict[str, Any]) -> str:
    """Per method and setting: ms per round of each stage, and its share of the round."""
    header = ["Method", "Nodes", "T"] + [f"{name} ms (share)" for name in LATENCY_ROWS] + ["round ms"]
    rows = []
    for s in summary["settings"]:
        stages = s["timing"].get("stages")
        if not stages:
            continue
        cells = [f"{fmt(stages[n]['ms'], 2)} ({_percent(stages[n]['share'])})" for n in LATENCY_ROWS]
        rows.append(_row_head(s) + cells + [fmt(sum(stages[n]["ms"] for n in LATENCY_ROWS), 2)])
    return _table(header, rows) if rows else "(no stage times in these records)"


def acceptance_table(summary: dict[str, Any]) -> str:
    drafted = [s for s in _drafted(summary) if s["acceptance"]]
    depth = max((len(s["acceptance"]["per_depth"]) for s in drafted), default=0)
    if not depth:
        return "(no drafted rounds)"
    header = ["Method", "Nodes", "T"] + [f"d={d}" for d in range(1, depth + 1)]
    rows = []
    for s in drafted:
        rates = [f"{with_interval(p['rate'], p.get('ci'))} (n={p['reached']})" if p["rate"] is not None else "-"
                 for p in s["acceptance"]["per_depth"]]
        rows.append(_row_head(s) + rates + ["-"] * (depth - len(rates)))
    return _table(header, rows)


def sources_table(summary: dict[str, Any]) -> str:
    """Draft candidates by what proposed them: per round verified and accepted, and each source's share."""
    rows = []
    for s in _drafted(summary):
        for source, c in (s.get("sources") or {}).items():
            rows.append(_row_head(s) + [source, fmt(c["nodes_per_round"]), fmt(c["accepted_per_round"]),
                                        _percent(c["acceptance"]), _percent(c["share_of_accepted"])])
    if not rows:
        return "(no drafted rounds)"
    return _table(["Method", "Nodes", "T", "source", "nodes / round", "accepted / round", "accepted / nodes",
                   "share of accepted"], rows)


def _bytes(x: float | None) -> str:
    if not x:
        return "-"
    return f"{x / MIB:.2f} MiB" if x >= MIB else f"{x / KIB:.1f} KiB"


def memory_table(summary: dict[str, Any]) -> str:
    """One row per method (the largest over its settings: tensors are sized by the longest sequence)."""
    header = ["Method", "target KV / token", "soft prompt", "contemplate slots / round (mean, max)",
              "target KV allocated", "draft KV / token", "draft KV allocated"]
    by_method: dict[str, dict] = {}
    for s in summary["settings"]:
        if s.get("memory"):
            mem = by_method.setdefault(s["method"], dict(s["memory"]))
            for k, v in s["memory"].items():
                mem[k] = max(mem[k], v)
    rows = [[method, _bytes(m["target_kv_per_token"]), _bytes(m["soft_prompt"]),
             f"{_bytes(m['contemplate_per_round'])}, {_bytes(m['contemplate_max_round'])}",
             _bytes(m["target_kv_allocated"]), _bytes(m["draft_kv_per_token"]), _bytes(m["draft_kv_allocated"])]
            for method, m in by_method.items()]
    return _table(header, rows) if rows else "(no KV measurements in these records)"


def routing_table(summary: dict[str, Any]) -> str:
    header = ["Method", "Nodes", "T", "router", "decisions", "experts (top-k)", "entropy (of ln E)",
              "load entropy (of ln E)", "top expert's weight", "busiest expert's load", "chosen share per expert"]
    rows = []
    for s in _drafted(summary):
        for router, u in (s.get("routing") or {}).items():
            shares = " ".join(f"{100 * c:.0f}" for c in u["chosen_share"])
            rows.append(_row_head(s) + [
                f"[{router}]", str(u["decisions"]), f"{u['experts']} ({u['top_k']})",
                f"{fmt(u['entropy_nats'])} nats ({_percent(u['entropy_norm'])})", _percent(u["load_entropy_norm"]),
                fmt(u["top_weight"]), _percent(u["busiest_load"]), f"{shares} (%)",
            ])
    return _table(header, rows) if rows else "(no MoE routers among these methods)"


def vllm_lines(engines: dict[str, dict] | None) -> list[str]:
    """The report's header lines on the vLLM methods' engines (`VllmEngine.describe`)."""
    return [f"- `{label}`: vLLM {e['version']} in its own process and virtualenv (`make anchors`), {e['dtype']}, "
            + (f"EAGLE-3 chains of {e['speculative_tokens']} draft tokens (τ = 1 + accepted / drafts, from its "
               "spec-decode counters), " if e["speculative_tokens"] else "plain decoding, ")
            + f"threads bound by VLLM_CPU_OMP_THREADS_BIND={e['threads_bind']}, KV cache {e['kv_cache_gib']} GiB, "
            f"LD_PRELOAD {e['ld_preload'] or '-'}, further LLM arguments {json.dumps(e['extra_args'])}; the same "
            "prompt tokens, max new tokens and stop tokens"
            for label, e in (engines or {}).items()]


def render_report(summary: dict[str, Any], run_info: dict[str, Any], plots: Sequence[str]) -> str:
    counts = run_info.get("questions_per_category", {})
    count_text = ", ".join(f"{column_name(c)} {counts[c]}" for c in order_categories(counts)) or "-"
    repeats = run_info.get("repeats", 1)
    lines = [
        f"# Spec-Bench results: {run_info.get('target', '?')}",
        "",
        f"- questions: {run_info.get('n_questions', '?')} ({count_text}); max new tokens per turn "
        f"{run_info.get('max_new_tokens', '?')}; temperatures {run_info.get('temperatures')}; tree nodes "
        f"{run_info.get('tree_nodes')}; depth {run_info.get('depth')}, top-k {run_info.get('topk')}; "
        f"contemplate {run_info.get('contemplate')}",
        f"- machine: {run_info.get('machine', '?')}; torch threads {run_info.get('torch_threads', '?')}; "
        f"batch size 1; warm-up {run_info.get('warmup', '?')} untimed run(s) of the first question per "
        f"method and setting; {repeats} timed run(s) of every question, methods interleaved per question",
        f"- target numerics: {run_info.get('numerics', '?')} (every method but `hf`, which runs transformers' own "
        "modules)",
        f"- draft numerics: {run_info.get('draft_numerics', '?')} (they change what a draft proposes, never what "
        "is emitted)",
        f"- process memory: {_bytes(run_info.get('rss_after_load_bytes'))} resident after loading the target and "
        f"drafts, peak {_bytes(run_info.get('peak_rss_bytes'))} (ru_maxrss of the bench process)",
        *vllm_lines(run_info.get("vllm")),
        "",
        "Metrics (Spec-Bench / the ConFu paper): τ = mean accepted draft tokens + 1 per verification step, "
        "pooled over all steps of all questions; a question's tokens/s = new tokens / generation wall time, "
        "both turns together (the mean over its timed runs); SR = mean over questions of the method's "
        "tokens/s / mean over the same questions of the baseline's tokens/s at the same temperature. "
        "**AVG pools all questions** (each category weighs by its number of questions; MT-bench math and "
        "reasoning have no paper column and count in AVG). `hf` is plain autoregressive decoding, so its τ "
        "is 1 by definition.",
        "",
        "Intervals: `x [lo, hi]` is a 95% percentile bootstrap interval over questions (2,000 resamples; for "
        "a speed-up, also over each question's timed runs, drawn per side). A cell without one had a single "
        f"question. {NOT_DISTINGUISHABLE} marks a speed-up whose interval contains 1.0: on this run it is not "
        "distinguishable from the baseline.",
        "",
        "## AVG: τ and speed-up with 95% intervals",
        "",
        headline_table(summary),
        "",
        "## Table 1. τ and speed-up vs `ar` (our plain decoding)",
        "",
        tau_sr_table(summary, "ar"),
        "",
        "## Table 2. τ and speed-up vs `hf` (transformers `generate` on the same model)",
        "",
        tau_sr_table(summary, "hf"),
        "",
        "## Table 3. Tokens/s (mean over questions)",
        "",
        tokens_per_s_table(summary),
        "",
        "## Acceptance rate per draft depth",
        "",
        "Rate at depth d = rounds that accepted ≥ d draft tokens / rounds that accepted ≥ d − 1 in a tree "
        "grown to depth d (n = those rounds), with its interval over questions.",
        "",
        acceptance_table(summary),
        "",
        "## Draft candidates by source",
        "",
        "What proposed the verified nodes: the draft `head`, or `match`es in the text so far (a candidate both "
        "propose is verified once and counts as the head's, so `match` is what matching adds). Per "
        "verification round, rounds without a tree included.",
        "",
        sources_table(summary),
        "",
        "## Per-step latency (ms per verification round, share of the round)",
        "",
        "The decoding loop's stage clock: draft = the draft's catch-up on the last round's tokens, the tree "
        "and tree sizing's node choice; the verify pass is one forward, split between its verify rows (root "
        "and nodes) and ConFu's contemplate rows by the target's verify-cost curve (an estimate: the marginal "
        "time of the slots' rows on the curve, as no clock can split one forward); accept = the logits rows "
        "verification reads and the acceptance test or sampling; "
        "bookkeeping = the cache commit, the next round's features and `f`, tree sizing's clock.",
        "",
        latency_table(summary),
        "",
        "## Where the time goes (the loop's own clocks)",
        "",
        "Draft = tree drafting plus the draft's catch-up on the accepted tokens; verify = the target pass, "
        "acceptance and the KV compaction. `rounds / wall` is the share of the generation time spent in "
        "rounds; the rest is prefill and the loop around it.",
        "",
        timing_table(summary),
        "",
        "## KV-cache footprint per method (from the allocated tensors)",
        "",
        "Target KV per token: keys and values of one position over all layers. ConFu's soft prompt sits in "
        "the target cache for the whole sequence; its contemplate slots are written by each verify pass and "
        "dropped by its commit (mean and largest per round). Allocated: the buffers as grown by the longest "
        "sequence (the target's doubles when full; the draft's is sized for the context).",
        "",
        memory_table(summary),
        "",
        "## MoE utilisation of ConFu's `[con]` and `[f]` routers",
        "",
        "Over every routing decision of the run ([con]: one per verify pass with slots; [f]: one per "
        "drafted round's future token). Entropy: of the router's softmax over its experts, mean per "
        "decision; load: an expert's share of the mixture weight over the run (its entropy 100% = all "
        "experts used equally); top expert's weight: mean weight of the first of the kept experts; chosen "
        "share: how often each expert is among the kept top-k.",
        "",
        routing_table(summary),
        "",
    ]
    ident = [(s, ref) for s in summary["settings"] for ref in ("ar", *GREEDY_REFERENCE.values())
             if f"greedy_identity_vs_{ref}" in s]
    if ident:
        lines += ["## Lossless check at T=0 (token-identical to plain decoding)", ""]
        for s, ref in ident:
            g = s[f"greedy_identity_vs_{ref}"]
            lines.append(f"- {setting_name((s['method'], s['temperature'], s['tree_nodes']))}: "
                         f"{g['identical']}/{g['compared']} questions identical to `{ref}`")
        lines += ["", "(With the CPU kernels and row-invariant attention (target numerics above) a tree node's logits "
                  "are the one-token step's bits, so a mismatch is a bug; without them (transformers' modules, "
                  "SDPA, GPU) rounding differs by batch shape and an exact near-tie can flip.)", ""]
        if any(s["kind"] == VLLM for s, _ in ident):
            lines += ["(`vllm` against `ar` compares two engines, whose sums run in different orders: a near-tie can "
                      "flip and the texts part from there. vLLM's EAGLE-3 is checked against `vllm`, its own "
                      "plain decoding.)", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
