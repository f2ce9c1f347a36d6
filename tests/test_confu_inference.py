"""ConFu inference: the soft prompt and contemplate slots never touch ordinary tokens, `f` is the contemplate
state of the last accepted node, and greedy ConFu decoding equals plain decoding on the embedded target."""

from __future__ import annotations

import pytest
import torch

from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig, RoundState
from confu.engine.tree import DraftTree, TreeConfig
from tests.helpers import (
    PROMPTS,
    GreedyReport,
    OracleProposer,
    chat_ids,
    compare_greedy,
    decoder_with,
    hf_greedy,
    load_target,
    single_thread,
)


def assert_gemm_rows_invariant(width: int) -> None:
    """The premise of the bit-identity check: a linear layer's rows do not depend on how many rows follow.
    (MKL holds it single-threaded from 4 rows up; below that it switches to matrix-vector kernels.)"""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(4 * width, width, generator=gen), torch.randn(40, width, generator=gen)
    for rows in (4, 5, 9, 17):
        assert torch.equal(x[:rows] @ weight.T, (x @ weight.T)[:rows]), f"GEMM rows vary with row count ({rows})"


def _confu_head(target, seed: int = 0):
    head = new_draft(target, "confu", draft_vocab_size=256, seed=seed)
    with torch.no_grad():  # a soft prompt far from the init, so a leak into ordinary rows could not hide
        head.soft_prompt.add_(torch.randn(head.soft_prompt.shape, generator=torch.Generator().manual_seed(seed)))
    return head


def _tree(vocab: int) -> DraftTree:
    gen = torch.Generator().manual_seed(7)
    parents = [-1, -1, 0, 0, 1, 2, 4, 6]
    tokens = torch.randint(vocab, (len(parents),), generator=gen).tolist()
    return DraftTree.from_parents(tokens, parents, [-0.1 * i for i in range(len(parents))])


def _ordinary_outputs(target, head, prompt: torch.Tensor, tree: DraftTree, soft_prompt: bool, slots: bool):
    """Prompt forward then one verify pass, with or without the soft prompt in the cache and a contemplate
    slot on every verify row. Returns (prompt logits, prompt features, verify logits, verify features, f)."""
    n = len(prompt)
    cache = target.new_cache(head.soft_prompt_kv() if soft_prompt else None)
    with torch.no_grad():
        pre = target.forward(cache, torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril(), input_ids=prompt)
        cache.commit(None)
        state = RoundState(root=int(pre.logits[-1].argmax()), route=pre.features[-1])
        decoder = Decoder.for_head(target, head) if slots else Decoder(target)
        decoder.extension.begin(GenerationConfig())  # a contemplate slot on every verify row
        out = decoder.verify_pass(cache, tree, state)
    rows = len(tree) + 1
    return pre.logits.all(), pre.features, out.logits.all(), out.features[:rows], out.last_hidden[rows:]


NAMES = ["prompt logits", "prompt features", "verify logits", "verify features"]


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir", "embedded_dir"])
def test_soft_prompt_and_slots_leave_ordinary_logits_bit_identical(model, request, record_property):
    target = load_target(request.getfixturevalue(model))
    head = _confu_head(target)
    prompt = torch.tensor(chat_ids(target, PROMPTS[4]))
    tree = _tree(target.vocab_size)
    plain = _ordinary_outputs(target, head, prompt, tree, soft_prompt=False, slots=False)
    # 1. The soft prompt in every layer's cache: the same forward with and without it is bit-identical.
    soft = _ordinary_outputs(target, head, prompt, tree, soft_prompt=True, slots=False)
    for name, a, b in zip(NAMES, plain, soft, strict=False):
        assert torch.equal(a, b), f"{name} changed by the soft prompt"
    # 2. Contemplate slots: what they hold (soft prompt, [con]) never reaches an ordinary row, bit for bit ...
    confu = _ordinary_outputs(target, head, prompt, tree, soft_prompt=True, slots=True)
    other = _ordinary_outputs(target, _confu_head(target, seed=1), prompt, tree, soft_prompt=True, slots=True)
    for name, a, b in zip(NAMES, confu, other, strict=False):
        assert torch.equal(a, b), f"{name} depend on the soft prompt / [con] of the contemplate slots"
    # ... while the slots themselves do see the soft prompt (so the check above is not vacuous).
    assert confu[4].shape == (len(tree) + 1, target.hidden_size)
    assert not torch.allclose(confu[4], other[4], atol=1e-3)
    # 3. Their mere presence. Ordinary rows attend in their own call (target.split_sdpa_attention), so the only
    # shared kernels left are the linear layers, run over more rows. confu's quantized kernels compute every row
    # alone; single-threaded MKL computes each row of a GEMM the same way whatever the row count, from 4 rows up,
    # on some CPUs only (checked first where MKL runs, so a BLAS without that property fails here rather than
    # being blamed on the slots); there the outputs must be bit-identical.
    with single_thread():
        if any(type(m) is torch.nn.Linear for m in target.model.modules()):
            assert_gemm_rows_invariant(target.hidden_size)
        plain_1t = _ordinary_outputs(target, head, prompt, tree, soft_prompt=False, slots=False)
        confu_1t = _ordinary_outputs(target, head, prompt, tree, soft_prompt=True, slots=True)
    for name, a, b in zip(NAMES, plain_1t, confu_1t, strict=False):
        assert torch.equal(a, b), f"{name} changed by adding contemplate slots"
    # Multi-threaded MKL splits rows into 4-row panels and rounds a partial panel differently, so a row can
    # move by rounding when more rows follow it: measured and bounded, like tree verification vs decoding.
    gap = max(float((a - b).abs().max()) for a, b in zip(plain[2:4], confu[2:4], strict=False))
    record_property("max_abs_diff_with_slots_multithreaded", gap)
    print(f"{model}: {torch.get_num_threads()} threads: max |ordinary output with slots - without| = {gap:.2e}")
    assert gap < 1e-3


