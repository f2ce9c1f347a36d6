"""Drafting at inference: the draft head's own KV cache and the EAGLE-2 dynamic tree expansion.

Row t of the draft cache pairs the target's features of token t with the embedding of token t+1 and sits at
RoPE position t. Rows ``0..length-1`` hold what the target has verified. For ConFu, the round's future token
(token half [f], hidden half f) is one extra key every query of the round sees, at position ``length``; it
lives in the slot right after the verified rows, because the next round brings a new f (and new rows).

A draft round grows the tree one level at a time with a single batched q / k / v and attention per level.
The keys of the nodes it expands go into the same buffer after the verified rows (and the future slot), so
each level attends to one contiguous slice of it and the draft cache is never concatenated or copied. The
buffer rows a node may see are one boolean row per node, inherited from its parent plus its own column.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from confu.engine.draft import Eagle3Head
from confu.engine.draft_kernel import top_children
from confu.engine.tree import DraftTree, TreeBuilder, TreeConfig
from confu.errors import InputError


class Drafter:
    def __init__(self, head: Eagle3Head, tree_cfg: TreeConfig, max_len: int):
        cfg = head.cfg
        self.head = head
        self.tree_cfg = tree_cfg
        self.max_len = max_len
        # Only expanded nodes need keys: at most `topk` per level, on every level but the last.
        tree_rows = (tree_cfg.depth - 1) * tree_cfg.topk
        # max_len verified rows, then the future slot, then the round's tree rows.
        shape = (1, cfg.num_key_value_heads, max_len + 1 + tree_rows, cfg.head_dim)
        self.device = head.fc.weight.device
        self.keys = torch.zeros(shape, dtype=head.fc.weight.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=head.fc.weight.dtype, device=self.device)
        self.length = 0
        self.future: tuple[Tensor, Tensor] | None = None
        self.future_shift: Tensor | None = None  # f's residual term for every row of the round (ConFu option)
        self.future_read: Tensor | None = None  # f through the output layer, (Vd,), gated per depth (ConFu option)
        # Node j of a level adds its own column j to what it sees.
        self._own_column = torch.eye(tree_cfg.topk, dtype=torch.bool, device=self.device)

    @property
    def _tree_start(self) -> int:
        """Buffer row of the round's first tree key: after the verified rows and the future key, if any."""
        return self.length + (self.future is not None)

    @torch.no_grad()
    def catch_up(self, features: Tensor, next_tokens: Tensor, f: Tensor | None = None) -> Tensor:
        """Store rows for tokens the target just verified; returns the last row's output hidden (1, 1, H).

        features: (m, 3H) target features of the verified tokens; next_tokens: (m,) the token after each.
        f: the target's future prediction for this round (ConFu only).
        """
        head, layer = self.head, self.head.layer
        m, start = len(next_tokens), self.length
        if start + m > self.max_len:
            raise InputError(f"the draft cache holds {self.max_len} rows; {start} + {m} do not fit")
        hidden_in = head.project_features(features)[None]
        positions = torch.arange(start, start + m, device=self.device)[None]
        q, k, v = layer.qkv(head.embed(next_tokens)[None], hidden_in, positions)
        self.keys[:, :, start : start + m] = k
        self.values[:, :, start : start + m] = v
        self.length += m
        self.future = self.future_shift = self.future_read = None
        if f is not None:  # only a verify extension for a head that reads f makes one
            f_token = head.future_embedding(hidden_in[:, -1:])
            _, fk, fv = layer.qkv(f_token, f.view(1, 1, -1), torch.tensor([[self.length]], device=self.device))
            self.keys[:, :, self.length : self.length + 1] = fk
            self.values[:, :, self.length : self.length + 1] = fv
            self.future = (fk, fv)
            self.future_shift = head.future_shift(f.view(1, 1, -1))
            self.future_read = head.future_logits(f.view(-1))
        # Only the last row's output is used: it drafts the first tree level.
        end = self._tree_start
        mask = self._with_future_bias(torch.ones(1, 1, 1, end, dtype=torch.bool, device=self.device))
        return layer.attend(hidden_in[:, -1:], q[:, :, -1:], self.keys[:, :, :end], self.values[:, :, :end], mask,
                            self.future_shift)

    def _with_future_bias(self, mask: Tensor) -> Tensor:
        """A ConFu head's learned future-key logit offset on the future slot (`DraftConfig.future_bias`)."""
        if self.future is None:
            return mask
        return self.head.future_mask(mask, slice(self.length, self.length + 1))

    def _top_children(self, out_hidden: Tensor, depth: int) -> tuple[Tensor, Tensor]:
        """Top-k children (target ids, log-probs) at draft depth `depth` of each row of out_hidden (n, H), each
        (n, k)."""
        bias = None if self.future_read is None else self.head.future_gate_at(depth) * self.future_read
        return top_children(self.head, out_hidden, self.tree_cfg.topk, bias)

    @torch.no_grad()
    def draft_tree(self, root_out: Tensor, max_nodes: int | None = None, depth: int | None = None) -> DraftTree:
        """Grow a tree from the last verified row's output hidden (1, 1, H); at most `max_nodes` nodes
        (near the end of the context) and `depth` levels (tree sizing may ask for fewer than configured)."""
        head, layer, cfg = self.head, self.head.layer, self.tree_cfg
        if max_nodes is not None and max_nodes < cfg.total_nodes:
            cfg = replace(cfg, total_nodes=max_nodes)
        if depth is not None and depth < cfg.depth:
            cfg = replace(cfg, depth=depth)
        # A kept node at depth d brings its d - 1 ancestors along, so levels below total_nodes never make it.
        levels = min(cfg.depth, cfg.total_nodes)
        builder = TreeBuilder(cfg)
        end = start = self._tree_start  # buffer rows in use: verified (+ future), then this round's tree
        # Row j: the buffer rows expanded node j attends to (verified rows and future, its ancestors, itself).
        # The root's row covers the verified part only; a child's row is its parent's plus its own column.
        sees = torch.zeros(1, start + (levels - 1) * cfg.topk, dtype=torch.bool, device=self.device)
        sees[:, :start] = True
        parent_out = root_out[0]  # (n, H) outputs of the nodes being expanded, the root first
        frontier: Tensor | None = None
        for level in range(1, levels + 1):
            child_tokens, child_logps = self._top_children(parent_out, level - 1)
            first_child = len(builder)
            frontier = builder.expand(frontier, child_tokens, child_logps)
            if level == levels or not len(frontier):  # the last level, or no node left that can be kept
                break
            # Children are numbered row-major after the existing candidates, so a child's row is its parent's.
            created = frontier - first_child
            parent_rows = created // child_tokens.shape[1]
            n = len(frontier)
            sees = sees[parent_rows]
            sees[:, end : end + n] = self._own_column[:n, :n]
            hidden = parent_out[parent_rows][None]
            positions = torch.full((1, n), self.length - 1 + level, device=self.device)
            q, k, v = layer.qkv(head.embed(child_tokens.flatten()[created])[None], hidden, positions)
            self.keys[:, :, end : end + n] = k
            self.values[:, :, end : end + n] = v
            end += n
            mask = self._with_future_bias(sees[None, None, :, :end])
            parent_out = layer.attend(hidden, q, self.keys[:, :, :end], self.values[:, :, :end], mask,
                                      self.future_shift)[0]
        return builder.build()
