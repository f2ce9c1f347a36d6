"""GGUF-exact quantized linear layers: block recovery, the CPU kernels, their build (a corrupt cache, a compiler that
hangs, none at all), and a quantized target decoding losslessly with and without them."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from confu.engine import quant
from confu.engine.attention import row_invariant_attention_built
from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.quant import (
    CFLAGS,
    PackedLinear,
    for_q8_activations,
    kernel_path,
    kernel_status,
    load_kernels,
    pack_exact,
    pack_model,
    pack_q4_1,
    pack_q8_0,
    packed_matmul,
    quantize_i8,
    split_outputs,
    stack_outputs,
)
from confu.engine.target import Target
from confu.engine.tree import TreeConfig
from confu.errors import InputError
from tests.helpers import (
    PROMPTS,
    OracleProposer,
    chat_ids,
    decoder_with,
    gguf_q4_1,
    gguf_q8_0,
    hf_greedy,
    load_target,
    quantized_tiny_target,
    require_kernels,
    single_thread,
)


def test_blocks_are_recovered_exactly_and_only_when_exact():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen) * 0.05
    q41, q80 = gguf_q4_1(w), gguf_q8_0(w)
    packed = pack_q4_1(q41)
    assert packed is not None and packed.kind == "q4_1" and packed.q.shape == (48, 48)
    lo, hi = packed.q & 15, packed.q >> 4  # byte j of a block: q[j] low, q[j + 16] high
    q = torch.cat([lo.reshape(48, 3, 16), hi.reshape(48, 3, 16)], -1).float()
    assert torch.equal(q * packed.d[..., None] + packed.m[..., None], q41.reshape(48, 3, 32))
    assert pack_exact(q41).kind == "q4_1"
    assert pack_exact(q80).kind == "q8_0" and pack_q4_1(q80) is None
    packed8 = pack_q8_0(q80)
    assert torch.equal(packed8.q.float().reshape(48, 3, 32) * packed8.d[..., None], q80.reshape(48, 3, 32))
    assert pack_exact(w) is None, "a float32 weight that is no GGUF block format must stay float32"
    assert pack_exact(q41[:, :80]) is None, "K must be a multiple of the block size"
    perturbed = q41.clone()
    perturbed[3, 7] = torch.nextafter(perturbed[3, 7], torch.tensor(1.0))
    assert pack_exact(perturbed) is None, "one weight one ulp off the grid must refuse the whole matrix"


@pytest.mark.parametrize("build", ["default", "avx2"])
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_kernel_matches_dense_and_is_row_invariant(kind, build):
    """Both builds: this CPU's (16 lanes where it has AVX-512) and the 8-lane AVX2 one every x86-64 CPU runs."""
    lib = require_kernels()
    if build == "avx2":
        status = load_kernels(CFLAGS)
        assert status.library is not None and status.lanes == 8, status.reason
        lib = status.library
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(71, 160, generator=gen) * 0.05  # odd: a 1-row tile at the end
    w = gguf_q4_1(w) if kind == "q4_1" else gguf_q8_0(w)
    packed = pack_exact(w)
    assert packed.kind == kind
    x = torch.randn(27, 160, generator=gen)
    # one chunk, several chunks, uneven chunks, for chunks of up to 6 (AVX2) and 12 (AVX-512) rows
    for m in (1, 2, 5, 6, 7, 8, 9, 12, 13, 17, 21, 27):
        out = packed_matmul(x[:m].contiguous(), packed, lib)
        torch.testing.assert_close(out, x[:m] @ w.T, atol=1e-5, rtol=1e-5)
        # A row's value must not depend on which rows share the call (contemplate rows rely on it).
        for row in (0, m - 1):
            assert torch.equal(out[row], packed_matmul(x[row : row + 1].contiguous(), packed, lib)[0])
    with single_thread():
        assert torch.equal(packed_matmul(x, packed, lib), packed_matmul(x, packed, lib))


