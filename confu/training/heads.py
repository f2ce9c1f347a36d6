"""How a training run gets its draft head: fresh (with a draft vocabulary from the data), or from `--init`
(continued, or an EAGLE-3 head's shared weights copied into a fresh ConFu head); a fresh head's output layer
initialised from the target's (`--head-init target`), its decoder layer from one of the target's
(`--layer-init K`), and its fc scaled to an output RMS (`--fc-rms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from confu.engine.draft import ConFuHead
from confu.engine.registry import build_head as build_draft_head
from confu.engine.registry import head_method
from confu.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from confu.training.batching import Dist, Seq
    from confu.training.forward import TargetSource
    from confu.training.train_config import TrainConfig

FC_RMS_SEQS = 8  # training sequences on which a fresh head's fc output RMS is measured (--fc-rms)


def _confu_overrides(cfg: TrainConfig) -> dict[str, Any]:
    return {"soft_prompt_len": cfg.soft_prompt_len, "n_expert": cfg.n_expert,
            "top_k_expert": cfg.top_k_expert, "future_bias": cfg.future_bias,
            "future_residual": cfg.future_residual, "future_logits": cfg.future_logits}


def build_head(cfg: TrainConfig, target, train_seqs: Sequence[Seq]) -> tuple[Any, dict[str, Any]]:
    """The head to train (on CPU) and a provenance note.

    --init with the same method continues that head; --init of an EAGLE-3 head with --method confu copies
    every shared weight (fc, layer, norm, lm_head, vocabulary) into a fresh ConFu head.
    """
    from confu.engine.checkpoint import new_draft
    from confu.engine.convert import load_draft

    if cfg.widen_vocab and not cfg.init:
        raise InputError("--widen-vocab grows the vocabulary of an --init head; a fresh head takes "
                         "--draft-vocab-size as it is")
    if cfg.init:
        src = load_draft(cfg.init, target)
        if cfg.widen_vocab:
            src, note = widen_vocab(src, target, train_seqs, cfg.draft_vocab_size)
        else:
            note = {}
        if src.cfg.method == cfg.method:
            if head_method(src.cfg.method).reads_future:
                src, added = with_deviations(src, target, cfg)
                note |= {"added_deviations": added} if added else {}
            return src.train(), {"init": str(cfg.init)} | note
        if head_method(cfg.method).extends == src.cfg.method:
            head = new_draft(target, cfg.method, src.d2t.clone(), src.t2d.clone(), seed=cfg.seed,
                             **_confu_overrides(cfg))
            result = head.load_state_dict(src.state_dict(), strict=False)
            new_parts = {k.split(".")[0] for k in result.missing_keys}
            if result.unexpected_keys or not new_parts <= set(type(head).NEW_PARTS):
                raise CheckpointError(f"{cfg.init}: cannot start a {cfg.method} head from it (missing "
                                      f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
            return head.train(), {"init": str(cfg.init), "init_method": src.cfg.method} | note
        raise InputError(f"--init {cfg.init} is a {src.cfg.method} head; "
                         f"--method {cfg.method} cannot start from it")
    vocab = _data_vocab(target, train_seqs, cfg.draft_vocab_size)
    overrides = _confu_overrides(cfg) if head_method(cfg.method).reads_future else {}
    head = new_draft(target, cfg.method, vocab.d2t, vocab.t2d, seed=cfg.seed, **overrides)
    if cfg.head_init == "target":
        init_output_from_target(head, target)
    note = {"draft_vocab_size": vocab.draft_vocab_size, "vocab_coverage": round(vocab.coverage, 4),
            "head_init": cfg.head_init}
    if cfg.layer_init is not None:
        note["layer_init"] = init_layer_from_target(head, target, cfg.layer_init)
    return head.train(), note


def with_deviations(src, target, cfg: TrainConfig) -> tuple[Any, list[str]]:
    """A continued ConFu head with the deviations `cfg` asks for and `src` lacks (`ConFuHead.DEVIATIONS`):
    a copy whose new parts start as the paper's head (zero gate, zero residual map), every other weight `src`'s.
    A deviation `src` has stays (its weights are trained)."""
    from confu.engine.checkpoint import attach_target_embedding

    wanted = {k: v for k, v in _confu_overrides(cfg).items() if k in ConFuHead.DEVIATIONS and v not in (None, False)}
    added = sorted(k for k, v in wanted.items() if getattr(src.cfg, k) in (None, False))
    if not added:
        return src, []
    head = build_draft_head(replace(src.cfg, **{k: wanted[k] for k in added}, extra=dict(src.cfg.extra)))
    result = head.load_state_dict(src.state_dict(), strict=False)
    if result.unexpected_keys or any(k.split(".")[0] not in ConFuHead.NEW_PARTS for k in result.missing_keys):
        raise CheckpointError(f"{cfg.init}: cannot add {added} to it ({result.missing_keys[:5]})")
    attach_target_embedding(head, target)
    return head.to(src.fc.weight.dtype), added


def _data_vocab(target, train_seqs: Sequence[Seq], size: int, always_include: Sequence[int] = ()):
    """The draft vocabulary of `size` tokens for the training data: the target's EOS ids, `always_include`,
    then the most frequent response tokens (`build_draft_vocab`)."""
    from confu.training.vocab import build_draft_vocab

    return build_draft_vocab([{"input_ids": i, "loss_mask": m} for i, m in train_seqs], target.vocab_size, size,
                             always_include=always_include, eos_token_id=sorted(target.eos_ids))


@torch.no_grad()
def widen_vocab(src, target, train_seqs: Sequence[Seq], size: int) -> tuple[Any, dict[str, Any]]:
    """A copy of the trained head `src` with a draft vocabulary of `size` tokens: all of `src`'s, then the most
    frequent response tokens of `train_seqs` (`build_draft_vocab`). Every other weight is `src`'s.

    A kept token keeps its lm_head row. A new token's row is the target's output-embedding row mapped into the
    draft's output space by the linear map that best takes (least squares) the target's rows of the kept tokens
    onto the draft's trained rows: the draft's space has moved away from the target's during training, and a
    row copied unmapped would be scored on another scale.
    """
    from confu.engine.checkpoint import attach_target_embedding

    old_ids = src.to_target_ids(torch.arange(len(src.d2t)))
    if size < len(old_ids):
        raise InputError(f"--widen-vocab: --draft-vocab-size {size} is smaller than the --init head's "
                         f"{len(old_ids)} tokens")
    vocab = _data_vocab(target, train_seqs, size, always_include=old_ids.tolist())
    head = build_draft_head(replace(src.cfg, draft_vocab_size=vocab.draft_vocab_size, extra=dict(src.cfg.extra)))
    head.load_state_dict({k: v for k, v in src.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")},
                         strict=False)
    head.set_vocab(vocab.d2t, vocab.t2d)
    attach_target_embedding(head, target)
    new_ids = vocab.target_ids
    kept = src.t2d[new_ids]  # new draft rows whose token the old vocabulary had, in the new order
    out_emb = target.model.get_output_embeddings().weight.float()
    old_rows, emb_old = src.lm_head.weight.float(), out_emb[old_ids]
    mapping = torch.linalg.lstsq(emb_old, old_rows).solution  # (H_target, H): target row -> draft row
    rows = out_emb[new_ids] @ mapping
    rows[kept] = old_rows  # old ids ascend, and so do the kept ones among the new ids
    head.lm_head.weight.copy_(rows.to(head.lm_head.weight))
    fit = float((emb_old @ mapping - old_rows).norm() / old_rows.norm())
    return head, {"widened_vocab": [len(old_ids), vocab.draft_vocab_size], "vocab_coverage": round(vocab.coverage, 4),
                  "draft_vocab_size": vocab.draft_vocab_size, "widen_fit_residual": round(fit, 4)}


@torch.no_grad()
def scale_fc_to_rms(head, source: TargetSource, indices: Sequence[int], rms: float, d: Dist) -> float:
    """Scale the head's fc so that its output over the real rows of sequences `indices` has RMS `rms`
    (rank 0's measurement, so data-parallel ranks keep identical weights). Returns the factor applied."""
    tb = source.batch(head, indices, keep_kv=False)
    real = torch.arange(tb.shape[1], device=tb.lengths.device)[None] < tb.lengths[:, None]
    h = head.project_features(tb.features.to(head.fc.weight.dtype))[real]
    factor = torch.tensor(rms / max(float(h.float().pow(2).mean().sqrt()), 1e-12), device=head.fc.weight.device)
    if d.world > 1:
        import torch.distributed as dist

        dist.broadcast(factor, 0)
    head.fc.weight.mul_(factor.to(head.fc.weight.dtype))
    return float(factor)


def _norm_scale(norm, eps: float) -> torch.Tensor:
    """The effective per-channel scale of a target RMSNorm, measured on an all-ones vector (RMS 1) rather
    than copied, because conventions differ (Gemma's multiplies by 1 + weight); (1 + eps) ** -0.5 divided out."""
    ones = torch.ones_like(norm.weight)[None]
    return norm(ones)[0].float() * math.sqrt(1 + eps)


# The target decoder layer's parts a draft layer copies: (draft attribute, path in a Llama-style layer, how many
# times the target's input width fits in the draft's: q / k / v read [embedding, hidden]).
LAYER_PARTS = (("q_proj", "self_attn.q_proj", 2), ("k_proj", "self_attn.k_proj", 2), ("v_proj", "self_attn.v_proj", 2),
               ("o_proj", "self_attn.o_proj", 1), ("gate_proj", "mlp.gate_proj", 1), ("up_proj", "mlp.up_proj", 1),
               ("down_proj", "mlp.down_proj", 1))


@torch.no_grad()
def init_layer_from_target(head, target, index: int) -> int:
    """Start the draft's decoder layer as the target's layer `index` (negative counts from the end); returns
    the layer index used.

    Attention and MLP weights and the norms are copied. The draft's q / k / v read [norm(embedding),
    norm(hidden)], 2H wide, where the target's read one H-wide stream: both halves get the target's weight,
    so at step 0 the layer reads the sum of the two normalised inputs through the target's projections.
    Needs a Llama-style layer (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms) of the
    draft's shapes.
    """
    layers = target.model.get_decoder().layers
    if not -len(layers) <= index < len(layers):
        raise InputError(f"--layer-init {index}: the target has {len(layers)} layers")
    index %= len(layers)
    src, dst = layers[index], head.layer

    def part(path: str) -> torch.nn.Module:
        try:
            return src.get_submodule(path)
        except AttributeError:
            raise InputError(f"--layer-init needs a Llama-style target layer; layer {index} has no {path}") from None

    for mine, theirs, halves in LAYER_PARTS:
        w, d = part(theirs).weight, getattr(dst, mine).weight
        if (w.shape[0], w.shape[1] * halves) != tuple(d.shape):
            raise InputError(f"--layer-init {index}: target {theirs} is {tuple(w.shape)}, the draft's {mine} "
                             f"{tuple(d.shape)}")
        d.copy_(w.repeat(1, halves).to(d))
    for norm, name in ((dst.hidden_norm, "input_layernorm"), (dst.embed_norm, "input_layernorm"),
                       (dst.post_norm, "post_attention_layernorm")):
        norm.weight.copy_(_norm_scale(part(name), norm.eps).to(norm.weight))
    return index


@torch.no_grad()
def init_output_from_target(head, target) -> None:
    """Start the head's final norm and lm_head as the target's own, for the draft vocabulary's rows.

    The draft's last hidden state then begins in a space the target's output embedding already reads
    (the norm's scale measured, `_norm_scale`).
    """
    norm = getattr(target.model.get_decoder(), "norm", None)
    if norm is not None:
        head.norm.weight.copy_(_norm_scale(norm, head.norm.eps).to(head.norm.weight))
    weight = target.model.get_output_embeddings().weight
    draft_ids = torch.arange(len(head.d2t), device=head.d2t.device) + head.d2t
    head.lm_head.weight.copy_(weight[draft_ids.to(weight.device)].to(head.lm_head.weight))
