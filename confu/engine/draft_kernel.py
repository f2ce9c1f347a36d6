"""The draft head's inference forward in kernel calls (`kernels.c`: `draft_qkv`, `draft_attend`, `draft_top_children`).

A draft level at a few rows is a handful of small matmuls and about seventy tensor ops between them (norms,
rotary angles, head reshapes, residuals, the MLP's activation, log_softmax and topk), and on a CPU each op costs
microseconds of dispatch, more than its arithmetic: growing a 16-node tree cost about a quarter of a target step,
most of it outside the matmuls. `FusedDraftLayer` runs `DraftLayer.qkv` and `DraftLayer.attend` as one kernel
call each, on the same int8 weights the packed layer holds (q / k / v and gate / up stacked into one matrix each
by `quant.stack_outputs`, every output row with its own scale as before, so the matmuls give the same bits), the
row-invariant attention kernel and the same rotary convention. `top_children` is a level's final norm, lm_head,
log_softmax, topk and id map in one call.

Like the int8 weights, this changes a draft's numerics by float roundings (norms and activations summed in another
order), which only changes what it proposes, never what the target emits. Calls the kernels cannot take (batch
above 1, a float attention mask, autograd, other devices or dtypes, a machine without AVX512-VNNI) go to the
wrapped layer's own forward.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from confu.engine.draft import DraftLayer, Eagle3Head, rope_inv_freq
from confu.engine.quant import KernelFamily, PackedLinear, PackedWeight, kernels_take, stack_outputs


class _I8Weight(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("sum", ctypes.c_void_p)]


class _DraftLayerArgs(ctypes.Structure):
    """`kernels.c`'s `draft_layer`: shapes, norm weights, rotary frequencies and the four int8 matrices."""

    _fields_ = [
        ("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
        ("intermediate", ctypes.c_int), ("eps", ctypes.c_float),
        ("embed_norm", ctypes.c_void_p), ("hidden_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
        ("inv_freq", ctypes.c_void_p),
        ("qkv", _I8Weight), ("o", _I8Weight), ("gate_up", _I8Weight), ("down", _I8Weight),
    ]


_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
# kernels.c's fused draft layer and top-k (AVX512-VNNI builds); `top_log_probs` is the top-k alone
DRAFT_LAYER = KernelFamily(
    "draft_layer",
    draft_qkv=[_P, _P, _P, _P, _I, _P, _P, _P],
    draft_attend=[_P, _P, _P, _P, _P, _L, _L, _P, _I, _I, _P, _L, _P],
    top_log_probs=[_P, _I, _I, _I, _P, _P],
    draft_top_children=[_P, _I, _I, _P, ctypes.c_float, _P, _P, _P, _I, _P, _P, _I, _P, _P],
)


def _i8(packed: PackedWeight) -> _I8Weight:
    return _I8Weight(packed.q.data_ptr(), packed.d.data_ptr(), packed.m.data_ptr())


def _layer_fits(layer: DraftLayer) -> bool:
    """The layer's linear layers run the int8 kernel and its shapes fit the fused kernels (multiples of 16)."""
    cfg = layer.cfg
    linears = (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj, layer.up_proj, layer.down_proj)
    return (DRAFT_LAYER.library() is not None
            and all(isinstance(m, PackedLinear) and m.packed.kind == "i8" and m.bias is None for m in linears)
            and cfg.hidden_size % 16 == 0 and cfg.intermediate_size % 16 == 0
            and cfg.head_dim % 16 == 0 and cfg.head_dim <= 256
            and cfg.num_attention_heads % cfg.num_key_value_heads == 0)


class FusedDraftLayer(nn.Module):
    """A packed `DraftLayer` whose `qkv` and `attend` run as one kernel call each where the kernels apply."""

    def __init__(self, layer: DraftLayer):
        super().__init__()
        cfg = layer.cfg
        self.layer = layer
        self.cfg = cfg
        self.lib = DRAFT_LAYER.library()
        self._qkv = stack_outputs(stack_outputs(layer.q_proj.packed, layer.k_proj.packed), layer.v_proj.packed)
        self._gate_up = stack_outputs(layer.gate_proj.packed, layer.up_proj.packed)
        # held here: the kernel reads them through the raw pointers below
        self._norms = [n.weight.detach().float().contiguous() for n in (layer.embed_norm, layer.hidden_norm,
                                                                         layer.post_norm)]
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, torch.device("cpu")).contiguous()
        self._args = _DraftLayerArgs(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.rms_norm_eps, *(t.data_ptr() for t in self._norms), self._inv_freq.data_ptr(),
            _i8(self._qkv), _i8(layer.o_proj.packed), _i8(self._gate_up), _i8(layer.down_proj.packed),
        )

    def qkv(self, emb: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`DraftLayer.qkv`: q (1, nh, n, d), k and v (1, nkv, n, d); q and k rotated."""
        if emb.shape[0] != 1 or not kernels_take(emb, hidden):
            return self.layer.qkv(emb, hidden, positions)
        cfg, n = self.cfg, emb.shape[1]
        emb = emb.reshape(n, -1).contiguous()
        hidden = hidden.reshape(n, -1).contiguous()
        pos = positions.reshape(n).to(torch.int64).contiguous()
        q = torch.empty(1, cfg.num_attention_heads, n, cfg.head_dim)
        k = torch.empty(1, cfg.num_key_value_heads, n, cfg.head_dim)
        v = torch.empty_like(k)
        self.lib.draft_qkv(ctypes.byref(self._args), emb.data_ptr(), hidden.data_ptr(), pos.data_ptr(), n,
                           q.data_ptr(), k.data_ptr(), v.data_ptr())
        return q, k, v

    def attend(self, hidden: Tensor, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
               shift: Tensor | None = None) -> Tensor:
        """`DraftLayer.attend` (attention over the given keys, the MLP block, `shift` on the residual)."""
        tensors = (hidden, q, keys, values) + (() if shift is None else (shift,))
        if (mask.dtype != torch.bool or hidden.shape[0] != 1 or mask.shape[0] != 1 or not kernels_take(*tensors)
                or keys.stride() != values.stride() or keys.stride(-1) != 1):
            return self.layer.attend(hidden, q, keys, values, mask, shift)
        n, total = q.shape[2], keys.shape[2]
        hidden = hidden.reshape(n, -1).contiguous()
        q = q.contiguous()
        seen = mask.reshape(n, total).contiguous().view(torch.uint8)
        shift_ptr, shift_row = None, 0
        if shift is not None:
            shift = shift.reshape(-1, self.cfg.hidden_size).contiguous()
            shift_ptr, shift_row = shift.data_ptr(), 0 if len(shift) == 1 else self.cfg.hidden_size
        out = torch.empty(1, n, self.cfg.hidden_size)
        self.lib.draft_attend(ctypes.byref(self._args), hidden.data_ptr(), q.data_ptr(), keys.data_ptr(),
                              values.data_ptr(), keys.stride(1), keys.stride(2), seen.data_ptr(), n, total, shift_ptr,
                              shift_row, out.data_ptr())
        return out


def fuse_draft_layer(head: Eagle3Head) -> bool:
    """Give a packed inference copy of a head the fused layer (`FusedDraftLayer`), where the kernels take it."""
    if isinstance(head.layer, FusedDraftLayer) or not _layer_fits(head.layer):
        return False
    head.layer = FusedDraftLayer(head.layer)
    return True


def top_children(head: Eagle3Head, out_hidden: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The k likeliest children of each row of out_hidden (n, H) under the head, best first: target-vocabulary
    ids and log-probs, (n, k) each. Final norm, lm_head, log_softmax, topk and the draft-to-target id map in one
    kernel call where the head's lm_head is int8-packed (ties: the lower draft id first); torch's ops otherwise.
    `bias` (Vd,), when given, is added to every row's logits (a ConFu head's `future_logits`)."""
    lm_head, cfg = head.lm_head, head.cfg
    k = min(k, cfg.draft_vocab_size)
    lib = DRAFT_LAYER.library()
    if not (lib is not None and isinstance(lm_head, PackedLinear) and lm_head.packed.kind == "i8"
            and kernels_take(out_hidden, head.norm.weight) and cfg.hidden_size % 16 == 0):
        logits = head.logits(out_hidden).float()
        top = torch.log_softmax(logits if bias is None else logits + bias, dim=-1).topk(k, dim=-1)
        return head.to_target_ids(top.indices), top.values
    n = out_hidden.shape[0]
    x = out_hidden.contiguous()
    logps = torch.empty(n, k)
    ids = torch.empty(n, k, dtype=torch.int64)
    packed = lm_head.packed
    bias = None if bias is None else bias.float().contiguous()
    lib.draft_top_children(x.data_ptr(), n, cfg.hidden_size, head.norm.weight.data_ptr(), head.norm.eps,
                           packed.q.data_ptr(), packed.d.data_ptr(), packed.m.data_ptr(), packed.out_features,
                           None if bias is None else bias.data_ptr(), head.d2t.data_ptr(), k, logps.data_ptr(),
                           ids.data_ptr())
    return ids, logps
