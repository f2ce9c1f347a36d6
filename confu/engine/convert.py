"""EAGLE-3 draft checkpoints in other engines' layouts: import into confu and export from it.

Three layouts, told apart by their files (`detect_layout`):

* ``confu``: `config.json` is a `DraftConfig` (it has `method`), weights `model.safetensors` in confu's names.
* ``eagle3``: the official EAGLE / SpecForge layout (SGLang reads it, llama.cpp converts it): `config.json` is a
  LlamaConfig with `draft_vocab_size`, architectures `LlamaForCausalLMEagle3`, weights `midlayer.*`.
* ``speculators``: what vLLM loads: `speculators_model_type: eagle3`, the LlamaConfig under
  `transformer_layer_config`, weights `layers.0.*`.

Every layout describes the same layer (checked against the reference code, see DESIGN.md "Checkpoint
layouts"): q / k / v read cat[input_layernorm(embedding), hidden_norm(hidden)], the attention residual is the
un-normed hidden (`norm_before_residual: false`), and `norm` sits before `lm_head`. Variants confu's layer does
not implement (RoPE scaling, biases, fc norms, a normed residual, a draft hidden size other than the target's)
are refused by name instead of being converted into a head that drafts something else.

A conversion goes through one canonical form, `DraftCheckpoint` (a `DraftConfig` and tensors under confu's
names), validated against the target; tensors keep their dtype, so a round trip is bit-exact.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from confu.engine.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    attach_target_embedding,
    check_compatible,
    load_confu_draft,
    read_config,
)
from confu.engine.draft import DraftConfig, Eagle3Head
from confu.engine.registry import build_head, head_method
from confu.errors import CheckpointError, DraftMismatchError, InputError

LAYOUTS = ("confu", "eagle3", "speculators")
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")

# confu's EAGLE-3 tensor names -> the official / SpecForge names. Speculators renames `midlayer.` to `layers.0.`.
CONFU_TO_EAGLE3 = {
    "fc.weight": "fc.weight",
    "layer.embed_norm.weight": "midlayer.input_layernorm.weight",
    "layer.hidden_norm.weight": "midlayer.hidden_norm.weight",
    "layer.q_proj.weight": "midlayer.self_attn.q_proj.weight",
    "layer.k_proj.weight": "midlayer.self_attn.k_proj.weight",
    "layer.v_proj.weight": "midlayer.self_attn.v_proj.weight",
    "layer.o_proj.weight": "midlayer.self_attn.o_proj.weight",
    "layer.post_norm.weight": "midlayer.post_attention_layernorm.weight",
    "layer.gate_proj.weight": "midlayer.mlp.gate_proj.weight",
    "layer.up_proj.weight": "midlayer.mlp.up_proj.weight",
    "layer.down_proj.weight": "midlayer.mlp.down_proj.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "d2t": "d2t",
    "t2d": "t2d",
}
EAGLE3_TO_CONFU = {v: k for k, v in CONFU_TO_EAGLE3.items()}
# The target's token embedding: some exporters (SpecForge) store a copy; confu always takes the target's own.
EMBEDDING_KEY = "embed_tokens.weight"

CONFU_ONLY_NOTE = (
    "a ConFu draft: exported its EAGLE-3 part only (fc, layer, norm, lm_head, vocabulary); the soft prompt and "
    "the [con] / [f] experts are dropped, since no other engine has contemplate tokens. The contemplate path "
    "needs confu's engine; elsewhere the head drafts as EAGLE-3 without its future token"
)


@dataclass(frozen=True)
class TargetInfo:
    """What a conversion needs to know of the target: shapes, identity and default feature layers.

    Attribute names follow `Target`, so `check_compatible` accepts either.
    """

    name: str  # the --target spec, as confu drafts record it
    public_name: str  # what other engines know the target as (`public_name`)
    model_type: str
    architectures: tuple[str, ...]
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    feature_layers: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, name: str, config: Any, vocab_size: int | None = None) -> TargetInfo:
        from confu.engine.target import default_feature_layers

        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        return cls(
            name=name,
            public_name=public_name(name),
            model_type=config.model_type,
            architectures=tuple(getattr(config, "architectures", None) or ()),
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            vocab_size=vocab_size or config.vocab_size,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            max_position_embeddings=config.max_position_embeddings,
            feature_layers=default_feature_layers(config.num_hidden_layers),
        )

    @classmethod
    def load(cls, spec: str) -> TargetInfo:
        """From the target's config alone: converting never loads the target's weights."""
        from transformers import AutoConfig

        from confu.hub import resolve_target

        return cls.from_hf_config(spec, AutoConfig.from_pretrained(resolve_target(spec)))

    @classmethod
    def of(cls, target) -> TargetInfo:
        """Of a loaded `Target` (its embedding decides the vocabulary size, as for confu's own drafts)."""
        return cls.from_hf_config(target.name, target.model.config, vocab_size=target.vocab_size)

    def identity(self) -> dict[str, Any]:
        """`DraftConfig.target`, as `DraftConfig.for_target` writes it."""
        return {"name": self.name, "model_type": self.model_type, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "vocab_size": self.vocab_size}


def public_name(spec: str) -> str:
    """The target's name for other engines (a speculators `verifier`): an embedded target's Hugging Face id,
    else its directory's or GGUF file's name; never a local path, which means nothing on another machine."""
    from confu.hub import EMBEDDED_TARGETS

    if spec in EMBEDDED_TARGETS:
        return EMBEDDED_TARGETS[spec].hub_id
    path = Path(spec).expanduser().resolve()
    return path.stem if path.suffix.lower() == ".gguf" else path.name


@dataclass
class DraftCheckpoint:
    """A draft in canonical form: confu's config and tensor names, validated against a target."""

    cfg: DraftConfig
    tensors: dict[str, Tensor]
    layout: str  # the layout it was read from
    notes: list[str] = field(default_factory=list)


# -- reading ----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a draft directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _weights_path(src: Path) -> Path:
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (src / name).is_file():
            return src / name
    raise CheckpointError(f"{src} has neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME}")


def _weight_names(src: Path) -> list[str]:
    path = _weights_path(src)
    if path.name == WEIGHTS_NAME:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is corrupt or unreadable: {err}") from err
    return list(read_weights(src))


def read_weights(src: Path) -> dict[str, Tensor]:
    """`model.safetensors`, else `pytorch_model.bin` (loaded with weights_only: no code runs)."""
    path = _weights_path(src)
    try:
        if path.name == WEIGHTS_NAME:
            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path} is corrupt or unreadable: {err}") from err
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return tensors


