"""Draft tree bookkeeping: EAGLE-2 expansion, rerank to the node budget, derived buffers."""

from __future__ import annotations

import math

import pytest
import torch

from confu.engine.tree import DraftTree, TreeBuilder, TreeConfig, path_to
from confu.errors import InputError


def _lp(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


def _check_invariants(tree: DraftTree) -> None:
    n = len(tree)
    parents = tree.parents.tolist()
    depths = tree.depths.tolist()
    for i, p in enumerate(parents):
        assert -1 <= p < i
        assert depths[i] == (1 if p < 0 else depths[p] + 1)
        expected = set(path_to(tree, i))
        assert {j for j in range(n) if tree.ancestor_mask[i, j]} == expected
    for row in tree.retrieve.tolist():
        nodes = [j for j in row if j >= 0]
        assert row[len(nodes) :] == [-1] * (len(row) - len(nodes))
        assert nodes == path_to(tree, nodes[-1])
        assert not tree.children_of(nodes[-1])
    leaves = {i for i in range(n) if not tree.children_of(i)}
    assert {r[[j for j in range(len(r)) if r[j] >= 0][-1]].item() for r in tree.retrieve} == leaves
    assert sorted(c for kids in tree.children for c in kids) == list(range(n))


def test_config_validation() -> None:
    assert TreeConfig() == TreeConfig(total_nodes=60, depth=5, topk=10)
    for kwargs in ({"total_nodes": 0}, {"depth": 0}, {"topk": -1}, {"topk": 2.0}, {"depth": True}):
        with pytest.raises(InputError):
            TreeConfig(**kwargs)


def test_frontier_selection_and_rerank() -> None:
    b = TreeBuilder(TreeConfig(total_nodes=5, depth=3, topk=2))
    f1 = b.grow(None, torch.tensor([[10, 11, 12]]), _lp(0.5, 0.3, 0.2))
    assert f1 == [0, 1]  # best two of the root's children, best first
    assert [b.depth_of(i) for i in range(3)] == [1, 1, 1]
    # Candidates 3..5 below node 0 (0.5 * .), 6..8 below node 1 (0.3 * .).
    logp = torch.tensor([[0.3, 0.1, 0.05], [0.9, 0.05, 0.05]]).log()
    f2 = b.grow(f1, torch.tensor([[20, 21, 22], [23, 24, 25]]), logp)
    # Cumulative: 3: .15, 4: .05, 5: .025, 6: .27, 7: .015, 8: .015
    assert f2 == [6, 3]
    assert b.parent_of(6) == 1 and b.depth_of(6) == 2
    assert b.ancestors(6) == [1]
    assert math.isclose(b.score_of(6), math.log(0.3 * 0.9), rel_tol=1e-6)
    f3 = b.grow(f2, torch.tensor([[30], [31]]), torch.tensor([[0.9], [0.5]]).log())
    # .243 and .075: 10 is already outside the best 5 (.5, .3, .27, .243, .2) and so cannot be kept: pruned
    assert f3 == [9]
    assert b.ancestors(9) == [1, 6] and b.ancestors(10) == [0, 3]
    assert b.num_candidates == 11

    tree = b.build()
    # Global top 5: 0 (.5), 1 (.3), 6 (.27), 9 (.243), 2 (.2); 3 (.15) is dropped.
    assert tree.tokens.tolist() == [10, 11, 12, 23, 30]
    assert tree.parents.tolist() == [-1, -1, -1, 1, 3]
    assert tree.depths.tolist() == [1, 1, 1, 2, 3]
    assert tree.children == [[0, 1, 2], [], [3], [], [4], []]
    torch.testing.assert_close(tree.scores, torch.tensor([0.5, 0.3, 0.2, 0.27, 0.243]).log())
    expected_mask = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 1, 0, 1, 0],
            [0, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestor_mask, expected_mask)
    assert tree.retrieve.tolist() == [[0, -1, -1], [2, -1, -1], [1, 3, 4]]
    assert path_to(tree, 4) == [1, 3, 4]
    assert tree.max_depth == 3 and len(tree) == 5
    _check_invariants(tree)


