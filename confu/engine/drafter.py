"""Drafting at inference: the draft head's own KV cache and the EAGLE-2 dynamic tree expansion.

Row t of the draft cache pairs the target's features of token t with the embedding of token t+1 and sits at
RoPE position t. Only rows the target has verified are stored; tree nodes of a round live in a scratch list.
For ConFu, the round's future token (token half [f], hidden half f) is one extra key every query of the round
sees, at position last_row + 1; it is never stored, because the next round brings a new f.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from confu.engine.draft import Eagle3Head
from confu.engine.tree import DraftTree, TreeBuilder, TreeConfig


class Drafter:
    def __init__(self, head: Eagle3Head, tree_cfg: TreeConfig, max_len: int):
        cfg = head.cfg
        self.head = head
        self.tree_cfg = tree_cfg
        shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=head.fc.weight.dtype)
        self.values = torch.zeros(shape, dtype=head.fc.weight.dtype)
        self.length = 0
        self.future: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def catch_up(self, features: Tensor, next_tokens: Tensor, f: Tensor | None = None) -> Tensor:
        """Store rows for tokens the target just verified; returns the last row's output hidden (1, 1, H).

        features: (m, 3H) target features of the verified tokens; next_tokens: (m,) the token after each.
        f: the target's future prediction for this round (ConFu only).
        """
        head, layer = self.head, self.head.layer
        m, start = len(next_tokens), self.length
        hidden_in = head.project_features(features)[None]
        q, k, v = layer.qkv(head.embed(next_tokens)[None], hidden_in, torch.arange(start, start + m)[None])
        self.keys[:, :, start : start + m] = k
        self.values[:, :, start : start + m] = v
        self.length += m
        self.future = None
        if f is not None and head.is_confu:
            f_token = head.future_embedding(hidden_in[:, -1:])
            _, fk, fv = layer.qkv(f_token, f.view(1, 1, -1), torch.tensor([[self.length]]))
            self.future = (fk, fv)
        # Only the last row's output is used: it drafts the first tree level.
        keys, values = self._keys_with_future(self.keys[:, :, : self.length], self.values[:, :, : self.length])
        mask = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
        return layer.attend(hidden_in[:, -1:], q[:, :, -1:], keys, values, mask)

    def _keys_with_future(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if self.future is None:
            return keys, values
        return torch.cat([keys, self.future[0]], 2), torch.cat([values, self.future[1]], 2)

    def _top_children(self, out_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k children (target ids, log-probs) of each row of out_hidden (n, H)."""
        logp = torch.log_softmax(self.head.logits(out_hidden).float(), dim=-1)
        top = logp.topk(min(self.tree_cfg.topk, logp.shape[-1]), dim=-1)
        return self.head.to_target_ids(top.indices), top.values

    @torch.no_grad()
    def draft_tree(self, root_out: Tensor, max_nodes: int | None = None) -> DraftTree:
        """Grow a tree from the last verified row's output hidden (1, 1, H); at most `max_nodes` nodes
        (near the end of the context)."""
        head, layer, cfg = self.head, self.head.layer, self.tree_cfg
        if max_nodes is not None and max_nodes < cfg.total_nodes:
            cfg = replace(cfg, total_nodes=max_nodes)
        builder = TreeBuilder(cfg)
        tokens, logps = self._top_children(root_out[0])
        frontier = builder.grow(None, tokens, logps)
        out_of: dict[int, Tensor] = {}  # expanded candidate -> its output hidden (H,)
        column_of: dict[int, int] = {}  # expanded candidate -> its column in the round's tree keys
        tree_k: list[Tensor] = []
        tree_v: list[Tensor] = []
        root_pos = self.length - 1
        for depth in range(1, cfg.depth):
            if not frontier:
                break
            node_tokens = torch.tensor([builder.token_of(i) for i in frontier])
            parent_out = torch.stack(
                [out_of[builder.parent_of(i)] if builder.parent_of(i) >= 0 else root_out[0, 0] for i in frontier]
            )[None]
            positions = torch.full((1, len(frontier)), root_pos + depth)
            q, k, v = layer.qkv(head.embed(node_tokens)[None], parent_out, positions)
            for j, i in enumerate(frontier):
                column_of[i] = len(tree_k) + j
            tree_k.extend(k.unbind(2))
            tree_v.extend(v.unbind(2))
            n_tree = len(tree_k)
            tree_mask = torch.zeros(len(frontier), n_tree, dtype=torch.bool)
            for j, i in enumerate(frontier):
                tree_mask[j, [column_of[a] for a in builder.ancestors(i)] + [column_of[i]]] = True
            keys = torch.cat([self.keys[:, :, : self.length], torch.stack(tree_k, 2)], 2)
            values = torch.cat([self.values[:, :, : self.length], torch.stack(tree_v, 2)], 2)
            keys, values = self._keys_with_future(keys, values)
            mask = torch.ones(len(frontier), keys.shape[2], dtype=torch.bool)
            mask[:, self.length : self.length + n_tree] = tree_mask
            out = layer.attend(parent_out, q, keys, values, mask[None, None])[0]
            for j, i in enumerate(frontier):
                out_of[i] = out[j]
            tokens, logps = self._top_children(out)
            frontier = builder.grow(frontier, tokens, logps)
        return builder.build()
