"""Draft candidates matched in the text so far (`confu.engine.matcher`): the matcher on constructed token streams,
trees merged with a head's, and decoding with match candidates, greedy and sampled, against the target's own."""

from __future__ import annotations

import math

import pytest
import torch

import confu.engine.generate as generate_mod
from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.matcher import MATCH_SOURCE, MatchConfig, MatchProposer
from confu.engine.methods import MergedProposer, PlainVerify
from confu.engine.registry import method_for_head
from confu.engine.sampling import SamplingConfig
from confu.engine.tree import DraftTree, TreeConfig, merge_trees
from tests.helpers import (
    PROMPTS,
    TargetTopProposer,
    biased_verify,
    chat_ids,
    chi_square_p_value,
    hf_greedy,
    load_target,
)
from tests.test_lossless_sampling import K, N, cell_counts, exact_law

NO_FEATURES = torch.empty(0)


def matcher_on(stream: list[int], depth: int = 6, nodes: int = 60, **cfg) -> MatchProposer:
    """A matcher that has observed `stream` (as the prompt's tokens after the first and the first output)."""
    m = MatchProposer(MatchConfig(**cfg))
    m.begin(GenerationConfig(tree=TreeConfig(nodes, depth, 1)), 1000)
    m.observe(NO_FEATURES, torch.tensor(stream), None)
    return m


def root_children(tree: DraftTree) -> list[tuple[int, float]]:
    return [(int(tree.tokens[i]), float(tree.scores[i])) for i in tree.children_of(-1)]


# -- the matcher on constructed streams ----------------------------------------------------------------------


def test_the_longest_match_ranks_first_even_when_a_shorter_one_is_more_recent():
    # "1 2 3 4" occurred once, followed by 50; "3 4" alone later, followed by 60; the text ends in "1 2 3 4"
    tree = matcher_on([7, 1, 2, 3, 4, 50, 51, 9, 3, 4, 60, 61, 8, 1, 2, 3, 4]).propose(60, 0)
    (first, s_first), (second, s_second) = root_children(tree)
    assert (first, second) == (50, 60)
    assert s_first > s_second, "a 4-token match must be trusted more than a 2-token one"
    assert tree.node_sources() == [MATCH_SOURCE] * len(tree)


def test_frequent_continuations_score_higher_and_ties_go_to_the_latest():
    frequent = matcher_on([1, 5, 6, 10, 2, 5, 6, 11, 3, 5, 6, 10, 4, 5, 6]).propose(60, 0)
    (top, s_top), (other, s_other) = root_children(frequent)
    assert (top, other) == (10, 11)
    assert math.isclose(s_top - s_other, math.log(2), rel_tol=1e-5), "two of three occurrences vs one of three"

    tied = matcher_on([1, 5, 6, 10, 2, 5, 6, 11, 3, 5, 6]).propose(60, 0)
    (latest, s_latest), (older, s_older) = root_children(tied)
    assert (latest, older) == (11, 10) and s_latest == s_older


def test_a_match_that_runs_into_the_end_keeps_repeating():
    tree = matcher_on([1, 2, 3, 1, 2], depth=6).propose(60, 0)
    assert tree.tokens.tolist() == [3, 1, 2, 3, 1, 2]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3, 4]
    assert all(a > b for a, b in zip(tree.scores.tolist(), tree.scores.tolist()[1:], strict=False))
    assert len(matcher_on([1, 2, 3, 1, 2], depth=6).propose(4, 0)) == 4, "max_nodes bounds the tree"
    assert matcher_on([1, 2, 3, 1, 2], depth=2).propose(60, 0).tokens.tolist() == [3, 1], "depth bounds it"


def test_no_earlier_occurrence_no_tree():
    assert matcher_on([1, 2, 3, 4, 5]).propose(60, 0) is None
    assert matcher_on([1, 2]).propose(60, 0) is None, "the text's own end is no match"
    assert matcher_on([1, 2, 3, 1, 2], min_match=3).propose(60, 0) is None


def test_hit_rates_learn_from_what_the_target_emitted():
    m = matcher_on([1, 2, 3, 1, 2])
    prior = m.hit_rate(2)
    m.propose(60, 0)  # proposes 3 1 2 3 ...
    m.observe(NO_FEATURES, torch.tensor([3, 1, 2, 3]), None)  # every token held
    assert m.hit_rate(2) > prior
    held = m.hit_rate(2)
    m.propose(60, 0)
    m.observe(NO_FEATURES, torch.tensor([9]), None)  # the first token missed
    assert m.hit_rate(2) < held
    assert m.hit_rate(8) == pytest.approx(8 / 10), "other bands keep their prior"