def test_rerank_keeps_parents_even_with_probability_one_children() -> None:
    # A child with log-prob 0 ties its parent; creation order must still put the parent first.
    b = TreeBuilder(TreeConfig(total_nodes=3, depth=4, topk=1))
    f = b.grow(None, torch.tensor([[5, 6]]), _lp(0.6, 0.4))
    for _ in range(3):
        f = b.grow(f, torch.tensor([[7, 8]]), torch.tensor([[0.0, -math.inf]]))
    tree = b.build()
    assert tree.tokens.tolist() == [5, 7, 7]
    assert tree.parents.tolist() == [-1, 0, 1]
    _check_invariants(tree)


def test_children_sorted_by_descending_score() -> None:
    b = TreeBuilder(TreeConfig(total_nodes=10, depth=2, topk=3))
    f = b.grow(None, torch.tensor([3, 1, 2]), _lp(0.2, 0.5, 0.3).flatten())
    assert f == [1, 2, 0]
    b.grow([1], torch.tensor([[4, 5, 6]]), _lp(0.1, 0.7, 0.2))
    tree = b.build()
    assert tree.children_of(-1) == [1, 2, 0]
    assert [tree.tokens[c].item() for c in tree.children_of(1)] == [5, 6, 4]


def test_likely_path_follows_the_top_child_while_it_is_likely_enough() -> None:
    b = TreeBuilder(TreeConfig(total_nodes=10, depth=3, topk=2))
    f = b.grow(None, torch.tensor([3, 1]), _lp(0.3, 0.7).flatten())  # token 1 (p 0.7) is the root's top child
    f = b.grow(f[:1], torch.tensor([[4, 5]]), _lp(0.6, 0.4))  # below it: token 4, reached with p 0.42
    b.grow(f[:1], torch.tensor([[6, 7]]), _lp(0.5, 0.5))  # then p 0.21
    tree = b.build()
    tokens = lambda path: [int(tree.tokens[n]) for n in path]  # noqa: E731
    assert tokens(tree.likely_path(0.0)) == [1, 4, 6]
    assert tokens(tree.likely_path(0.25)) == [1, 4]
    assert tokens(tree.likely_path(0.5)) == [1]
    assert tree.likely_path(0.8) == []


def test_depth_one_tree() -> None:
    b = TreeBuilder(TreeConfig(total_nodes=60, depth=1, topk=4))
    f = b.grow(None, torch.tensor([[9, 8, 7, 6]]), _lp(0.1, 0.2, 0.3, 0.4))
    assert f == [3, 2, 1, 0]
    with pytest.raises(InputError):
        b.grow(f, torch.tensor([[1]] * 4), torch.zeros(4, 1))  # would exceed depth 1
    tree = b.build()
    assert tree.tokens.tolist() == [9, 8, 7, 6]
    assert tree.parents.tolist() == [-1] * 4
    assert tree.retrieve.tolist() == [[0], [1], [2], [3]]
    assert torch.equal(tree.ancestor_mask, torch.eye(4, dtype=torch.bool))
    assert tree.children_of(-1) == [3, 2, 1, 0]
    _check_invariants(tree)


def test_total_nodes_smaller_than_first_level() -> None:
    b = TreeBuilder(TreeConfig(total_nodes=2, depth=3, topk=5))
    f = b.grow(None, torch.tensor([[1, 2, 3, 4, 5]]), _lp(0.1, 0.4, 0.05, 0.3, 0.15))
    assert f == [1, 3]  # the best 5, less the 3 that two nodes can never hold
    assert b.grow(f, torch.tensor([[6], [7]]), _lp(0.5, 0.5).T) == []  # .2 and .15 both rank below .4 and .3
    tree = b.build()
    assert tree.tokens.tolist() == [2, 4]
    assert tree.parents.tolist() == [-1, -1]
    _check_invariants(tree)


def test_single_chain_via_builder_and_helper() -> None:
    b = TreeBuilder(TreeConfig(total_nodes=60, depth=4, topk=1))
    f = b.grow(None, torch.tensor([[11]]), _lp(0.9))
    for t in (12, 13, 14):
        f = b.grow(f, torch.tensor([[t]]), _lp(0.9))
    built = b.build()
    chain = DraftTree.chain([11, 12, 13, 14])
    for tree in (built, chain):
        assert tree.tokens.tolist() == [11, 12, 13, 14]
        assert tree.parents.tolist() == [-1, 0, 1, 2]
        assert tree.depths.tolist() == [1, 2, 3, 4]
        assert tree.retrieve.tolist() == [[0, 1, 2, 3]]
        assert torch.equal(tree.ancestor_mask, torch.ones(4, 4, dtype=torch.bool).tril())
        _check_invariants(tree)