def detect_layout(src: str | Path) -> str:
    """`confu`, `eagle3` or `speculators`, from config.json (and the weight names when the config is ambiguous)."""
    src = Path(src)
    if src.is_file():
        raise CheckpointError(f"{src} is a file; a draft is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME} "
                              f"(or {PICKLE_WEIGHTS_NAME})")
    if not src.is_dir():
        raise CheckpointError(f"draft directory not found: {src}")
    cfg = _read_json(src / CONFIG_NAME)
    if "method" in cfg:
        return "confu"
    if "speculators_model_type" in cfg:
        if cfg["speculators_model_type"] != "eagle3":
            raise CheckpointError(f"{src}: a speculators {cfg['speculators_model_type']!r} model; "
                                  "only eagle3 speculators convert")
        return "speculators"
    if any(a in EAGLE3_ARCHITECTURES for a in cfg.get("architectures") or []):
        return "eagle3"
    if "draft_vocab_size" in cfg and any(k.startswith("midlayer.") for k in _weight_names(src)):
        return "eagle3"
    raise CheckpointError(f"{src} is not a confu, official / SpecForge EAGLE-3 or speculators EAGLE-3 draft")


def foreign_layout(src: str | Path) -> str | None:
    """`eagle3` or `speculators` when `src` is one; None otherwise (a confu draft, or nothing recognisable)."""
    try:
        layout = detect_layout(src)
    except CheckpointError:
        return None
    return None if layout == "confu" else layout


