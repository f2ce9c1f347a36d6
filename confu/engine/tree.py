"""EAGLE-2 dynamic draft tree bookkeeping (no model code).

The drafter grows candidates level by level: each expanded node proposes its top-k draft tokens, every
proposal becomes a candidate with a cumulative score (sum of draft log-probs along its path, an estimate of
the log of its acceptance probability), and only the ``topk`` best new candidates are expanded next.
After ``depth`` levels the ``total_nodes`` best candidates overall form the tree the target verifies.

Indices: a ``TreeBuilder`` numbers candidates in creation order; a ``DraftTree`` numbers its kept nodes
``0..T-1`` with parents before children. The root (the last accepted token) is never a node; ``-1`` stands
for it wherever a parent index is expected.

The bookkeeping runs on Python lists: a round has a few dozen candidates, and each torch op on tensors that
small costs more (microseconds of dispatch) than the whole Python loop; growing a tree took about a millisecond
of torch ops a round. Rankings are stable sorts (equal scores keep creation order); a `DraftTree` holds tensors
for what verification reads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from confu.errors import InputError

__all__ = ["HEAD_SOURCE", "DraftTree", "TreeBuilder", "TreeConfig", "best_subtree", "merge_trees", "path_to"]

# log_softmax output is <= 0 mathematically; a rounding error this small is clamped away so the invariant
# "a child never outscores its parent" holds exactly. Anything larger is a caller bug (raw logits passed).
_LOGPROB_SLACK = 1e-4
# What proposed a node: a tree without labels is a draft head's (`DraftTree.node_sources`).
HEAD_SOURCE = "head"


@dataclass(frozen=True)
class TreeConfig:
    """Tree shape: ``total_nodes`` kept by the rerank, ``depth`` levels, ``topk`` children per expansion."""

    total_nodes: int = 60
    depth: int = 5
    topk: int = 10

    def __post_init__(self) -> None:
        for name in ("total_nodes", "depth", "topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"tree {name} must be an integer >= 1, got {value!r}")


def _as_list(values: Sequence | Tensor, name: str) -> list:
    """The entries of a 1-D sequence or tensor as Python numbers."""
    values = torch.as_tensor(values)
    if values.dim() != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
    return values.tolist()


def rank_by_score(scores: list[float], indices: Sequence[int]) -> list[int]:
    """``indices`` best score first; equal scores keep the order of ``indices`` (creation order: the sort is
    stable under ``reverse=True``)."""
    return sorted(indices, key=scores.__getitem__, reverse=True)


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A verified-ready draft tree of ``T`` nodes (root excluded), parents before children.

    ``children[0]`` lists the root's children and ``children[i + 1]`` node ``i``'s, each by descending score
    (ties by index): verification tries siblings in that order. ``sources`` names what proposed each node
    (None: every node is a draft head's), for per-source statistics and calibration; verification ignores it.
    """

    tokens: Tensor  # (T,) long, target vocabulary ids
    parents: Tensor  # (T,) long, parent node index or -1 for a child of the root
    depths: Tensor  # (T,) long, 1..D
    scores: Tensor  # (T,) float32, cumulative draft log-prob
    ancestor_mask: Tensor  # (T, T) bool, [i, j] iff j is an ancestor of i or j == i
    retrieve: Tensor  # (n_leaves, D) long, root-to-leaf node indices padded with -1
    children: list[list[int]]
    sources: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if len(self) else 0

    def likely_path(self, min_prob: float) -> list[int]:
        """The draft's best guess at the accepted path: from the root, always the top-scored child, for as long
        as its score says it is reached with probability at least `min_prob`."""
        path, node = [], -1
        while self.children[node + 1]:
            child = self.children[node + 1][0]
            if math.exp(float(self.scores[child])) < min_prob:
                break
            path.append(child)
            node = child
        return path

    def node_sources(self) -> list[str]:
        """What proposed each node."""
        return list(self.sources) if self.sources is not None else [HEAD_SOURCE] * len(self)

    def sources_of(self, nodes: Sequence[int]) -> list[str]:
        """What proposed each of `nodes`."""
        sources = self.node_sources()
        return [sources[i] for i in nodes]

    def count_by_source(self, nodes: Sequence[int]) -> dict[str, int]:
        """How many of `nodes` each source proposed."""
        return dict(Counter(self.sources_of(nodes)))

    def children_of(self, node: int) -> list[int]:
        """Children of ``node`` (``-1`` = root) by descending score."""
        return self.children[node + 1]

    def to(self, device: torch.device | str) -> DraftTree:
        """The same tree with its tensors on ``device``."""
        return DraftTree(
            tokens=self.tokens.to(device),
            parents=self.parents.to(device),
            depths=self.depths.to(device),
            scores=self.scores.to(device),
            ancestor_mask=self.ancestor_mask.to(device),
            retrieve=self.retrieve.to(device),
            children=[list(c) for c in self.children],
            sources=self.sources,
        )

    @staticmethod
    def from_parents(
        tokens: Sequence[int] | Tensor,
        parents: Sequence[int] | Tensor,
        scores: Sequence[float] | Tensor | None = None,
        device: torch.device | str | None = None,
        sources: Sequence[str] | None = None,
    ) -> DraftTree:
        """Build a tree from node arrays; ``parents[i]`` must be ``-1`` or an index ``< i``.

        Without ``scores`` every node scores 0, so siblings are tried in index order. Siblings are ordered on
        the scores as given (float64 stays float64); the stored ``scores`` are float32. ``sources`` labels
        each node's proposer (None: all a draft head's).
        """
        tok = [int(t) for t in _as_list(tokens, "tokens")]
        par = [int(q) for q in _as_list(parents, "parents")]
        n = len(tok)
        if len(par) != n:
            raise InputError(f"tokens and parents differ in length ({n} vs {len(par)})")
        if scores is None:
            sc = [0.0] * n
        else:
            sc = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist()
        if len(sc) != n:
            raise InputError(f"scores has {len(sc)} entries for {n} nodes")
        if any(math.isnan(x) for x in sc):
            raise InputError("tree scores must not be NaN")
        if sources is not None and len(sources) != n:
            raise InputError(f"sources has {len(sources)} entries for {n} nodes")
        for i, q in enumerate(par):
            if not -1 <= q < i:
                raise InputError(f"node {i} has parent {q}; parents must be -1 or precede their children")

        # Node i's path from depth 1: its parent's path and itself (parents come first).
        paths: list[list[int]] = []
        for i, q in enumerate(par):
            paths.append((paths[q] if q >= 0 else []) + [i])
        children: list[list[int]] = [[] for _ in range(n + 1)]
        for i in rank_by_score(sc, range(n)):  # each sibling group by descending score, ties by index
            children[par[i] + 1].append(i)
        leaves = [i for i in range(n) if not children[i + 1]]
        width = max((len(path) for path in paths), default=0)
        rows = [i for i, path in enumerate(paths) for _ in path]
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[rows, [j for path in paths for j in path]] = True
        return DraftTree(
            tokens=torch.tensor(tok, dtype=torch.long, device=device),
            parents=torch.tensor(par, dtype=torch.long, device=device),
            depths=torch.tensor([len(path) for path in paths], dtype=torch.long, device=device),
            scores=torch.tensor(sc, dtype=torch.float32, device=device),
            ancestor_mask=mask.to(device),
            retrieve=torch.tensor([paths[leaf] + [-1] * (width - len(paths[leaf])) for leaf in leaves],
                                  dtype=torch.long, device=device).reshape(len(leaves), width),
            children=children,
            sources=None if sources is None else tuple(sources),
        )

    @staticmethod
    def chain(tokens: Sequence[int] | Tensor, device: torch.device | str | None = None) -> DraftTree:
        """A single path ``tokens[0] -> tokens[1] -> ...`` below the root (a linear draft)."""
        tok = _as_list(tokens, "tokens")
        return DraftTree.from_parents(tok, list(range(-1, len(tok) - 1)), device=device)


