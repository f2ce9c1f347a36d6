"""Hardware-aware tree sizing (`--tree-nodes auto`): whether to draft, how deep, and how many nodes to verify.

What a round costs comes from measurements on this machine: the target's verify pass against its row count,
measured once per target, numerics, device and thread count (`measure_verify_costs`, cached under
`$CONFU_CACHE/costs`), and the draft's cost per depth level, timed online. What a round yields comes from
acceptance observed online:
- a node's cumulative draft score estimates the log-probability that the target accepts it, so a tree's
  expected accepted length is the sum of exp(score) over its nodes; a calibration factor per source of nodes
  (a draft head, matches in the text so far; accepted / predicted, both averaged over recent rounds) corrects
  each source's over- or under-confidence, so one tree can mix them;
- `gain[d]`, the recent mean of min(accepted, d), is what drafting d levels deep has been worth.

Each round `AutoSizer` picks the depth with the best expected tokens per second, or no draft at all when
plain decoding is expected to be faster; it drafts one level deeper than that as soon as the deepest level
keeps being accepted, and every `explore_every` rounds to re-check (so a draft that improves mid-sequence is
noticed). The model is checked against the clock, depth by depth: where a depth has been drafted, its
measured tokens per second replace the model's estimate, and while no depth makes more tokens per second
than rounds without a draft, it drafts only to re-check (depth 1 first, the cheapest round), and the gap
between re-checks doubles (up to MAX_EXPLORE_GAP). It then keeps the number of nodes whose calibrated
expected gain pays for their verify rows. A draft that cannot pay therefore costs a catch-up per token and a
shallow tree now and then, not a tree per token; one that pays only with tiny trees (a 2-core CPU, where each
draft level and verify row costs several ms) is drafted at the depth that pays, and the decoder hands those
per-depth rates to its next sequence.

Candidates that cost no draft model (matches in the text so far) are proposed in rounds that draft no level
as well; such a round keeps only the nodes that pay for their rows, possibly none, and its time per token is
what rounds without a draft model make, the rate a drafted depth must beat.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from confu.engine.tree import HEAD_SOURCE, DraftTree, rank_by_score

COST_ROWS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
DECAY = 0.9  # weight of the past in the running means: about the last ten rounds count
MAX_EXPLORE_GAP = 64  # rounds between re-checks of a draft that keeps losing to plain decoding
MIN_DRAFT_NODES = 4  # the fewest nodes a round drafts toward (`AutoSizer.draft_nodes`)


@dataclass
class VerifyCosts:
    """Seconds of a verify pass (target forward, reading two logits rows, commit) against its row count."""

    rows: list[int]
    seconds: list[float]

    def __call__(self, n: int) -> float:
        """Piecewise-linear in the row count; beyond the last point, linear in the last segment's slope."""
        rows, secs = self.rows, self.seconds
        if n <= rows[0]:
            return secs[0]
        for (r0, s0), (r1, s1) in zip(zip(rows, secs, strict=True), zip(rows[1:], secs[1:], strict=True),
                                      strict=False):
            if n <= r1:
                return s0 + (s1 - s0) * (n - r0) / (r1 - r0)
        slope = (secs[-1] - secs[-2]) / (rows[-1] - rows[-2])
        return secs[-1] + slope * (n - rows[-1])


