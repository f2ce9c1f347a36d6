"""The head-method registry: a new method is one entry, and every layer (checkpoints, decoding, training, the
bench and the CLI) takes it from there; verify extensions implement the `VerifyExtension` protocol."""

from __future__ import annotations

from pathlib import Path

import pytest

from confu.bench.specbench import parse_methods
from confu.cli import build_parser
from confu.engine.checkpoint import new_draft, save_draft
from confu.engine.convert import load_draft
from confu.engine.draft import Eagle3Head
from confu.engine.methods import ContemplateSlots, DraftHeadProposer, PlainVerify, VerifyExtension
from confu.engine.registry import HEAD_METHODS, HeadMethod, head_method, method_for_head
from confu.training.train import TrainConfig
from tests.helpers import load_target


class EchoHead(Eagle3Head):
    """An EAGLE-3 body under another method name: what a new method's head class looks like to the rest."""


@pytest.fixture
def echo_method(monkeypatch: pytest.MonkeyPatch) -> HeadMethod:
    method = HeadMethod("echo", f"{__name__}:EchoHead", "confu.engine.methods:PlainVerify",
                        reads_future=False, holds_target_kv=False)
    monkeypatch.setitem(HEAD_METHODS, "echo", method)
    return method


def test_a_new_head_method_is_one_registry_entry(echo_method: HeadMethod, tiny_llama_dir: Path,
                                                 tmp_path: Path) -> None:
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "echo", draft_vocab_size=64)
    assert type(head) is EchoHead
    loaded = load_draft(save_draft(head, tmp_path / "echo"), target)
    assert type(loaded) is EchoHead and loaded.cfg.method == "echo"
    proposer, extension = method_for_head(loaded)
    assert isinstance(proposer, DraftHeadProposer) and proposer.name == "echo" and type(extension) is PlainVerify
    assert TrainConfig(data="d", out="o", method="echo").method == "echo"
    assert parse_methods("echo+match:runs/x=x")[0].kind == "echo+match"
    parser = build_parser()
    assert parser.parse_args(["init-draft", "--target", "t", "--method", "echo", "--out", "o"]).method == "echo"
    assert parser.parse_args(["train", "--data", "d", "--out", "o", "--method", "echo"]).method == "echo"


def test_an_unknown_method_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown draft method 'nope'.*eagle3"):
        head_method("nope")


@pytest.mark.parametrize("extension", [PlainVerify, ContemplateSlots])
def test_verify_extensions_implement_the_protocol(extension: type) -> None:
    members = {name for name in vars(VerifyExtension) if not name.startswith("_")}
    members |= set(VerifyExtension.__annotations__)
    assert members >= {"begin", "soft_prompt", "extra_rows", "future", "extra_row_count", "root_round_in_prefill"}
    assert all(hasattr(extension, name) for name in members)