def test_a_corrupt_cached_build_is_built_again(tmp_path, monkeypatch):
    require_kernels()
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path))
    path = kernel_path(CFLAGS)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF cut short by a full disk")
    status = load_kernels(CFLAGS)
    assert status.library is not None and status.lanes == 8, status.reason
    assert status.reason == str(path) and path.stat().st_size > 10_000


def test_a_compiler_that_hangs_is_given_up_on(tmp_path, monkeypatch):
    hanging = tmp_path / "cc"
    hanging.write_text("#!/bin/sh\nsleep 60\n")  # a child of the compiler's process holds the pipes too
    hanging.chmod(0o755)
    monkeypatch.setenv("CC", str(hanging))
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant, "COMPILE_TIMEOUT_S", 1)
    start = time.monotonic()
    status = load_kernels(CFLAGS)
    assert status.library is None and "did not finish building the kernels within 1 s" in status.reason
    assert time.monotonic() - start < 30


@pytest.fixture
def no_kernel_library(tmp_path, monkeypatch):
    """This process as on a machine where the kernels cannot be built: no C compiler and nothing cached."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "cache"))
    kernel_status.cache_clear()
    yield
    kernel_status.cache_clear()  # the next caller loads this machine's kernels again (the environment is restored)


def test_decoding_without_any_kernel_library_works_and_is_lossless(no_kernel_library, tiny_llama_dir):
    status = kernel_status()
    assert status.library is None and "no-such-compiler" in status.reason
    target = quantized_tiny_target(tiny_llama_dir)  # GGUF-exact weights the kernels would take
    assert not any(isinstance(m, PackedLinear) for m in target.model.modules()) and not row_invariant_attention_built()
    cfg = GenerationConfig(max_new_tokens=12, tree=TreeConfig(8, 4, 3), auto_tree=False)
    for text in PROMPTS[:2]:
        prompt = chat_ids(target, text)
        want = hf_greedy(target, prompt, 12)
        assert Decoder.for_head(target, None).generate(prompt, cfg).tokens == want
        OracleProposer.reference = prompt + want
        for method in ("eagle3", "confu"):
            decoder = decoder_with(target, new_draft(target, method, draft_vocab_size=256), OracleProposer)
            assert not any(isinstance(m, PackedLinear) for m in decoder.proposer.head.modules())
            result = decoder.generate(prompt, cfg)
            assert result.tokens == want and any(s.accepted for s in result.steps), (method, text)


def int8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The draft kernel's arithmetic in torch: int8 weights per output channel, int8 activations per row, an
    exact integer dot product, then the two scales."""
    w_scale = w.abs().amax(1) / 127
    wq = (w / w_scale[:, None]).round().clamp(-127, 127)
    x_max = x.abs().amax(1)
    xq = (x * (127 / x_max)[:, None]).round().clamp(-127, 127)
    dots = (xq.double() @ wq.double().T).long()  # exact: |sum| < 2^53
    return dots.float() * (w_scale[None, :] * (x_max / 127)[:, None])


def test_draft_int8_kernel_is_exact_integer_arithmetic_and_close_to_float():
    lib = require_kernels()
    if not kernel_status().int8:
        pytest.skip("this CPU has no AVX512-VNNI: drafts run the Q8_0 kernel (tested above)")
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(71, 160, generator=gen) * 0.05  # 71: the last block of 16 outputs is partly padding
    packed = quantize_i8(w)
    assert packed.kind == "i8" and packed.q.shape == (5, 40, 16, 4) and packed.d.shape == (71,)
    x = torch.randn(27, 160, generator=gen)
    x[3] = 0  # a zero row: scale 0, output 0
    for m in (1, 2, 7, 8, 9, 16, 17, 27):  # tiles of up to 8 rows: one, several and uneven chunks
        out = packed_matmul(x[:m].contiguous(), packed, lib)
        assert torch.equal(out, int8_reference(x[:m], w)), m
        for row in (0, m - 1):
            assert torch.equal(out[row], packed_matmul(x[row : row + 1].contiguous(), packed, lib)[0])
    exact = x @ w.T
    assert (out - exact).norm() / exact.norm() < 0.02  # int8 rounding: about 1% here


