"""Pure summaries of `confu bench` records (the report's numbers) and the CLI's console tables.

Metrics follow Spec-Bench and the ConFu paper exactly:

- tau = mean over verification steps of (accepted draft tokens + 1), pooled over all steps of all questions
  of a group. Plain decoding scores exactly 1.0 (every step verifies the root alone); `hf` (transformers
  `generate`) and `vllm` (vLLM's plain decoding) are plain autoregressive decoding too and expose no steps,
  so their tau is 1.0 by definition. `vllm-eagle3` records hold the rounds vLLM's spec-decode counters tell
  (`confu.bench.vllm_engine`): their tau is vLLM's mean acceptance length, 1 + accepted / drafts.
- tokens/s of a question = new tokens / wall time of its generation, both turns together.
- SR = mean over questions of method tokens/s / mean over the same questions of baseline tokens/s, the
  baseline (`ar` or `hf`) at the same temperature, in the same run. Only questions both have finished count,
  so an interrupted run never compares different question sets.
- AVG pools every selected question (so a category weighs by its number of questions, and MT-bench's math
  and reasoning, which have no column of their own in the paper, count in AVG).
- Every tau, SR and acceptance rate comes with a 95% interval, bootstrapped over questions (and over a
  question's timed repeats for SR; `confu.bench.stats`). None where fewer than two questions.

A record is one question x method x setting (see `confu.bench.specbench` for how it is produced):
    question_id, category, method (label), kind (ar | hf | eagle3 | confu | vllm | vllm-eagle3), temperature,
    tree_nodes (None for ar / hf / vLLM's), new_tokens, wall_s, tokens_per_s, turns [...], steps {accepted,
    tree_nodes, contemplate_slots, verify_tokens, draft_s, verify_s, stage_s {stage: [...]}} (parallel lists
    over rounds; None for hf and vllm; only accepted and depth for vllm-eagle3),
    timings [{new_tokens, wall_s}] (one per timed run), memory {KV bytes}, routing {router: tally}.
Everything here is a function of the records (and the verify-cost curve handed in), so a test can
hand-compute every number.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import fmean
from typing import Any

from confu.bench.stats import Interval, bootstrap_ratio, depth_counts, merge_tallies, utilisation
from confu.bench.vllm_engine import VLLM, VLLM_EAGLE3

# Spec-Bench category -> the paper's column name, in the paper's column order.
PAPER_COLUMNS: dict[str, str] = {
    "writing": "WRIT",
    "roleplay": "RP",
    "coding": "CODE",
    "extraction": "EXT",
    "stem": "STEM",
    "humanities": "HUM",
    "summarization": "SUMM",
    "translation": "TRAN",
    "qa": "QA",
    "rag": "RAG",
    "math_reasoning": "M/R",
}
BASELINE_KINDS = ("ar", "hf")
NO_ROUND_KINDS = ("hf", VLLM)  # plain decoding whose engine exposes no verification rounds: tau is 1 by definition
# The plain decoding a method's T=0 tokens must equal: its own engine's.
GREEDY_REFERENCE = {VLLM_EAGLE3: VLLM}
AVG = "AVG"

SettingKey = tuple[str, float, "int | None"]


def setting_key(rec: dict) -> SettingKey:
    return (rec["method"], float(rec["temperature"]), rec.get("tree_nodes"))


def setting_name(key: SettingKey) -> str:
    method, temp, nodes = key
    return f"{method} T={temp:g}" + ("" if nodes is None else f" nodes={nodes}")


def column_name(category: str) -> str:
    return PAPER_COLUMNS.get(category, category)


def order_categories(categories: Iterable[str]) -> list[str]:
    """Paper columns first in the paper's order, then any other category (e.g. MT-bench math) by name."""
    present = set(categories)
    known = [c for c in PAPER_COLUMNS if c in present]
    return known + sorted(present - set(PAPER_COLUMNS))


