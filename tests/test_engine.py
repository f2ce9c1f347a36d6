"""Greedy speculative decoding is token-identical to plain decoding and to HF generate()."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from confu.engine.checkpoint import new_draft, save_draft
from confu.engine.convert import load_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.target import RowLogits
from confu.engine.tree import TreeConfig
from confu.errors import DraftMismatchError
from tests.helpers import (
    PROMPTS,
    GreedyReport,
    OracleProposer,
    chat_ids,
    compare_greedy,
    decoder_with,
    hf_greedy,
    load_target,
)

TREE_SHAPES = [
    TreeConfig(total_nodes=1, depth=1, topk=1),  # depth 1, one node
    TreeConfig(total_nodes=5, depth=5, topk=1),  # a single chain
    TreeConfig(total_nodes=12, depth=4, topk=3),
    TreeConfig(total_nodes=30, depth=6, topk=6),
]


def _assert_report(report: GreedyReport, record_property, min_exact: int) -> None:
    record_property("greedy_exact", report.exact)
    record_property("greedy_near_ties", len(report.near_ties))
    print(f"greedy: {report.exact} exact, {len(report.near_ties)} near-tie divergences {report.near_ties}")
    assert not report.failures, "\n".join(report.failures)
    assert report.exact >= min_exact


@pytest.mark.parametrize("method", ["none", "eagle3", "confu"])
def test_greedy_matches_hf_on_tiny_models(tiny_model_dirs, method, record_property):
    target = load_target(tiny_model_dirs)
    head = None if method == "none" else new_draft(target, method, draft_vocab_size=256)
    report = GreedyReport()
    for i, text in enumerate(PROMPTS):
        ids = chat_ids(target, text)
        ref = hf_greedy(target, ids, 20)
        tree = TREE_SHAPES[i % len(TREE_SHAPES)]
        cfg = GenerationConfig(max_new_tokens=20, tree=tree, auto_tree=False)
        ours = Decoder.for_head(target, head).generate(ids, cfg).tokens
        compare_greedy(target, ids, ours, ref, i, report)
    _assert_report(report, record_property, min_exact=len(PROMPTS) - 2)


@pytest.mark.parametrize("method", ["eagle3", "confu"])
@pytest.mark.parametrize("tree", TREE_SHAPES, ids=lambda t: f"n{t.total_nodes}d{t.depth}k{t.topk}")
def test_greedy_with_accepting_drafts(tiny_llama_dir, method, tree, record_property):
    """Trees that contain the true continuation: long, partial and empty acceptances, cache compaction."""
    target = load_target(tiny_llama_dir)
    head = new_draft(target, method, draft_vocab_size=256)
    report = GreedyReport()
    total_accepted = 0
    for i, text in enumerate(PROMPTS[:8]):
        ids = chat_ids(target, text)
        ref = hf_greedy(target, ids, 30)
        OracleProposer.reference = ids + ref
        res = decoder_with(target, head, OracleProposer).generate(
            ids, GenerationConfig(max_new_tokens=30, tree=tree, auto_tree=False, contemplate=2))
        total_accepted += sum(s.accepted for s in res.steps)
        compare_greedy(target, ids, res.tokens, ref, i, report)
    _assert_report(report, record_property, min_exact=7)
    assert total_accepted > 0, "the oracle trees should have been accepted at least sometimes"


def test_greedy_matches_hf_on_embedded_target(embedded_dir, record_property):
    target = load_target(embedded_dir)
    eagle = new_draft(target, "eagle3", draft_vocab_size=4096)
    report = GreedyReport()
    for i, text in enumerate(PROMPTS[:20]):
        ids = chat_ids(target, text)
        ref = hf_greedy(target, ids, 12)
        plain = Decoder(target).generate(ids, GenerationConfig(max_new_tokens=12)).tokens
        compare_greedy(target, ids, plain, ref, i, report)
        tree = TREE_SHAPES[i % len(TREE_SHAPES)]
        cfg = GenerationConfig(max_new_tokens=12, tree=tree, auto_tree=False)
        spec = Decoder.for_head(target, eagle).generate(ids, cfg).tokens
        compare_greedy(target, ids, spec, ref, i, report)
    _assert_report(report, record_property, min_exact=36)


def test_stream_yields_what_generate_returns(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "eagle3", draft_vocab_size=256)
    ids = chat_ids(target, PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=15, tree=TreeConfig(8, 3, 2), auto_tree=False)
    chunks = list(Decoder.for_head(target, head).stream(ids, cfg))
    assert [t for c in chunks for t in c] == Decoder.for_head(target, head).generate(ids, cfg).tokens


def test_decoding_passes_the_cache_under_the_models_own_keyword(tiny_llama_dir):
    # transformers 5 renamed past_key_values to cache and warns on every call that uses the old name
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "eagle3", draft_vocab_size=256)
    cfg = GenerationConfig(max_new_tokens=6, tree=TreeConfig(4, 2, 2), auto_tree=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        Decoder.for_head(target, head).generate(chat_ids(target, PROMPTS[0]), cfg)


def test_stops_at_eos_and_budget(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    ids = chat_ids(target, PROMPTS[1])
    res = Decoder(target).generate(ids, GenerationConfig(max_new_tokens=7))
    assert len(res.tokens) <= 7
    if res.stop_reason == "eos":
        assert res.tokens[-1] in target.eos_ids
    else:
        assert len(res.tokens) == 7 and res.stop_reason == "max_new_tokens"
    assert res.tau == 1.0  # plain decoding accepts exactly one token per step


def test_a_round_that_accepts_past_the_budget_emits_what_plain_decoding_does(tiny_llama_dir):
    """A drafted round can accept tokens beyond max_new_tokens; an EOS among them past the budget is one plain
    decoding never reaches, so it must not be emitted (it was: 49 tokens, "eos", on a 48-token budget)."""
    target = load_target(tiny_llama_dir)
    decoder = Decoder(target)
    eos = min(target.eos_ids)
    cfg = GenerationConfig(max_new_tokens=48)
    assert decoder._clip([5, 6, eos], 46, cfg) == ([5, 6], "max_new_tokens")
    assert decoder._clip([5, eos, 6], 46, cfg) == ([5, eos], "eos")
    assert decoder._clip([5, 6], 40, cfg) == ([5, 6], "")
    assert decoder._clip([5, 6], 46, cfg) == ([5, 6], "max_new_tokens")
    assert decoder._clip([5, eos], 40, GenerationConfig(max_new_tokens=48, stop_at_eos=False)) == ([5, eos], "")


def test_stops_at_context_limit(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "eagle3", draft_vocab_size=256)
    ids = chat_ids(target, PROMPTS[2])
    room = target.max_context - len(ids)
    res = Decoder.for_head(target, head).generate(ids, GenerationConfig(max_new_tokens=10 * room, stop_at_eos=False,
                                                              tree=TreeConfig(10, 4, 3), auto_tree=False))
    assert res.stop_reason == "context"
    assert len(ids) + len(res.tokens) == target.max_context + 1  # the last token is emitted, never forwarded


def test_eos_ids_include_chat_turn_end(embedded_dir):
    target = load_target(embedded_dir)
    assert target.tokenizer.convert_tokens_to_ids("<|im_end|>") in target.eos_ids


def test_plain_features_match_hidden_states(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    ids = torch.tensor(chat_ids(target, PROMPTS[3]))
    cache = target.new_cache()
    out = target.forward(cache, torch.arange(len(ids)), torch.ones(len(ids), len(ids), dtype=torch.bool).tril(),
                         input_ids=ids)
    hs = target.model(ids[None], output_hidden_states=True).hidden_states
    want = torch.cat([hs[i][0] for i in target.feature_layers], -1)
    # Our forward attends through the row-invariant kernel, transformers' through SDPA: both are within 1e-6 of
    # float64 attention, and the random model carries that rounding to about 2e-5 by these layers.
    torch.testing.assert_close(out.features, want, atol=1e-4, rtol=1e-4)
    assert target.feature_layers == (2, 4, 5)


def test_commit_moves_only_displaced_entries_and_prefetched_rows_are_the_rows(tiny_llama_dir):
    """A tree pass over root r and nodes a (child of r), b (child of a), c (child of r); keeping [r, c] or
    [r, a, b] must leave the cache exactly as a plain pass over those tokens would (the second keeps its
    entries in place, the first moves c's), and logits rows fetched together equal rows fetched alone (bit for
    bit with the quantized kernels: tests/test_quant.py checks their row invariance)."""
    target = load_target(tiny_llama_dir)
    ids = torch.tensor(chat_ids(target, PROMPTS[0]))
    n = len(ids)
    tree_ids = torch.tensor([5, 6, 7, 8])  # r, a, b, c
    tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    positions = n + torch.tensor([0, 1, 2, 1])

    def cache_after(keep):
        cache = target.new_cache()
        target.forward(cache, torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril(), input_ids=ids)
        cache.commit(None)
        out = target.forward(cache, positions, tree_mask, input_ids=tree_ids)
        cache.commit(keep)
        return cache, out

    for keep in ([0, 3], [0, 1, 2]):
        cache, out = cache_after(torch.tensor(keep))
        plain = target.new_cache()
        path = torch.cat([ids, tree_ids[keep]])
        target.forward(plain, torch.arange(len(path)), torch.ones(len(path), len(path), dtype=torch.bool).tril(),
                       input_ids=path)
        plain.commit(None)
        assert cache.num_tokens == plain.num_tokens == n + len(keep)
        for ours, want in zip(cache.kv.layers, plain.kv.layers, strict=True):
            torch.testing.assert_close(ours.view(), want.view())
    together = RowLogits(target, out.logits.hidden)
    together.prefetch([3, 1, 0])
    assert sorted(together._rows) == [0, 1, 3]
    for row in (0, 1, 3):  # against rows computed one by one: MKL's rounding may depend on the row count
        torch.testing.assert_close(together[row], out.logits[row], atol=1e-5, rtol=1e-5)


def test_generate_prompt_file_cli(tiny_llama_dir, tmp_path, capsys):
    import json

    from confu.cli import main

    draft = tmp_path / "confu"
    assert main(["init-draft", "--target", str(tiny_llama_dir), "--method", "confu", "--out", str(draft),
                 "--draft-vocab-size", "256"]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment line\nTell me about the moon.\n\nName three colors.\n")
    capsys.readouterr()
    assert main(["generate", "--target", str(tiny_llama_dir), "--draft", str(draft), "--prompt-file", str(prompts),
                 "--max-new-tokens", "8", "--tree-nodes", "6", "--contemplate", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    records, summary = lines[:-1], lines[-1]["summary"]
    assert [r["prompt"] for r in records] == ["Tell me about the moon.", "Name three colors."]
    lengths = [n for r in records for n in r["accept_lengths"]]
    assert summary["steps"] == len(lengths) == sum(r["steps"] for r in records)
    assert summary["tau"] == round(sum(lengths) / len(lengths), 4)
    assert all(len(r["contemplate_slots"]) == r["steps"] for r in records)
    assert main(["generate", "--target", str(tiny_llama_dir), "--prompt-file", str(tmp_path / "none.txt")]) == 2
    capsys.readouterr()
    prompts.write_text('{"prompt": "Name three colors."}\n{"turns": []}\n')
    assert main(["generate", "--target", str(tiny_llama_dir), "--prompt-file", str(prompts)]) == 2
    assert f"{prompts}:2: a JSON line must be an object" in capsys.readouterr().err


SHIPPED = sorted((Path(__file__).parent.parent / "drafts").glob("smollm2-135m-*"))


def test_shipped_drafts_are_trained_and_lossless_on_the_embedded_target(embedded_dir, record_property):
    """Every draft in drafts/ loads against the embedded target, decodes like plain decoding (token-identical
    but for near-ties, as everywhere in this file), and accepts more than an untrained head of its kind."""
    assert len(SHIPPED) >= 2, "drafts/ should hold the shipped EAGLE-3 and ConFu drafts"
    target = load_target(embedded_dir)
    cfg = GenerationConfig(max_new_tokens=24, tree=TreeConfig(16, 6, 8), auto_tree=False)  # tau of fixed trees
    prompts = [chat_ids(target, text) for text in PROMPTS[:4]]
    plain = [Decoder(target).generate(ids, cfg).tokens for ids in prompts]

    def pooled_tau(head) -> tuple[float, list[list[int]]]:
        results = [Decoder.for_head(target, head).generate(ids, cfg) for ids in prompts]
        lengths = [n for r in results for n in r.accept_lengths]
        return sum(lengths) / len(lengths), [r.tokens for r in results]

    untrained_tau: dict[str, float] = {}
    for draft_dir in SHIPPED:
        head = load_draft(draft_dir, target)
        trained, tokens = pooled_tau(head)
        report = GreedyReport()
        for i, (ids, ours, ref) in enumerate(zip(prompts, tokens, plain, strict=True)):
            compare_greedy(target, ids, ours, ref, i, report)
        assert not report.failures, f"{draft_dir.name}: " + "\n".join(report.failures)
        kind = head.cfg.method
        if kind not in untrained_tau:
            torch.manual_seed(0)
            untrained_tau[kind] = pooled_tau(new_draft(target, kind, draft_vocab_size=head.cfg.draft_vocab_size))[0]
        untrained = untrained_tau[kind]
        record_property(f"tau_{draft_dir.name}", round(trained, 3))
        print(f"{draft_dir.name}: tau {trained:.3f} (untrained {untrained:.3f})")
        assert trained > untrained + 0.2, f"{draft_dir.name}: tau {trained:.3f} vs untrained {untrained:.3f}"


def test_a_draft_reads_its_own_feature_layers_without_changing_the_target(tiny_llama_dir, tmp_path):
    """Two drafts with different feature layers decode side by side; each proposer observes its own layers."""
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "eagle3", draft_vocab_size=256)
    head.cfg.feature_layers = [1, 3, 6]
    save_draft(head, tmp_path / "d")
    loaded = load_draft(tmp_path / "d", target)
    assert target.feature_layers == (2, 4, 5), "loading a draft must not rewire the target"
    ids = chat_ids(target, PROMPTS[1])
    seen = []

    class Recording(OracleProposer):
        def observe(self, features, next_tokens, future):
            seen.append(features)
            super().observe(features, next_tokens, future)

    OracleProposer.reference = ids + hf_greedy(target, ids, 6)
    res = decoder_with(target, loaded, Recording).generate(ids, GenerationConfig(max_new_tokens=6, auto_tree=False))
    assert res.tokens == OracleProposer.reference[len(ids):]
    hs = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    # the prompt's rows: the features of token t, paired with token t + 1
    torch.testing.assert_close(seen[0], torch.cat([hs[i][0] for i in (1, 3, 6)], -1), atol=1e-5, rtol=1e-4)
    head.cfg.feature_layers = [1, 3, 99]
    save_draft(head, tmp_path / "bad")
    with pytest.raises(DraftMismatchError, match="feature layers"):
        load_draft(tmp_path / "bad", target)
