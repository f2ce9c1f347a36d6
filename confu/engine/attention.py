"""The target's registered attention function (`confu_split`): how a verify pass's rows attend.

Ordinary rows (the tree's nodes) never share a kernel call with ConFu's contemplate rows. Where the CPU kernels
are built (AVX-512), ordinary rows attend through `kernels.c`'s `attend_rows`, whose arithmetic for a row depends
only on the keys that row sees: a tree node's output is then bit for bit the one-token step's over the same prefix,
which SDPA does not give (its blocked reductions change with the row count and the masked keys). Elsewhere (GPU,
other dtypes, AVX2 builds, logit soft-capping, a long prompt's bulk prefill) ordinary rows take SDPA.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from confu.engine.quant import KernelFamily

SPLIT_ATTENTION = "confu_split"  # no "sdpa" in the name: transformers would demand `_supports_sdpa` (Gemma-2 has not)


def split_sdpa_attention(module, query, key, value, attention_mask, *, contemplate_split=None, softcap=None,
                         row_invariant=False, **kwargs):
    """Attention in which ordinary rows never share a kernel call with contemplate rows.

    `contemplate_split = (prefix, n_ordinary)`: the cache starts with `prefix` soft-prompt entries and the
    new rows are `n_ordinary` ordinary rows followed by contemplate rows. The mask already hides the soft
    prompt and the contemplate keys from ordinary rows, but a masked key still takes part in the kernel's
    blocked reductions, so with one call the mere presence of contemplate rows changed ordinary outputs by
    rounding (up to 4.5e-5 on the embedded target's logits). Ordinary rows therefore attend over exactly
    the keys they may see (committed tokens and ordinary new rows), which is the very call a forward without
    ConFu makes; only contemplate rows attend over the whole cache. Grouped KV heads are handed over as
    they are (`enable_gqa`) instead of being expanded to every query head in each layer of each pass.
    Calls without a split (HF `generate`, training) take HF's own SDPA path. Attention logit soft-capping
    (Gemma-2), which SDPA cannot do, runs the same calls through `_softcapped_attention`. `row_invariant`:
    both calls go through `row_invariant_attention` where it applies (`Target.forward` asks for it).
    """
    scaling = kwargs.get("scaling")
    if contemplate_split is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _softcapped_attention(query, key, value, attention_mask, scaling, softcap).transpose(1, 2), None
    prefix, n_ordinary = contemplate_split
    end = key.shape[2] - (query.shape[2] - n_ordinary)  # keys of the soft prompt, committed and ordinary rows
    ordinary_args = (query[:, :, :n_ordinary], key[:, :, prefix:end], value[:, :, prefix:end],
                     attention_mask[:, :, :n_ordinary, prefix:end])
    if softcap is None:
        ordinary = attention(*ordinary_args, scaling, kernel=row_invariant)
    else:
        ordinary = _softcapped_attention(*ordinary_args, scaling, softcap).transpose(1, 2)
    if n_ordinary == query.shape[2]:
        return ordinary.contiguous(), None
    contemplate_args = (query[:, :, n_ordinary:], key, value, attention_mask[:, :, n_ordinary:])
    if row_invariant and softcap is None and _kernel_applies(*contemplate_args):
        # `f` needs no invariance, but the kernel is also the faster one for a few rows (1.5-3.5x SDPA)
        contemplate = row_invariant_attention(*contemplate_args, scaling)
    else:
        contemplate = _contemplate_attention(*contemplate_args, getattr(module, "num_key_value_groups", 1), scaling,
                                             softcap)
    return torch.cat([ordinary, contemplate], dim=1), None


def _contemplate_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, n_rep: int,
                           scaling: float | None, softcap: float | None) -> Tensor:
    """Contemplate rows over the whole cache, returned as (batch, rows, heads, head_dim).

    The query heads are folded into their KV groups (HF's `pack_gqa`, extended to several rows) so the
    cache is never expanded to all query heads.
    """
    b, h, c, d = query.shape
    packed = query.reshape(b, h // n_rep, n_rep * c, d)  # head kv*n_rep + r, row i -> group kv, row r*c + i
    mask = mask.repeat(1, 1, n_rep, 1)
    if softcap is None:
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    else:
        out = _softcapped_attention(packed, key, value, mask, scaling, softcap)
    return out.reshape(b, h, c, d).transpose(1, 2)


def _softcapped_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None,
                          softcap: float) -> Tensor:
    """Attention with logit soft-capping, `softcap * tanh(scores / softcap)` before the mask (as Gemma-2's eager
    attention), over grouped KV heads; (batch, heads, rows, head_dim). A missing mask is HF's causal one, aligned
    to the last key."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    q, k = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value


_L = ctypes.c_long
# kernels.c's `attend_rows` (AVX-512 builds)
ATTEND_ROWS = KernelFamily("attention", attend_rows=[ctypes.c_void_p, _L, _L, ctypes.c_void_p, ctypes.c_void_p, _L, _L,
                                                     ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_float,
                                                     ctypes.c_void_p])


def row_invariant_attention_built() -> bool:
    """Whether this machine's kernels include `attend_rows` (AVX-512 builds)."""
    return ATTEND_ROWS.library() is not None


def _kernel_applies(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> bool:
    """`attend_rows` can run this call: CPU float32, batch 1, a boolean mask, the layouts it reads, and nothing
    that needs a gradient (the kernel has no backward)."""
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return (not grad and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32
            and mask is not None and mask.dtype == torch.bool and query.shape[0] == 1
            and query.shape[-1] % 16 == 0 and query.shape[-1] <= 256 and query.shape[1] % key.shape[1] == 0
            and key.stride(-1) == 1 and key.stride() == value.stride() and query.stride(-1) == 1
            and row_invariant_attention_built())


def attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scaling: float | None = None,
              kernel: bool = True) -> Tensor:
    """query (B, H, n, D) over key / value (B, KV, T, D) with a (B or 1, 1, n, T) mask -> (B, n, H, D):
    `row_invariant_attention` where `kernel` and it applies (the target's ordinary rows; the draft head's levels,
    where it is 1.5-3.5x SDPA for a few rows), SDPA with grouped KV heads as they are otherwise (training, GPU,
    a float mask)."""
    if kernel and _kernel_applies(query, key, value, mask):
        return row_invariant_attention(query, key, value, mask, scaling)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1]).transpose(1, 2)


