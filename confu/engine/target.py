"""The frozen target model: forwards against a KV cache with explicit positions and a 4D mask.

The wrapper never patches the HF model's code. It uses what every HF causal LM accepts: `inputs_embeds`,
`position_ids`, a boolean 4D `attention_mask` over (cache + new tokens), a `DynamicCache`,
`output_hidden_states` (for the EAGLE-3 features and the contemplate state `f`), `logits_to_keep`
(so contemplate slots cost no lm_head work), and it switches the model's attention implementation to a
registered function (below) that keeps ordinary rows and contemplate rows in separate attention calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from confu.chat import end_of_turn_ids
from confu.errors import InputError


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / mid / high feature layers: the inputs of layers 2, L//2 and L-3."""
    return (2, num_layers // 2, num_layers - 3)


SPLIT_ATTENTION = "confu_split_sdpa"


def split_sdpa_attention(module, query, key, value, attention_mask, *, contemplate_split=None, **kwargs):
    """HF's SDPA attention, except that ordinary rows never share a kernel call with contemplate rows.

    `contemplate_split = (prefix, n_ordinary)`: the cache starts with `prefix` soft-prompt entries and the
    new rows are `n_ordinary` ordinary rows followed by contemplate rows. The mask already hides the soft
    prompt and the contemplate keys from ordinary rows, but a masked key still takes part in the kernel's
    blocked reductions, so with one call the mere presence of contemplate rows changed ordinary outputs by
    rounding (up to 4.5e-5 on the embedded target's logits). Ordinary rows therefore attend over exactly
    the keys they may see (committed tokens and ordinary new rows), which is the very call a forward without
    ConFu makes; only contemplate rows attend over the whole cache.
    """
    if contemplate_split is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    prefix, n_ordinary = contemplate_split
    end = key.shape[2] - (query.shape[2] - n_ordinary)  # keys of the soft prompt, committed and ordinary rows
    ordinary, _ = sdpa_attention_forward(
        module, query[:, :, :n_ordinary], key[:, :, prefix:end], value[:, :, prefix:end],
        attention_mask[:, :, :n_ordinary, prefix:end], **kwargs,
    )
    if n_ordinary == query.shape[2]:
        return ordinary, None
    contemplate = _contemplate_attention(
        query[:, :, n_ordinary:], key, value, attention_mask[:, :, n_ordinary:],
        getattr(module, "num_key_value_groups", 1), kwargs.get("scaling"),
    )
    return torch.cat([ordinary, contemplate], dim=1), None


def _contemplate_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, n_rep: int,
                           scaling: float | None) -> Tensor:
    """Contemplate rows over the whole cache, returned as (batch, rows, heads, head_dim).

    The query heads are folded into their KV groups (HF's `pack_gqa`, extended to several rows) so the
    cache is not expanded to all query heads a second time in the layer: only the ordinary call pays that.
    """
    b, h, c, d = query.shape
    packed = query.reshape(b, h // n_rep, n_rep * c, d)  # head kv*n_rep + r, row i -> group kv, row r*c + i
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask.repeat(1, 1, n_rep, 1), scale=scaling)
    return out.reshape(b, h, c, d).transpose(1, 2)


AttentionInterface.register(SPLIT_ATTENTION, split_sdpa_attention)
# HF builds the default (causal, padding) mask from the implementation's name: ours takes SDPA's.
AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)


@dataclass
class TargetOutput:
    """What one forward returns for its new positions."""

    logits: Tensor | None  # (n_logits, V) for the rows asked for, in order
    features: Tensor  # (n, 3H) EAGLE-3 features of every new row
    last_hidden: Tensor  # (n, H) final-norm hidden state: `f` on contemplate rows