def _int_field(c: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    value = c.get(key, default)
    if value is None:
        raise CheckpointError(f"{source}: config lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _rope_theta(c: dict[str, Any], source: str) -> float:
    params = c.get("rope_parameters") or {}  # transformers 5 spelling
    scaling = c.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type")
    if rope_type not in (None, "default"):
        raise CheckpointError(f"{source}: RoPE scaling {rope_type!r} is not supported by confu's draft layer")
    return float(c.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _refuse_variants(c: dict[str, Any], norm_output_means_feedback: bool, source: str) -> None:
    """EAGLE-3 variants whose layer differs from confu's: refused by name, never converted silently.

    `norm_output` means two things: SpecForge applies `norm` before `lm_head` only when it is true (default
    true); speculators feeds the normed hidden back across steps when it is true (default false).
    """
    problems = []
    if c.get("num_hidden_layers", 1) != 1:
        problems.append(f"num_hidden_layers {c['num_hidden_layers']} (confu's head has one layer)")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias", "fc_norm", "norm_before_fc", "norm_before_residual"):
        if c.get(flag):
            problems.append(f"{flag}: true")
    norm_output = c.get("norm_output")
    if norm_output_means_feedback and norm_output:
        problems.append("norm_output: true (normed hidden fed back)")
    if not norm_output_means_feedback and norm_output is False:
        problems.append("norm_output: false (no norm before lm_head)")
    if (c.get("eagle_config") or {}).get("use_aux_hidden_state") is False:
        problems.append("use_aux_hidden_state: false")
    target_hidden = c.get("target_hidden_size")
    if target_hidden is not None and target_hidden != c.get("hidden_size"):
        problems.append(f"target_hidden_size {target_hidden} != hidden_size {c.get('hidden_size')}")
    if problems:
        raise CheckpointError(f"{source}: an EAGLE-3 variant confu's draft layer does not implement: "
                              + "; ".join(problems))


def _draft_config(c: dict[str, Any], layers: list[int] | None, target: TargetInfo, source: str) -> DraftConfig:
    """A confu `DraftConfig` from an EAGLE-3 LlamaConfig dict."""
    hidden = _int_field(c, "hidden_size", source)
    heads = _int_field(c, "num_attention_heads", source)
    vocab = _int_field(c, "vocab_size", source)
    return DraftConfig(
        method="eagle3",  # every foreign layout holds an EAGLE-3 head
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=_int_field(c, "num_key_value_heads", source, heads),
        head_dim=_int_field(c, "head_dim", source, hidden // heads),
        intermediate_size=_int_field(c, "intermediate_size", source),
        vocab_size=vocab,
        draft_vocab_size=_int_field(c, "draft_vocab_size", source, vocab),
        feature_layers=list(layers) if layers else list(target.feature_layers),
        target=target.identity(),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(c, source),
        target_num_kv_heads=target.num_kv_heads,
        target_head_dim=target.head_dim,
    )


def _layer_ids(value: Any, offset: int, source: str) -> list[int] | None:
    """Feature layers (inputs of target layers) from a config's layer ids; `offset` 1 for output-of ids."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(i, int) and i >= 0 for i in value):
        raise CheckpointError(f"{source}: eagle_aux_hidden_state_layer_ids must be three layer ids, got {value!r}")
    return [i + offset for i in value]


def _parse_foreign(layout: str, c: dict[str, Any], target: TargetInfo, source: str) -> DraftConfig:
    if layout == "eagle3":
        _refuse_variants(c, norm_output_means_feedback=False, source=source)
        # SpecForge / SGLang count aux layers as outputs of layer i, i.e. the input of layer i + 1.
        ids = (c.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        return _draft_config(c, _layer_ids(ids, 1, source), target, source)
    layer_cfg = c.get("transformer_layer_config") or c.get("transformer_config")
    if not isinstance(layer_cfg, dict):
        raise CheckpointError(f"{source}: speculators config lacks transformer_layer_config")
    if "norm_before_residual" not in c:
        raise CheckpointError(f"{source}: speculators config lacks norm_before_residual, which vLLM then takes as "
                              "true (a normed residual, which confu's draft layer does not implement); a draft with "
                              "the un-normed residual says norm_before_residual: false")
    verifier = (c.get("speculators_config") or {}).get("verifier") or {}
    drafts_for = verifier.get("architectures")
    if drafts_for and target.architectures and not set(drafts_for) & set(target.architectures):
        raise DraftMismatchError(f"{source} drafts for a {'/'.join(drafts_for)} verifier "
                                 f"({verifier.get('name_or_path')}), not target {target.name!r} "
                                 f"({'/'.join(target.architectures)})")
    flags = {"norm_before_residual": c["norm_before_residual"]}
    for key in ("norm_before_fc", "fc_norm", "norm_output", "target_hidden_size"):
        if key in c:
            flags[key] = c[key]
    _refuse_variants({**layer_cfg, **flags}, norm_output_means_feedback=True, source=source)
    draft_vocab = c.get("draft_vocab_size", layer_cfg.get("vocab_size"))
    # vLLM uses these ids as inputs of layer i (its default is (2, L//2, L-3), as confu's).
    ids = _layer_ids(c.get("eagle_aux_hidden_state_layer_ids"), 0, source)
    return _draft_config({**layer_cfg, "draft_vocab_size": draft_vocab}, ids, target, source)


def _rename_foreign(layout: str, tensors: dict[str, Tensor], cfg: DraftConfig, source: str,
                    notes: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        name = key
        if layout == "speculators" and key.startswith("layers.0."):
            name = "midlayer." + key.removeprefix("layers.0.")
        if name == EMBEDDING_KEY:
            notes.append(f"{source}: dropped {EMBEDDING_KEY} (confu always uses the target's own embedding)")
        elif name in EAGLE3_TO_CONFU:
            out[EAGLE3_TO_CONFU[name]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: tensors confu's EAGLE-3 head has no place for: {sorted(unknown)[:6]}")
    # Official heads drafting over the full vocabulary may store no mapping at all.
    if "d2t" not in out and "t2d" not in out and cfg.draft_vocab_size == cfg.vocab_size:
        out["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
        out["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    return out


def _validate(ckpt: DraftCheckpoint, target: TargetInfo, source: str) -> None:
    """Config against the target, tensors against the config (shapes from a head built on the meta device)."""
    cfg = ckpt.cfg
    layers = list(cfg.feature_layers)
    if not all(0 <= i <= target.num_layers for i in layers):
        raise DraftMismatchError(f"{source}: feature layers {layers} do not exist in target "
                                 f"{target.name!r} ({target.num_layers} layers)")
    if layers != sorted(set(layers)):  # low, mid, high: a draft trained on a target reads three distinct layers
        why = (f"EAGLE-3's default (2, L//2, L-3) for its {target.num_layers} layers" if tuple(layers) ==
               target.feature_layers else "the draft's config")
        raise DraftMismatchError(f"{source}: feature layers {layers} (from {why}) are not three distinct layers "
                                 f"from low to high; is {target.name!r} the target this draft was trained for?")
    if cfg.hidden_size != target.hidden_size or cfg.vocab_size != target.vocab_size:
        raise DraftMismatchError(
            f"{source} does not fit target {target.name!r}: hidden size draft {cfg.hidden_size}, target "
            f"{target.hidden_size}; vocabulary size draft {cfg.vocab_size}, target {target.vocab_size}")
    # The confu-only fields (ConFu KV shape, recorded target identity) are checked as confu checks them.
    check_compatible(cfg, replace(target, feature_layers=tuple(cfg.feature_layers)))
    with torch.device("meta"):
        expected = build_head(cfg).trainable_state_dict()
    missing = sorted(set(expected) - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    wrong = sorted(k for k in expected if k in ckpt.tensors and ckpt.tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    d2t = ckpt.tensors["d2t"]
    if d2t.is_floating_point() or ckpt.tensors["t2d"].is_floating_point():
        raise CheckpointError(f"{source}: d2t and t2d must be integer / bool tensors")
    ids = torch.arange(len(d2t)) + d2t.long()
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise CheckpointError(f"{source}: d2t maps draft ids outside the target vocabulary")


def read_checkpoint(src: str | Path, target: TargetInfo) -> DraftCheckpoint:
    """Any of the three layouts, in canonical form, validated against `target`."""
    src = Path(src)
    layout = detect_layout(src)
    source = str(src)
    notes: list[str] = []
    if layout == "confu":
        cfg = read_config(src)
        tensors = read_weights(src)
    else:
        cfg = _parse_foreign(layout, _read_json(src / CONFIG_NAME), target, source)
        tensors = _rename_foreign(layout, read_weights(src), cfg, source, notes)
    ckpt = DraftCheckpoint(cfg, tensors, layout, notes)
    _validate(ckpt, target, source)
    return ckpt


def import_draft(src: str | Path, target) -> Eagle3Head:
    """An official / SpecForge / speculators EAGLE-3 directory as a ready head next to a loaded `Target`."""
    ckpt = read_checkpoint(src, TargetInfo.of(target))
    target.feature_layers = tuple(ckpt.cfg.feature_layers)  # the draft decides which features it reads
    head = build_head(ckpt.cfg)
    own = head.state_dict()
    head.load_state_dict({k: v.to(own[k].dtype) for k, v in ckpt.tensors.items()}, strict=False)
    attach_target_embedding(head, target)
    return head.eval()


def load_draft(draft_dir: str | Path, target) -> Eagle3Head:
    """A draft directory of any layout next to its target: confu's own, or an official / SpecForge or speculators
    EAGLE-3 directory imported in memory."""
    return import_draft(draft_dir, target) if foreign_layout(draft_dir) else load_confu_draft(draft_dir, target)


# -- writing ----------------------------------------------------------------------------------------------------


def _float_dtype_name(tensors: dict[str, Tensor]) -> str:
    return str(tensors["lm_head.weight"].dtype).removeprefix("torch.")


def llama_config(cfg: DraftConfig, target: TargetInfo, dtype: str) -> dict[str, Any]:
    """The draft layer as a LlamaConfig dict (`num_hidden_layers: 1`, the target's vocabulary)."""
    return {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": target.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": 1,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


@dataclass(frozen=True)
class ExportOptions:
    """What the other engines' configs record beyond the head itself."""

    verifier: str | None = None  # speculators `verifier.name_or_path` (default: the target's `public_name`)
    speculative_tokens: int = 3  # speculators `proposal_methods[0].speculative_tokens` (vLLM's default k)

    def __post_init__(self) -> None:
        if self.speculative_tokens < 1:
            raise InputError(f"--speculative-tokens must be at least 1 (got {self.speculative_tokens})")


def eagle3_config(cfg: DraftConfig, target: TargetInfo, dtype: str) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        **llama_config(cfg, target, dtype),
        "draft_vocab_size": cfg.draft_vocab_size,
        "norm_before_residual": False,
    }
    if tuple(cfg.feature_layers) != target.feature_layers:
        # SpecForge / SGLang ids count outputs of layer i (= the input of layer i + 1). Written only when the
        # layers are not the default, which every engine derives the same way from the target.
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in cfg.feature_layers],
                                  "use_aux_hidden_state": True}
    return config


def speculators_config(cfg: DraftConfig, target: TargetInfo, dtype: str, options: ExportOptions) -> dict[str, Any]:
    config: dict[str, Any] = {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "draft_vocab_size": cfg.draft_vocab_size,
        # vLLM assumes true when this is missing; confu's residual is the un-normed hidden.
        "norm_before_residual": False,
        "transformer_layer_config": llama_config(cfg, target, dtype),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": options.speculative_tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": options.verifier or target.public_name,
                         "architectures": list(target.architectures)},
        },
        "torch_dtype": dtype,
    }
    if tuple(cfg.feature_layers) != target.feature_layers:
        config["eagle_aux_hidden_state_layer_ids"] = list(cfg.feature_layers)  # vLLM: inputs of layer i
    return config


def _write(out: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)  # never leave a half-written checkpoint behind
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def write_checkpoint(ckpt: DraftCheckpoint, to: str, out: str | Path, target: TargetInfo,
                     options: ExportOptions | None = None) -> list[str]:
    """Write `ckpt` in layout `to`; returns notes for the user (what was left out)."""
    if to not in LAYOUTS:
        raise InputError(f"unknown layout {to!r}; expected one of {LAYOUTS}")
    options = options or ExportOptions()
    out = Path(out)
    if to == "confu":
        _write(out, ckpt.cfg.to_dict(), ckpt.tensors)
        return []
    dtype = _float_dtype_name(ckpt.tensors)
    prefix = "layers.0." if to == "speculators" else "midlayer."
    tensors = {CONFU_TO_EAGLE3[k].replace("midlayer.", prefix): v for k, v in ckpt.tensors.items()
               if k in CONFU_TO_EAGLE3}
    config = (eagle3_config(ckpt.cfg, target, dtype) if to == "eagle3"
              else speculators_config(ckpt.cfg, target, dtype, options))
    _write(out, config, tensors)
    return [CONFU_ONLY_NOTE] if head_method(ckpt.cfg.method).reads_future else []


@dataclass(frozen=True)
class ConversionReport:
    source_layout: str
    layout: str
    out: Path
    notes: list[str]


def convert(src: str | Path, target: TargetInfo, to: str, out: str | Path,
            options: ExportOptions | None = None, force: bool = False) -> ConversionReport:
    """Read `src` in whatever layout it has, check it against `target`, write it to `out` in layout `to`. An
    `out` that holds anything is refused unless `force` (its config and weights are then replaced)."""
    out = Path(out)
    if out.resolve() == Path(src).resolve():
        raise InputError("--out must differ from the source directory")
    if out.is_file():
        raise InputError(f"--out {out} is a file; a draft is written as a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out} is not empty; name a new or empty directory, or pass --force to write "
                         "into it")
    ckpt = read_checkpoint(src, target)
    notes = ckpt.notes + write_checkpoint(ckpt, to, out, target, options)
    return ConversionReport(ckpt.layout, to, out, notes)
