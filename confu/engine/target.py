"""The frozen target model: forwards against a preallocated KV cache with explicit positions and a 4D mask.

The wrapper never patches the HF model's code. It uses what every HF causal LM accepts: `inputs_embeds`,
`position_ids`, a boolean 4D `attention_mask` over (cache + new tokens) (one per layer type where sliding-window
and full layers mix: `AttentionLayout`), a `Cache` whose layers are ours
(`PositionalLayer`: buffers written by position, gpt-fast style, so a round costs no concatenation and a
commit moves only the accepted entries), `output_hidden_states` (for the EAGLE-3 features and the
contemplate state `f`). It runs the decoder without its lm_head and applies the head lazily, row by row
(`RowLogits`): verification reads only the rows on the accepted path. On a model of its own (a copy of the
given model's modules sharing its weights, `owned_copy`), it switches the attention implementation to a function
it registers (`confu.engine.attention`) that keeps ordinary rows and contemplate rows in separate attention calls,
and, on the CPU, swaps linear layers whose weights are exactly GGUF blocks for the quantized kernels of
`confu.engine.quant` (`numerics="auto"`) in a second copy, `model`, once; `reference_model` keeps transformers'
modules. Architectures it cannot run are refused by
name (`check_supported`, and a load-time probe against transformers' own logits).
"""

from __future__ import annotations

import copy
import ctypes
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from confu.chat import end_of_turn_ids
from confu.engine import TARGET_NUMERICS
from confu.engine.attention import SPLIT_ATTENTION, register_split_attention, row_invariant_attention_built
from confu.engine.fused import FusedRMSNorm, fuse_norms_and_mlps
from confu.engine.quant import kernel_status, pack_model
from confu.errors import InputError, UnsupportedModelError


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / mid / high feature layers: the inputs of layers 2, L//2 and L-3."""
    return (2, num_layers // 2, num_layers - 3)


class PositionalLayer(CacheLayerMixin):
    """One layer's keys and values in a preallocated buffer written by position.

    `update` writes the new entries after the current ones and returns views of the filled part, so a
    forward costs no concatenation. The buffer doubles when full (amortised O(1) per token).
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(b, h, self.capacity, d)
        self.values = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _reserve(self, size: int) -> None:
        if size <= self.capacity:
            return
        self.capacity = max(size, 2 * self.capacity)
        keys = self.keys.new_zeros(*self.keys.shape[:2], self.capacity, self.keys.shape[-1])
        values = self.values.new_zeros(*self.values.shape[:2], self.capacity, self.values.shape[-1])
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep(self, start: int, index: Tensor | None) -> None:
        """Keep the entries at `start + index` (ascending) as `start, start + 1, ...`; drop the rest (None: keep
        nothing from `start` on)."""
        if index is None:
            self.length = start
            return
        if self.is_initialized:
            src = start + index
            self.keys[:, :, start : start + len(index)] = self.keys[:, :, src]
            self.values[:, :, start : start + len(index)] = self.values[:, :, src]
        self.length = start + len(index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of entries to drop")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.length = 0

    def view(self) -> tuple[Tensor, Tensor]:
        """(keys, values) of the filled part."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class TargetCache:
    """The target's KV cache plus the number of committed entries.

    Layout of every layer: `[soft prompt (s) | committed tokens | entries of the last forward]`.
    `commit` keeps a chosen subset of the last forward's entries and drops the rest, so draft nodes
    that were rejected and every contemplate slot vanish after each verification pass.
    """

    def __init__(self, model: PreTrainedModel, soft_prompt: list[tuple[Tensor, Tensor]] | None = None):
        self.kv = Cache(layers=[PositionalLayer() for _ in range(model.config.num_hidden_layers)])
        self.prefix = 0
        if soft_prompt is not None:
            for layer_idx, (k, v) in enumerate(soft_prompt):
                self.kv.update(k.detach(), v.detach(), layer_idx)
            self.prefix = soft_prompt[0][0].shape[-2]
        self.committed = self.prefix

    @property
    def num_tokens(self) -> int:
        """Committed real tokens (soft prompt excluded): the next real token's position."""
        return self.committed - self.prefix

    @property
    def pending(self) -> int:
        """Entries the last forward appended that are not committed yet."""
        return self.kv.get_seq_length() - self.committed

    def commit(self, keep: Tensor | None) -> None:
        """Keep the last forward's entries at local indices `keep` (ascending; None keeps all of them)."""
        if keep is None:
            self.committed += self.pending
            return
        # The leading entries already in their place (the root, and an accepted path along the first nodes)
        # stay where they are; only the rest is copied.
        kept = keep.tolist()
        in_place = next((i for i, j in enumerate(kept) if i != j), len(kept))
        moved = keep[in_place:].to(torch.long) - in_place if in_place < len(kept) else None
        for layer in self.kv.layers:
            layer.keep(self.committed + in_place, moved)
        self.committed += len(kept)

    def rollback(self) -> None:
        """Drop what the last forward appended (a benchmark repeats one pass on the same cache)."""
        self.kv.crop(-self.pending)


def mask_with_cache(cache: TargetCache, new_mask: Tensor, contemplate_rows: int) -> Tensor:
    """Extend a mask over the new rows to (soft prompt | committed tokens | new rows).

    Every new row sees all committed real tokens; only the last `contemplate_rows` rows see the soft
    prompt. The split attention already gives ordinary rows no soft-prompt keys at all; the mask still
    states the rule in full, so it is right on its own.
    """
    n = new_mask.shape[0]
    mask = torch.ones(n, cache.committed + n, dtype=torch.bool, device=new_mask.device)
    mask[: n - contemplate_rows, : cache.prefix] = False
    mask[:, cache.committed :] = new_mask
    return mask


ATTENTION_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class AttentionLayout:
    """The kinds of attention a target's layers run (full, sliding-window) and the masks a forward gives them.

    Sliding-window layers keep their whole cache here (`PositionalLayer` never evicts); their mask hides the
    keys `window` or more positions behind each query, computed from positions (tree rows sit at committed
    length + depth), not from row indices. That is exact, and rollback never needs evicted entries.
    """

    windows: dict[str, int | None]  # layer type -> its sliding window (None: full attention)

    @classmethod
    def of(cls, model: PreTrainedModel) -> AttentionLayout:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        windows: dict[str, int | None] = {}
        for layer_type, kwargs in zip(layer_types, layer_kwargs, strict=True):
            if layer_type not in ATTENTION_TYPES:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: layers of type {layer_type!r} are not supported "
                    "(confu needs the KV cache of full or sliding-window attention layers)")
            window = kwargs.get("sliding_window")
            if windows.setdefault(layer_type, window) != window:
                raise UnsupportedModelError(f"{type(model).__name__}: sliding windows of several sizes")
        return cls(windows)

    def masks(self, mask: Tensor, query_pos: Tensor, key_pos: Tensor, prefix: int = 0) -> Tensor | dict[str, Tensor]:
        """The `attention_mask` a forward hands the model.

        mask (..., q, k) bool: what full-attention layers see. query_pos (..., q), key_pos (..., k): positions.
        The first `prefix` keys (a soft prompt: learned entries with no position) are never outside a window.
        A model with one layer type takes its mask; hybrid models take a dict keyed by layer type.
        """
        per_type = {kind: mask if window is None else mask & _in_window(query_pos, key_pos, window, prefix)
                    for kind, window in self.windows.items()}
        return next(iter(per_type.values())) if len(per_type) == 1 else per_type


