"""The report's statistics on inputs whose answers are known: bootstrap intervals on known distributions,
acceptance counts by depth, and the utilisation of constructed routers (`confu.bench.stats`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from confu.bench.stats import bootstrap_ratio, depth_counts, merge_tallies, router_tally, utilisation


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory():
    # num / den with den = 1: the ratio is the sample mean; its 95% interval is mean +- 1.96 sigma / sqrt(n).
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, size=400)
    ci = bootstrap_ratio(x, np.ones_like(x))
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert ci.lo == pytest.approx(x.mean() - half, abs=0.02)
    assert ci.hi == pytest.approx(x.mean() + half, abs=0.02)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # (A percentile interval runs a little short on small skewed samples: 89% for 60 exponential draws.)
    rng = np.random.default_rng(2)
    covered = sum(bootstrap_ratio(sample, np.ones(60), samples=500, seed=i).contains(1.0)
                  for i, sample in enumerate(rng.normal(1.0, 1.0, size=(300, 60))))
    assert 0.90 <= covered / 300 <= 0.99


def test_bootstrap_ratio_of_sums_pools_rounds():
    # tau-like: every question has the same rate (3 accepted tokens a round), in different round counts.
    rounds = [5, 10, 20, 40]
    ci = bootstrap_ratio([3 * n for n in rounds], rounds)
    assert ci.lo == pytest.approx(3.0) and ci.hi == pytest.approx(3.0)
    assert bootstrap_ratio([1.0], [1.0]) is None  # one question: nothing to resample


def test_repeated_timings_widen_the_interval():
    # The same questions: timed once, or three times with a noisy clock; the noise must show in the interval.
    rng = np.random.default_rng(3)
    base = rng.uniform(10, 20, size=30)
    once = bootstrap_ratio(1.1 * base, base)
    assert once.lo == pytest.approx(1.1) and once.hi == pytest.approx(1.1)
    noisy = [[1.1 * b * f for f in rng.normal(1, 0.1, size=3)] for b in base]
    ci = bootstrap_ratio(noisy, [[b] for b in base])
    assert ci.lo < 1.1 < ci.hi and ci.hi - ci.lo > 0.02


def test_a_speedup_of_one_contains_one():
    rng = np.random.default_rng(4)
    base = rng.uniform(10, 20, size=50)
    method = base * rng.normal(1, 0.05, size=50)
    assert bootstrap_ratio(method, base).contains(1.0)
    assert not bootstrap_ratio(1.2 * method, base).contains(1.0)


def test_depth_counts():
    accepted = [2, 3, 1, 4, 0, 2, 1]
    assert depth_counts(accepted, 4) == ([7, 6, 4, 2], [6, 4, 2, 1])
    # trees grown to depth 1 cannot count as misses at depth 2
    assert depth_counts([1, 1, 0], 2, grown=[1, 2, 2]) == ([3, 1], [2, 0])


def test_router_tally_of_a_constructed_router():
    # Four experts; the router is a linear map whose row e fires on the unit input e, strongly.
    experts, top_k = 4, 2
    router = torch.nn.Linear(experts, experts, bias=False)
    with torch.no_grad():
        router.weight.copy_(20 * torch.eye(experts))
    # 6 decisions on expert 0, 2 on expert 3: each picks its expert first, then one of the others (tied)
    inputs = torch.eye(experts)[[0, 0, 0, 0, 0, 0, 3, 3]]
    u = utilisation(router_tally(router(inputs).detach().numpy(), top_k))
    assert u["decisions"] == 8 and u["top_k"] == 2
    assert u["chosen_share"][0] == pytest.approx(1.0) and sum(u["chosen_share"]) == pytest.approx(2.0)
    assert u["top_weight"] == pytest.approx(1.0, abs=1e-6)  # e^20 against e^0: the first expert decides
    assert u["load"] == pytest.approx([0.75, 0, 0, 0.25], abs=1e-6)
    assert u["busiest_load"] == pytest.approx(0.75, abs=1e-6)
    assert u["entropy_norm"] == pytest.approx(0.0, abs=1e-6)  # a sure router
    assert u["load_entropy_norm"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4),
                                                   abs=1e-6)


def test_a_router_without_preference_spreads_evenly():
    tally = router_tally(np.zeros((10, 8)), top_k=2)
    u = utilisation(tally)
    assert u["entropy_nats"] == pytest.approx(math.log(8)) and u["entropy_norm"] == pytest.approx(1.0)
    assert u["top_weight"] == pytest.approx(0.5)
    both = utilisation(merge_tallies([tally, router_tally(np.zeros((30, 8)), top_k=2)]))
    assert both["decisions"] == 40 and sum(both["load"]) == pytest.approx(1.0)
    assert merge_tallies([None]) is None


def test_the_embedding_moe_routes_as_tallied():
    # The tally keeps the top-k of the softmax as EmbeddingMoE does: same experts, same weights.
    from confu.engine.draft import EmbeddingMoE

    torch.manual_seed(0)
    moe = EmbeddingMoE(16, 4, n_expert=8, top_k=2)
    x = torch.randn(32, 16)
    logits = moe.router(x).detach()
    gates = torch.softmax(logits, -1)
    weights, idx = gates.topk(2, dim=-1)
    tally = router_tally(logits.numpy(), 2)
    expected = np.zeros(8)
    np.add.at(expected, idx.flatten().numpy(), (weights / weights.sum(-1, keepdim=True)).flatten().numpy())
    assert tally["mixture_weight"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert tally["top_weight_sum"] == pytest.approx(float((weights[:, 0] / weights.sum(-1)).sum()), abs=1e-5)


def test_contemplate_share_by_the_verify_cost_curve():
    from confu.bench.report import contemplate_shares, stage_latency

    # A pass costs 10 ms + 1 ms a row: 4 slots of a 12-row pass cost 4 of its 22 ms.
    curve = ([1, 64], [0.011, 0.074])
    assert contemplate_shares([12, 5], [4, 0], curve) == pytest.approx([4 / 22, 0.0])
    assert contemplate_shares([12], [4], None) == pytest.approx([4 / 12])  # by rows, without a curve
    laps = {"draft": [0.002, 0.004], "verify": [0.022, 0.015], "accept": [0.001, 0.001],
            "bookkeeping": [0.0005, 0.0005]}
    latency = stage_latency(laps, [4 / 22, 0.0])
    assert latency["contemplate rows"]["ms"] == pytest.approx(2.0)
    assert latency["verify rows"]["ms"] == pytest.approx((18 + 15) / 2)
    assert latency["draft"]["share"] == pytest.approx(0.006 / 0.046)
    assert sum(v["share"] for v in latency.values()) == pytest.approx(1.0)
