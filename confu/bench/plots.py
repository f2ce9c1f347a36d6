"""The plots of a `confu bench` report (matplotlib, PNG), from `confu.bench.report.summarize`'s output.

- `accept_<method>.png`: acceptance rate per draft depth with its 95% interval, and P(accept length >= n),
  a line per setting;
- `latency.png`: each method's round split into the loop's stages (ms), one bar per method and setting;
- `moe_<method>.png`: each router's load per expert (share of the mixture weight), one panel per router.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from confu.bench.report import BASELINE_KINDS, LATENCY_ROWS


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "method"


def _label(s: dict) -> str:
    return f"nodes={s['tree_nodes']} T={s['temperature']:g}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str | Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(Path(out_dir) / name, dpi=100)
    return name


def _acceptance_plots(plt, summary: dict[str, Any], out_dir: str | Path) -> list[str]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for s in summary["settings"]:
        if s["kind"] not in BASELINE_KINDS and s["acceptance"] and s["acceptance"]["per_depth"]:
            by_method[s["method"]].append(s)
    names = []
    for method, settings in by_method.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for s in settings:
            per_depth = [p for p in s["acceptance"]["per_depth"] if p["rate"] is not None]
            rates = [p["rate"] for p in per_depth]
            lows = [r - (p["ci"] or [r, r])[0] for r, p in zip(rates, per_depth, strict=True)]
            highs = [(p["ci"] or [r, r])[1] - r for r, p in zip(rates, per_depth, strict=True)]
            ax1.errorbar([p["depth"] for p in per_depth], rates, yerr=[lows, highs], marker="o", capsize=3,
                         label=_label(s))
            surv = s["acceptance"]["survival"]
            ax2.plot([p["n"] for p in surv], [p["p"] for p in surv], marker="o", label=_label(s))
        ax1.set(title=f"{method}: acceptance rate per depth (95% CI)", xlabel="draft depth d",
                ylabel="P(accept d | reached d-1)", ylim=(0, 1.05))
        ax2.set(title=f"{method}: P(accept length >= n)", xlabel="n", ylabel="fraction of rounds",
                ylim=(0, 1.05))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        names.append(_save(fig, out_dir, f"accept_{_safe(method)}.png"))
        plt.close(fig)
    return names


def _latency_plot(plt, summary: dict[str, Any], out_dir: str | Path) -> list[str]:
    staged = [s for s in summary["settings"] if s["timing"].get("stages")]
    if not staged:
        return []
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(staged) + 2), 4))
    labels = [f"{s['method']}\n{_label(s)}" if s["tree_nodes"] is not None else f"{s['method']}\nT={s['temperature']:g}"
              for s in staged]
    bottom = [0.0] * len(staged)
    for row in LATENCY_ROWS:
        ms = [s["timing"]["stages"][row]["ms"] for s in staged]
        ax.bar(range(len(staged)), ms, bottom=bottom, label=row)
        bottom = [b + m for b, m in zip(bottom, ms, strict=True)]
    ax.set_xticks(range(len(staged)), labels, fontsize=7, rotation=45, ha="right")
    ax.set(title="ms per verification round, by stage", ylabel="ms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    name = _save(fig, out_dir, "latency.png")
    plt.close(fig)
    return [name]


def _routing_plots(plt, summary: dict[str, Any], out_dir: str | Path) -> list[str]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for s in summary["settings"]:
        if s.get("routing"):
            by_method[s["method"]].append(s)
    names = []
    for method, settings in by_method.items():
        routers = sorted({r for s in settings for r in s["routing"]})
        fig, axes = plt.subplots(1, len(routers), figsize=(5 * len(routers), 3.6), squeeze=False)
        for ax, router in zip(axes[0], routers, strict=True):
            present = [s for s in settings if router in s["routing"]]
            width = 0.8 / len(present)
            for i, s in enumerate(present):
                load = s["routing"][router]["load"]
                ax.bar([e + i * width for e in range(len(load))], load, width=width, label=_label(s))
            ax.set(title=f"{method}: [{router}] load per expert", xlabel="expert", ylabel="share of mixture weight")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        names.append(_save(fig, out_dir, f"moe_{_safe(method)}.png"))
        plt.close(fig)
    return names


def write_plots(summary: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Every plot of the report; returns the file names written into `out_dir`."""
    plt = _pyplot()
    return (_acceptance_plots(plt, summary, out_dir) + _latency_plot(plt, summary, out_dir)
            + _routing_plots(plt, summary, out_dir))