def test_earlier_sequences_are_matched_only_when_kept():
    def second_sequence(history_tokens: int, match_first: bool = True) -> DraftTree | None:
        m = MatchProposer(MatchConfig(history_tokens=history_tokens))
        m.begin(GenerationConfig(tree=TreeConfig(60, 6, 1), match=match_first), 1000)
        m.observe(NO_FEATURES, torch.tensor([7, 8, 9, 10, 11]), None)
        m.begin(GenerationConfig(tree=TreeConfig(60, 6, 1)), 1000)
        m.observe(NO_FEATURES, torch.tensor([3, 7, 8]), None)
        return m.propose(60, 0)

    assert second_sequence(100).tokens.tolist() == [9, 10, 11], "an ended sequence does not repeat past its end"
    assert second_sequence(0) is None, "off by default"
    assert second_sequence(100, match_first=False) is None, "a sequence that opted out is not kept"
    assert second_sequence(3) is None, "only the latest history_tokens are kept"


# -- merged trees ----------------------------------------------------------------------------------------------


def test_merged_tree_verifies_a_shared_candidate_once_and_keeps_the_best_nodes():
    head = DraftTree.from_parents([5, 6, 7], [-1, 0, -1], [-0.1, -0.5, -1.0])
    match = DraftTree.from_parents([5, 6, 8, 9], [-1, 0, 1, -1], [-0.2, -0.3, -0.4, -2.0],
                                   sources=[MATCH_SOURCE] * 4)
    merged = merge_trees(head, match, max_nodes=10)
    assert merged.tokens.tolist() == [5, 6, 7, 8, 9]
    assert merged.parents.tolist() == [-1, 0, -1, 1, -1]
    assert merged.node_sources() == ["head", "head", "head", MATCH_SOURCE, MATCH_SOURCE]
    assert merged.scores.tolist() == pytest.approx([-0.1, -0.3, -1.0, -0.4, -2.0]), "the better estimate"
    best = merge_trees(head, match, max_nodes=3)
    assert best.tokens.tolist() == [5, 6, 8] and best.parents.tolist() == [-1, 0, 1]
    assert best.count_by_source(range(3)) == {"head": 2, MATCH_SOURCE: 1}


class _Fixed:
    """A proposer that always proposes one tree."""

    feature_layers = ()
    name = "fixed"

    def __init__(self, tree: DraftTree, drafts_levels: bool):
        self.tree, self.drafts_levels, self.lookup_candidates = tree, drafts_levels, not drafts_levels
        self.asked: list[int] = []

    def begin(self, cfg, max_len):
        pass

    def observe(self, features, next_tokens, future):
        pass

    def propose(self, max_nodes, depth):
        self.asked.append(depth)
        return self.tree


def test_merged_proposer_asks_the_head_only_for_drafted_levels():
    head = _Fixed(DraftTree.from_parents([5, 6], [-1, 0], [-0.1, -0.2]), drafts_levels=True)
    lookup = _Fixed(DraftTree.from_parents([5, 8], [-1, 0], [-0.3, -0.4], sources=[MATCH_SOURCE] * 2), False)
    merged = MergedProposer(head, lookup)
    merged.begin(GenerationConfig(tree=TreeConfig(3, 6, 1)), 100)
    assert merged.drafts_levels and merged.lookup_candidates
    assert merged.propose(60, 0).tokens.tolist() == [5, 8]
    tree = merged.propose(60, 2)
    assert tree.tokens.tolist() == [5, 6, 8], "one 5, and no more nodes than the configured tree holds"
    assert head.asked == [2] and lookup.asked == [0, 2]


# -- decoding with match candidates is lossless ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["none", "eagle3", "confu"])
def test_greedy_with_matches_equals_plain_decoding(tiny_llama_dir, tmp_path, monkeypatch, method):
    """Each prompt twice through one decoder that keeps earlier sequences: the second pass matches the first
    (as a server's repeated request would), so match candidates are accepted, alone and merged with a head's."""
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path))
    target = load_target(tiny_llama_dir)
    head = None if method == "none" else new_draft(target, method, draft_vocab_size=256)
    decoder = Decoder.for_head(target, head, MatchConfig(history_tokens=4096))
    accepted = {}
    for i, text in enumerate(PROMPTS[:4]):
        ids = chat_ids(target, text)
        ref = hf_greedy(target, ids, 24)
        for auto in (False, True):
            cfg = GenerationConfig(max_new_tokens=24, tree=TreeConfig(8, 4, 2), auto_tree=auto, contemplate=2,
                                   stop_at_eos=False)
            res = decoder.generate(ids, cfg)
            assert res.tokens == ref, f"prompt {i}, auto={auto}"
            for source, counts in res.by_source().items():
                accepted[source] = accepted.get(source, 0) + counts["accepted"]
    assert accepted.get(MATCH_SOURCE, 0) >= 24, accepted
    if head is not None:
        assert "head" in accepted, "the head's candidates are verified alongside the matches"