def best_subtree(tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float], max_nodes: int,
                 sources: Sequence[str] | None = None, device: torch.device | str | None = None) -> DraftTree:
    """The ``max_nodes`` best-scored candidates of a candidate tree (``parents[i]`` -1 or ``< i``) as a
    ``DraftTree``, in creation order.

    The sort is stable on ``-score`` over creation order. A parent is created before its children and scores
    at least as much, so it always ranks ahead of them: every kept node's parent is kept and the kept set is a
    tree. Creation order is then a valid parents-first order.
    """
    kept = sorted(rank_by_score(list(scores), range(len(tokens)))[:max_nodes])
    new_index = {old: new for new, old in enumerate(kept)}
    old_parents = [parents[i] for i in kept]
    if any(p >= 0 and p not in new_index for p in old_parents):
        # Unreachable while children never outscore their parents; guards future edits.
        raise AssertionError("rerank dropped the parent of a kept candidate")
    return DraftTree.from_parents(
        [tokens[i] for i in kept],
        [new_index[p] if p >= 0 else -1 for p in old_parents],
        [scores[i] for i in kept],
        device=device,
        sources=None if sources is None else [sources[i] for i in kept],
    )


def merge_trees(first: DraftTree, second: DraftTree, max_nodes: int) -> DraftTree:
    """One tree holding both trees' candidates, the ``max_nodes`` best-scored of them.

    A node of ``second`` whose path is already in ``first`` (same tokens from the root) is a duplicate: it adds
    no row, keeps ``first``'s source, and scores the better of the two estimates. The max of two trees whose
    children never outscore their parents keeps that property, so the best-scored nodes still form a tree.
    """
    tokens, parents = first.tokens.tolist(), first.parents.tolist()
    scores, sources = first.scores.double().tolist(), first.node_sources()
    node_at = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True))}
    where: list[int] = []  # second's node -> merged node (parents come first, so a parent is always mapped)
    for tok, par, score, source in zip(second.tokens.tolist(), second.parents.tolist(),
                                       second.scores.double().tolist(), second.node_sources(), strict=True):
        key = (where[par] if par >= 0 else -1, tok)
        if key in node_at:
            i = node_at[key]
            scores[i] = max(scores[i], score)
        else:
            i = node_at[key] = len(tokens)
            tokens.append(tok)
            parents.append(key[0])
            scores.append(score)
            sources.append(source)
        where.append(i)
    labels = None if set(sources) == {HEAD_SOURCE} else sources
    return best_subtree(tokens, parents, scores, max_nodes, labels, device=first.tokens.device)


