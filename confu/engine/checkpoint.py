"""Draft checkpoints: a directory with `config.json` and `model.safetensors`.

The target's token embedding is never stored: it is copied from the target at load time, which is also why
a draft can only be loaded next to the target it was built for. Every mismatch is reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from confu.engine.draft import DraftConfig, Eagle3Head, init_weights_like_eagle
from confu.engine.registry import build_head, head_method
from confu.errors import CheckpointError, DraftMismatchError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_draft(head: Eagle3Head, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write config + weights; float tensors are cast to `dtype` (fp16 for shipped drafts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in head.trainable_state_dict().items()
    }
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)  # never leave a half-written checkpoint behind
    (out / CONFIG_NAME).write_text(json.dumps(head.cfg.to_dict(), indent=2) + "\n")
    return out


def read_config(draft_dir: str | Path) -> DraftConfig:
    path = Path(draft_dir)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"draft directory not found: {path}")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: not a confu draft directory")
    try:
        cfg = DraftConfig(**json.loads(cfg_path.read_text()))
        head_method(cfg.method)
        return cfg
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path} is not a valid draft config: {err}") from err


def check_compatible(cfg: DraftConfig, target) -> None:
    """Refuse a draft built for another target, naming each field that differs."""
    want = {
        "hidden size": (cfg.target.get("hidden_size"), target.hidden_size),
        "number of layers": (cfg.target.get("num_hidden_layers"), target.num_layers),
        "vocabulary size": (cfg.target.get("vocab_size"), target.vocab_size),
    }
    problems = [f"{name}: draft {a}, target {b}" for name, (a, b) in want.items() if a != b]
    if not (len(cfg.feature_layers) == 3 and all(0 <= i <= target.num_layers for i in cfg.feature_layers)):
        problems.append(f"feature layers: draft reads {list(cfg.feature_layers)}, target has {target.num_layers} layers")
    if head_method(cfg.method).holds_target_kv:
        if (cfg.target_num_kv_heads, cfg.target_head_dim) != (target.num_kv_heads, target.head_dim):
            problems.append(
                f"KV shape: draft {cfg.target_num_kv_heads}x{cfg.target_head_dim}, "
                f"target {target.num_kv_heads}x{target.head_dim}"
            )
    if problems:
        raise DraftMismatchError(
            f"draft was built for target {cfg.target.get('name')!r}, not {target.name!r}: " + "; ".join(problems)
        )


def load_confu_draft(draft_dir: str | Path, target) -> Eagle3Head:
    """Load a draft of confu's layout next to its target (the draft decides which target features it reads:
    `cfg.feature_layers`). Any layout: `confu.engine.convert.load_draft`."""
    cfg = read_config(draft_dir)
    check_compatible(cfg, target)
    weights_path = Path(draft_dir) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or unreadable: {err}") from err
    head = build_head(cfg)
    expected = head.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in expected if k in tensors and tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights_path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    state = {k: v.to(expected[k].dtype) for k, v in tensors.items()}
    head.load_state_dict(state, strict=False)
    attach_target_embedding(head, target)
    return head.eval()


def attach_target_embedding(head: Eagle3Head, target) -> None:
    with torch.no_grad():
        head.embed.weight.copy_(target.model.get_input_embeddings().weight)


def new_draft(target, method: str, d2t: torch.Tensor | None = None, t2d: torch.Tensor | None = None,
              draft_vocab_size: int | None = None, seed: int = 0, **overrides) -> Eagle3Head:
    """An untrained head for `target`; without a vocabulary it drafts over the first `draft_vocab_size` ids."""
    torch.manual_seed(seed)
    size = len(d2t) if d2t is not None else (draft_vocab_size or target.vocab_size)
    cfg = DraftConfig.for_target(target, method, size, **overrides)
    head = build_head(cfg)
    init_weights_like_eagle(head)
    if d2t is None:
        t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        d2t = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
    head.set_vocab(d2t, t2d)
    attach_target_embedding(head, target)
    head.init_from_target(target)
    return head.eval()
