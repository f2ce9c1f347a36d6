"""The statistics of a benchmark report, as pure functions of numbers (no torch, no records).

- Confidence intervals by the bootstrap over questions (a question is the unit Spec-Bench samples; its rounds
  are not independent draws, so resampling rounds would understate the spread). Every metric of the report
  is a ratio of sums over questions: tau = sum of accept lengths / rounds, the acceptance rate at a depth =
  rounds that got there / rounds that reached the depth before, SR = sum of method tokens/s / sum of baseline
  tokens/s over the same questions. `bootstrap_ratio` resamples questions and, where a question was timed more
  than once, one of its repeats per side, so the interval of a speed-up carries the run-to-run timing noise as
  well as the spread over questions. Percentile intervals, seeded: a report is reproducible.
- Acceptance by draft depth: per question counts that the bootstrap sums.
- MoE routing: tallies of a router's decisions (kept per question, summed over a run) and the utilisation
  figures read from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def _as_repeats(values: Sequence[float | Sequence[float]]) -> list[list[float]]:
    return [[float(v)] if isinstance(v, int | float) else [float(x) for x in v] for v in values]


def _draw(repeats: list[list[float]], clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each resampled question (clusters, (B, n) indices) one of its repeats at random: (B, n) values."""
    counts = np.array([len(r) for r in repeats])
    if (counts == 1).all():
        return np.array([r[0] for r in repeats])[clusters]
    table = np.full((len(repeats), counts.max()), np.nan)
    for i, r in enumerate(repeats):
        table[i, : len(r)] = r
    pick = (rng.random(clusters.shape) * counts[clusters]).astype(np.int64)
    return table[clusters, pick]


def bootstrap_ratio(num: Sequence[float | Sequence[float]], den: Sequence[float | Sequence[float]],
                    samples: int = BOOTSTRAP_SAMPLES, level: float = LEVEL, seed: int = 0) -> Interval | None:
    """Percentile interval of sum(num) / sum(den) when the questions (index i of both) are resampled.

    num[i] and den[i] are a number or the repeats of one (timings of the same question run several times);
    a repeat is drawn per side independently (the method and its baseline were timed in separate runs).
    None when fewer than two questions: one question gives no spread to resample.
    """
    if len(num) != len(den):
        raise ValueError(f"num has {len(num)} questions, den {len(den)}")
    if len(num) < 2:
        return None
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, len(num), size=(samples, len(num)))
    tops = _draw(_as_repeats(num), clusters, rng).sum(axis=1)
    bottoms = _draw(_as_repeats(den), clusters, rng).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = tops / bottoms
    ratios = ratios[np.isfinite(ratios)]
    if not len(ratios):
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return Interval(float(lo), float(hi))


# -- acceptance by draft depth -------------------------------------------------------------------------------


def depth_counts(accepted: Sequence[int], depth: int,
                 grown: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(reached, got) for depths 1..depth: rounds whose accepted path reached depth d - 1 in a tree grown to
    depth d or deeper (`grown`, per round; None: every tree counts as deep enough), and rounds that accepted
    a token at depth d. Under tree sizing many rounds draft one level or none: without `grown` they would
    count as misses at the depths they never tried."""
    grown = grown if grown is not None else [depth] * len(accepted)
    reached = [sum(1 for a, g in zip(accepted, grown, strict=True) if a >= d - 1 and g >= d)
               for d in range(1, depth + 1)]
    got = [sum(1 for a in accepted if a >= d) for d in range(1, depth + 1)]
    return reached, got


# -- MoE routing ---------------------------------------------------------------------------------------------


def router_tally(logits: np.ndarray, top_k: int) -> dict:
    """Sufficient statistics of a router's decisions, logits (n, E): softmax gates, the top-k kept (as
    `EmbeddingMoE` keeps them). Tallies of several questions add up with `merge_tallies`."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, np.shape(logits)[-1])
    n, experts = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)
    gates = np.exp(z)
    gates /= gates.sum(axis=1, keepdims=True)
    k = min(top_k, experts)
    top = np.argsort(-gates, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(gates, top, axis=1)
    weights = kept / kept.sum(axis=1, keepdims=True)  # the mixture's weights after renormalisation
    chosen = np.zeros(experts)
    mixture = np.zeros(experts)
    np.add.at(chosen, top.ravel(), 1)
    np.add.at(mixture, top.ravel(), weights.ravel())
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(gates > 0, gates * np.log(gates), 0.0).sum(axis=1)
    return {"decisions": int(n), "top_k": k, "chosen": chosen.tolist(), "mixture_weight": mixture.tolist(),
            "entropy_sum": float(entropy.sum()), "top_weight_sum": float(weights[:, 0].sum())}


def merge_tallies(tallies: Sequence[dict]) -> dict | None:
    tallies = [t for t in tallies if t and t["decisions"]]
    if not tallies:
        return None
    out = {"decisions": sum(t["decisions"] for t in tallies), "top_k": tallies[0]["top_k"]}
    for key in ("chosen", "mixture_weight"):
        out[key] = np.sum([t[key] for t in tallies], axis=0).tolist()
    for key in ("entropy_sum", "top_weight_sum"):
        out[key] = sum(t[key] for t in tallies)
    return out


def utilisation(tally: dict) -> dict:
    """What a referee asks of a router, from a tally:

    - chosen_share[e]: the share of decisions that kept expert e in their top-k (sums to top_k);
    - load[e]: expert e's share of the total mixture weight (sums to 1);
    - entropy: mean entropy of the router's softmax over the experts, in nats and as a fraction of ln E
      (1: the router spreads its gates evenly, 0: it is sure);
    - load_entropy: entropy of `load` as a fraction of ln E (1: every expert is used equally over the run);
    - top_weight: mean weight of the first expert within the kept mixture (1: one expert decides);
    - busiest_load: the largest `load` (1: one expert does all the work).
    """
    n, experts = tally["decisions"], len(tally["chosen"])
    load = np.asarray(tally["mixture_weight"]) / n
    log_e = math.log(experts) if experts > 1 else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        load_entropy = float(-np.where(load > 0, load * np.log(load), 0.0).sum())
    entropy = tally["entropy_sum"] / n
    return {
        "decisions": n, "experts": experts, "top_k": tally["top_k"],
        "chosen_share": (np.asarray(tally["chosen"]) / n).tolist(), "load": load.tolist(),
        "entropy_nats": entropy, "entropy_norm": entropy / log_e if experts > 1 else 0.0,
        "load_entropy_norm": load_entropy / log_e if experts > 1 else 0.0,
        "top_weight": tally["top_weight_sum"] / n, "busiest_load": float(load.max()),
    }
