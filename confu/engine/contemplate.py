"""Contemplate slots in the verify pass (ConFu).

Each slot is a `[con]` row attached after one verify row (the root or a draft node). It sees the soft prompt,
the committed prefix, its row's ancestors, its row, and itself; no ordinary row sees it. Its final hidden state
is the future prediction `f` for a round that ends at that row.

With a budget (`--contemplate N`, beyond the paper) only the root and the N nodes likeliest to end the round get
a slot; a round ending elsewhere takes `f` from its deepest ancestor that has one, i.e. an `f` that is a few
positions old. Training with future-prediction replication (`--replicate l`) teaches the draft to use such an f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from confu.engine.tree import DraftTree


@dataclass
class ContemplatePlan:
    tree: DraftTree | None
    slot_rows: list[int]  # verify rows (0 = root, i + 1 = node i) that get a slot; always starts with 0

    @property
    def num_slots(self) -> int:
        return len(self.slot_rows)

    def slot_inputs(self, positions: Tensor, mask: Tensor, head, con_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The slots' rows after the verify rows: ([con] embeddings (n, H), positions (n,), mask (n, rows + n)
        over the verify rows and the slots)."""
        slot_rows = torch.tensor(self.slot_rows, device=positions.device)
        n = len(slot_rows)
        con = head.contemplate_embedding(con_features)  # one [con] shared by every slot
        own = torch.eye(n, dtype=torch.bool, device=mask.device)
        # a slot sees what its row sees (root, ancestors, the row itself) and itself
        return con.expand(n, -1), positions[slot_rows] + 1, torch.cat([mask[slot_rows], own], dim=1)

    def future_of(self, last_hidden: Tensor, accepted: list[int]) -> Tensor:
        """f of the last accepted row, or of its deepest ancestor with a slot (the root always has one)."""
        rows = last_hidden.shape[0] - self.num_slots
        slot_index = {row: j for j, row in enumerate(self.slot_rows)}
        for node in reversed(accepted):
            if node + 1 in slot_index:
                return last_hidden[rows + slot_index[node + 1]]
        return last_hidden[rows]


def end_probability(tree: DraftTree) -> Tensor:
    """Draft estimate of P(the round ends at node i): P(path to i accepted) - P(a child of i is accepted too)."""
    reach = tree.scores.exp()
    child_mass = torch.zeros_like(reach)
    for i, children in enumerate(tree.children[1:]):
        if children:
            child_mass[i] = reach[torch.tensor(children)].sum()
    return reach - child_mass


def plan_contemplate_slots(tree: DraftTree | None, budget: int | None) -> ContemplatePlan:
    """Slots on the root and on every node (budget None) or on the `budget` likeliest round ends."""
    n_nodes = 0 if tree is None else len(tree.tokens)
    if n_nodes == 0:
        return ContemplatePlan(tree, [0])
    if budget is None or budget >= n_nodes:
        return ContemplatePlan(tree, list(range(n_nodes + 1)))
    chosen = end_probability(tree).topk(budget).indices.sort().values
    return ContemplatePlan(tree, [0] + [int(i) + 1 for i in chosen])