def test_matches_within_one_sequence_on_the_embedded_target(embedded_dir, tmp_path, monkeypatch):
    """A real model copies from its prompt: matches of the prompt are accepted within the sequence."""
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path))
    target = load_target(embedded_dir)
    text = ("Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the quiet river bank.")
    ids = chat_ids(target, text)
    cfg = GenerationConfig(max_new_tokens=24, tree=TreeConfig(8, 6, 1), auto_tree=False)
    plain = Decoder(target).generate(ids, cfg).tokens
    res = Decoder.for_head(target, None, MatchConfig()).generate(ids, cfg)
    assert res.tokens == plain
    assert res.by_source()[MATCH_SOURCE]["accepted"] >= 6, res.by_source()


def _samples(decoder: Decoder, prompt: list[int], sampling: SamplingConfig) -> tuple[list[tuple[int, ...]], int]:
    """N samples of K tokens through one decoder, and how many tokens match candidates supplied."""
    out, from_matches = [], 0
    for seed in range(N):
        cfg = GenerationConfig(max_new_tokens=K, sampling=sampling, tree=TreeConfig(6, 3, 2), auto_tree=False,
                               seed=seed, stop_at_eos=False)
        res = decoder.generate(prompt, cfg)
        assert len(res.tokens) == K
        out.append(tuple(res.tokens))
        from_matches += res.by_source().get(MATCH_SOURCE, {}).get("accepted", 0)
    return out, from_matches


@pytest.fixture
def sharp_target(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    with torch.no_grad():
        target.model.lm_head.weight.mul_(4.0)  # as in test_lossless_sampling: a law with many testable cells
    return target, chat_ids(target, PROMPTS[5])


def _match_decoder(target, method: str) -> Decoder:
    """Match candidates from earlier samples of the same prompt (history): they are draws of the target's own
    law, so they are accepted and rejected often. `merged`: joined to trees of the target's top tokens, under
    ConFu's verify extension."""
    matcher = MatchProposer(MatchConfig(history_tokens=4096))
    if method == "match":
        return Decoder(target, matcher, PlainVerify())
    head = new_draft(target, "confu", draft_vocab_size=256)
    TargetTopProposer.model = target.model
    return Decoder(target, MergedProposer(TargetTopProposer(head), matcher), method_for_head(head)[1])


# the fewest tokens match-only nodes must supply for the test to have power over them (in the merged trees a
# match the head's trees hold too is the head's)
@pytest.mark.parametrize(("method", "sampling", "min_from_matches"),
                         [("match", SamplingConfig(temperature=1.0), N // 2),
                          ("merged", SamplingConfig(temperature=0.7, top_p=0.9), N // 10)],
                         ids=["match", "merged"])
def test_sampling_with_matches_keeps_the_target_law(sharp_target, method, sampling, min_from_matches):
    target, prompt = sharp_target
    TargetTopProposer.first_token = prompt[0]
    samples, from_matches = _samples(_match_decoder(target, method), prompt, sampling)
    law = exact_law(target, prompt, sampling, N)
    p_value = chi_square_p_value(*cell_counts(samples, law))
    print(f"{method}: {len(law)} cells, {from_matches} tokens from matches, p = {p_value:.3g}")
    assert len(law) >= 10
    assert from_matches >= min_from_matches, "match candidates must be accepted often for the test to have power"
    assert p_value > 1e-3


def test_planted_bias_on_match_trees_is_detected(sharp_target, monkeypatch):
    target, prompt = sharp_target
    monkeypatch.setattr(generate_mod, "verify_sampling", biased_verify)
    sampling = SamplingConfig(temperature=1.0)
    samples, _ = _samples(_match_decoder(target, "match"), prompt, sampling)
    assert chi_square_p_value(*cell_counts(samples, exact_law(target, prompt, sampling, N))) < 1e-6