def q8_activation_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`numerics="q8"` in torch: activations rounded per block of 32 (dx = max |x| / 127), exact integer block
    dot products with the GGUF q, then dw * dx per block (and Q4_1's mw * dx * sum(xq))."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1)
    xq = (xb * torch.where(amax > 0, 127 / amax, 0)[..., None]).round()
    dx = amax / 127
    packed = pack_exact(w)
    if packed.kind == "q4_1":
        q = torch.cat([(packed.q & 15).reshape(len(w), -1, 16), (packed.q >> 4).reshape(len(w), -1, 16)], -1)
    else:
        q = packed.q.reshape(len(w), -1, 32)
    dots = torch.einsum("mgk,ngk->mng", xq.double(), q.double())  # exact integers
    out = (dots * (packed.d.double()[None] * dx.double()[:, None])).sum(-1)
    if packed.kind == "q4_1":
        out += (packed.m.double()[None] * (dx * xq.sum(-1)).double()[:, None]).sum(-1)
    return out.float()


def require_int8(what: str):
    lib = require_kernels()
    if not kernel_status().int8:
        pytest.skip(f"this CPU has no AVX512-VNNI: {what}")
    return lib


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_q8_activation_kernel_is_its_definition_and_row_invariant(kind):
    lib = require_int8("numerics 'q8' is refused there (test_q8_numerics_refuses_what_it_cannot_run)")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(71, 160, generator=gen) * 0.05  # 71: the last block of 16 outputs is partly padding
    w = gguf_q4_1(w) if kind == "q4_1" else gguf_q8_0(w)
    packed = for_q8_activations(pack_exact(w))
    assert packed.kind == f"a8_{kind}" and packed.out_features == 71
    x = torch.randn(40, 160, generator=gen)
    x[3] = 0  # a zero row: every block's scale is 0, and so is the output
    x[5, 32:64] *= 100  # an outlier block: its scale must not touch the row's other blocks
    for m in (1, 2, 5, 9, 16, 17, 33, 40):  # tiles of up to 16 rows: one, several and uneven chunks
        out = packed_matmul(x[:m].contiguous(), packed, lib)
        torch.testing.assert_close(out, q8_activation_reference(x[:m], w), atol=2e-5, rtol=2e-5)
        for row in (0, m - 1):
            assert torch.equal(out[row], packed_matmul(x[row : row + 1].contiguous(), packed, lib)[0])
    assert torch.equal(out[3], torch.zeros(71))
    exact = x @ w.T
    assert (out - exact).norm() / exact.norm() < 0.02  # 8-bit activations: under 1% here
    with single_thread():
        assert torch.equal(packed_matmul(x, packed, lib), out)


def test_q8_numerics_target_decodes_losslessly(tiny_llama_dir):
    """Under `numerics="q8"` every method decodes the tokens plain decoding gives with the same numerics, and a
    long prompt's bulk prefill stays on the kernels (they are the numerics, not a rounding of transformers')."""
    require_int8("numerics 'q8' is refused there")
    target = quantized_tiny_target(tiny_llama_dir, numerics="q8")
    assert all(new.packed.kind.startswith("a8_") for *_, new in target._swaps) and "Q8 activation" in target.numerics
    assert all(isinstance(m, PackedLinear) for m in target.bulk_model.modules() if isinstance(m, nn.Linear | PackedLinear))
    # the HF baseline and training still see transformers' own modules
    assert not any(isinstance(m, PackedLinear) for m in target.reference_model.modules())
    ids = torch.tensor([chat_ids(target, PROMPTS[0])])
    with torch.no_grad():
        q8 = target.model(ids).logits
        reference = target.reference_model(ids).logits
    assert (q8 - reference).norm() / reference.norm() < 0.1, "8-bit activations: 4% on this random model"
    assert not torch.equal(q8, reference)
    tree = TreeConfig(8, 4, 3)
    for bulk in (0, 8):
        for text in PROMPTS[:3]:
            prompt = chat_ids(target, text)
            cfg = GenerationConfig(max_new_tokens=16, tree=tree, auto_tree=False, bulk_prefill=bulk)
            want = Decoder.for_head(target, None).generate(prompt, cfg).tokens
            for method in ("eagle3", "confu"):
                head = new_draft(target, method, draft_vocab_size=256)
                assert Decoder.for_head(target, head).generate(prompt, cfg).tokens == want, (method, text, bulk)


def test_q8_numerics_refuses_what_it_cannot_run(tiny_llama_dir):
    plain = load_target(tiny_llama_dir)
    if kernel_status().int8:
        with pytest.raises(InputError, match="GGUF block weights"):
            Target(plain.model, plain.tokenizer, numerics="q8")  # float32 weights no block format reproduces
    else:
        with pytest.raises(InputError, match="AVX512-VNNI"):
            Target(plain.model, plain.tokenizer, numerics="q8")
    with pytest.raises(InputError, match="numerics must be one of"):
        Target(plain.model, plain.tokenizer, numerics="int4")


def test_lossy_packing_takes_every_draft_layer_and_the_int8_kernel_where_built():
    require_kernels()
    layers = nn.Sequential(nn.Linear(64, 96, bias=False), nn.Linear(96, 64, bias=True), nn.Linear(64, 16))
    with torch.no_grad():
        reference = layers(torch.ones(2, 64))
    assert pack_model(layers) == [], "float32 weights that no GGUF format reproduces are never packed without lossy"
    swaps = pack_model(layers, lossy=True)
    assert [type(m) for m in layers] == [PackedLinear, PackedLinear, nn.Linear], "16 outputs: below the block size"
    assert {s[3].packed.kind for s in swaps} == {"i8" if kernel_status().int8 else "q8_0"}
    with torch.no_grad():
        torch.testing.assert_close(layers(torch.ones(2, 64)), reference, atol=0.05, rtol=0.05)


def test_quantized_target_runs_kernels_and_decodes_losslessly(tiny_llama_dir):
    require_kernels()
    target = quantized_tiny_target(tiny_llama_dir)
    linears = [m for m in target.model.modules() if isinstance(m, nn.Linear | PackedLinear)]
    assert linears and all(isinstance(m, PackedLinear) for m in linears), target.numerics
    assert "Q4_1" in target.numerics
    ids = torch.tensor([chat_ids(target, PROMPTS[0])])
    with torch.no_grad():
        fast = target.model(ids).logits
        assert not any(isinstance(m, PackedLinear) for m in target.reference_model.modules())
        reference = target.reference_model(ids).logits
    assert any(isinstance(m, PackedLinear) for m in target.model.modules()), "the decoding path keeps the kernels"
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    assert not torch.equal(fast, reference), "the kernel path must really have run (its rounding differs from MKL's)"
    for method in ("none", "eagle3", "confu"):
        head = None if method == "none" else new_draft(target, method, draft_vocab_size=256)
        for text in PROMPTS[:3]:
            prompt = chat_ids(target, text)
            cfg = GenerationConfig(max_new_tokens=16, tree=TreeConfig(8, 4, 3), auto_tree=False)
            ours = Decoder.for_head(target, head).generate(prompt, cfg)
            assert ours.tokens == hf_greedy(target, prompt, 16), (method, text)


def test_long_prompts_prefill_in_one_dense_pass_and_stay_lossless(tiny_llama_dir):
    """From `bulk_prefill` tokens on, a prompt's first n - 1 rows run transformers' dense layers in one pass:
    the cache then holds MKL's rounding, not the kernels', and every method starts from those same bits."""
    require_kernels()
    target = quantized_tiny_target(tiny_llama_dir)
    prompt = chat_ids(target, PROMPTS[1])
    assert len(prompt) > 9
    tree = TreeConfig(8, 4, 3)
    bulk = GenerationConfig(max_new_tokens=12, tree=tree, auto_tree=False, bulk_prefill=8)
    kernels_only = GenerationConfig(max_new_tokens=12, tree=tree, auto_tree=False, bulk_prefill=0)
    plain = Decoder.for_head(target, None)
    with torch.no_grad():
        _, dense_features, _ = plain.prefill(target.new_cache(), torch.tensor(prompt), bulk, None)
        _, kernel_features, _ = plain.prefill(target.new_cache(), torch.tensor(prompt), kernels_only, None)
    torch.testing.assert_close(dense_features, kernel_features, atol=1e-4, rtol=1e-4)
    assert not torch.equal(dense_features[:-1], kernel_features[:-1]), "the bulk rows must run the dense layers"
    want = plain.generate(prompt, bulk).tokens
    assert want == hf_greedy(target, prompt, 12)
    for method in ("eagle3", "confu"):
        decoder = Decoder.for_head(target, new_draft(target, method, draft_vocab_size=256))
        with torch.no_grad():
            _, features, _ = decoder.prefill(target.new_cache(decoder.extension.soft_prompt()),
                                             torch.tensor(prompt), bulk, None)
        assert torch.equal(features, dense_features), method
        assert decoder.generate(prompt, bulk).tokens == want, method
    with pytest.raises(InputError, match="bulk_prefill"):
        GenerationConfig(bulk_prefill=-1)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "a8_q4_1", "a8_q8_0", "i8"])
