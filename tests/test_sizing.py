"""Hardware-aware tree sizing: cost curves, the per-round decisions, and lossless decoding under `auto`."""

from __future__ import annotations

from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.sizing import AutoSizer, VerifyCosts, load_verify_costs, prune
from confu.engine.tree import DraftTree, TreeConfig
from tests.helpers import PROMPTS, OracleProposer, chat_ids, decoder_with, hf_greedy, load_target

# A CPU-like curve: a pass over 1 row 40 ms, flat up to 5 rows, then about 2.5 ms a row.
COSTS = VerifyCosts([1, 5, 9, 17, 33], [0.040, 0.044, 0.054, 0.074, 0.114])


def test_cost_curve_interpolates_and_extrapolates():
    assert COSTS(1) == 0.040 and COSTS(0) == 0.040
    assert abs(COSTS(7) - 0.049) < 1e-12
    assert abs(COSTS(41) - (0.114 + 8 * 0.040 / 16)) < 1e-12
    assert all(COSTS(n) <= COSTS(n + 1) for n in range(1, 60))


def _round(sizer: AutoSizer, accepted: int, tree: DraftTree, draft_s: float = 0.006):
    depth = sizer.plan_round()
    if depth:
        sizer.observe(sizer.choose_nodes(tree, draft_s), depth, accepted, draft_s)
    return depth


def _chain_tree(depth: int, logp: float) -> DraftTree:
    return DraftTree.from_parents(list(range(depth)), list(range(-1, depth - 1)), [logp * (i + 1) for i in range(depth)])


def test_useless_draft_is_skipped_but_rechecked():
    sizer = AutoSizer(COSTS, max_depth=6, explore_every=8)
    depths = [_round(sizer, accepted=0, tree=_chain_tree(6, -2.0)) for _ in range(40)]
    assert depths[0] == 2, "the first round measures a shallow draft"
    later = depths[1:]
    assert sum(d == 0 for d in later) >= 33, f"a draft that never hits must mostly be skipped: {depths}"
    assert any(d > 0 for d in later), "it must still be re-checked now and then"
    assert max(depths) <= 2, "a draft that misses at level 1 is never drafted deeper"


def test_good_draft_is_used_deep_and_wide():
    sizer = AutoSizer(COSTS, max_depth=6)
    wide = DraftTree.from_parents(list(range(12)), [-1, 0, 1, 2, 3, 4, -1, 0, 1, 2, 3, 4],
                                  [-0.05 * (i % 6 + 1) - (i >= 6) for i in range(12)])
    depths = [_round(sizer, accepted=6, tree=wide) for _ in range(20)]
    assert depths[:5] == [2, 3, 4, 5, 6], f"a draft accepted to its full depth is drafted deeper each round: {depths}"
    assert all(d == 6 for d in depths[5:]), depths
    kept = sizer.choose_nodes(wide, 0.006)
    assert 6 <= len(kept) <= 12 and sizer.calibration > 0.5


def test_node_choice_keeps_a_valid_top_scored_subtree():
    sizer = AutoSizer(VerifyCosts([1, 2, 64], [0.040, 0.060, 0.060 + 62 * 0.020]), max_depth=3)
    tree = DraftTree.from_parents([5, 6, 7, 8, 9], [-1, -1, 0, 0, 2], [-0.1, -3.0, -0.3, -4.0, -0.6])
    kept = sizer.choose_nodes(tree, 0.0)
    assert 1 <= len(kept) < len(tree), "expensive rows: only the likeliest nodes are worth verifying"
    assert kept.tokens.tolist() == [5, 7, 9][: len(kept)]
    sub = prune(tree, [0, 2, 4])
    assert sub.parents.tolist() == [-1, 0, 1] and sub.tokens.tolist() == [5, 7, 9]


def test_cost_curve_is_measured_once_and_cached(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path))
    target = load_target(tiny_llama_dir)
    first = load_verify_costs(target)
    assert first.rows[0] == 1 and len(first.rows) == len(first.seconds) and all(s > 0 for s in first.seconds)
    assert all(a <= b for a, b in zip(first.seconds, first.seconds[1:], strict=False))
    assert len(list((tmp_path / "costs").glob("*.json"))) == 1
    assert load_verify_costs(target).seconds == first.seconds  # read back, not re-measured