def test_from_parents_validation_and_empty_tree() -> None:
    with pytest.raises(InputError):
        DraftTree.from_parents([1, 2], [-1, 1])  # a node cannot be its own parent
    with pytest.raises(InputError):
        DraftTree.from_parents([1, 2], [-1])
    with pytest.raises(InputError):
        DraftTree.from_parents([1], [-1], [float("nan")])
    empty = DraftTree.chain([])
    assert len(empty) == 0 and empty.children == [[]] and empty.retrieve.shape == (0, 0)
    assert empty.ancestor_mask.shape == (0, 0) and empty.max_depth == 0
    assert len(TreeBuilder(TreeConfig()).build()) == 0


def test_builder_input_errors() -> None:
    b = TreeBuilder(TreeConfig(depth=3))
    with pytest.raises(InputError):
        b.grow(None, torch.tensor([[1, 2]]), torch.tensor([[0.5, -1.0]]))  # not log-probs
    with pytest.raises(InputError):
        b.grow(None, torch.tensor([[1, 2], [3, 4]]), torch.zeros(2, 2))  # root has one row
    f = b.grow(None, torch.tensor([[1, 2]]), _lp(0.5, 0.5))
    with pytest.raises(InputError):
        b.grow(None, torch.tensor([[1]]), _lp(1.0))  # root twice
    with pytest.raises(InputError):
        b.grow([99], torch.tensor([[1]]), _lp(1.0))
    with pytest.raises(InputError):
        b.grow(f, torch.tensor([[1]]), _lp(1.0))  # rows != parents
    with pytest.raises(InputError):
        b.ancestors(5)


def test_random_builds_are_valid_trees() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        cfg = TreeConfig(total_nodes=1 + trial * 3, depth=1 + trial % 5, topk=1 + trial % 4)
        b = TreeBuilder(cfg)
        k = 1 + trial % 3
        root_logp = torch.randn(1, k, generator=gen).log_softmax(-1)
        frontier = b.grow(None, torch.randint(0, 8, (1, k), generator=gen), root_logp)
        for _ in range(cfg.depth - 1):
            n = len(frontier)
            logp = torch.randn(n, 8, generator=gen).log_softmax(-1).topk(k, dim=-1).values
            frontier = b.grow(frontier, torch.randint(0, 8, (n, k), generator=gen), logp)
        tree = b.build()
        assert len(tree) == min(cfg.total_nodes, b.num_candidates)
        assert tree.max_depth <= cfg.depth
        kept_scores = sorted(tree.scores.tolist(), reverse=True)
        all_scores = sorted((b.score_of(i) for i in range(b.num_candidates)), reverse=True)
        torch.testing.assert_close(torch.tensor(kept_scores), torch.tensor(all_scores[: len(tree)]))
        _check_invariants(tree)


def test_to_device_round_trip() -> None:
    tree = DraftTree.from_parents([4, 5, 6], [-1, 0, 0], [-0.1, -0.5, -0.2])
    moved = tree.to("cpu")
    assert torch.equal(moved.ancestor_mask, tree.ancestor_mask)
    assert moved.children == tree.children == [[0], [2, 1], [], []]


def _naive_tree(parents: list[int], scores: list[float]) -> tuple[list[set[int]], list[int], list[list[int]]]:
    """Ancestor sets (self included), depths and score-ordered children, one node at a time."""
    ancestors: list[set[int]] = []
    depths: list[int] = []
    for i, p in enumerate(parents):
        ancestors.append({i} | (ancestors[p] if p >= 0 else set()))
        depths.append(len(ancestors[i]))
    children = [sorted((c for c, q in enumerate(parents) if q == p), key=lambda c: -scores[c])
                for p in range(-1, len(parents))]
    return ancestors, depths, children