def row_invariant_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor,
                            scaling: float | None) -> Tensor:
    """query (1, H, n, D), key / value (1, KV, T, D), mask (1, 1, n, T) bool -> (1, n, H, D), contiguous.

    Row i attends over exactly the keys it sees, in key order, and its arithmetic depends on nothing else
    (`kernels.c`: `attend_rows`): the same row in a tree and in a one-token step give the same bits."""
    _, heads, n, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    seen = mask.reshape(n, total).contiguous().view(torch.uint8)
    out = torch.empty(1, n, heads, dim, dtype=query.dtype)
    scale = scaling if scaling is not None else dim ** -0.5
    ATTEND_ROWS.library().attend_rows(
        query.data_ptr(), query.stride(2), query.stride(1), key.data_ptr(), value.data_ptr(), key.stride(1),
        key.stride(2), seen.data_ptr(), n, total, heads, kv_heads, dim, scale, out.data_ptr())
    return out


def register_split_attention() -> None:
    """Make `SPLIT_ATTENTION` an attention implementation transformers knows. A `Target` calls it when it wires
    its model, so importing confu changes nothing in transformers; registering again changes nothing."""
    AttentionInterface.register(SPLIT_ATTENTION, split_sdpa_attention)
    # HF builds the default (causal, padding) mask from the implementation's name: ours takes SDPA's.
    AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)
