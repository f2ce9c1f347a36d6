"""Tree verification: which draft nodes the target accepts and which token it emits after them.

Both functions are pure (no model, no cache). Target rows follow DESIGN.md: row 0 is the distribution of the
token after the last accepted token (the root), row ``i + 1`` the distribution after node ``i``. Rows are read one
at a time, only those on the path being verified, so they may be a tensor or any ``Rows`` whose rows are computed
on demand (the decoder's ``RowLogits``: a row of a large vocabulary head is not free). Each returns
``(accepted, next_token)``: the accepted node indices in depth order and the token sampled from the target at
the last accepted position (the bonus token when a leaf was reached, the correction otherwise). A decoder
emits ``[tree.tokens[i] for i in accepted] + [next_token]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from confu.engine.sampling import sample_token
from confu.engine.tree import DraftTree
from confu.errors import InputError

__all__ = ["MappedRows", "Rows", "verify_greedy", "verify_sampling"]


class Rows(Protocol):
    """Per-row target outputs: a (T + 1, V) tensor, or rows computed when first read."""

    def __len__(self) -> int: ...

    def __getitem__(self, row: int) -> Tensor: ...


class MappedRows:
    """``fn`` applied to each row of ``rows`` when that row is first read (e.g. logits -> probabilities)."""

    def __init__(self, rows: Rows, fn: Callable[[Tensor], Tensor]):
        self.rows, self.fn = rows, fn
        self._done: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> Tensor:
        if row not in self._done:
            self._done[row] = self.fn(self.rows[row])
        return self._done[row]


def _check_rows(tree: DraftTree, target: Rows, name: str) -> None:
    if isinstance(target, Tensor) and target.dim() != 2:
        raise InputError(f"{name} must have shape (T + 1, V), got {tuple(target.shape)}")
    if len(target) != len(tree) + 1:
        raise InputError(
            f"{name} must have T + 1 = {len(tree) + 1} rows for a tree of {len(tree)} nodes, got {len(target)}"
        )


def verify_greedy(tree: DraftTree, target_logits: Rows) -> tuple[list[int], int]:
    """Accept the longest root path whose every token is the target's argmax at its parent's row.

    The output equals greedy autoregressive decoding by construction: a node is accepted only if its token is
    what the target would have chosen after its (already accepted) path. When duplicate siblings both match,
    the one whose subtree accepts more tokens wins (still exact; ties go to the higher-scored sibling).
    """
    _check_rows(tree, target_logits, "target_logits")
    best: dict[int, int] = {}  # argmax of each row read so far
    tokens: list[int] = tree.tokens.tolist()

    def best_of(row: int) -> int:
        if row not in best:
            best[row] = int(target_logits[row].argmax())
        return best[row]

    def longest_from(node: int) -> list[int]:
        row = node + 1
        longest: list[int] = []
        for child in tree.children[row]:
            if tokens[child] == best_of(row):
                path = [child, *longest_from(child)]
                if len(path) > len(longest):
                    longest = path
        return longest

    accepted = longest_from(-1)
    last_row = accepted[-1] + 1 if accepted else 0
    return accepted, best_of(last_row)


def _work_dtype(probs: Tensor) -> torch.dtype:
    # p arrives in float32 from logits_to_probs, so float32 residuals lose nothing that matters, and on CPU
    # multinomial over a large vocabulary is several times slower in float64. float64 input stays float64
    # (exact checks in tests); half precision is widened so u * mass < p(x) is not decided by 8-bit mantissas.
    return torch.float64 if probs.dtype == torch.float64 else torch.float32


def verify_sampling(
    tree: DraftTree, target_probs: Rows, generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Multi-candidate rejection sampling for a deterministic draft tree (SpecInfer / EAGLE style).

    Notation: at the current row the target distribution is ``p``; the children of the current node are the
    candidates ``x_1, ..., x_m`` in descending draft score. Because the candidates are a deterministic set
    given the draft, each one is a point-mass proposal ``q_j = e_{x_j}`` and the usual rule
    ``accept with prob min(1, p(x_j) / q_j(x_j))`` becomes ``accept x_j iff u < p(x_j)`` with ``u ~ U[0, 1)``.
    On rejection the residual is ``p <- norm(max(0, p - q_j)) = norm(p with p(x_j) = 0)``. An accepted ``x_j``
    moves verification to its node's row (with that row's fresh ``p``); if every candidate is rejected, or the
    node is a leaf, the next token is sampled from what is left of ``p``.

    Why it is lossless: let ``P_j(y)`` be the output law when candidates ``x_j..x_m`` remain and the residual
    is ``p_j``. With no candidate left, ``P_{m+1} = p_{m+1}`` (a direct sample). Inductively
    ``P_j(y) = p_j(x_j) [y = x_j] + (1 - p_j(x_j)) P_{j+1}(y)``, and since ``p_{j+1}(y) = p_j(y) [y != x_j] /
    (1 - p_j(x_j))`` this is ``p_j(x_j) [y = x_j] + p_j(y) [y != x_j] = p_j(y)``. So the token emitted at
    each position has exactly the target's law given the accepted prefix, whichever subtree is then followed.

    Duplicate siblings are harmless: once ``x`` was rejected ``p(x) = 0``, so a later copy is rejected with
    probability 1 and leaves ``p`` unchanged. ``p`` is kept unnormalised (``u * mass < p(x)`` instead of
    dividing), so no division by zero can occur.
    """
    _check_rows(tree, target_probs, "target_probs")
    tokens: list[int] = tree.tokens.tolist()

    accepted: list[int] = []
    node = -1
    while True:
        # A private copy (rejected candidates are zeroed in place), on the generator's device: uniform draws
        # must come from there.
        row = target_probs[node + 1]
        device = generator.device if generator is not None else row.device
        p = row.to(device=device, dtype=_work_dtype(row), copy=True)
        mass = float(p.sum())
        if not mass > 0:
            raise InputError(f"target distribution at row {node + 1} has no mass")
        chosen = -1
        for child in tree.children[node + 1]:
            x = tokens[child]
            p_x = float(p[x])
            u = float(torch.rand((), generator=generator, device=device, dtype=p.dtype))
            if u * mass < p_x:
                chosen = child
                break
            p[x] = 0.0
            mass -= p_x
            if not mass > 0:
                # Only reachable through rounding when p_x was (numerically) all of the mass, so the
                # rejection itself had probability 0: accept x instead of sampling an empty residual.
                chosen = child
                break
        if chosen < 0:
            # Every candidate failed, or the node is a leaf (no candidates): the bonus / correction token.
            return accepted, sample_token(p, generator)
        accepted.append(chosen)
        node = chosen