class _RecordingOracle(OracleProposer):
    """Records, at every observation, the tokens the round's f should summarise and the f it was given."""

    records: list[tuple[list[int], torch.Tensor, int]] = []

    def observe(self, features, next_tokens, future):
        super().observe(features, next_tokens, future)
        # f sits after every token the target has verified, i.e. all but the newly emitted last one.
        seq = [self.reference[0], *self.seen[:-1]]
        self.records.append((seq, future.clone(), len(next_tokens)))


def test_future_is_contemplate_state_of_last_accepted_node(tiny_llama_dir, monkeypatch):
    target = load_target(tiny_llama_dir)
    head = _confu_head(target)
    cons: list[torch.Tensor] = []
    embed_con = head.contemplate_embedding
    monkeypatch.setattr(head, "contemplate_embedding", lambda x: cons.append(embed_con(x)) or cons[-1])
    _RecordingOracle.records = []
    for text in PROMPTS[:3]:
        ids = chat_ids(target, text)
        _RecordingOracle.reference = ids + hf_greedy(target, ids, 24)
        decoder_with(target, head, _RecordingOracle).generate(
            ids, GenerationConfig(max_new_tokens=24, tree=TreeConfig(12, 5, 2), auto_tree=False))
    records = _RecordingOracle.records
    assert len(records) == len(cons) > 6
    assert max(n for _, _, n in records) >= 3, "some round should accept at least two draft nodes"

    def contemplate_state(seq: list[int], con: torch.Tensor) -> torch.Tensor:
        n = len(seq)
        cache = target.new_cache(head.soft_prompt_kv())
        embeds = torch.cat([target.embed(torch.tensor(seq)), con[None]])
        with torch.no_grad():
            out = target.forward(cache, torch.arange(n + 1), torch.ones(n + 1, n + 1, dtype=torch.bool).tril(),
                                 inputs_embeds=embeds, contemplate_rows=1)
        return out.last_hidden[n]

    for (seq, f, _), con in zip(records, cons, strict=True):
        torch.testing.assert_close(f, contemplate_state(seq, con), atol=1e-5, rtol=1e-4)
        # One token short is a different state: an off-by-one in the returned f would be caught.
        assert not torch.allclose(f, contemplate_state(seq[:-1], con), atol=1e-3)


def test_zero_future_gives_the_draft_zeros_and_keeps_the_output(tiny_llama_dir):
    """`zero_future` (`confu generate --zero-future`): every round's f reaches the proposer as zeros while the
    contemplate rows still run, and greedy output stays the target's own; without it f is not zero."""
    target = load_target(tiny_llama_dir)
    head = _confu_head(target)
    ids = chat_ids(target, PROMPTS[0])
    _RecordingOracle.reference = ids + hf_greedy(target, ids, 20)
    for zero in (True, False):
        _RecordingOracle.records = []
        res = decoder_with(target, head, _RecordingOracle).generate(
            ids, GenerationConfig(max_new_tokens=20, tree=TreeConfig(12, 5, 2), auto_tree=False, zero_future=zero))
        assert res.tokens == _RecordingOracle.reference[len(ids):]
        futures = torch.stack([f for _, f, _ in _RecordingOracle.records])
        assert len(futures) > 3 and bool((futures == 0).all()) == zero
        assert all(s.contemplate_slots > 0 for s in res.steps)


def test_confu_greedy_matches_hf_on_embedded_target(embedded_dir, record_property):
    target = load_target(embedded_dir)
    head = new_draft(target, "confu", draft_vocab_size=4096)
    report = GreedyReport()
    budgets = [None, 1, 4, 8]
    for i, text in enumerate(PROMPTS[:8]):
        ids = chat_ids(target, text)
        ref = hf_greedy(target, ids, 12)
        cfg = GenerationConfig(max_new_tokens=12, tree=TreeConfig(16, 4, 4), contemplate=budgets[i % len(budgets)])
        res = Decoder.for_head(target, head).generate(ids, cfg)
        # a slot on the root and on the budget's nodes; none in rounds tree sizing drafts nothing in
        assert all(s.contemplate_slots == (1 + min(cfg.contemplate or s.tree_nodes, s.tree_nodes) if s.depth else 0)
                   for s in res.steps)
        assert any(s.depth for s in res.steps)
        compare_greedy(target, ids, res.tokens, ref, i, report)
    record_property("greedy_exact", report.exact)
    assert not report.failures, "\n".join(report.failures)
    assert report.exact >= 7