# -- per-group metrics ---------------------------------------------------------------------------------------


def _accepted(records: Iterable[dict]) -> list[int]:
    out: list[int] = []
    for rec in records:
        steps = rec.get("steps")
        if steps:
            out.extend(int(a) for a in steps["accepted"])
    return out


def pooled_tau(records: Sequence[dict]) -> float | None:
    """Mean of (accepted + 1) over every step of every record; 1.0 for `hf` and `vllm` (no steps, one token per
    pass)."""
    if records and all(r["kind"] in NO_ROUND_KINDS for r in records):
        return 1.0
    accepted = _accepted(records)
    if not accepted:
        return None
    return sum(a + 1 for a in accepted) / len(accepted)


def tau_interval(records: Sequence[dict]) -> Interval | None:
    """pooled_tau's interval: the questions resampled, each with all its rounds."""
    with_steps = [r for r in records if r.get("steps")]
    if not with_steps:
        return None
    return bootstrap_ratio([sum(a + 1 for a in r["steps"]["accepted"]) for r in with_steps],
                           [len(r["steps"]["accepted"]) for r in with_steps])


def mean_tokens_per_s(records: Sequence[dict]) -> float | None:
    return fmean(r["tokens_per_s"] for r in records) if records else None


def _paired(method: Sequence[dict], baseline: Sequence[dict]) -> list[tuple[dict, dict]]:
    base_by_q = {r["question_id"]: r for r in baseline}
    return [(r, base_by_q[r["question_id"]]) for r in method if r["question_id"] in base_by_q]


def speedup(method: Sequence[dict], baseline: Sequence[dict]) -> float | None:
    """SR over the questions both sides have: mean method tokens/s / mean baseline tokens/s."""
    pairs = _paired(method, baseline)
    if not pairs:
        return None
    base_mean = fmean(b["tokens_per_s"] for _, b in pairs)
    if base_mean <= 0:
        return None
    return fmean(m["tokens_per_s"] for m, _ in pairs) / base_mean


def _timed_runs(rec: dict) -> list[float]:
    """tokens/s of each timed run of a record (records from before --repeats hold one)."""
    runs = [t["new_tokens"] / t["wall_s"] for t in rec.get("timings") or [] if t["wall_s"] > 0]
    return runs or [rec["tokens_per_s"]]


def speedup_interval(method: Sequence[dict], baseline: Sequence[dict]) -> Interval | None:
    """SR's interval: questions resampled in pairs, and one timed run per side of each."""
    pairs = _paired(method, baseline)
    return bootstrap_ratio([_timed_runs(m) for m, _ in pairs], [_timed_runs(b) for _, b in pairs])


# The rows of the latency table: the loop's stages (`confu.engine.generate.STAGES`), the verify pass split
# into its verify rows and its contemplate rows.
LATENCY_ROWS = ("draft", "verify rows", "contemplate rows", "accept", "bookkeeping")


def contemplate_shares(rows: Sequence[int], slots: Sequence[int],
                       verify_costs: tuple[Sequence[int], Sequence[float]] | None) -> list[float]:
    """Per round, the share of its verify pass that its contemplate slots cost.

    A pass is one forward, so its time cannot be split by a clock. With the target's verify-cost curve
    (seconds against rows, `confu.engine.sizing.VerifyCosts`) the slots cost the marginal time of their rows,
    1 - cost(rows - slots) / cost(rows); without it, their share of the rows (an overestimate: a pass's
    time grows slower than its rows).
    """
    if verify_costs is None:
        return [s / r if r else 0.0 for s, r in zip(slots, rows, strict=True)]
    from confu.engine.sizing import VerifyCosts

    cost = VerifyCosts(list(verify_costs[0]), list(verify_costs[1]))
    # clamped: a curve measured on a noisy machine need not be monotone
    return [min(1.0, max(0.0, 1 - cost(r - s) / cost(r))) if s and cost(r) > 0 else 0.0
            for s, r in zip(slots, rows, strict=True)]


