"""The target's RMSNorms and gated MLPs in row kernels (`confu.engine.fused`): the modules' own function, row by
row, swapped only where a probe says so, on the decoding path only (`Target.reference_model` keeps transformers'
modules), and autograd left to the originals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confu.engine.fused import FusedGatedMLP, FusedRMSNorm, fuse_norms_and_mlps
from confu.engine.quant import PackedLinear, kernel_status, pack_model
from tests.helpers import PROMPTS, chat_ids, gguf_q4_1, quantized_tiny_target, require_kernels


def require_row_kernels() -> None:
    require_kernels()
    if not kernel_status().norm_mlp:
        pytest.skip(f"the row kernels need an AVX-512 build (this one: {kernel_status().lanes} lanes)")


def fused_modules(target) -> tuple[list[FusedRMSNorm], list[FusedGatedMLP]]:
    modules = list(target.model.modules())
    return ([m for m in modules if isinstance(m, FusedRMSNorm)], [m for m in modules if isinstance(m, FusedGatedMLP)])


@pytest.mark.parametrize("numerics", ["auto", "q8"])
def test_fused_norms_and_mlps_are_the_modules_function_row_by_row(tiny_llama_dir, numerics):
    require_row_kernels()
    if numerics == "q8" and not kernel_status().int8:
        pytest.skip("numerics 'q8' needs AVX512-VNNI")
    target = quantized_tiny_target(tiny_llama_dir, numerics=numerics)
    norms, mlps = fused_modules(target)
    layers = target.num_layers
    assert (len(norms), len(mlps)) == (2 * layers + 1, layers), target.numerics
    assert f"{2 * layers + 1} RMSNorms and {layers} gated MLPs in row kernels" in target.numerics
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in norms:  # the tiny model's norms start at 1: give them a weight the kernel must read
            norm.weight.uniform_(0.5, 1.5, generator=gen)
        x = torch.randn(17, target.hidden_size, generator=gen) * 2
        for module in norms + mlps:
            want = module.fallback(x)  # the replaced module's own forward
            original, module.fallback = module.fallback, None  # from here on only the kernel path can answer
            out = module(x)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
            other = x.clone()
            other[3] += 1.0
            assert torch.equal(module(other)[4], out[4]) and not torch.equal(module(other)[3], out[3])
            for row in (0, 5, 16):  # a row's bits do not depend on the rows beside it
                assert torch.equal(out[row], module(x[row : row + 1])[0])
            assert torch.equal(module(x[None, :4]), out[None, :4]), "a batch dimension is read as rows"
            assert module(x[:0]).shape == (0, out.shape[1]), "no rows: an empty output, as the original gives"
            module.fallback = original


def test_a_module_the_kernels_do_not_reproduce_is_left_alone():
    require_row_kernels()

    class GemmaStyleNorm(nn.Module):  # scales by 1 + weight: the same attributes, another function
        def __init__(self, width: int):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    class Mlp(nn.Module):
        def __init__(self, act: nn.Module):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
            self.down_proj = nn.Linear(96, 64, bias=False)
            self.act_fn = act

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class GatedNorm(nn.RMSNorm):  # an RMSNorm when called alone, but the model passes a gate (Mamba2-style)
        def forward(self, x, gate=None):
            out = super().forward(x)
            return out if gate is None else out * torch.sigmoid(gate)

    torch.manual_seed(0)
    model = nn.ModuleDict({"gemma_norm": GemmaStyleNorm(64), "llama_norm": nn.RMSNorm(64, eps=1e-6),
                           "narrow_norm": nn.RMSNorm(40, eps=1e-6), "gated_norm": GatedNorm(64, eps=1e-6),
                           "gelu_mlp": Mlp(nn.GELU()), "silu_mlp": Mlp(nn.SiLU()), "float_mlp": Mlp(nn.SiLU())})
    with torch.no_grad():
        for mlp in ("gelu_mlp", "silu_mlp"):
            for linear in model[mlp].children():
                if isinstance(linear, nn.Linear):
                    linear.weight.copy_(gguf_q4_1(linear.weight))
    pack_model(model["gelu_mlp"])
    pack_model(model["silu_mlp"])
    assert isinstance(model["silu_mlp"].gate_proj, PackedLinear)
    swaps = fuse_norms_and_mlps(model)
    assert sorted(name for _, name, *_ in swaps) == ["llama_norm", "silu_mlp"], \
        "only what the kernels reproduce: not 1 + weight, not 40 wide, not gated, not GELU, not an unpacked MLP"
    assert fuse_norms_and_mlps(model) == [], "a fused module is not fused again"
    assert isinstance(model["llama_norm"], FusedRMSNorm) and isinstance(model["silu_mlp"], FusedGatedMLP)
    assert isinstance(model["gemma_norm"], GemmaStyleNorm) and type(model["gelu_mlp"]) is Mlp


def test_autograd_takes_the_original_and_the_reference_model_keeps_transformers_modules(tiny_llama_dir):
    require_row_kernels()
    target = quantized_tiny_target(tiny_llama_dir)
    norms, mlps = fused_modules(target)
    norm, mlp = norms[0], mlps[0]
    x = torch.randn(3, target.hidden_size, requires_grad=True)
    norm(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    norm.fallback(x).sum().backward()
    assert torch.equal(grad, x.grad), "with autograd the fused module is the original"
    assert mlp(x).requires_grad
    y = torch.randn(3, target.hidden_size)
    norm.weight.requires_grad_(True)  # a weight that wants a gradient (the target itself is frozen)
    norm(y).pow(2).sum().backward()
    grad = norm.weight.grad.clone()
    norm.weight.grad = None
    norm.fallback(y).pow(2).sum().backward()
    assert torch.equal(grad, norm.weight.grad)
    norm.weight.requires_grad_(False)
    reference_layer = target.reference_model.get_decoder().layers[0]
    assert not any(isinstance(m, FusedRMSNorm | FusedGatedMLP) for m in target.reference_model.modules())
    assert (type(reference_layer.mlp).__name__ == "LlamaMLP"
            and type(reference_layer.input_layernorm).__name__ == "LlamaRMSNorm")
    assert type(reference_layer.mlp.gate_proj) is nn.Linear
    assert fused_modules(target) == (norms, mlps), "the decoding path keeps its fused modules"
    assert isinstance(target.model.get_decoder().layers[0].mlp.gate_proj, PackedLinear)
    ids = torch.tensor([chat_ids(target, PROMPTS[0])])
    with torch.no_grad():
        fused = target.model(ids).logits
        reference = target.reference_model(ids).logits
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
