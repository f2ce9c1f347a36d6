"""EAGLE-2 dynamic draft tree bookkeeping (no model code).

The drafter grows candidates level by level: each expanded node proposes its top-k draft tokens, every
proposal becomes a candidate with a cumulative score (sum of draft log-probs along its path, an estimate of
the log of its acceptance probability), and only the ``topk`` best new candidates are expanded next.
After ``depth`` levels the ``total_nodes`` best candidates overall form the tree the target verifies.

Indices: a ``TreeBuilder`` numbers candidates in creation order; a ``DraftTree`` numbers its kept nodes
``0..T-1`` with parents before children. The root (the last accepted token) is never a node; ``-1`` stands
for it wherever a parent index is expected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from confu.errors import InputError

__all__ = ["DraftTree", "TreeBuilder", "TreeConfig", "path_to"]

# log_softmax output is <= 0 mathematically; a rounding error this small is clamped away so the invariant
# "a child never outscores its parent" holds exactly. Anything larger is a caller bug (raw logits passed).
_LOGPROB_SLACK = 1e-4


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


def _as_int_list(values: Sequence[int] | Tensor, name: str) -> list[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise InputError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A verified-ready draft tree of ``T`` nodes (root excluded), parents before children.

    ``children[0]`` lists the root's children and ``children[i + 1]`` node ``i``'s, each by descending score
    (ties by index): verification tries siblings in that order.
    """

    tokens: Tensor  # (T,) long, target vocabulary ids
    parents: Tensor  # (T,) long, parent node index or -1 for a child of the root
    depths: Tensor  # (T,) long, 1..D
    scores: Tensor  # (T,) float32, cumulative draft log-prob
    ancestor_mask: Tensor  # (T, T) bool, [i, j] iff j is an ancestor of i or j == i
    retrieve: Tensor  # (n_leaves, D) long, root-to-leaf node indices padded with -1
    children: list[list[int]]

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_nodes(self) -> int:
        return len(self)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if len(self) else 0

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
        )

    @staticmethod
    def from_parents(
        tokens: Sequence[int] | Tensor,
        parents: Sequence[int] | Tensor,
        scores: Sequence[float] | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> DraftTree:
        """Build a tree from node arrays; ``parents[i]`` must be ``-1`` or an index ``< i``.

        Without ``scores`` every node scores 0, so siblings are tried in index order.
        """
        tok = _as_int_list(tokens, "tokens")
        par = _as_int_list(parents, "parents")
        n = len(tok)
        if len(par) != n:
            raise InputError(f"tokens and parents differ in length ({n} vs {len(par)})")
        if scores is None:
            sc = [0.0] * n
        elif isinstance(scores, Tensor):
            sc = [float(s) for s in scores.reshape(-1).tolist()]
        else:
            sc = [float(s) for s in scores]
        if len(sc) != n:
            raise InputError(f"scores has {len(sc)} entries for {n} nodes")
        if any(math.isnan(s) for s in sc):
            raise InputError("tree scores must not be NaN")

        depths: list[int] = []
        paths: list[list[int]] = []  # root-excluded path to each node, itself included
        children: list[list[int]] = [[] for _ in range(n + 1)]
        for i, p in enumerate(par):
            if not -1 <= p < i:
                raise InputError(f"node {i} has parent {p}; parents must be -1 or precede their children")
            depths.append(1 if p < 0 else depths[p] + 1)
            paths.append(([] if p < 0 else paths[p]) + [i])
            children[p + 1].append(i)
        for kids in children:
            # Python's sort is stable, so equal scores keep index (creation) order.
            kids.sort(key=lambda c: -sc[c])

        mask = torch.zeros(n, n, dtype=torch.bool)
        rows = [i for i in range(n) for _ in paths[i]]
        cols = [j for i in range(n) for j in paths[i]]
        if rows:
            mask[rows, cols] = True

        leaves = [i for i in range(n) if not children[i + 1]]
        width = max(depths, default=0)
        retrieve = torch.full((len(leaves), width), -1, dtype=torch.long)
        for r, leaf in enumerate(leaves):
            retrieve[r, : len(paths[leaf])] = torch.tensor(paths[leaf], dtype=torch.long)

        return DraftTree(
            tokens=torch.tensor(tok, dtype=torch.long, device=device),
            parents=torch.tensor(par, dtype=torch.long, device=device),
            depths=torch.tensor(depths, dtype=torch.long, device=device),
            scores=torch.tensor(sc, dtype=torch.float32, device=device),
            ancestor_mask=mask.to(device),
            retrieve=retrieve.to(device),
            children=children,
        )

    @staticmethod
    def chain(tokens: Sequence[int] | Tensor, device: torch.device | str | None = None) -> DraftTree:
        """A single path ``tokens[0] -> tokens[1] -> ...`` below the root (a linear draft)."""
        tok = _as_int_list(tokens, "tokens")
        return DraftTree.from_parents(tok, list(range(-1, len(tok) - 1)), device=device)


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
        frontier = b.grow(None, tokens (1, k), logprobs (1, k))     # root's children, depth 1
        while frontier and depth < cfg.depth:
            ... run the draft head on the frontier nodes ...
            frontier = b.grow(frontier, tokens (n, k), logprobs (n, k))
        tree = b.build()
    """

    def __init__(self, config: TreeConfig) -> None:
        self.config = config
        self._tokens: list[int] = []
        self._parents: list[int] = []  # candidate index or -1 (root)
        self._depths: list[int] = []
        self._scores: list[float] = []  # python floats (float64): no accumulation ties from float32 rounding

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def num_candidates(self) -> int:
        return len(self._tokens)

    def token_of(self, i: int) -> int:
        return self._tokens[self._check(i)]

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
        if not 0 <= i < len(self._tokens):
            raise InputError(f"candidate {i} does not exist ({len(self._tokens)} candidates)")
        return i

    def grow(self, parents: list[int] | None, child_tokens: Tensor, child_logprobs: Tensor) -> list[int]:
        """Add the k children of each of the n parents; return the next frontier.

        ``parents=None`` expands the root (n = 1; a 1-D ``(k,)`` row is accepted too). Child ``(r, c)`` scores
        ``score(parents[r]) + child_logprobs[r, c]`` (the root scores 0). The returned frontier is the
        ``topk`` best of the candidates added by this call, best first (ties: creation order).
        """
        if parents is None:
            if self._tokens:
                raise InputError("the root can only be expanded once, before any other expansion")
            if child_tokens.dim() == 1:
                child_tokens, child_logprobs = child_tokens[None], child_logprobs.reshape(1, -1)
            parent_list = [-1]
        else:
            parent_list = [self._check(int(p)) for p in parents]
        if child_tokens.dim() != 2 or child_tokens.shape != child_logprobs.shape:
            raise InputError(
                f"child tokens {tuple(child_tokens.shape)} and log-probs {tuple(child_logprobs.shape)} "
                "must both be (n, k)"
            )
        if child_tokens.shape[0] != len(parent_list):
            raise InputError(f"{child_tokens.shape[0]} rows of children for {len(parent_list)} parents")

        toks: list[list[int]] = child_tokens.tolist()
        logps: list[list[float]] = child_logprobs.double().tolist()
        start = len(self._tokens)
        for p, row_tokens, row_logps in zip(parent_list, toks, logps, strict=True):
            depth = 1 if p < 0 else self._depths[p] + 1
            if depth > self.config.depth:
                raise InputError(f"expanding candidate {p} would exceed the tree depth {self.config.depth}")
            base = 0.0 if p < 0 else self._scores[p]
            for t, lp in zip(row_tokens, row_logps, strict=True):
                if math.isnan(lp) or lp > _LOGPROB_SLACK:
                    raise InputError(f"child log-probabilities must be <= 0 (log_softmax output), got {lp}")
                self._tokens.append(int(t))
                self._parents.append(p)
                self._depths.append(depth)
                self._scores.append(base + min(lp, 0.0))
        new = range(start, len(self._tokens))
        ranked = sorted(new, key=lambda i: -self._scores[i])
        return ranked[: self.config.topk]

    def build(self, device: torch.device | str | None = None) -> DraftTree:
        """Keep the ``total_nodes`` best candidates and return them as a ``DraftTree``.

        The sort is stable on ``-score`` over creation order. A parent is created before its children and its
        score is >= theirs (log-probs are <= 0), so it always ranks ahead of them: every kept node's parent is
        kept and the kept set is a tree. Creation order is then a valid parents-first order.
        """
        n = len(self._tokens)
        ranked = sorted(range(n), key=lambda i: -self._scores[i])
        kept = sorted(ranked[: self.config.total_nodes])
        new_index = {old: new for new, old in enumerate(kept)}
        parents: list[int] = []
        for old in kept:
            p = self._parents[old]
            if p >= 0 and p not in new_index:
                # Unreachable given the score invariant enforced in grow(); guards future edits.
                raise AssertionError(f"rerank dropped the parent {p} of kept candidate {old}")
            parents.append(-1 if p < 0 else new_index[p])
        return DraftTree.from_parents(
            [self._tokens[i] for i in kept],
            parents,
            [self._scores[i] for i in kept],
            device=device,
        )