def stage_latency(stage_s: dict[str, list[float]], shares: Sequence[float]) -> dict[str, dict[str, float]]:
    """Mean ms per round of each `LATENCY_ROWS` entry and its share of the round."""
    verify = stage_s["verify"]
    per_row = {
        "draft": stage_s["draft"],
        "verify rows": [v * (1 - c) for v, c in zip(verify, shares, strict=True)],
        "contemplate rows": [v * c for v, c in zip(verify, shares, strict=True)],
        "accept": stage_s["accept"],
        "bookkeeping": stage_s["bookkeeping"],
    }
    total = sum(sum(v) for v in per_row.values())
    return {name: {"ms": 1000 * fmean(v), "share": sum(v) / total if total > 0 else 0.0}
            for name, v in per_row.items()}


def timing_breakdown(records: Sequence[dict],
                     verify_costs: tuple[Sequence[int], Sequence[float]] | None = None) -> dict[str, Any]:
    """Where one method's time goes, per verification round.

    `draft_ms` / `verify_ms` are the loop's own two clocks (`StepRecord`); `stages` the stage clock's laps
    (records that have them), with the verify pass split by `contemplate_shares`. The root's slot counts.
    """
    draft, verify, slots, rows, nodes, depths = [], [], [], [], [], []
    stage_s: dict[str, list[float]] = defaultdict(list)
    staged = True
    wall = sum(r["wall_s"] for r in records)
    for rec in records:
        steps = rec.get("steps")
        if not steps or "verify_s" not in steps:  # vLLM's rounds carry no clocks
            continue
        staged = staged and "stage_s" in steps
        for stage, laps in steps.get("stage_s", {}).items():
            stage_s[stage].extend(laps)
        draft.extend(steps["draft_s"])
        verify.extend(steps["verify_s"])
        slots.extend(steps["contemplate_slots"])
        rows.extend(steps["verify_tokens"])
        nodes.extend(steps["tree_nodes"])
        depths.extend(steps.get("depth", []))  # records from before tree sizing have none
    if not verify:
        return {"rounds": 0, "draft_ms": None, "verify_ms": None, "tree_nodes": None, "depth": None,
                "no_draft_share": None, "verify_tokens": None,
                "contemplate_slots": None, "contemplate_share_est": None, "contemplate_ms_est": None,
                "rounds_share_of_wall": None, "stages": None}
    share = contemplate_shares(rows, slots, verify_costs)
    return {
        "rounds": len(verify),
        "draft_ms": 1000 * fmean(draft),
        "verify_ms": 1000 * fmean(verify),
        "tree_nodes": fmean(nodes),
        "depth": fmean(depths) if depths else None,
        "no_draft_share": sum(d == 0 for d in depths) / len(depths) if depths else None,
        "verify_tokens": fmean(rows),
        "contemplate_slots": fmean(slots),
        "contemplate_share_est": fmean(share),
        "contemplate_ms_est": 1000 * fmean(v * s for v, s in zip(verify, share, strict=True)),
        # The rest of the wall time is prefill, the first token and Python around the loop.
        "rounds_share_of_wall": (sum(draft) + sum(verify)) / wall if wall > 0 else None,
        "contemplate_split": "row count" if verify_costs is None else "verify-cost curve",
        "stages": stage_latency(stage_s, share) if staged else None,
    }


def kv_memory(records: Sequence[dict]) -> dict[str, float] | None:
    """KV bytes of one method: the records' largest tensors, and the contemplate slots' transient entries
    per round (mean and largest) at the target's bytes per token."""
    measured = [r["memory"] for r in records if r.get("memory")]
    if not measured:
        return None
    out: dict[str, float] = {k: max(m[k] for m in measured) for k in measured[0]}
    slots = [s for r in records if r.get("steps") for s in r["steps"]["contemplate_slots"]]
    out["contemplate_per_round"] = fmean(slots) * out["target_kv_per_token"] if slots else 0.0
    out["contemplate_max_round"] = max(slots, default=0) * out["target_kv_per_token"]
    return out