class TargetCache:
    """A DynamicCache plus the number of committed entries.

    Layout of every layer: `[soft prompt (s) | committed tokens | entries of the last forward]`.
    `commit` keeps a chosen subset of the last forward's entries and drops the rest, so draft nodes
    that were rejected and every contemplate slot vanish after each verification pass.
    """

    def __init__(self, model: PreTrainedModel, soft_prompt: list[tuple[Tensor, Tensor]] | None = None):
        self.kv = DynamicCache(config=model.config)
        self.prefix = 0
        if soft_prompt is not None:
            for layer_idx, (k, v) in enumerate(soft_prompt):
                self.kv.update(k, v, layer_idx)
            self.prefix = soft_prompt[0][0].shape[-2]
        self.committed = self.prefix

    @property
    def num_tokens(self) -> int:
        """Committed real tokens (soft prompt excluded): the next real token's position."""
        return self.committed - self.prefix

    def commit(self, keep: Tensor | None) -> None:
        """Keep the last forward's entries at local indices `keep` (None keeps all of them)."""
        total = self.kv.get_seq_length()
        new = total - self.committed
        if keep is None or (len(keep) == new and torch.equal(keep, torch.arange(new))):
            self.committed = total
            return
        index = torch.cat([torch.arange(self.committed), self.committed + keep.to(torch.long)])
        for layer in self.kv.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self.committed = len(index)


def mask_with_cache(cache: TargetCache, new_mask: Tensor, contemplate_rows: int) -> Tensor:
    """Extend a mask over the new rows to (soft prompt | committed tokens | new rows).

    Every new row sees all committed real tokens; only the last `contemplate_rows` rows see the soft
    prompt. The split attention already gives ordinary rows no soft-prompt keys at all; the mask still
    states the rule in full, so it is right on its own.
    """
    n = new_mask.shape[0]
    prefix = torch.zeros(n, cache.prefix, dtype=torch.bool)
    if contemplate_rows:
        prefix[n - contemplate_rows:] = True
    committed = torch.ones(n, cache.committed - cache.prefix, dtype=torch.bool)
    return torch.cat([prefix, committed, new_mask], dim=1)


class Target:
    """A frozen HF causal LM seen the way a speculative decoder needs it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        feature_layers: tuple[int, ...] | None = None,
        name: str = "",
    ):
        self.model = model.eval().requires_grad_(False)
        self.model.set_attn_implementation(SPLIT_ATTENTION)
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.num_layers: int = cfg.num_hidden_layers
        self.hidden_size: int = cfg.hidden_size
        self.vocab_size: int = model.get_input_embeddings().weight.shape[0]
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_context: int = cfg.max_position_embeddings
        self.feature_layers = tuple(feature_layers or default_feature_layers(self.num_layers))
        if len(self.feature_layers) != 3 or not all(0 <= i <= self.num_layers for i in self.feature_layers):
            raise InputError(
                f"feature layers {self.feature_layers} must be 3 layer ids in 0..{self.num_layers}"
            )
        # EOS ids: the generation config's, the tokenizer's, and the chat template's turn end.
        self.eos_ids: set[int] = set(end_of_turn_ids(tokenizer, getattr(model, "generation_config", None)))

    @classmethod
    def load(cls, spec: str, feature_layers: tuple[int, ...] | None = None) -> Target:
        from confu.hub import load_target_model

        model, tokenizer = load_target_model(spec)
        return cls(model, tokenizer, feature_layers, name=spec)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def new_cache(self, soft_prompt: list[tuple[Tensor, Tensor]] | None = None) -> TargetCache:
        return TargetCache(self.model, soft_prompt)

    def forward(
        self,
        cache: TargetCache,
        positions: Tensor,
        new_mask: Tensor,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        logits_rows: Tensor | None = None,
        contemplate_rows: int = 0,
    ) -> TargetOutput:
        """Forward `n` new rows after the cache's committed entries.

        positions: (n,) RoPE positions of the new rows.
        new_mask: (n, n) bool, which new rows each new row may see (True = attend).
        logits_rows: which new rows need logits (default: all); contemplate rows need none.
        contemplate_rows: how many of the new rows, at the end, are contemplate tokens (they alone see the
            soft prompt, and attend in their own attention call).
        """
        if cache.kv.get_seq_length() != cache.committed:
            raise RuntimeError("the previous forward was not committed")
        n = len(positions)
        split = (cache.prefix, n - contemplate_rows) if cache.prefix or contemplate_rows else None
        out = self.model(
            input_ids=None if input_ids is None else input_ids[None],
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[None],
            position_ids=positions[None],
            attention_mask=mask_with_cache(cache, new_mask, contemplate_rows)[None, None],
            past_key_values=cache.kv,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=0 if logits_rows is None else logits_rows,
            contemplate_split=split,
        )
        hidden = out.hidden_states
        features = torch.cat([hidden[i][0] for i in self.feature_layers], dim=-1)
        return TargetOutput(logits=out.logits[0], features=features, last_hidden=hidden[-1][0])

