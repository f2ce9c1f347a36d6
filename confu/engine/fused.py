"""A target's RMSNorms and SiLU-gated MLPs as row kernels (`kernels.c`: `rms_norm_rows`, `silu_mul`).

With its matmuls in the kernels (`quant.PackedLinear`), a one-token step of the embedded 135M target still ran
some 1,900 small tensor ops, each a few microseconds of dispatch on a CPU, more than its arithmetic at a few rows.
The norms were a quarter of them (a Llama RMSNorm is eight ops) and the MLP's activation a few more.
`fuse_norms_and_mlps` swaps, module by module and undoably like `quant.pack_model`:

- an RMSNorm for a `FusedRMSNorm` (one call: x / sqrt(mean(x^2) + eps) * weight per row);
- a gated MLP whose gate and up projections are packed alike for a `FusedGatedMLP`: gate and up as one matmul
  (`quant.stack_outputs`: the same bits per output), then silu(gate) * up in one call, then the down projection.

Neither is assumed from a class name: a module whose `forward` takes one input is swapped only when the
replacement reproduces its output on a probe (so a Gemma norm, which scales by 1 + weight, a gated norm or an MLP
with another activation stays as it is). Both compute each row on its own, so a row's bits never depend on the
rows beside it, which is what keeps speculative decoding token-identical to plain decoding; their roundings
differ from torch's by an ulp or two (the SiLU's exp is a polynomial), the same for every method. Calls the
kernels cannot take (autograd, other devices or dtypes, a weight that wants a gradient) go to the replaced module.
"""

from __future__ import annotations

import ctypes
import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from confu.engine.quant import (
    KernelFamily,
    PackedLinear,
    PackedWeight,
    kernels_take,
    packed_matmul,
    split_outputs,
    stack_outputs,
)

PROBE_ROWS = 3
# kernels.c's row-wise RMSNorm and SiLU gate (AVX-512 builds)
NORM_MLP = KernelFamily("norm_mlp", rms_norm_rows=[ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                                   ctypes.c_float, ctypes.c_void_p],
                        silu_mul=[ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p])
TOLERANCE = 1e-4  # relative to the probe output's largest magnitude: roundings, not a different function


class FusedRMSNorm(nn.Module):
    """An RMSNorm (weight * x / sqrt(mean(x^2) + eps), per row) as one kernel call."""

    def __init__(self, norm: nn.Module, eps: float):
        super().__init__()
        self.weight = norm.weight  # shared: the checkpoint layout and the fallback see the same parameter
        self.in_features = norm.weight.shape[0]
        self.eps = eps
        self.fallback: Callable[[Tensor], Tensor] = norm.forward  # a bound method, not a registered submodule
        self.lib = NORM_MLP.library()

    def forward(self, x: Tensor) -> Tensor:
        width = self.in_features
        if x.shape[-1] != width or not kernels_take(x, self.weight):
            return self.fallback(x)
        x = x.contiguous()
        out = torch.empty_like(x)
        self.lib.rms_norm_rows(x.data_ptr(), x.numel() // width, width, self.weight.data_ptr(), self.eps,
                               out.data_ptr())
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, eps={self.eps}"


class FusedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one packed matmul and the activation as one kernel call."""

    def __init__(self, mlp: nn.Module, gate_up: PackedWeight):
        super().__init__()
        # the projections stay children under their names: the module tree and its parameter names are the model's
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_up = gate_up
        self.in_features, self.intermediate = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.fallback: Callable[[Tensor], Tensor] = mlp.forward
        self.lib = NORM_MLP.library()

    def share_weights(self) -> None:
        """Point the gate and up projections' packed weights at the stacked copy (views), so the model holds
        those weights once; what they compute is unchanged (`quant.split_outputs`)."""
        self.gate_proj.packed, self.up_proj.packed = split_outputs(self.gate_up, self.intermediate)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features or not kernels_take(x, self.gate_proj.weight, self.up_proj.weight):
            return self.fallback(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        gate_up = packed_matmul(flat, self.gate_up, self.lib)
        act = torch.empty(flat.shape[0], self.intermediate, dtype=torch.float32)
        self.lib.silu_mul(gate_up.data_ptr(), flat.shape[0], self.intermediate, act.data_ptr())
        return self.down_proj(act).view(*x.shape[:-1], self.down_proj.out_features)

    def extra_repr(self) -> str:
        return f"intermediate={self.intermediate}, {self.gate_up.kind}"


def _one_input(module: nn.Module) -> bool:
    """`forward(x)` and nothing else: a norm with an optional gate (Mamba2-style) passes a one-argument probe
    but is called with two arguments in the model."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _norm_candidate(module: nn.Module) -> FusedRMSNorm | None:
    if isinstance(module, FusedRMSNorm) or not _one_input(module):  # fused already: a model wrapped twice
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.dtype != torch.float32
            or weight.device.type != "cpu" or weight.shape[0] % 16 or not isinstance(eps, float)
            or getattr(module, "bias", None) is not None or any(True for _ in module.children())):
        return None
    return FusedRMSNorm(module, eps)


def _mlp_candidate(module: nn.Module) -> FusedGatedMLP | None:
    if isinstance(module, FusedGatedMLP) or not _one_input(module):
        return None
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if not all(isinstance(m, PackedLinear) and m.bias is None for m in (gate, up, down)):
        return None
    if gate.out_features % 16 or gate.in_features != up.in_features:
        return None
    gate_up = stack_outputs(gate.packed, up.packed)
    return None if gate_up is None else FusedGatedMLP(module, gate_up)


def _same_function(original: nn.Module, fused: FusedRMSNorm | FusedGatedMLP) -> bool:
    """The fused module gives the original's output on a probe, within roundings."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, fused.in_features, generator=gen) * 3
    try:
        with torch.no_grad():
            want, got = original(x), fused(x)
    except Exception:  # a module that cannot take a plain (rows, width) input is no candidate
        return False
    if not isinstance(want, Tensor) or want.shape != got.shape or not torch.isfinite(want).all():
        return False
    return float((want - got).abs().max()) <= TOLERANCE * max(1.0, float(want.abs().max()))


def fuse_norms_and_mlps(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """Swap every RMSNorm and gated MLP of `model` that the row kernels reproduce (after `quant.pack_model`, whose
    packed gate / up projections the MLPs need); returns the swaps (parent, attribute, original, fused), to be
    undone like `pack_model`'s. Nothing is swapped where the kernels are not built (AVX-512 only)."""
    if NORM_MLP.library() is None:
        return []
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = _norm_candidate(child) or _mlp_candidate(child)
            if fused is not None and _same_function(child, fused):
                swaps.append((parent, name, child, fused))
    for parent, name, _, fused in swaps:
        setattr(parent, name, fused)
        if isinstance(fused, FusedGatedMLP):
            fused.share_weights()
    return swaps