def routing_utilisation(records: Sequence[dict]) -> dict[str, dict] | None:
    """Utilisation of each router over the records' decisions (`confu.bench.stats.utilisation`)."""
    routers = sorted({name for r in records for name in (r.get("routing") or {})})
    out = {}
    for name in routers:
        tally = merge_tallies([(r.get("routing") or {}).get(name) for r in records])
        if tally is not None:
            out[name] = utilisation(tally)
    return out or None


def acceptance_profile(records: Sequence[dict], max_depth: int | None = None) -> dict[str, list[dict]]:
    """Acceptance rate per draft depth, with its interval, and the survival function of the accept length.

    rate(d) = #rounds accepting >= d draft tokens / #rounds accepting >= d - 1 whose tree was grown to depth
    d (records from before the loop recorded depths: all rounds accepting >= d - 1);
    its interval resamples questions. survival(n) = P(accept length >= n), accept length = accepted + 1, so
    survival(1) = 1.
    """
    accepted = _accepted(records)
    if not accepted:
        return {"per_depth": [], "survival": []}
    depth = max(max(accepted), max_depth or 0, 1)
    per_question = [depth_counts([int(a) for a in r["steps"]["accepted"]], depth, r["steps"].get("depth"))
                    for r in records if r.get("steps")]
    reached = [sum(n[d] for n, _ in per_question) for d in range(depth)]
    got = [sum(g[d] for _, g in per_question) for d in range(depth)]
    per_depth = []
    for d in range(depth):
        ci = bootstrap_ratio([g[d] for _, g in per_question], [n[d] for n, _ in per_question])
        per_depth.append({"depth": d + 1, "reached": reached[d], "rate": got[d] / reached[d] if reached[d] else None,
                          "ci": None if ci is None else [ci.lo, ci.hi]})
    n_rounds = len(accepted)
    survival = [{"n": n, "p": sum(1 for a in accepted if a + 1 >= n) / n_rounds} for n in range(1, depth + 2)]
    return {"per_depth": per_depth, "survival": survival}


def candidate_sources(records: Sequence[dict]) -> dict[str, dict[str, float]] | None:
    """Per source of draft candidates (a draft "head", "match"es in the text so far), over every round: nodes
    verified and accepted per round, the share of them accepted, and the source's share of all accepted draft
    tokens. None without per-source step records (plain decoding, records from before they were kept)."""
    nodes: dict[str, int] = defaultdict(int)
    accepted: dict[str, int] = defaultdict(int)
    rounds = 0
    for rec in records:
        steps = rec.get("steps") or {}
        if "nodes_by_source" not in steps:
            continue
        rounds += len(steps["nodes_by_source"])
        for counts in steps["nodes_by_source"]:
            for source, n in counts.items():
                nodes[source] += n
        for path in steps["accepted_sources"]:
            for source in path:
                accepted[source] += 1
    if not nodes:
        return None
    total = sum(accepted.values())
    return {source: {"nodes_per_round": n / rounds, "accepted_per_round": accepted[source] / rounds,
                     "acceptance": accepted[source] / n, "share_of_accepted": accepted[source] / total if total else 0.0}
            for source, n in sorted(nodes.items())}


def greedy_identity(records: Sequence[dict], reference: Sequence[dict]) -> dict[str, int]:
    """At T=0 every lossless method must emit the reference's tokens: count questions that match exactly."""
    ref = {r["question_id"]: [t.get("tokens") for t in r.get("turns", [])] for r in reference}
    compared = identical = 0
    for rec in records:
        if rec["question_id"] not in ref:
            continue
        mine = [t.get("tokens") for t in rec.get("turns", [])]
        if any(t is None for t in mine) or any(t is None for t in ref[rec["question_id"]]):
            continue
        compared += 1
        identical += mine == ref[rec["question_id"]]
    return {"compared": compared, "identical": identical}


