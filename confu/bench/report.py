"""Pure summaries of `confu bench` records, the Markdown report and the acceptance plots.

Metrics follow Spec-Bench and the ConFu paper exactly (reference NOTES section 3):

- tau = mean over verification steps of (accepted draft tokens + 1), pooled over all steps of all questions
  of a group. Plain decoding scores exactly 1.0 (every step verifies the root alone); `hf` (transformers
  `generate`) is plain autoregressive decoding too and exposes no steps, so its tau is 1.0 by definition.
- tokens/s of a question = new tokens / wall time of its generation, both turns together.
- SR = mean over questions of method tokens/s / mean over the same questions of baseline tokens/s, the
  baseline (`ar` or `hf`) at the same temperature, in the same run. Only questions both have finished count,
  so an interrupted run never compares different question sets.
- AVG pools every selected question (so a category weighs by its number of questions, and MT-bench's math
  and reasoning, which have no column of their own in the paper, count in AVG).

A record is one question x method x setting (see `confu.bench.specbench` for how it is produced):
    question_id, category, method (label), kind (ar | hf | eagle3 | confu), temperature, tree_nodes (None for
    ar / hf), new_tokens, wall_s, tokens_per_s, turns [...], steps {accepted, tree_nodes, contemplate_slots,
    verify_tokens, draft_s, verify_s} (parallel lists over rounds, None for hf).
Everything here is a function of the records alone, so a test can hand-compute every number.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

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
KIND_ORDER = {"ar": 0, "hf": 1, "eagle3": 2, "confu": 3}
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
    """Mean of (accepted + 1) over every step of every record; 1.0 for `hf` (no steps, one token per pass)."""
    if records and all(r["kind"] == "hf" for r in records):
        return 1.0
    accepted = _accepted(records)
    if not accepted:
        return None
    return sum(a + 1 for a in accepted) / len(accepted)


def mean_tokens_per_s(records: Sequence[dict]) -> float | None:
    return fmean(r["tokens_per_s"] for r in records) if records else None


def speedup(method: Sequence[dict], baseline: Sequence[dict]) -> float | None:
    """SR over the questions both sides have: mean method tokens/s / mean baseline tokens/s."""
    base_by_q = {r["question_id"]: r for r in baseline}
    common = [r for r in method if r["question_id"] in base_by_q]
    if not common:
        return None
    base_mean = fmean(base_by_q[r["question_id"]]["tokens_per_s"] for r in common)
    if base_mean <= 0:
        return None
    return fmean(r["tokens_per_s"] for r in common) / base_mean


def timing_breakdown(records: Sequence[dict]) -> dict[str, float | int | None]:
    """Where one method's time goes, per verification round.

    The contemplate share of a verify pass is an estimate by token count (contemplate slots / rows of the
    pass): the pass is one forward, so its time cannot be split exactly. The root's slot counts too.
    """
    draft, verify, slots, rows, nodes, depths = [], [], [], [], [], []
    wall = sum(r["wall_s"] for r in records)
    for rec in records:
        steps = rec.get("steps")
        if not steps:
            continue
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
                "rounds_share_of_wall": None}
    share = [s / r if r else 0.0 for s, r in zip(slots, rows, strict=True)]
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
    }


def acceptance_profile(records: Sequence[dict], max_depth: int | None = None) -> dict[str, list[dict]]:
    """Acceptance rate per draft depth and the survival function of the accept length.

    rate(d) = #rounds accepting >= d draft tokens / #rounds accepting >= d - 1 (those that reached depth d).
    survival(n) = P(accept length >= n), accept length = accepted + 1, so survival(1) = 1.
    """
    accepted = _accepted(records)
    if not accepted:
        return {"per_depth": [], "survival": []}
    depth = max(max(accepted), max_depth or 0, 1)
    per_depth = []
    for d in range(1, depth + 1):
        reached = sum(1 for a in accepted if a >= d - 1)
        got = sum(1 for a in accepted if a >= d)
        per_depth.append({"depth": d, "reached": reached, "rate": got / reached if reached else None})
    n_rounds = len(accepted)
    survival = [{"n": n, "p": sum(1 for a in accepted if a + 1 >= n) / n_rounds} for n in range(1, depth + 2)]
    return {"per_depth": per_depth, "survival": survival}


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


def _group_metrics(recs: Sequence[dict], base: dict[str, Sequence[dict]]) -> dict[str, Any]:
    return {
        "n_questions": len(recs),
        "tau": pooled_tau(recs),
        "tokens_per_s": mean_tokens_per_s(recs),
        "new_tokens": fmean(r["new_tokens"] for r in recs) if recs else None,
        "sr_vs_ar": speedup(recs, base["ar"]) if base.get("ar") else None,
        "sr_vs_hf": speedup(recs, base["hf"]) if base.get("hf") else None,
    }


def _sort_key(key: SettingKey, kind: str, method_order: dict[str, int]) -> tuple:
    method, temp, nodes = key
    if kind in BASELINE_KINDS:  # baselines on top, by temperature
        return (0, temp, KIND_ORDER[kind], 0, 0)
    # "auto" sizing before fixed node counts (a plain sort of the mixed values fails on str < int)
    size = (1, nodes) if isinstance(nodes, int) else (0, 0)
    return (1, size, temp, method_order[method], 0)


def summarize(records: Sequence[dict], max_depth: int | None = None) -> dict[str, Any]:
    """Every metric of the report, computed from the records alone.

    Returns {"categories": [...], "settings": [{method, kind, temperature, tree_nodes,
    per_category {cat: metrics}, avg (metrics over all questions), timing, acceptance,
    greedy_identity_vs_ar (T=0 only)}]}.
    """
    groups: dict[SettingKey, list[dict]] = defaultdict(list)
    kinds: dict[str, str] = {}
    method_order: dict[str, int] = {}
    for rec in records:
        groups[setting_key(rec)].append(rec)
        kinds[rec["method"]] = rec["kind"]
        method_order.setdefault(rec["method"], len(method_order))
    categories = order_categories(r["category"] for r in records)

    # The baseline of every setting: the ar / hf records at the same temperature.
    baselines: dict[tuple[str, float], list[dict]] = {}
    for (method, temp, _nodes), recs in groups.items():
        if kinds[method] in BASELINE_KINDS:
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
            "timing": timing_breakdown(recs),
            "acceptance": acceptance_profile(recs, max_depth) if kinds[method] != "hf" else None,
        }
        if temp == 0 and kinds[method] != "ar" and base_all["ar"]:
            entry["greedy_identity_vs_ar"] = greedy_identity(recs, base_all["ar"])
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


# -- Markdown ------------------------------------------------------------------------------------------------


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _row_head(s: dict) -> list[str]:
    return [s["method"], "-" if s["tree_nodes"] is None else str(s["tree_nodes"]), f"{s['temperature']:g}"]


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
            row += ["-", "-"] if m is None else [_fmt(m["tau"]), _fmt(m[f"sr_vs_{baseline}"])]
        rows.append(row)
    return _table(header, rows)


def tokens_per_s_table(summary: dict[str, Any]) -> str:
    cats = summary["categories"]
    header = ["Method", "Nodes", "T"] + [column_name(c) for c in cats] + [AVG]
    rows = []
    for s in summary["settings"]:
        cells = [_fmt(s["per_category"][c]["tokens_per_s"]) if c in s["per_category"] else "-" for c in cats]
        rows.append(_row_head(s) + cells + [_fmt(s["avg"]["tokens_per_s"])])
    return _table(header, rows)


def timing_table(summary: dict[str, Any]) -> str:
    header = ["Method", "Nodes", "T", "rounds", "τ", "draft ms/round", "verify ms/round", "tree nodes",
              "depth", "rounds without draft", "verify tokens", "contemplate slots", "contemplate share (est.)",
              "contemplate ms (est.)", "rounds / wall"]
    rows = []
    for s in summary["settings"]:
        t = s["timing"]
        if not t["rounds"]:
            continue
        share = t["contemplate_share_est"]
        rows.append(_row_head(s) + [
            str(t["rounds"]), _fmt(s["avg"]["tau"]), _fmt(t["draft_ms"], 1), _fmt(t["verify_ms"], 1),
            _fmt(t["tree_nodes"], 1), _fmt(t.get("depth"), 1),
            "-" if t.get("no_draft_share") is None else f"{100 * t['no_draft_share']:.0f}%",
            _fmt(t["verify_tokens"], 1), _fmt(t["contemplate_slots"], 1),
            "-" if share is None else f"{100 * share:.0f}%", _fmt(t["contemplate_ms_est"], 1),
            "-" if t["rounds_share_of_wall"] is None else f"{100 * t['rounds_share_of_wall']:.0f}%",
        ])
    return _table(header, rows)


def acceptance_table(summary: dict[str, Any]) -> str:
    drafted = [s for s in summary["settings"] if s["kind"] not in BASELINE_KINDS and s["acceptance"]]
    depth = max((len(s["acceptance"]["per_depth"]) for s in drafted), default=0)
    if not depth:
        return "(no drafted rounds)"
    header = ["Method", "Nodes", "T"] + [f"d={d}" for d in range(1, depth + 1)]
    rows = []
    for s in drafted:
        rates = [_fmt(p["rate"]) for p in s["acceptance"]["per_depth"]]
        rows.append(_row_head(s) + rates + ["-"] * (depth - len(rates)))
    return _table(header, rows)


def render_report(summary: dict[str, Any], run_info: dict[str, Any], plots: Sequence[str]) -> str:
    counts = run_info.get("questions_per_category", {})
    count_text = ", ".join(f"{column_name(c)} {counts[c]}" for c in order_categories(counts)) or "-"
    lines = [
        f"# Spec-Bench results: {run_info.get('target', '?')}",
        "",
        f"- questions: {run_info.get('n_questions', '?')} ({count_text}); max new tokens per turn "
        f"{run_info.get('max_new_tokens', '?')}; temperatures {run_info.get('temperatures')}; tree nodes "
        f"{run_info.get('tree_nodes')}; depth {run_info.get('depth')}, top-k {run_info.get('topk')}; "
        f"contemplate {run_info.get('contemplate')}",
        f"- machine: {run_info.get('machine', '?')}; torch threads {run_info.get('torch_threads', '?')}; "
        f"batch size 1; warm-up {run_info.get('warmup', '?')} untimed run(s) of the first question per "
        "method and setting; methods interleaved per question",
        f"- target numerics: {run_info.get('numerics', '?')} (every method but `hf`, which runs transformers' own "
        "modules)",
        f"- draft numerics: {run_info.get('draft_numerics', '?')} (they change what a draft proposes, never what "
        "is emitted)",
        "",
        "Metrics (Spec-Bench / the ConFu paper): τ = mean accepted draft tokens + 1 per verification step, "
        "pooled over all steps of all questions; a question's tokens/s = new tokens / generation wall time, "
        "both turns together; SR = mean over questions of the method's tokens/s / mean over the same "
        "questions of the baseline's tokens/s at the same temperature. **AVG pools all questions** (each "
        "category weighs by its number of questions; MT-bench math and reasoning have no paper column and "
        "count in AVG). `hf` is plain autoregressive decoding, so its τ is 1 by definition.",
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
        "## Where the time goes (per verification round)",
        "",
        "Draft = tree drafting plus the draft's catch-up on the accepted tokens; verify = the target pass, "
        "acceptance and the KV compaction. The contemplate share is an **estimate "
        "by token count** (contemplate slots / rows of the pass): one forward cannot be split exactly. "
        "`rounds / wall` is the share of the generation time spent in rounds; the rest is prefill and the "
        "loop around it.",
        "",
        timing_table(summary),
        "",
        "## Acceptance rate per draft depth",
        "",
        "Rate at depth d = rounds that accepted ≥ d draft tokens / rounds that accepted ≥ d − 1.",
        "",
        acceptance_table(summary),
        "",
    ]
    ident = [s for s in summary["settings"] if "greedy_identity_vs_ar" in s]
    if ident:
        lines += ["## Lossless check at T=0 (token-identical to `ar`)", ""]
        for s in ident:
            g = s["greedy_identity_vs_ar"]
            lines.append(f"- {setting_name((s['method'], s['temperature'], s['tree_nodes']))}: "
                         f"{g['identical']}/{g['compared']} questions identical")
        lines += ["", "(With the CPU kernels and row-invariant attention (target numerics above) a tree node's logits "
                  "are the one-token step's bits, so a mismatch is a bug; without them (transformers' modules, "
                  "SDPA, GPU) rounding differs by batch shape and an exact near-tie can flip.)", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------------------


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "method"


def write_plots(summary: dict[str, Any], out_dir: str | Path) -> list[str]:
    """One PNG per drafted method: acceptance rate per depth and P(accept length >= n), a line per setting."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = defaultdict(list)
    for s in summary["settings"]:
        if s["kind"] not in BASELINE_KINDS and s["acceptance"] and s["acceptance"]["per_depth"]:
            by_method[s["method"]].append(s)
    names = []
    for method, settings in by_method.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for s in settings:
            label = f"nodes={s['tree_nodes']} T={s['temperature']:g}"
            per_depth = [p for p in s["acceptance"]["per_depth"] if p["rate"] is not None]
            ax1.plot([p["depth"] for p in per_depth], [p["rate"] for p in per_depth], marker="o", label=label)
            surv = s["acceptance"]["survival"]
            ax2.plot([p["n"] for p in surv], [p["p"] for p in surv], marker="o", label=label)
        ax1.set(title=f"{method}: acceptance rate per depth", xlabel="draft depth d",
                ylabel="P(accept d | reached d-1)", ylim=(0, 1.05))
        ax2.set(title=f"{method}: P(accept length >= n)", xlabel="n", ylabel="fraction of rounds",
                ylim=(0, 1.05))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"accept_{_safe(method)}.png"
        fig.savefig(Path(out_dir) / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


# -- console tables (the CLI's human-readable output) --------------------------------------------------------


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def render_bench_console(compact: Sequence[dict[str, Any]]) -> str:
    rows = [[c["method"], "-" if c["tree_nodes"] is None else str(c["tree_nodes"]), f"{c['temperature']:g}",
             _fmt(c["tau"]), _fmt(c["sr_vs_ar"]), _fmt(c["sr_vs_hf"]), _fmt(c["tokens_per_s"], 1)]
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
