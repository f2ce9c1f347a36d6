"""Bad input gets a clear error: wrong draft for the target, corrupt checkpoints, bad prompts and budgets."""

from __future__ import annotations

import pytest

from confu.chat import encode_prompt
from confu.cli import main
from confu.engine.checkpoint import WEIGHTS_NAME, new_draft, save_draft
from confu.engine.convert import load_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.errors import CheckpointError, DraftMismatchError, InputError
from tests.helpers import load_target


def test_draft_for_another_target_names_the_mismatch(tiny_llama_dir, embedded_dir, tmp_path):
    tiny = load_target(tiny_llama_dir)
    save_draft(new_draft(tiny, "eagle3", draft_vocab_size=64), tmp_path / "d")
    with pytest.raises(DraftMismatchError, match="hidden size"):
        load_draft(tmp_path / "d", load_target(embedded_dir))


def test_corrupt_draft_weights(tiny_llama_dir, tmp_path):
    target = load_target(tiny_llama_dir)
    save_draft(new_draft(target, "confu", draft_vocab_size=64), tmp_path / "d")
    path = tmp_path / "d" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_draft(tmp_path / "d", target)
    with pytest.raises(CheckpointError, match="not found"):
        load_draft(tmp_path / "missing", target)


def test_prompt_errors(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    with pytest.raises(InputError, match="empty"):
        encode_prompt(target.tokenizer, "   ", raw=False)
    with pytest.raises(InputError, match="context"):
        Decoder(target).generate([5] * (target.max_context + 3), GenerationConfig(max_new_tokens=4))
    with pytest.raises(InputError, match="max-new-tokens"):
        GenerationConfig(max_new_tokens=0)


def test_cli_prints_error_not_traceback(capsys):
    assert main(["generate", "--target", "/no/such/model", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