def test_auto_sizing_is_lossless_and_uses_an_accepting_proposer(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path))
    target = load_target(tiny_llama_dir)
    for method in ("eagle3", "confu"):
        head = new_draft(target, method, draft_vocab_size=256)
        for text in PROMPTS[:3]:
            ids = chat_ids(target, text)
            ref = hf_greedy(target, ids, 24)
            OracleProposer.reference = ids + ref
            cfg = GenerationConfig(max_new_tokens=24, tree=TreeConfig(12, 5, 2))
            res = decoder_with(target, head, OracleProposer).generate(ids, cfg)
            assert res.tokens == ref, (method, text)
            untrained = Decoder.for_head(target, head).generate(ids, cfg)
            assert untrained.tokens == ref, (method, text)
            assert all(s.tree_nodes <= 12 and s.depth <= 5 for s in res.steps + untrained.steps)


def test_drafting_that_loses_on_the_clock_backs_off():
    """The cost model says drafting pays (cheap rows, every level accepted), the clock says it does not:
    drafting stops except to re-check, and the re-checks grow rarer; once drafting wins again they return."""
    sizer = AutoSizer(COSTS, max_depth=3, explore_every=4)
    tree = _chain_tree(3, -0.05)
    depths = []
    for _ in range(200):
        depth = sizer.plan_round()
        depths.append(depth)
        if depth:
            sizer.observe(sizer.choose_nodes(tree, 0.001), depth, 1, 0.030, 0.070)  # 2 tokens in 100 ms
        else:
            sizer.observe_plain(0.030)  # 1 token in 30 ms
    assert sizer.drafting_loses
    drafted = [i for i, d in enumerate(depths) if d]
    assert len(drafted) <= 16, f"drafting must back off: {len(drafted)} of 200 rounds drafted"
    gaps = [b - a for a, b in zip(drafted, drafted[1:], strict=False)]
    assert gaps[-1] >= 32, f"re-checks grow rarer: {gaps}"
    for _ in range(3):  # drafting wins again
        sizer.observe(tree, 3, 3, 0.005, 0.030)
    assert not sizer.drafting_loses and sizer.explore_gap == 4


def test_a_stale_plain_clock_is_timed_again_while_every_round_drafts():
    """Rounds without a draft were timed in a slow stretch of the machine (60 ms a token); drafting (2 tokens in
    50 ms) beats that stale number, and since it then drafts every round, nothing would ever correct it. A
    round without a draft is timed again after a few drafted rounds: at its real 20 ms, plain decoding wins."""
    sizer = AutoSizer(COSTS, max_depth=2, explore_every=4)
    for _ in range(20):
        sizer.observe_plain(0.060)
    depths = []
    for _ in range(100):
        depth = sizer.plan_round()
        depths.append(depth)
        if depth:
            sizer.observe(sizer.choose_nodes(_chain_tree(depth, -0.7), 0.004), depth, 1, 0.004, 0.046)
        else:
            sizer.observe_plain(0.020)
    assert depths[:3] != [0, 0, 0], "drafting first beats the stale clock"
    assert 0 in depths[:8], f"a plain round is re-timed within a few drafted rounds: {depths}"
    assert sizer.drafting_loses and sum(d == 0 for d in depths[-50:]) >= 40, depths
    # ... and while drafting really wins, the re-timings grow rarer
    winner = AutoSizer(COSTS, max_depth=2, explore_every=4)
    winner.observe_plain(0.030)
    plain_rounds = []
    for i in range(200):
        depth = winner.plan_round()
        if depth:
            winner.observe(winner.choose_nodes(_chain_tree(depth, -0.1), 0.004), depth, depth, 0.004, 0.026)
        else:
            plain_rounds.append(i)
            winner.observe_plain(0.030)
    gaps = [b - a for a, b in zip(plain_rounds, plain_rounds[1:], strict=False)]
    assert not winner.drafting_loses and 3 <= len(plain_rounds) <= 7 and gaps == sorted(gaps), plain_rounds


