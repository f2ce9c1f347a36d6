"""Draft heads: EAGLE-3 (our baseline) and ConFu (EAGLE-3 body + soft prompt + contemplate / future MoEs).

The EAGLE-3 head is one decoder layer. Its input at row t is the pair (embedding of token t+1, hidden h_t),
where h_t = fc(concat of the target's low / mid / high features of token t) for tokens the target has seen,
and the head's own previous output for tokens it drafted itself. Both halves are RMS-normed and concatenated
(2H) before q / k / v. Logits cover a reduced draft vocabulary; `d2t` maps draft ids back to target ids.

Every function takes a leading batch dimension so training (batched, train-time test) and drafting
(batch 1, tree attention) share one code path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confu.engine.attention import attention

FUTURE_GATE_DEPTHS = 8  # draft depths with a gate of their own under `DraftConfig.future_logits`


@dataclass
class DraftConfig:
    method: str  # a `confu.engine.registry.HEAD_METHODS` name, checked where a head is built
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    feature_layers: list[int]
    target: dict  # identity of the target it was built for: name, hidden_size, num_hidden_layers, vocab_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ConFu only
    soft_prompt_len: int = 16
    n_expert: int = 8  # 1 = a static [con] / [f] embedding (the paper's -MoE ablation)
    top_k_expert: int = 2
    # Deviation from the paper (None = the paper): a learned per-head offset on the attention logit of the
    # future key, starting at this value. Why: the future key is one among hundreds of sequence keys, so at
    # the start of training it gets ~1/N of the attention and almost no gradient; f then stays unread.
    future_bias: float | None = None
    # Deviation from the paper (False = the paper): f also enters every draft row's residual stream after
    # attention, through a linear map that starts at zero, so its gradient never waits on attention to f.
    future_residual: bool = False
    # Deviation from the paper (False = the paper): every draft depth adds gate_k * lm_head(f) to its logits, a
    # learned gate per depth starting at zero. Why: f is a final-norm hidden state of the target, so the draft's
    # output layer (initialised from the target's) reads it directly as a prediction of the tokens ahead, and
    # the gate's gradient does not wait on attention or a residual map to learn to route f first.
    future_logits: bool = False
    target_num_kv_heads: int = 0
    target_head_dim: int = 0
    extra: dict = field(default_factory=dict)  # training provenance, free-form

    def __post_init__(self) -> None:
        self.top_k_expert = min(self.top_k_expert, self.n_expert)

    @classmethod
    def for_target(cls, target, method: str, draft_vocab_size: int, **overrides) -> DraftConfig:
        """A draft shaped like the target's own decoder layers (EAGLE-3 does the same)."""
        cfg = target.model.config
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0
        )
        return cls(
            method=method,
            hidden_size=target.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=target.vocab_size,
            draft_vocab_size=min(draft_vocab_size, target.vocab_size),
            feature_layers=list(target.feature_layers),
            target={
                "name": target.name,
                "model_type": cfg.model_type,
                "hidden_size": target.hidden_size,
                "num_hidden_layers": target.num_layers,
                "vocab_size": target.vocab_size,
            },
            rms_norm_eps=getattr(cfg, "rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            target_num_kv_heads=target.num_kv_heads,
            target_head_dim=target.head_dim,
            **overrides,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # One fused op (a draft level runs four norms); in float32 for half-precision inputs, like the target's
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """The rotary frequencies, (head_dim / 2,) float32: angle = position * inv_freq."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_angles(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, (B, 1, n, head_dim / 2) each, for positions (B, n)."""
    angles = positions.to(torch.float32)[:, None, :, None] * rope_inv_freq(head_dim, theta, positions.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, half-split convention: x (B, heads, n, d), cos / sin from `rope_angles`.

    Written on the halves, (x1 cos - x2 sin, x2 cos + x1 sin), which is x * [cos, cos] + [-x2, x1] * [sin, sin]
    with the same roundings, and fewer ops.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DraftLayer(nn.Module):
    """One decoder layer whose q / k / v read the 2H input [norm(embedding), norm(hidden)]."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.embed_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(2 * h, nh * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def _heads(self, x: Tensor, n_heads: int) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, n_heads, self.cfg.head_dim).transpose(1, 2)

    def qkv(self, emb: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, nh, n, d), k and v (B, nkv, n, d); q and k rotated."""
        x = torch.cat([self.embed_norm(emb), self.hidden_norm(hidden)], dim=-1)
        cfg = self.cfg
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        q = apply_rope(self._heads(self.q_proj(x), cfg.num_attention_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x), cfg.num_key_value_heads), cos, sin)
        v = self._heads(self.v_proj(x), cfg.num_key_value_heads)
        return q, k, v

    def attend(self, hidden: Tensor, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
               shift: Tensor | None = None) -> Tensor:
        """Attention over given keys (mask (B or 1, 1, n, K), True = attend), then the MLP block; `shift`
        (broadcast to (B, n, H)) is added to the residual after attention (`ConFuHead.future_shift`)."""
        # grouped KV heads as they are: expanding them would copy the whole draft cache at every level
        attn = attention(q, keys, values, mask)
        b, n = attn.shape[:2]
        h = hidden + self.o_proj(attn.reshape(b, n, -1))
        if shift is not None:
            h = h + shift
        x = self.post_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EmbeddingMoE(nn.Module):
    """A token embedding chosen by a router: the top-k of `n_expert` learned embeddings, weighted.

    With one expert it is a static learned embedding (the router's output is then irrelevant).
    """

    def __init__(self, in_dim: int, out_dim: int, n_expert: int, top_k: int, init: Tensor | None = None):
        super().__init__()
        self.router = nn.Linear(in_dim, n_expert, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        experts = torch.randn(n_expert, out_dim) * 0.02
        if init is not None:
            experts = experts + init  # start every expert near a sensible token embedding
        self.experts = nn.Parameter(experts)
        self.top_k = top_k

    def forward(self, x: Tensor) -> Tensor:
        gates = torch.softmax(self.router(x).float(), dim=-1)
        weights, idx = gates.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(self.experts.dtype)
        return (weights[..., None] * self.experts[idx]).sum(-2)


class Eagle3Head(nn.Module):
    """The EAGLE-3 draft head. `embed` is the target's frozen token embedding (never saved)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, h)
        self.embed.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.layer = DraftLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))

    def init_from_target(self, target) -> None:
        """Start the parts that live in the target's space at its scale: an EAGLE-3 head has none."""

    def set_vocab(self, d2t: Tensor, t2d: Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    def logits(self, out_hidden: Tensor) -> Tensor:
        """Draft-vocabulary logits of the layer's output hidden states."""
        return self.lm_head(self.norm(out_hidden))

    def project_features(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint stores: everything but the target's frozen embedding."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}


class ConFuHead(Eagle3Head):
    """EAGLE-3 head + the ConFu parts that live on the target side (soft prompt, [con] MoE)
    and on the draft side ([f] MoE)."""

    # Its own parameters and modules (first component of a state-dict name), which an EAGLE-3 head lacks:
    # they start fresh when a ConFu head is made from an EAGLE-3 one, and may train at a larger lr.
    NEW_PARTS = ("soft_prompt", "con_moe", "future_moe", "future_bias", "future_proj", "future_gate")
    # The optional deviations (`DraftConfig`), which a continued ConFu head may gain (`with_deviations`).
    DEVIATIONS = ("future_bias", "future_residual", "future_logits")

    def __init__(self, cfg: DraftConfig):
        super().__init__(cfg)
        h = cfg.hidden_size
        layers = cfg.target["num_hidden_layers"]
        # Prefix-tuning style: learned keys and values per target layer, stored without RoPE.
        self.soft_prompt = nn.Parameter(
            torch.randn(layers, 2, cfg.target_num_kv_heads, cfg.soft_prompt_len, cfg.target_head_dim)
        )
        self.con_moe = EmbeddingMoE(3 * h, h, cfg.n_expert, cfg.top_k_expert)
        self.future_moe = EmbeddingMoE(h, h, cfg.n_expert, cfg.top_k_expert)
        if cfg.future_bias is None:
            self.register_parameter("future_bias", None)
        else:
            self.future_bias = nn.Parameter(torch.full((cfg.num_attention_heads,), float(cfg.future_bias)))
        self.future_proj = nn.Linear(h, h, bias=False) if cfg.future_residual else None
        if self.future_proj is not None:
            nn.init.zeros_(self.future_proj.weight)  # starts as the paper's head; learns how much f to add
        # one gate per draft depth; depths beyond the last use the last (zero: the paper's head)
        self.future_gate = nn.Parameter(torch.zeros(FUTURE_GATE_DEPTHS)) if cfg.future_logits else None

    def init_from_target(self, target) -> None:
        """Start the soft prompt and the expert embeddings at the scale of the target's own.

        Soft prompt: the target's keys / values of a short neutral text (RoPE is then part of the learned
        value, which is fine: the entries are free parameters). Experts: near the mean token embedding as each
        side receives tokens: [con] is a target input, so the mean of `target.embed` (Gemma scales it by
        sqrt(H) in its embedding module); [f] is a draft input, so the mean of the draft's raw embedding.
        """
        s = self.cfg.soft_prompt_len
        seed_ids = target.tokenizer("Think ahead: where is this answer going next?").input_ids or [0]
        ids = torch.tensor((seed_ids * s)[:s], dtype=torch.long)
        cache = target.new_cache()
        target.forward(cache, torch.arange(s), torch.ones(s, s, dtype=torch.bool).tril(), input_ids=ids)
        kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in (layer.view() for layer in cache.kv.layers)])
        with torch.no_grad():
            self.soft_prompt.copy_(kv)
            self.con_moe.experts.add_(target.mean_embedding())
            self.future_moe.experts.add_(self.embed.weight.mean(0))

    def soft_prompt_kv(self, batch: int = 1) -> list[tuple[Tensor, Tensor]]:
        """Per target layer (keys, values) shaped (B, kv_heads, s, head_dim) for `TargetCache`."""
        sp = self.soft_prompt
        return [(sp[i, 0].expand(batch, -1, -1, -1), sp[i, 1].expand(batch, -1, -1, -1)) for i in range(len(sp))]

    def contemplate_embedding(self, features: Tensor) -> Tensor:
        """[con] for the target, routed on the 3-layer features of the most recent token the target saw."""
        return self.con_moe(features)

    def future_embedding(self, draft_hidden: Tensor) -> Tensor:
        """[f], the token half of the draft's future token, routed on the draft hidden of the latest token."""
        return self.future_moe(draft_hidden)

    def future_shift(self, f: Tensor) -> Tensor | None:
        """What f adds to a draft row's residual (`DraftConfig.future_residual`); None for the paper's head."""
        return None if self.future_proj is None else self.future_proj(f)

    def future_logits(self, f: Tensor) -> Tensor | None:
        """f read by the draft's output layer, float32 (..., Vd) for f (..., H): what draft depth k adds to its
        logits times `future_gate_at(k)` (`DraftConfig.future_logits`); None for the paper's head."""
        return None if self.future_gate is None else self.lm_head(f).float()

    def future_gate_at(self, depth: int) -> Tensor:
        """The gate of draft depth `depth` (0 = the first drafted token); deeper depths share the last."""
        return self.future_gate[min(depth, len(self.future_gate) - 1)].float()

    def future_mask(self, mask: Tensor, future_cols: slice) -> Tensor:
        """The attention mask (B, 1, n, K) bool, with `DraftConfig.future_bias` added to the logits of the
        future-key columns `future_cols`: a float mask (B, heads, n, K). Unchanged for a head without it."""
        if self.future_bias is None:
            return mask
        b, _, n, k = mask.shape
        scores = torch.zeros(b, len(self.future_bias), n, k, dtype=self.fc.weight.dtype, device=mask.device)
        scores[..., future_cols] = self.future_bias.to(scores.dtype).view(1, -1, 1, 1)
        return scores.masked_fill(~mask, float("-inf"))


def init_weights_like_eagle(head: Eagle3Head) -> None:
    """Small-normal init for the new linear layers (the target's own init scale)."""
    for name, module in head.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(("router", "future_proj")):
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