def test_from_parents_matches_naive_construction() -> None:
    gen = torch.Generator().manual_seed(1)
    for n in list(range(12)) + [40, 60]:
        parents = [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(n)]
        # Scores on a coarse grid (many ties) with -inf and 0 among them.
        scores = [float(s) for s in torch.randint(-4, 1, (n,), generator=gen).double() / 2]
        scores = [-math.inf if s == -2.0 else s for s in scores]
        tree = DraftTree.from_parents(torch.arange(n) + 100, parents, scores)
        ancestors, depths, children = _naive_tree(parents, scores)
        assert tree.depths.tolist() == depths and tree.children == children
        assert [set(torch.nonzero(row).flatten().tolist()) for row in tree.ancestor_mask] == ancestors
        leaves = [i for i in range(n) if not children[i + 1]]
        assert tree.retrieve.tolist() == [sorted(ancestors[i]) + [-1] * (max(depths) - depths[i]) for i in leaves]
        _check_invariants(tree)


def test_sibling_order_uses_the_scores_as_given() -> None:
    # Python floats are ordered in float64; a float32 tensor rounds both to one value, a tie kept in index order.
    scores = [-0.1 - 1e-12, -0.1]
    assert DraftTree.from_parents([1, 2], [-1, -1], scores).children_of(-1) == [1, 0]
    assert DraftTree.from_parents([1, 2], [-1, -1], torch.tensor(scores)).children_of(-1) == [0, 1]


def _eagle2_unpruned(cfg: TreeConfig, children) -> list[tuple[tuple[int, ...], float]]:
    """EAGLE-2 as published, as a reference: expand the top-k new candidates of every level, keep the best
    `total_nodes` of everything. Candidates are (token path, score); `children(path)` gives (tokens, logps)."""
    cands: list[tuple[tuple[int, ...], float]] = []
    frontier = [((), 0.0)]
    for _ in range(cfg.depth):
        new = []
        for path, score in frontier:
            tokens, logps = children(path)
            new += [(path + (t,), score + lp) for t, lp in zip(tokens, logps, strict=True)]
        order = sorted(range(len(new)), key=lambda i: -new[i][1])  # stable: creation order on ties
        cands += new
        frontier = [new[i] for i in order[: cfg.topk]]
    keep = sorted(range(len(cands)), key=lambda i: -cands[i][1])[: cfg.total_nodes]
    return sorted(cands[i] for i in keep)


def test_pruned_frontier_builds_the_unpruned_tree() -> None:
    """Expanding only the nodes the final tree can still keep changes nothing in it (the proof is in
    TreeBuilder.expand), while it skips expansions when the budget is small."""
    skipped = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        cfg = TreeConfig(total_nodes=int(torch.randint(1, 30, (1,), generator=gen)),
                         depth=int(torch.randint(1, 6, (1,), generator=gen)),
                         topk=int(torch.randint(1, 6, (1,), generator=gen)))

        def children(path, cfg=cfg):
            g = torch.Generator().manual_seed(hash(path) % 2**31)  # the same children for the same node
            logps = torch.log_softmax(torch.randn(50, generator=g) * 3, -1).topk(cfg.topk)
            return [int(t) for t in logps.indices], [float(v) for v in logps.values.double()]

        b = TreeBuilder(cfg)
        paths = {}
        frontier = None
        for _ in range(cfg.depth):
            parents = [()] if frontier is None else [paths[int(i)] for i in frontier]
            if not parents:
                skipped += 1
                break
            kids = [children(p) for p in parents]
            first = len(b)
            frontier = b.expand(frontier, torch.tensor([t for t, _ in kids]),
                                torch.tensor([lp for _, lp in kids], dtype=torch.float64))
            for r, p in enumerate(parents):
                for c, t in enumerate(kids[r][0]):
                    paths[first + r * cfg.topk + c] = p + (t,)
        tree = b.build()
        ours = sorted((tuple(int(tree.tokens[j]) for j in path_to(tree, i)), float(tree.scores[i]))
                      for i in range(len(tree)))
        ref = _eagle2_unpruned(cfg, children)
        assert [p for p, _ in ours] == [p for p, _ in ref], cfg
        assert [s for _, s in ours] == pytest.approx([s for _, s in ref]), cfg
    assert skipped > 0
