"""The draft-head methods, in one place: each method's name (a `DraftConfig.method`, a `--method` choice, a bench
method kind), its head class, its verify extension, and what its checkpoints and training need of the target.
A new head method is one more `HeadMethod` here.

Import-light (no torch): the CLI reads the names to build its parsers, and `confu --help` must stay fast. The
classes are therefore named as `module:Class` and imported on first use; none of their modules imports this one
back at import time for anything but the names.

Matches in the text so far (`confu.engine.matcher`) are not a head method: they need no checkpoint and join any
method's proposer (`method_for_head(head, match)`), so bench kinds such as `eagle3+match` are a head method's name
plus `MATCH`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confu.engine.draft import DraftConfig, Eagle3Head
    from confu.engine.matcher import MatchConfig
    from confu.engine.methods import Proposer, VerifyExtension

MATCH = "match"  # the proposer of matches in the text so far; joins a head method's name as `NAME+match`


@dataclass(frozen=True)
class HeadMethod:
    name: str
    head_class: str  # `module:Class` of its `Eagle3Head` subclass
    verify_extension: str  # `module:Class` of its `VerifyExtension`, built from the head (`for_head`)
    # The head reads `f`, the target's future prediction from contemplate rows: training runs the contemplate
    # pass, decoding hands the drafter `f`, and --zero-future / --oracle-future / --stage future apply.
    reads_future: bool
    # Its checkpoint holds entries of the target's KV cache (a soft prompt), so the target's KV shape must match.
    holds_target_kv: bool
    # The method whose trained head this one's can start from (`--init`): every weight they share is copied and
    # the head's own parts (`NEW_PARTS`) start fresh.
    extends: str | None = None

    def build_head(self, cfg: DraftConfig) -> Eagle3Head:
        return _resolve(self.head_class)(cfg)

    def verify_for(self, head: Eagle3Head) -> VerifyExtension:
        return _resolve(self.verify_extension).for_head(head)


HEAD_METHODS = {m.name: m for m in (
    HeadMethod("eagle3", "confu.engine.draft:Eagle3Head", "confu.engine.methods:PlainVerify",
               reads_future=False, holds_target_kv=False),
    HeadMethod("confu", "confu.engine.draft:ConFuHead", "confu.engine.methods:ContemplateSlots",
               reads_future=True, holds_target_kv=True, extends="eagle3"),
)}


def head_method(name: str) -> HeadMethod:
    """The method called `name`; a ValueError naming the known ones otherwise."""
    try:
        return HEAD_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown draft method {name!r}; expected one of {tuple(HEAD_METHODS)}") from None


def method_of(head: Eagle3Head) -> HeadMethod:
    return HEAD_METHODS[head.cfg.method]


def build_head(cfg: DraftConfig) -> Eagle3Head:
    """An untrained head of `cfg.method`'s class."""
    return head_method(cfg.method).build_head(cfg)


def method_for_head(head: Eagle3Head | None, match: MatchConfig | None = None) -> tuple[Proposer | None,
                                                                                        VerifyExtension]:
    """The (proposer, verify extension) pair a draft head stands for, with matches in the text so far joined to
    its trees when `match` is given; no head and no `match` is plain decoding."""
    from confu.engine.matcher import MatchProposer
    from confu.engine.methods import DraftHeadProposer, MergedProposer, PlainVerify

    matcher = None if match is None else MatchProposer(match)
    if head is None:
        return matcher, PlainVerify()
    proposer = DraftHeadProposer(head)
    if matcher is not None:
        proposer = MergedProposer(proposer, matcher)
    return proposer, method_of(head).verify_for(head)


def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