# -- the whole run -------------------------------------------------------------------------------------------


def _bounds(ci: Interval | None) -> list[float] | None:
    return None if ci is None else [ci.lo, ci.hi]


def _group_metrics(recs: Sequence[dict], base: dict[str, Sequence[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_questions": len(recs),
        "tau": pooled_tau(recs),
        "tau_ci": _bounds(tau_interval(recs)),
        "tokens_per_s": mean_tokens_per_s(recs),
        "new_tokens": fmean(r["new_tokens"] for r in recs) if recs else None,
    }
    for kind in BASELINE_KINDS:
        out[f"sr_vs_{kind}"] = speedup(recs, base[kind]) if base.get(kind) else None
        out[f"sr_vs_{kind}_ci"] = _bounds(speedup_interval(recs, base[kind])) if base.get(kind) else None
    return out


def _sort_key(key: SettingKey, kind: str, method_order: dict[str, int]) -> tuple:
    method, temp, nodes = key
    if kind in BASELINE_KINDS:  # baselines on top, by temperature
        return (0, temp, BASELINE_KINDS.index(kind), 0, 0)
    # "auto" sizing before fixed node counts (a plain sort of the mixed values fails on str < int)
    size = (1, nodes) if isinstance(nodes, int) else (0, 0)
    return (1, size, temp, method_order[method], 0)


def summarize(records: Sequence[dict], max_depth: int | None = None,
              verify_costs: tuple[Sequence[int], Sequence[float]] | None = None) -> dict[str, Any]:
    """Every metric of the report, computed from the records (and the verify-cost curve, which splits a
    pass's time between verify and contemplate rows; None: by row count).

    Returns {"categories": [...], "settings": [{method, kind, temperature, tree_nodes,
    per_category {cat: metrics}, avg (metrics over all questions), timing, acceptance, memory, routing,
    greedy_identity_vs_ar (T=0 only; vs_vllm for vllm-eagle3)}]}.
    """
    groups: dict[SettingKey, list[dict]] = defaultdict(list)
    kinds: dict[str, str] = {}
    method_order: dict[str, int] = {}
    for rec in records:
        groups[setting_key(rec)].append(rec)
        kinds[rec["method"]] = rec["kind"]
        method_order.setdefault(rec["method"], len(method_order))
    categories = order_categories(r["category"] for r in records)

    # The baseline of every setting: the ar / hf records at the same temperature (and vLLM's plain decoding,
    # the greedy reference of vLLM's EAGLE-3).
    baselines: dict[tuple[str, float], list[dict]] = {}
    for (method, temp, _nodes), recs in groups.items():
        if kinds[method] in (*BASELINE_KINDS, VLLM):
            if (kinds[method], temp) in baselines:
                raise ValueError(f"two {kinds[method]} baselines at T={temp:g}")
            baselines[(kinds[method], temp)] = recs

    settings = []
    for key in sorted(groups, key=lambda k: _sort_key(k, kinds[k[0]], method_order)):
        method, temp, nodes = key
        recs = groups[key]
        base_all = {kind: baselines.get((kind, temp), []) for kind in BASELINE_KINDS}
        per_category = {}
        for cat in categories:
            cat_recs = [r for r in recs if r["category"] == cat]
            if not cat_recs:
                continue
            base_cat = {k: [r for r in v if r["category"] == cat] for k, v in base_all.items()}
            per_category[cat] = _group_metrics(cat_recs, base_cat)
        entry: dict[str, Any] = {
            "key": setting_name(key),
            "method": method,
            "kind": kinds[method],
            "temperature": temp,
            "tree_nodes": nodes,
            "per_category": per_category,
            "avg": _group_metrics(recs, base_all),
            "timing": timing_breakdown(recs, verify_costs),
            "acceptance": acceptance_profile(recs, max_depth) if kinds[method] not in NO_ROUND_KINDS else None,
            "memory": kv_memory(recs),
            "routing": routing_utilisation(recs),
            "sources": candidate_sources(recs),
        }
        reference = GREEDY_REFERENCE.get(kinds[method], "ar")
        if temp == 0 and kinds[method] != reference and baselines.get((reference, temp)):
            entry[f"greedy_identity_vs_{reference}"] = greedy_identity(recs, baselines[(reference, temp)])
        settings.append(entry)
    return {"categories": categories, "settings": settings}


def compact_summary(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per method / setting: tau, SR vs ar, SR vs hf, tokens/s (the CLI's last JSON line)."""

    def r(x: float | None, nd: int = 4) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)

    return [
        {
            "method": s["method"],
            "temperature": s["temperature"],
            "tree_nodes": s["tree_nodes"],
            "tau": r(s["avg"]["tau"]),
            "sr_vs_ar": r(s["avg"]["sr_vs_ar"]),
            "sr_vs_hf": r(s["avg"]["sr_vs_hf"]),
            "tokens_per_s": r(s["avg"]["tokens_per_s"], 3),
        }
        for s in summary["settings"]
    ]


# -- console tables (the CLI's human-readable output) --------------------------------------------------------


def fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"



def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def render_bench_console(compact: Sequence[dict[str, Any]]) -> str:
    rows = [[c["method"], "-" if c["tree_nodes"] is None else str(c["tree_nodes"]), f"{c['temperature']:g}",
             fmt(c["tau"]), fmt(c["sr_vs_ar"]), fmt(c["sr_vs_hf"]), fmt(c["tokens_per_s"], 1)]
            for c in compact]
    return text_table(["method", "nodes", "T", "tau", "SR/ar", "SR/hf", "tok/s"], rows)


def render_ar_console(res: dict[str, Any]) -> str:
    rows = [[str(r["prompt"]), str(r["prompt_tokens"]), f"{r['ours_tokens']}/{r['hf_tokens']}",
             f"{r['ours_ms']:.0f}", f"{r['hf_ms']:.0f}", f"{r['ours_best_ms']:.0f}", f"{r['hf_best_ms']:.0f}",
             "yes" if r["identical"] else f"no (at {r['first_difference']})"]
            for r in res["rows"]]
    table = text_table(["prompt", "prompt tok", "new tok ours/hf", "ours ms", "hf ms", "ours best",
                        "hf best", "identical"], rows)
    return "\n".join([
        f"greedy, {res['max_new_tokens']} new tokens max; median and best of {res['repeats']} after warm-up",
        table,
        f"median: ours {res['ours_tokens_per_s']:.1f} tok/s, hf {res['hf_tokens_per_s']:.1f} tok/s, ratio "
        f"{res['ratio']:.3f} ({'within' if res['within_10pct'] else 'NOT within'} 10% of HF)",
        f"best:   ours {res['ours_best_tokens_per_s']:.1f} tok/s, hf {res['hf_best_tokens_per_s']:.1f} "
        f"tok/s, ratio {res['best_ratio']:.3f}",
        f"outputs {'token-identical' if res['identical'] else 'DIFFER (see the identical column)'}",
    ])


def render_verify_console(res: dict[str, Any]) -> str:
    cols = res["columns"]
    parts = []
    for stat, title in (("ms", "median"), ("best_ms", "best")):
        rows = [[str(r["nodes"]), str(r["tree_nodes"])]
                + [f"{r['columns'][c][stat]:.1f} ({r['columns'][c]['tokens']})" for c in cols]
                for r in res["rows"]]
        parts.append(f"verify pass, {title} of {res['repeats']} after warm-up; prompt {res['prompt_tokens']} "
                     "tokens; ms (tokens in the pass)")
        parts.append(text_table(["nodes", "tree"] + cols, rows) + "\n")
    return "\n".join(parts).rstrip()