def test_stacked_outputs_give_each_layer_its_own_bits_and_split_back_into_views(kind):
    """Two layers on the same input as one matmul (the gated MLP's gate and up): every output keeps its blocks
    and scales, so the stacked call returns the separate calls' bits; the split parts are views of it."""
    lib = require_kernels()
    if kind in ("a8_q4_1", "a8_q8_0", "i8"):
        require_int8("the layout is the AVX512-VNNI kernels'")
    gen = torch.Generator().manual_seed(4)
    snap = gguf_q8_0 if kind.endswith("q8_0") else gguf_q4_1
    first, second = (snap(torch.randn(n, 96, generator=gen) * 0.05) for n in (32, 40))

    def packed(w):
        if kind == "i8":
            return quantize_i8(w)
        exact = pack_exact(w)
        return for_q8_activations(exact) if kind.startswith("a8_") else exact

    a, b = packed(first), packed(second)
    assert a.kind == kind
    stacked = stack_outputs(a, b)
    x = torch.randn(5, 96, generator=gen)
    separate = torch.cat([packed_matmul(x, a, lib), packed_matmul(x, b, lib)], dim=1)
    assert torch.equal(packed_matmul(x, stacked, lib), separate)
    head, tail = split_outputs(stacked, 32)
    assert torch.equal(packed_matmul(x, head, lib), packed_matmul(x, a, lib))
    assert torch.equal(packed_matmul(x, tail, lib), packed_matmul(x, b, lib))
    assert head.q.untyped_storage().data_ptr() == stacked.q.untyped_storage().data_ptr(), "views, not copies"
    tiled = kind != "q4_1" and kind != "q8_0"
    # a tiled layout cannot join after a part that ends inside a tile of 16 outputs
    assert (stack_outputs(b, a) is None) == tiled
    other_kind = pack_q4_1(gguf_q4_1(first)) if kind == "q8_0" else pack_q8_0(gguf_q8_0(first))
    assert stack_outputs(a, other_kind) is None, "different kinds do not join"