def test_a_draft_that_pays_only_shallow_is_drafted_shallow():
    """On the clock, depth 1 beats plain decoding and depth 2 loses (each level costs more than it brings):
    the first, depth-2 round loses, yet a re-check at depth 1 finds what pays and drafting stays there, with
    only the periodic look one level deeper. (One mean over all drafted rounds would call drafting a loss.)"""
    sizer = AutoSizer(COSTS, max_depth=4, explore_every=8)
    round_s = {1: 0.046, 2: 0.080, 3: 0.100, 4: 0.120}  # plain: 0.040 s a token; 1.5 tokens a drafted round
    depths = []
    for i in range(120):
        depth = sizer.plan_round()
        depths.append(depth)
        if depth:
            sizer.observe(sizer.choose_nodes(_chain_tree(depth, -0.7), 0.004 * depth), depth, i % 2,
                          0.004 * depth, round_s[depth] - 0.004 * depth)
        else:
            sizer.observe_plain(0.040)
    assert depths[0] == 2 and not sizer.drafting_loses
    assert sum(d == 1 for d in depths) >= 90, f"depth 1 pays and must be the usual choice: {depths}"
    assert sum(d >= 2 for d in depths) <= 20, depths
    plain, depth_rate, _ = sizer.clock()
    seeded = AutoSizer(COSTS, max_depth=4, explore_every=8)
    seeded.set_clock((plain, depth_rate, 8))
    assert seeded.plan_round() == 1, "the next sequence starts at the depth that paid"


def test_the_clock_carries_over_to_the_next_sequence():
    """A sizer seeded with a clock that says drafting loses does not draft at once (it waits for a re-check)."""
    fresh = AutoSizer(COSTS, max_depth=3, explore_every=4)
    assert fresh.plan_round() == 2
    seeded = AutoSizer(COSTS, max_depth=3, explore_every=4)
    seeded.set_clock((0.030, [0.0, 20.0], 16))  # plain 33 tokens/s, drafting 20 (at depth 2)
    depths = [seeded.plan_round() for _ in range(16)]
    assert depths[:15] == [0] * 15 and depths[15] == 2, depths


def test_rounds_draft_toward_twice_the_nodes_they_keep():
    """A round asks the drafter for twice the nodes the last one kept (at least 4), not for 60: growing toward
    60 expanded up to top-k rows a level to verify two or three. A choice that fills the budget doubles it."""
    sizer = AutoSizer(COSTS, max_depth=6)
    assert sizer.draft_nodes() == 4
    likely = DraftTree.from_parents(list(range(12)), [-1, 0, 1, 2, 3, 4, -1, 0, 1, 2, 3, 4],
                                    [-0.05 * (i % 6 + 1) - (i >= 6) for i in range(12)])
    kept = sizer.choose_nodes(likely, 0.006)
    assert sizer.draft_nodes() == 2 * len(kept) > 4
    sizer.choose_nodes(_chain_tree(4, -3.0), 0.006)  # unlikely nodes: one at most is worth a row
    assert sizer.draft_nodes() == 4


def test_auto_rounds_hand_the_drafter_their_node_budget(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path))
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "eagle3", draft_vocab_size=256)
    asked = []

    class Recording(OracleProposer):
        def propose(self, max_nodes, depth):
            asked.append((max_nodes, depth))
            return super().propose(max_nodes, depth)

    ids = chat_ids(target, PROMPTS[0])
    ref = hf_greedy(target, ids, 32)
    OracleProposer.reference = ids + ref
    res = decoder_with(target, head, Recording).generate(ids, GenerationConfig(max_new_tokens=32,
                                                                              tree=TreeConfig(60, 6, 4)))
    assert res.tokens == ref
    drafted = [s for s in res.steps if s.depth]
    assert asked and asked[0][0] == 4 and len(asked) == len(drafted)
    for (budget, depth), before in zip(asked[1:], drafted, strict=False):
        assert budget == 2 * max(before.tree_nodes, 2) and depth <= budget, (budget, depth, before)