def _in_window(query_pos: Tensor, key_pos: Tensor, window: int, prefix: int) -> Tensor:
    """(..., q, k) bool: key within `window` positions of its query (transformers' `q - k < window`)."""
    inside = (query_pos[..., :, None] - key_pos[..., None, :]) < window
    inside[..., :prefix] = True
    return inside


def cache_keyword(module: torch.nn.Module) -> str:
    """The name `module.forward` gives its KV cache argument: transformers renamed `past_key_values` to
    `cache` (the old name still works there, with a deprecation warning on every call)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def check_supported(model: PreTrainedModel) -> AttentionLayout:
    """Refuse, by name, the architectures the wrapper cannot run (before a forward would fail obscurely);
    returns the attention layout of those it can."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: encoder-decoder models are not supported (confu needs a decoder-only LM)")
    layout = AttentionLayout.of(model)
    params = inspect.signature(model.get_decoder().forward).parameters
    if not {"past_key_values", "cache"} & params.keys():  # transformers renames past_key_values to cache
        raise UnsupportedModelError(f"{name}: the model has no KV cache (its forward takes no past_key_values)")
    missing = [p for p in ("position_ids", "attention_mask", "inputs_embeds") if p not in params]
    if missing:
        raise UnsupportedModelError(f"{name}: its forward takes no {', '.join(missing)}")
    return layout


