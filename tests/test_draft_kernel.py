"""The fused draft layer (`confu.engine.draft_kernel`) computes what the packed `DraftLayer` computes.

It reads the same int8 weights, so the only differences are float roundings of norms, rotary terms and the MLP's
activation (a few ulps); calls it cannot take go to the layer itself, unchanged. `top_children` is the head's
final norm, lm_head, log_softmax and topk, ties broken towards the lower index.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from confu.engine import draft_kernel
from confu.engine.draft import DraftConfig, init_weights_like_eagle
from confu.engine.draft_kernel import DRAFT_LAYER, FusedDraftLayer, fuse_draft_layer, top_children
from confu.engine.generate import GenerationConfig
from confu.engine.methods import DraftHeadProposer
from confu.engine.quant import pack_model
from confu.engine.registry import build_head
from confu.engine.tree import TreeConfig
from tests.helpers import require_kernels

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


def require_fused():
    require_kernels()
    if DRAFT_LAYER.library() is None:
        pytest.skip("no AVX512-VNNI kernels in this build (the CPU, or CONFU_KERNELS_AVX2): the draft layer runs torch ops")


def _tiny_head(method: str = "eagle3"):
    torch.manual_seed(0)
    cfg = DraftConfig(
        method=method, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, intermediate_size=128, vocab_size=300, draft_vocab_size=96, feature_layers=[1, 2, 3],
        target={"name": "tiny", "hidden_size": HIDDEN, "num_hidden_layers": 4, "vocab_size": 300},
        target_num_kv_heads=KV_HEADS, target_head_dim=HEAD_DIM, n_expert=4,
    )
    head = build_head(cfg)
    init_weights_like_eagle(head)
    for norm in (head.layer.embed_norm, head.layer.hidden_norm, head.layer.post_norm):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # not all ones: a norm weight read wrongly must show
    return head.eval()


def _packed_layer():
    head = _tiny_head()
    assert pack_model(head, lossy=True)
    return head.layer


@torch.no_grad()
def test_fused_qkv_and_attend_match_the_packed_layer():
    require_fused()
    layer = _packed_layer()
    fused = FusedDraftLayer(layer)
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 8):
        emb = torch.randn(1, n, HIDDEN, generator=gen)
        hidden = 4 * torch.randn(1, n, HIDDEN, generator=gen)
        positions = torch.arange(37, 37 + n)[None]
        for ours, theirs in zip(fused.qkv(emb, hidden, positions), layer.qkv(emb, hidden, positions), strict=True):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        q = layer.qkv(emb, hidden, positions)[0]
        # keys as the drafter hands them: a slice of a longer buffer, some of them masked
        buffer = torch.randn(2, 1, KV_HEADS, 50, HEAD_DIM, generator=gen)
        keys, values = buffer[0, :, :, :41], buffer[1, :, :, :41]
        mask = torch.rand(1, 1, n, 41, generator=gen) > 0.4
        mask[..., 0] = True
        for shift in (None, torch.randn(1, 1, HIDDEN, generator=gen), torch.randn(1, n, HIDDEN, generator=gen)):
            ours = fused.attend(hidden, q, keys, values, mask, shift)
            torch.testing.assert_close(ours, layer.attend(hidden, q, keys, values, mask, shift), atol=1e-5, rtol=1e-5)
        # a float mask (ConFu's future-key offset) and a batch of two are the layer's own calls
        bias = torch.zeros(1, HEADS, n, 41).masked_fill(~mask, float("-inf"))
        assert torch.equal(fused.attend(hidden, q, keys, values, bias), layer.attend(hidden, q, keys, values, bias))
        two = hidden.expand(2, -1, -1)
        assert torch.equal(fused.qkv(emb.expand(2, -1, -1), two, positions.expand(2, -1))[0],
                           layer.qkv(emb.expand(2, -1, -1), two, positions.expand(2, -1))[0])


@torch.no_grad()
def test_the_fused_layer_reads_every_weight():
    """Zeroing any one matrix or norm weight of the layer it was built from changes its output (so none is
    read from a stale or wrong pointer); the fused copies of q / k / v and gate / up are rebuilt to check them."""
    require_fused()
    layer = _packed_layer()
    gen = torch.Generator().manual_seed(2)
    emb, hidden = torch.randn(1, 2, HIDDEN, generator=gen), torch.randn(1, 2, HIDDEN, generator=gen)
    positions = torch.tensor([[5, 6]])
    keys, values = torch.randn(2, 1, KV_HEADS, 9, HEAD_DIM, generator=gen)
    mask = torch.ones(1, 1, 2, 9, dtype=torch.bool)

    def outputs(f):
        q, k, v = f.qkv(emb, hidden, positions)
        return torch.cat([q.flatten(), k.flatten(), v.flatten(), f.attend(hidden, q, keys, values, mask).flatten()])

    reference = outputs(FusedDraftLayer(layer))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        broken = _packed_layer()  # the same weights again (a packed layer holds the kernels' library: no deepcopy)
        linear = getattr(broken, name)
        linear.weight.zero_()
        linear.packed.q.zero_()
        assert not torch.allclose(outputs(FusedDraftLayer(broken)), reference), name
    for name in ("embed_norm", "hidden_norm", "post_norm"):
        broken = _packed_layer()
        getattr(broken, name).weight.mul_(2.0)
        assert not torch.allclose(outputs(FusedDraftLayer(broken)), reference), name


@torch.no_grad()
def test_top_children_is_norm_lm_head_log_softmax_topk():
    require_fused()
    head = _tiny_head()
    head.set_vocab(torch.randint(0, 200, (96,)), torch.ones(300, dtype=torch.bool))
    torch.nn.init.uniform_(head.norm.weight, 0.5, 1.5)
    assert pack_model(head, lossy=True)
    out = 3 * torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(3))
    ids, logps = top_children(head, out, 8)
    reference = torch.log_softmax(head.logits(out), -1).topk(8, -1)
    assert torch.equal(ids, head.to_target_ids(reference.indices))
    torch.testing.assert_close(logps, reference.values, atol=1e-5, rtol=1e-5)
    assert top_children(head, out, 500)[0].shape == (6, 96), "k above the draft vocabulary: every entry"
    bias = 4 * torch.randn(96, generator=torch.Generator().manual_seed(4))  # a ConFu head's future logits
    ids, logps = top_children(head, out, 8, bias)
    reference = torch.log_softmax(head.logits(out) + bias, -1).topk(8, -1)
    assert torch.equal(ids, head.to_target_ids(reference.indices))
    torch.testing.assert_close(logps, reference.values, atol=1e-5, rtol=1e-5)
    # a head without int8 weights (the drafter's float64 exactness tests) takes torch's own ops, as it always did
    plain = _tiny_head().double()
    expected = torch.log_softmax(plain.logits(out.double()).float(), -1).topk(3, -1)
    plain_ids, plain_logps = top_children(plain, out.double(), 3)
    assert torch.equal(plain_ids, plain.to_target_ids(expected.indices)) and torch.equal(plain_logps, expected.values)


def test_top_log_probs_kernel_breaks_ties_towards_the_lower_index():
    require_fused()
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0] + [-5.0] * 14])  # not a multiple of 16 wide
    values, ids = torch.empty(1, 5), torch.empty(1, 5, dtype=torch.int64)
    DRAFT_LAYER.library().top_log_probs(logits.data_ptr(), 1, logits.shape[1], 5, values.data_ptr(), ids.data_ptr())
    assert ids.tolist() == [[1, 2, 4, 0, 3]]
    torch.testing.assert_close(values, torch.log_softmax(logits, -1)[:, [1, 2, 4, 0, 3]])


class CountingLibrary:
    """The kernels' library, counting the calls of each function."""

    def __init__(self, lib):
        self.lib, self.calls = lib, Counter()

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def call(*args):
            self.calls[name] += 1
            return fn(*args)

        return call


@torch.no_grad()
def test_a_proposer_drafts_its_levels_in_the_fused_kernels(monkeypatch):
    require_fused()
    lib = CountingLibrary(DRAFT_LAYER.library())
    monkeypatch.setattr(draft_kernel.DRAFT_LAYER, "library", lambda: lib)
    head = _tiny_head()
    proposer = DraftHeadProposer(head)
    proposer.begin(GenerationConfig(tree=TreeConfig(total_nodes=8, depth=3, topk=3)), max_len=64)
    gen = torch.Generator().manual_seed(5)
    proposer.observe(torch.randn(4, 3 * HIDDEN, generator=gen), torch.randint(0, 300, (4,), generator=gen), None)
    tree = proposer.propose(max_nodes=8, depth=3)
    assert len(tree) == 8
    # the catch-up pass and each level: q / k / v, attention and MLP, children, each one kernel call
    assert lib.calls["draft_qkv"] >= 3 and lib.calls["draft_attend"] >= 3 and lib.calls["draft_top_children"] >= 3
    assert not isinstance(head.layer, FusedDraftLayer), "the caller's head is left as it was"
    assert not fuse_draft_layer(head), "an unpacked head has no int8 weights to fuse"