def path_to(tree: DraftTree, node: int) -> list[int]:
    """Root-excluded node indices from depth 1 down to ``node`` (included)."""
    if not 0 <= node < len(tree):
        raise InputError(f"node {node} is not in a tree of {len(tree)} nodes")
    # Ancestors always have smaller indices than their descendants, so ascending index order is depth order.
    return torch.nonzero(tree.ancestor_mask[node]).flatten().tolist()


class TreeBuilder:
    """Accumulates candidates level by level and reranks them into a ``DraftTree``.

    Usage (drafter side)::

        b = TreeBuilder(cfg)
        frontier = b.expand(None, tokens (1, k), logprobs (1, k))     # root's children, depth 1
        while depth < cfg.depth:
            ... run the draft head on the frontier nodes ...
            frontier = b.expand(frontier, tokens (n, k), logprobs (n, k))
        tree = b.build()

    ``grow`` is the same step with Python lists in and out.
    """

    def __init__(self, config: TreeConfig) -> None:
        self.config = config
        self._tokens: list[int] = []
        self._parents: list[int] = []  # candidate index or -1 (root)
        self._depths: list[int] = []
        # Python floats (float64): float32 sums would create rounding ties.
        self._scores: list[float] = []

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def num_candidates(self) -> int:
        return len(self)

    def score_of(self, i: int) -> float:
        return self._scores[self._check(i)]

    def parent_of(self, i: int) -> int:
        """Parent candidate index, ``-1`` for a child of the root."""
        return self._parents[self._check(i)]

    def depth_of(self, i: int) -> int:
        return self._depths[self._check(i)]

    def ancestors(self, i: int) -> list[int]:
        """Strict ancestors of candidate ``i`` (root and ``i`` excluded), outermost first."""
        out: list[int] = []
        p = self._parents[self._check(i)]
        while p >= 0:
            out.append(p)
            p = self._parents[p]
        out.reverse()
        return out

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise InputError(f"candidate {i} does not exist ({len(self)} candidates)")
        return i

    def grow(self, parents: Sequence[int] | None, child_tokens: Tensor, child_logprobs: Tensor) -> list[int]:
        """``expand`` with the parents and the returned frontier as lists of candidate indices."""
        index = None if parents is None else torch.tensor([self._check(int(p)) for p in parents], dtype=torch.long)
        return self.expand(index, child_tokens, child_logprobs).tolist()

    def expand(self, parents: Tensor | None, child_tokens: Tensor, child_logprobs: Tensor) -> Tensor:
        """Add the k children of each of the n parents; return the next frontier (candidate indices).

        ``parents=None`` expands the root (n = 1; a 1-D ``(k,)`` row is accepted too); otherwise ``parents``
        holds existing candidate indices (``grow`` checks them). Child ``(r, c)`` becomes candidate
        ``len(self) + r * k + c`` and scores ``score(parents[r]) + child_logprobs[r, c]`` (the root scores
        0). The returned frontier is the ``topk`` best of the candidates added by this call, best first (ties:
        creation order), less those that ``build`` can no longer keep.

        Pruning that last part is exact. A candidate outside the ``total_nodes`` best so far has that many
        candidates ranked ahead of it; they stay ahead whatever is added later (the ranking is by score, then
        creation order), and its descendants score no more and come later. So neither it nor anything grown
        from it reaches the final tree, and expanding it would only cost the drafter a forward row.
        """
        if parents is None:
            if len(self):
                raise InputError("the root can only be expanded once, before any other expansion")
            if child_tokens.dim() == 1:
                child_tokens, child_logprobs = child_tokens[None], child_logprobs.reshape(1, -1)
            rows, bases, depths = [-1], [0.0], [1]
        else:
            rows = parents.tolist()
            bases = [self._scores[p] for p in rows]
            depths = [self._depths[p] + 1 for p in rows]
        if child_tokens.dim() != 2 or child_tokens.shape != child_logprobs.shape:
            raise InputError(
                f"child tokens {tuple(child_tokens.shape)} and log-probs {tuple(child_logprobs.shape)} "
                "must both be (n, k)"
            )
        if child_tokens.shape[0] != len(rows):
            raise InputError(f"{child_tokens.shape[0]} rows of children for {len(rows)} parents")
        if depths and max(depths) > self.config.depth:
            too_deep = next(p for p, d in zip(rows, depths, strict=True) if d > self.config.depth)
            raise InputError(f"expanding candidate {too_deep} would exceed the tree depth {self.config.depth}")
        logps = child_logprobs.to("cpu", torch.float64).tolist()
        for row in logps:
            for lp in row:
                if not lp <= _LOGPROB_SLACK:  # NaN fails it too
                    raise InputError(f"child log-probabilities must be <= 0 (log_softmax output), got {lp}")

        start = len(self)
        for parent, base, depth, tokens, row in zip(rows, bases, depths, child_tokens.tolist(), logps, strict=True):
            self._tokens.extend(tokens)
            self._parents.extend([parent] * len(tokens))
            self._depths.extend([depth] * len(tokens))
            self._scores.extend(base + min(lp, 0.0) for lp in row)
        frontier = rank_by_score(self._scores, range(start, len(self)))[: self.config.topk]
        kept_now = rank_by_score(self._scores, range(len(self)))[: self.config.total_nodes]
        # The new candidates among the best so far are a prefix of the frontier (both rankings agree on them).
        return torch.tensor(frontier[: sum(i >= start for i in kept_now)], dtype=torch.long)

    def build(self, device: torch.device | str | None = None) -> DraftTree:
        """Keep the ``total_nodes`` best candidates and return them as a ``DraftTree`` (``best_subtree``: log-probs
        are <= 0, so no child outscores its parent)."""
        return best_subtree(self._tokens, self._parents, self._scores, self.config.total_nodes, device=device)