class RowLogits:
    """The logits of a pass's rows, each computed when first read.

    Verification reads the rows on the accepted path and seldom more, and one row of a large vocabulary
    head costs about as much as a whole decoder layer. With the quantized kernels a row's value does not depend
    on which rows share the call (they are row-invariant), so fetching rows alone or together gives the same
    bits; on dense layers (MKL, GPU) it may differ by rounding, as the verify pass's own rows already do.
    """

    def __init__(self, target: Target, hidden: Tensor):
        self.target = target
        self.hidden = hidden
        self._rows: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, row: int) -> Tensor:
        row = int(row)
        if row < 0:
            row += len(self)
        if row not in self._rows:
            self._rows[row] = self.target.logits(self.hidden[row : row + 1])[0]
        return self._rows[row]

    def prefetch(self, rows: list[int]) -> None:
        """Compute these rows now, in one call: a head that streams its weights once for a few rows costs
        little more than for one (the rows' values are the same either way)."""
        todo = sorted({int(r) for r in rows} - self._rows.keys())
        if todo:
            for row, logits in zip(todo, self.target.logits(self.hidden[todo]), strict=True):
                self._rows[row] = logits

    def all(self) -> Tensor:
        return self.target.logits(self.hidden)


@dataclass
class TargetOutput:
    """What one forward returns for its new positions."""

    logits: RowLogits  # (ordinary rows, V), each row computed on first use
    features: Tensor  # (n, 3H) EAGLE-3 features of every new row
    last_hidden: Tensor  # (n, H) final-norm hidden state: `f` on contemplate rows