def cost_key(target) -> str:
    """Identity of a cost curve: the model, its numerics, the device, the thread count and the machine."""
    cfg = target.model.config
    parts = [target.name, cfg.model_type, str(cfg.hidden_size), str(cfg.num_hidden_layers), str(target.vocab_size),
             str(target.dtype), str(target.device), target.numerics, str(torch.get_num_threads()),
             platform.machine(), platform.processor() or _cpu_model()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def measure_verify_costs(target, rows: tuple[int, ...] = COST_ROWS, repeats: int = 5, context: int = 64) -> VerifyCosts:
    """Time verify passes of each row count after a `context`-token prompt (median of `repeats`)."""
    device = target.device
    n_ctx = min(context, target.max_context // 2)
    rows = tuple(r for r in rows if n_ctx + r <= target.max_context)
    ids = torch.arange(n_ctx, device=device) % target.vocab_size
    cache = target.new_cache()
    with torch.no_grad():
        target.forward(cache, torch.arange(n_ctx, device=device), _causal(n_ctx, device), input_ids=ids)
        cache.commit(None)
        seconds = []
        for r in rows:
            new = torch.arange(r, device=device) % target.vocab_size
            pos = n_ctx + torch.arange(r, device=device)
            times = []
            for i in range(repeats + 1):
                tic = time.perf_counter()
                out = target.forward(cache, pos, _causal(r, device), input_ids=new)
                out.logits[0], out.logits[r - 1]  # verification reads about this many rows
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first is a warm-up
                    times.append(time.perf_counter() - tic)
                cache.rollback()
            seconds.append(statistics.median(times))
    # a pass over more rows never costs less: keep the curve monotone against timing noise
    for i in range(1, len(seconds)):
        seconds[i] = max(seconds[i], seconds[i - 1])
    return VerifyCosts(list(rows), seconds)


def _causal(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def load_verify_costs(target) -> VerifyCosts:
    """The cached cost curve of this target on this machine, measured on first use (a few seconds)."""
    from confu.hub import cache_dir

    path = cache_dir() / "costs" / f"{cost_key(target)}.json"
    try:
        data = json.loads(path.read_text())
        return VerifyCosts(data["rows"], data["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    costs = measure_verify_costs(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"rows": costs.rows, "seconds": costs.seconds, "target": target.name,
                               "numerics": target.numerics, "threads": torch.get_num_threads()}))
    tmp.replace(path)
    return costs


@dataclass
class AutoSizer:
    """Per-sequence sizing state. `extra_rows(n)` is what the verify extension adds to a pass over n nodes."""

    costs: VerifyCosts
    max_depth: int
    extra_rows: Callable[[int], int] | None = None
    explore_every: int = 8
    first_depth: int = 2  # the first round's depth: cheap, and enough to see whether level 2 ever hits
    deepen_at: float = 0.3  # draft one level deeper as soon as this share of rounds accepts the whole depth
    gain: list[float] = field(default_factory=list)  # gain[d - 1]: running mean of min(accepted, d)
    observed_depth: int = 0  # the deepest depth drafted so far: gain is known up to it
    level_s: float = 0.0  # running mean of draft seconds per depth level (catch-up included)
    # per source of nodes: running sums behind its calibration factor
    predicted: dict[str, float] = field(default_factory=dict)
    observed: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    last_nodes: int = 0
    # What rounds really took, on the clock: the cost model misses what it cannot see (catch-up after rounds
    # without a draft, the context length, other processes), so drafting stops when it measurably loses.
    plain_s: float = 0.0  # running mean of the seconds per token of rounds without a draft level
    # depth_rate[d - 1]: running mean of the tokens per second of rounds drafted d levels deep (0: none yet).
    # Per depth, because one mean over all drafted rounds mixes the depth that pays with the explorations
    # around it, and a draft that pays only shallow (tiny trees on a CPU) would be judged a loss.
    depth_rate: list[float] = field(default_factory=list)
    explore_gap: int = 0  # rounds until the next re-check: explore_every, doubled while drafting loses
    next_explore: int = 0
    # The other way round: while every round drafts, plain_s is never re-timed, and one slow stretch of the
    # machine can leave it too high for good (drafting then "wins" against a stale number). So a round without
    # a draft is timed again every plain_check_gap rounds (explore_every, doubled while drafting keeps
    # winning), and its time replaces the stale mean.
    plain_check_gap: int = 0
    next_plain_check: int = 0
    plain_check: bool = False  # this round is such a re-timing

    def __post_init__(self) -> None:
        self.gain = [0.0] * self.max_depth
        self.depth_rate = [0.0] * self.max_depth
        self.explore_gap = self.next_explore = self.explore_every
        self.plain_check_gap = self.next_plain_check = self.explore_every

    @property
    def draft_rate(self) -> float:
        """Tokens per second of rounds drafted at the best depth measured so far (0: none measured)."""
        return max(self.depth_rate, default=0.0)

    @property
    def plain_round_s(self) -> float:
        """Seconds per token of rounds that draft no level (plain, or verifying looked-up candidates only): on the
        clock, or the cost curve's one-row pass until one has run."""
        return self.plain_s or self.costs(self._rows(0))

    @property
    def drafting_loses(self) -> bool:
        """Rounds with a draft, at their best depth, have measurably made fewer tokens per second than rounds
        without."""
        return self.draft_rate > 0 and self.draft_rate * self.plain_round_s < 1.0

    def _rows(self, nodes: int, extended: bool = True) -> int:
        """Rows of a pass over `nodes` nodes, with the verify extension's rows unless not `extended`."""
        return nodes + 1 + (self.extra_rows(nodes) if self.extra_rows and extended else 0)

    @property
    def calibration(self) -> float:
        """A draft head's calibration factor."""
        return self.calibration_of(HEAD_SOURCE)

    def calibration_of(self, source: str) -> float:
        predicted = self.predicted.get(source, 0.0)
        return self.observed.get(source, 0.0) / predicted if predicted > 0 else 1.0

    def reach(self, d: int) -> float:
        """Share of recent rounds that accepted at least d tokens (gain[d] - gain[d - 1])."""
        return self.gain[d - 1] - (self.gain[d - 2] if d > 1 else 0.0)

    def plan_round(self) -> int:
        """Depth to draft this round (0 = no draft): the best expected tokens per second among the depths
        measured so far, one level deeper when the deepest level keeps being accepted or, every
        `explore_every` rounds, to re-check (so a draft that starts hitting later is noticed); and, once
        rounds without a draft have been timed, one of those again every `plain_check_gap` rounds."""
        self.rounds += 1
        depth = self._plan_depth()
        self.plain_check = bool(depth) and self.plain_s > 0 and not self.drafting_loses \
            and self.rounds >= self.next_plain_check
        return 0 if self.plain_check else depth

    def _plan_depth(self) -> int:
        if self.observed_depth == 0:  # nothing drafted yet in this sequence
            start = self._clock_depth(default=self.first_depth)  # what paid in earlier sequences, if measured
            if not self.drafting_loses:
                return min(start, self.max_depth)
            if self.rounds < self.next_explore:  # the clock says drafting loses
                return 0
            self.next_explore = self.rounds + self.explore_gap
            return min(start, self.max_depth)
        nodes = max(1, self.last_nodes)
        best, best_rate = 0, 1.0 / self.plain_round_s
        for d in range(1, self.observed_depth + 1):
            # what drafting d levels has made on the clock, where measured; the cost model's estimate if not
            rate = self.depth_rate[d - 1] or (1.0 + self.gain[d - 1]) / (d * self.level_s + self.costs(self._rows(nodes)))
            if rate > best_rate:
                best, best_rate = d, rate
        if self.drafting_loses:
            best = 0
        deeper = min(self.max_depth, best + 1)
        if best == self.observed_depth and best and self.reach(best) >= self.deepen_at:
            return deeper
        if self.rounds >= self.next_explore:
            self.next_explore = self.rounds + self.explore_gap
            if best:
                return deeper
            # drafting loses: re-check depth 1 (the cheapest round) until measured, then the depth that made most
            return self._clock_depth(default=1) if self.depth_rate[0] else 1
        return best

    def _clock_depth(self, default: int) -> int:
        """The depth whose rounds made the most tokens per second on the clock; `default` if none was measured."""
        return 1 + self.depth_rate.index(self.draft_rate) if self.draft_rate > 0 else default

    def draft_nodes(self) -> int:
        """Nodes to draft toward this round: twice the last round's choice, at least MIN_DRAFT_NODES.

        Why: a round verifies only the few nodes `choose_nodes` keeps (2-3 on a 2-core CPU), and growing a
        tree toward 60 expands up to top-k rows a level to keep them. With this budget the drafter's exact
        pruning expands only candidates that can still be among its best nodes, which are EAGLE-2's best
        nodes of the full tree: so the choice is unchanged whenever fewer nodes than the budget pay, and a
        choice that reaches the budget doubles the next round's."""
        return 2 * max(self.last_nodes, MIN_DRAFT_NODES // 2)

    def choose_nodes(self, tree: DraftTree, draft_s: float, drafted: bool = True) -> DraftTree | None:
        """Keep the n likeliest nodes for the n with the best expected tokens per second. A node's likelihood is
        exp(score) times its source's calibration, capped by its parent's (so the n likeliest form a tree, ties
        kept in score, then index order). A round that drafted no level (`drafted` False: looked-up
        candidates, no rows of the verify extension) may keep none (None)."""
        if len(tree) == 0:
            return tree
        sources, parents = tree.node_sources(), tree.parents.tolist()
        scores = tree.scores.double().tolist()
        likely: list[float] = []
        for i, score in enumerate(scores):  # parents come first
            value = math.exp(score) * self.calibration_of(sources[i])
            likely.append(min(value, likely[parents[i]]) if parents[i] >= 0 else value)
        order = rank_by_score(list(zip(likely, scores, strict=True)), range(len(tree)))
        best_n, best_rate, gain = (1, -1.0, 0.0) if drafted else (0, 1.0 / (draft_s + self.costs(1)), 0.0)
        for n in range(1, len(tree) + 1):
            gain += likely[order[n - 1]]
            rate = (1.0 + gain) / (draft_s + self.costs(self._rows(n, drafted)))
            if rate > best_rate:
                best_n, best_rate = n, rate
        self.last_nodes = best_n
        return prune(tree, sorted(order[:best_n])) if best_n else None

    def clock(self) -> tuple[float, list[float], int]:
        """What the clock has said: (plain_s, depth_rate, explore_gap). A decoder hands it to the sizer of its
        next sequence, so neither a draft that loses nor the depth that pays is re-learned at every prompt."""
        return self.plain_s, list(self.depth_rate), self.explore_gap

    def set_clock(self, clock: tuple[float, list[float], int]) -> None:
        self.plain_s, depth_rate, self.explore_gap = clock
        self.depth_rate = (list(depth_rate) + [0.0] * self.max_depth)[: self.max_depth]
        self.next_explore = self.explore_gap

    def observe_plain(self, seconds: float) -> None:
        """A round without a draft took `seconds` on the clock."""
        fresh = self.plain_s == 0 or self.plain_check
        self.plain_s = seconds if fresh else DECAY * self.plain_s + (1 - DECAY) * seconds
        self.plain_check = False
        self.plain_check_gap = self.explore_every if self.draft_rate == 0 or self.drafting_loses \
            else min(2 * self.plain_check_gap, MAX_EXPLORE_GAP)
        self.next_plain_check = self.rounds + self.plain_check_gap

    def observe(self, tree: DraftTree | None, depth: int, accepted: int, draft_s: float,
                verify_s: float | None = None, accepted_nodes: list[int] | None = None) -> None:
        """Update the running means with a verified round (`verify_s`: its target pass, when timed;
        `accepted_nodes`: which nodes, for per-source calibration; without them every accepted token is credited
        to the source of the tree's first node)."""
        if tree is None:
            return
        self._calibrate(tree, accepted, accepted_nodes)
        if depth == 0:  # looked-up candidates only: no draft level to learn about
            return
        if verify_s is not None:
            rate = (1 + accepted) / (draft_s + verify_s)
            old = self.depth_rate[depth - 1]
            self.depth_rate[depth - 1] = rate if old == 0 else DECAY * old + (1 - DECAY) * rate
            self.explore_gap = min(2 * self.explore_gap, MAX_EXPLORE_GAP) if self.drafting_loses \
                else self.explore_every
        for d in range(1, depth + 1):  # a level's first observation is its mean; later ones decay into it
            first = d > self.observed_depth
            self.gain[d - 1] = min(accepted, d) if first else DECAY * self.gain[d - 1] + (1 - DECAY) * min(accepted, d)
        self.observed_depth = max(self.observed_depth, depth)
        self.level_s = draft_s / depth if self.level_s == 0 else DECAY * self.level_s + (1 - DECAY) * draft_s / depth

    def _calibrate(self, tree: DraftTree, accepted: int, accepted_nodes: list[int] | None) -> None:
        """Each source's running sums: the expected accepted nodes its scores predicted, and those accepted."""
        sources = tree.node_sources()
        predicted: dict[str, float] = {}
        for source, score in zip(sources, tree.scores.double().exp().tolist(), strict=True):
            predicted[source] = predicted.get(source, 0.0) + score
        got = tree.count_by_source(accepted_nodes) if accepted_nodes is not None else {sources[0]: accepted}
        for source, expected in predicted.items():
            self.predicted[source] = DECAY * self.predicted.get(source, 0.0) + expected
            self.observed[source] = DECAY * self.observed.get(source, 0.0) + got.get(source, 0)


def prune(tree: DraftTree, keep: list[int]) -> DraftTree:
    """The subtree of the nodes `keep` (ascending, closed under parents), renumbered in the same order."""
    if len(keep) == len(tree):
        return tree
    new_index = {old: new for new, old in enumerate(keep)}
    parents = [-1 if int(tree.parents[i]) < 0 else new_index[int(tree.parents[i])] for i in keep]
    index = torch.tensor(keep)
    sources = None if tree.sources is None else [tree.sources[i] for i in keep]
    return DraftTree.from_parents(tree.tokens[index], parents, tree.scores[index], sources=sources)
