"""The batched drafter grows exactly the tree of a naive, node-by-node EAGLE-2 expansion.

The reference below runs the draft layer on one node at a time, attending only to the verified rows, the
future key and the node's own path, and applies the EAGLE-2 rule with Python lists and sorts. Heads run in
float64 so both sides see the same float32 log-probs; a head with rounded logits makes ties on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from confu.engine.draft import DraftConfig, Eagle3Head, apply_rope, init_weights_like_eagle, rope_angles
from confu.engine.drafter import Drafter
from confu.engine.registry import build_head
from confu.engine.tree import DraftTree, TreeConfig

VOCAB, DRAFT_VOCAB, HIDDEN = 200, 24, 32


def _tiny_head(method: str, seed: int) -> Eagle3Head:
    """method: eagle3, confu, confu+bias (ConFu with a learned future-key logit offset, one per head) or
    confu+resid (ConFu whose f also enters the residual)."""
    torch.manual_seed(seed)
    cfg = DraftConfig(
        method=method.split("+")[0], hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB,
        feature_layers=[1, 2, 3],
        target={"name": "tiny", "hidden_size": HIDDEN, "num_hidden_layers": 4, "vocab_size": VOCAB},
        target_num_kv_heads=2, target_head_dim=8, n_expert=4,
        future_bias=0.0 if method.endswith("+bias") else None, future_residual=method.endswith("+resid"),
    )
    head = build_head(cfg)
    with torch.no_grad():
        if method.endswith("+bias"):
            head.future_bias.copy_(torch.tensor([3.0, -1.0, 0.5, 6.0]))  # unequal: each head gets its own
        if method.endswith("+resid"):
            torch.nn.init.normal_(head.future_proj.weight)  # it starts at zero, which would test nothing
    init_weights_like_eagle(head)
    torch.nn.init.normal_(head.embed.weight)
    head.set_vocab(torch.randint(0, VOCAB - DRAFT_VOCAB, (DRAFT_VOCAB,)), torch.ones(VOCAB, dtype=torch.bool))
    return head.double().eval()


def _round_logits(head: Eagle3Head, scale: float) -> None:
    """Logits times `scale`, rounded to integers: equal siblings (ties), and with a large scale a top child of
    log-prob exactly 0."""
    logits = head.logits
    head.logits = lambda out: (logits(out) * scale).round()  # type: ignore[method-assign]


def _reference_tree(d: Drafter, root_out: Tensor, cfg: TreeConfig, future_f: Tensor | None) -> DraftTree:
    """EAGLE-2 growth one node at a time: k children per frontier node, the topk best new candidates form
    the next frontier, the total_nodes best overall are kept (stable sorts: ties keep creation order)."""
    head, layer = d.head, d.head.layer
    verified_keys = [d.keys[:, :, : d.length]] + ([d.future[0]] if d.future else [])
    verified_values = [d.values[:, :, : d.length]] + ([d.future[1]] if d.future else [])
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    depths: list[int] = []
    key_of: dict[int, tuple[Tensor, Tensor]] = {}
    out_of: dict[int, Tensor] = {-1: root_out[0]}

    def path(i: int) -> list[int]:
        return [] if i < 0 else path(parents[i]) + [i]

    def output(i: int) -> Tensor:
        """Node i's output hidden: its own query over the verified rows, the future and its path's keys."""
        if i not in out_of:
            q, k, v = layer.qkv(head.embed(torch.tensor([[tokens[i]]])), out_of[parents[i]][None],
                                torch.tensor([[d.length - 1 + depths[i]]]))
            key_of[i] = (k, v)
            keys = torch.cat(verified_keys + [key_of[j][0] for j in path(i)], 2)
            values = torch.cat(verified_values + [key_of[j][1] for j in path(i)], 2)
            # Additive logits: 0 everywhere but the future key's column, which gets the head's offset.
            mask = torch.zeros(1, 4, 1, keys.shape[2], dtype=keys.dtype)
            if d.future is not None and getattr(head, "future_bias", None) is not None:
                mask[0, :, 0, d.length] = head.future_bias.detach()
            shift = None
            if d.future is not None and getattr(head, "future_proj", None) is not None:
                shift = head.future_proj(future_f)  # the round's f, added to every node's residual
            out_of[i] = layer.attend(out_of[parents[i]][None], q, keys, values, mask, shift)[0]
        return out_of[i]

    def add_children(parent: int) -> list[int]:
        logp = torch.log_softmax(head.logits(output(parent)).float(), -1)[0]
        top = logp.topk(min(cfg.topk, DRAFT_VOCAB))
        base = 0.0 if parent < 0 else scores[parent]
        added = []
        for token, lp in zip(head.to_target_ids(top.indices).tolist(), top.values.double().tolist(), strict=True):
            added.append(len(tokens))
            tokens.append(token)
            parents.append(parent)
            scores.append(base + min(lp, 0.0))
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return added

    frontier = [-1]
    for _ in range(cfg.depth):
        new = [c for p in frontier for c in add_children(p)]
        frontier = sorted(new, key=lambda c: -scores[c])[: cfg.topk]
    kept = sorted(sorted(range(len(tokens)), key=lambda c: -scores[c])[: cfg.total_nodes])
    new_index = {old: new for new, old in enumerate(kept)}
    return DraftTree.from_parents(
        [tokens[i] for i in kept],
        [-1 if parents[i] < 0 else new_index[parents[i]] for i in kept],
        [scores[i] for i in kept],
    )


def _assert_same_tree(got: DraftTree, want: DraftTree) -> None:
    assert got.tokens.tolist() == want.tokens.tolist()
    assert got.parents.tolist() == want.parents.tolist()
    assert torch.equal(got.scores, want.scores)
    assert got.children == want.children
    assert torch.equal(got.ancestor_mask, want.ancestor_mask) and torch.equal(got.retrieve, want.retrieve)


def _rounds(method: str, seed: int, cfg: TreeConfig, max_nodes: int | None = None, depth: int | None = None,
            tweak: Callable[[Eagle3Head], None] | None = None) -> list[tuple[DraftTree, DraftTree]]:
    """Two draft rounds (the second after a catch-up of 3 rows): (drafter's tree, reference tree) each."""
    ref_cfg = TreeConfig(min(max_nodes or cfg.total_nodes, cfg.total_nodes), min(depth or cfg.depth, cfg.depth),
                         cfg.topk)
    head = _tiny_head(method, seed)
    if tweak is not None:
        tweak(head)
    gen = torch.Generator().manual_seed(seed)
    drafter = Drafter(head, cfg, 64)
    pairs = []
    for rows in (7, 3):
        f = torch.randn(HIDDEN, generator=gen, dtype=torch.float64) if method.startswith("confu") else None
        features = torch.randn(rows, 3 * HIDDEN, generator=gen, dtype=torch.float64)
        root_out = drafter.catch_up(features, torch.randint(0, VOCAB, (rows,), generator=gen), f)
        got = drafter.draft_tree(root_out, max_nodes=max_nodes, depth=depth)
        pairs.append((got, _reference_tree(drafter, root_out, ref_cfg, f)))
    return pairs


SHAPES = [  # (total_nodes, depth, topk)
    (16, 6, 8),
    (60, 5, 10),
    (10, 4, 3),
    (3, 5, 2),  # fewer nodes than levels
    (40, 1, 8),  # depth 1: the root's children only
    (25, 7, 1),  # a chain
    (50, 3, 30),  # topk above the draft vocabulary
]


@pytest.mark.parametrize("method", ["eagle3", "confu", "confu+bias", "confu+resid"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}-{d}-{k}" for n, d, k in SHAPES])
def test_drafter_matches_naive_growth(method: str, shape: tuple[int, int, int]) -> None:
    for got, want in _rounds(method, seed=sum(shape), cfg=TreeConfig(*shape)):
        _assert_same_tree(got, want)


@pytest.mark.parametrize("max_nodes", [1, 5, 15])
def test_max_nodes_below_total_nodes(max_nodes: int) -> None:
    for got, want in _rounds("eagle3", seed=3, cfg=TreeConfig(16, 6, 8), max_nodes=max_nodes):
        _assert_same_tree(got, want)
        assert len(got) == max_nodes


@pytest.mark.parametrize("depth", [1, 3, 9])
def test_depth_below_configured(depth: int) -> None:
    for got, want in _rounds("confu", seed=4, cfg=TreeConfig(30, 6, 5), depth=depth):
        _assert_same_tree(got, want)
        assert got.max_depth <= depth


@pytest.mark.parametrize("scale", [2.0, 200.0])
@pytest.mark.parametrize("method", ["eagle3", "confu"])
def test_ties_keep_creation_order(method: str, scale: float) -> None:
    """Rounded logits: equal siblings at scale 2; at scale 200 top children of log-prob 0 tie their parents."""
    for got, want in _rounds(method, seed=5, cfg=TreeConfig(30, 5, 6), tweak=lambda head: _round_logits(head, scale)):
        _assert_same_tree(got, want)
        if scale > 100:  # a top child of probability one scores exactly what its parent scores
            child = got.parents >= 0
            assert (got.scores[child] == got.scores[got.parents[child]]).any()
        else:  # equal siblings
            siblings = [got.scores[kids].tolist() for kids in got.children if len(kids) > 1]
            assert any(len(set(s)) < len(s) for s in siblings)


def test_rotary_embedding_is_a_rotation_by_position():
    # Each pair (x[i], x[i + d/2]) turns by position * theta^(-2i/d): so q.k after rotation depends only on
    # the positions' difference, and lengths are kept (the angles are float32, hence 1e-6).
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16, dtype=torch.float64), torch.randn(1, 2, 1, 16, dtype=torch.float64)

    def rotated(x: Tensor, pos: int) -> Tensor:
        cos, sin = rope_angles(torch.tensor([[pos]]), 16, 500.0, torch.float64)
        return apply_rope(x, cos, sin)

    dots = [float((rotated(q, m + 7) * rotated(k, m)).sum()) for m in (0, 3, 40)]
    assert dots == pytest.approx([dots[0]] * 3, rel=1e-6)
    assert float((rotated(q, 5) * rotated(k, 5)).sum()) == pytest.approx(float((q * k).sum()), rel=1e-6)
    assert float(rotated(q, 11).norm()) == pytest.approx(float(q.norm()), rel=1e-6)
    angle = 3 * 500.0 ** (-2 * 1 / 16)  # pair 1 at position 3
    x = torch.zeros(1, 1, 1, 16, dtype=torch.float64)
    x[..., 1] = 1.0
    y = rotated(x, 3)
    assert float(y[..., 1]) == pytest.approx(torch.cos(torch.tensor(angle, dtype=torch.float64)).item())
    assert float(y[..., 9]) == pytest.approx(torch.sin(torch.tensor(angle, dtype=torch.float64)).item())