class Target:
    """A frozen HF causal LM seen the way a speculative decoder needs it.

    numerics: "auto" runs GGUF-exact linear layers through the CPU kernels when the machine has them (the
    model's float32 values, summed in another order), and RMSNorms and gated MLPs through row kernels
    (`confu.engine.fused`); "reference" keeps transformers' own modules; "q8" runs the GGUF-exact layers with
    activations rounded to 8-bit blocks (llama.cpp's numerics, AVX512-VNNI only). `self.numerics` says what is
    in effect.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        feature_layers: tuple[int, ...] | None = None,
        name: str = "",
        numerics: str = "auto",
    ):
        if numerics not in TARGET_NUMERICS:
            raise InputError(f"numerics must be one of {TARGET_NUMERICS} (got {numerics!r})")
        self.layout = check_supported(model)
        self._cache_keyword = cache_keyword(model.get_decoder())
        model = owned_copy(model)
        self.model = model
        probe = _probe_reference(model)  # transformers' own attention, before the switch
        register_split_attention()
        self.model.set_attn_implementation(SPLIT_ATTENTION)
        if model.config._attn_implementation != SPLIT_ATTENTION:
            raise UnsupportedModelError(
                f"{type(model).__name__}: its attention does not go through transformers' AttentionInterface, "
                "so it cannot take the tree's custom 4D mask")
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
        check_feature_layers(self.feature_layers, self.num_layers)
        # EOS ids: the generation config's, the tokenizer's, and the chat template's turn end.
        self.eos_ids: set[int] = set(end_of_turn_ids(tokenizer, getattr(model, "generation_config", None)))
        # Ordinary rows attend through the row-invariant kernel where it runs (not in a bulk prefill, nor through
        # `reference_model`): a node's bits are then the one-token step's, whatever the tree around it.
        self._row_invariant = (numerics != "reference" and self.device.type == "cpu" and self.dtype == torch.float32
                               and row_invariant_attention_built())
        self._check_probe(probe)
        if numerics == "q8" and not (self.device.type == "cpu" and kernel_status().int8):
            raise InputError("numerics 'q8' runs the AVX512-VNNI int8 kernels, which need a CPU target on a CPU that "
                             f"has them (device {self.device}; kernels: {kernel_status().reason})")
        packs = numerics != "reference" and self.device.type == "cpu"
        # `reference_model` keeps transformers' own modules for the HF baseline, training's target passes and the
        # bulk prefill; the decoding path (`model`) is a copy of its modules, sharing its weights, into which the
        # kernels are swapped here, once. Neither is ever switched back and forth.
        self.reference_model = model
        self.model = _copy_modules(model, lambda p: p) if packs else model
        self._swaps = pack_model(self.model, q8_activations=numerics == "q8") if packs else []
        if numerics == "q8" and not self._swaps:
            raise InputError("numerics 'q8' needs GGUF block weights (a .gguf target or the embedded one); "
                             f"no linear layer of {name or type(model).__name__} is one")
        # after the linear layers: a gated MLP is fused where its gate and up projections are packed alike
        self._fused = fuse_norms_and_mlps(self.model) if packs else []
        # A long prompt's bulk prefill (`Decoder.prefill`): transformers' dense layers, where MKL's GEMM beats the
        # kernels that reproduce them, or the kernels themselves where they are the numerics (q8).
        self.bulk_model = self.model if numerics == "q8" else self.reference_model
        self.numerics = self._describe_numerics(numerics)

    @classmethod
    def load(cls, spec: str, feature_layers: tuple[int, ...] | None = None, numerics: str = "auto") -> Target:
        from confu.hub import load_target_model

        model, tokenizer = load_target_model(spec)
        return cls(model, tokenizer, feature_layers, name=spec, numerics=numerics)

    def _describe_numerics(self, numerics: str) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self._swaps:
            kinds = "/".join(sorted({new.packed.kind.removeprefix("a8_").upper() for *_, new in self._swaps}))
            total = len(self._swaps) + sum(1 for m in self.model.modules() if type(m) is torch.nn.Linear)
            if numerics == "q8":
                return (f"{kinds} x Q8 activation kernels on {len(self._swaps)} of {total} linear layers (exact GGUF "
                        "weights, activations rounded per block of 32, integer block sums: llama.cpp's "
                        f"numerics){self._row_kernels_note()}")
            lanes = kernel_status().lanes
            return (f"{kinds} kernels on {len(self._swaps)} of {total} linear layers (exact GGUF weights, fp32 sums "
                    f"over {lanes} lanes){self._row_kernels_note()}")
        if numerics == "reference" or self.device.type != "cpu":
            return f"transformers {dtype}"
        status = kernel_status()
        why = "no weight is a GGUF block format" if status.library is not None else status.reason
        return f"transformers {dtype} linear layers ({why}){self._row_kernels_note()}"

    def _row_kernels_note(self) -> str:
        notes = ["row-invariant attention (attend_rows)"] if self._row_invariant else []
        norms = sum(isinstance(new, FusedRMSNorm) for *_, new in self._fused)
        fused = [f"{count} {kind}" for count, kind in ((norms, "RMSNorms"), (len(self._fused) - norms, "gated MLPs"))
                 if count]
        if fused:
            notes.append(" and ".join(fused) + " in row kernels")
        return "".join(f"; {note}" for note in notes)

    def to(self, device: torch.device | str) -> Target:
        """Both module trees on `device` (they share parameters, each holds its own buffers)."""
        self.reference_model.to(device)
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _check_probe(self, reference: Tensor) -> None:
        """Refuse a model whose logits through this wrapper (cache, tree mask, split attention, lazy head) are
        not transformers' own: an attention or output feature the wrapper does not implement."""
        dev = self.device
        ids = torch.tensor(PROBE_IDS, device=dev)
        with torch.no_grad():
            cache = self.new_cache()
            causal = torch.ones(2, 2, dtype=torch.bool, device=dev).tril()
            prefill = self.forward(cache, torch.arange(2, device=dev), causal, input_ids=ids[:2])
            cache.commit(None)
            tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=dev)
            nodes = self.forward(cache, torch.tensor([2, 3, 3], device=dev), tree, input_ids=ids[2:])
            ours = torch.cat([prefill.logits.all(), nodes.logits.all()]).float()
        want = torch.cat([reference[0], reference[1, 3:]])
        diff = float((ours - want).abs().max())
        tolerance = (1e-3 if self.dtype == torch.float32 else 5e-2) * max(1.0, float(want.abs().max()))
        if not diff <= tolerance:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: confu's forward does not reproduce transformers' own (logits differ "
                f"by {diff:.3g} on a 5-token probe): an attention or output feature of this architecture is not supported")

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings as the decoder receives them (scaled, where the embedding module scales: Gemma)."""
        return self.model.get_input_embeddings()(ids)

    def mean_embedding(self, chunk: int = 8192) -> Tensor:
        """The mean over the vocabulary of `embed`: where a learned input embedding (ConFu's [con]) starts."""
        ids = torch.arange(self.vocab_size, device=self.device)
        with torch.no_grad():
            return sum(self.embed(part).sum(0) for part in ids.split(chunk)) / self.vocab_size

    def logits(self, hidden: Tensor, reference: bool = False) -> Tensor:
        """Next-token logits of final-norm hidden states (n, H) -> (n, V), as the model's own forward gives them
        (with `reference`, through transformers' own output layer)."""
        model = self.reference_model if reference else self.model
        return self.finish_logits(model.get_output_embeddings()(hidden))

    def finish_logits(self, logits: Tensor) -> Tensor:
        """The model's post-processing of its output projection: Cohere's `logit_scale`, Granite's
        `logits_scaling`, Gemma's final soft-capping. Elementwise, so it applies to any subset of the columns."""
        cfg = self.model.config
        scale = getattr(self.model, "logit_scale", None)
        if scale is not None:
            logits = logits * scale
        if getattr(cfg, "logits_scaling", None):
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_cache(self, soft_prompt: list[tuple[Tensor, Tensor]] | None = None) -> TargetCache:
        return TargetCache(self.model, soft_prompt)

    def forward(
        self,
        cache: TargetCache,
        positions: Tensor,
        new_mask: Tensor,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        contemplate_rows: int = 0,
        feature_layers: tuple[int, ...] | None = None,
        bulk: bool = False,
    ) -> TargetOutput:
        """Forward `n` new rows after the cache's committed entries.

        positions: (n,) RoPE positions of the new rows.
        new_mask: (n, n) bool, which new rows each new row may see (True = attend).
        contemplate_rows: how many of the new rows, at the end, are contemplate tokens (they alone see the
            soft prompt, and attend in their own attention call).
        feature_layers: the hidden-state indices concatenated into `features` (default: the target's).
        bulk: a long prompt's bulk rows, through `bulk_model` and SDPA (every method makes the same bulk call, so
            it needs no row invariance).
        """
        if cache.pending:
            raise RuntimeError("the previous forward was not committed")
        n = len(positions)
        committed = torch.arange(cache.committed, device=positions.device) - cache.prefix  # soft prompt: < 0, unused
        out = (self.bulk_model if bulk else self.model).get_decoder()(
            input_ids=None if input_ids is None else input_ids[None],
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[None],
            position_ids=positions[None],
            attention_mask=self.layout.masks(mask_with_cache(cache, new_mask, contemplate_rows)[None, None],
                                             positions, torch.cat([committed, positions]), cache.prefix),
            **{self._cache_keyword: cache.kv},
            use_cache=True,
            output_hidden_states=True,
            contemplate_split=(cache.prefix, n - contemplate_rows),
            row_invariant=self._row_invariant and not bulk,
        )
        hidden = out.hidden_states
        features = torch.cat([hidden[i][0] for i in feature_layers or self.feature_layers], dim=-1)
        last = out.last_hidden_state[0]
        # contemplate rows have no next token: only `f`, their hidden state, is read
        return TargetOutput(logits=RowLogits(self, last[: n - contemplate_rows]), features=features, last_hidden=last)


PROBE_IDS = (1, 2, 3, 4, 5)  # the load-time probe: prefill 1 2, then root 3 with sibling nodes 4 and 5


def owned_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The model a `Target` rewires (attention implementation, kernel modules), frozen and in eval mode: a copy of
    `model`'s modules and configuration whose parameters and buffers share `model`'s memory, so the caller's
    model keeps its own modules, mode, attention and `requires_grad` flags, at no cost in weights."""
    return _copy_modules(model, lambda p: torch.nn.Parameter(p.detach(), requires_grad=False)).eval()


def _copy_modules(model: PreTrainedModel, parameter: Callable[[torch.nn.Parameter], torch.nn.Parameter]
                  ) -> PreTrainedModel:
    """A copy of `model`'s modules and configuration holding `parameter(p)` for each parameter and the very same
    buffers (no parameter or buffer is copied), and the same kernel libraries where `model` already runs some
    (a loaded library cannot be copied)."""
    memo: dict[int, object] = {id(b): b for b in model.buffers()}
    memo |= {id(p): parameter(p) for p in model.parameters()}
    memo |= {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, ctypes.CDLL)}
    return copy.deepcopy(model, memo)


def _probe_reference(model: PreTrainedModel) -> Tensor:
    """Transformers' own logits of the probe: rows of 1 2 3 4, then the last row of 1 2 3 5."""
    ids = torch.tensor([PROBE_IDS[:4], PROBE_IDS[:3] + PROBE_IDS[4:]], device=model.device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def check_feature_layers(layers: tuple[int, ...], num_layers: int) -> None:
    if len(layers) != 3 or not all(0 <= i <= num_layers for i in layers):
        raise InputError(f"feature layers {tuple(layers)} must be 3 layer ids in 0..{num_layers}")
