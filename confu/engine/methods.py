"""Decoding methods as objects the decoding loop is handed.

A method is a pair:
- a `Proposer` drafts a tree of candidate tokens within a node budget and observes what the target verified;
  it owns the target features it reads (`feature_layers`);
- a `VerifyExtension` adds to the target's pass whatever the method needs there: a cache prefix, extra rows
  after the verify rows, and the future state those rows produce for the proposer.

Plain decoding is no proposer and `PlainVerify`; EAGLE-3 is a `DraftHeadProposer` and `PlainVerify`; ConFu is a
`DraftHeadProposer` (whose head reads `f`) and `ContemplateSlots`. Matches in the text so far are a
`MatchProposer` (`confu.engine.matcher`), alone or joined to a head's proposer by `MergedProposer`. Which head
method takes which extension is `confu.engine.registry`'s business (`method_for_head`). Tests hand the loop
oracle proposers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from confu.engine.contemplate import ContemplatePlan, plan_contemplate_slots
from confu.engine.draft import ConFuHead, Eagle3Head
from confu.engine.draft_kernel import fuse_draft_layer
from confu.engine.drafter import Drafter
from confu.engine.quant import pack_model
from confu.engine.tree import DraftTree, merge_trees

if TYPE_CHECKING:
    from confu.engine.generation_config import GenerationConfig


class Proposer(Protocol):
    name: str  # what proposes, as reports and the server name it: "eagle3", "confu", "match", "eagle3+match"
    feature_layers: tuple[int, ...]  # hidden-state indices of the target features `observe` receives (): none
    # Each level of depth runs a draft model, so tree sizing plans how many levels a round buys.
    drafts_levels: bool
    # Proposes candidates that cost no draft model (looked up), so it is asked in rounds that draft no level too.
    lookup_candidates: bool

    def begin(self, cfg: GenerationConfig, max_len: int) -> None:
        """A new sequence of at most `max_len` tokens."""

    def observe(self, features: Tensor, next_tokens: Tensor, future: Tensor | None) -> None:
        """Rows the target has verified: their features (m, 3H) and the token after each (m,); `future` is the
        verify extension's prediction for the next round, if it makes one."""

    def propose(self, max_nodes: int, depth: int) -> DraftTree | None:
        """A tree of at most `max_nodes` nodes below the last observed token, drafting `depth` levels (0: none;
        looked-up candidates may go deeper), or None: nothing to propose."""


def asks_for_tree(proposer: Proposer, depth: int) -> bool:
    """Whether a round that drafts `depth` levels asks `proposer` for a tree."""
    return depth > 0 or proposer.lookup_candidates


class DraftHeadProposer:
    """An EAGLE-3 or ConFu draft head growing EAGLE-2 dynamic trees (`confu.engine.drafter`).

    On the CPU it drafts with a copy of the head whose linear layers run the quantized kernels (`pack_model(...,
    lossy=True)`: int8 weights and activations on AVX512-VNNI, else Q8_0 weights): a draft level is a handful
    of small-row matmuls, which MKL runs several times slower than one row, and a draft's numerics only change
    which tokens are proposed, never what the target emits. With AVX512-VNNI its decoder layer also runs as two
    kernel calls a level (`confu.engine.draft_kernel`).
    """

    def __init__(self, head: Eagle3Head):
        self.head = head
        if head.fc.weight.device.type == "cpu" and head.fc.weight.dtype == torch.float32:
            fast = copy.deepcopy(head)  # the caller's head stays float32 (it may be trained further)
            if pack_model(fast, lossy=True):
                fuse_draft_layer(fast)
                self.head = fast
        self.name = head.cfg.method
        self.feature_layers = tuple(head.cfg.feature_layers)
        self.drafter: Drafter | None = None
        self.root_out: Tensor | None = None  # the draft's output hidden of the last observed row
        # Observations not yet run through the draft: catching up is deferred to the next proposal, so rounds
        # that draft nothing (tree sizing) cost no draft forward, and several rows catch up in one.
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.future: Tensor | None = None

    drafts_levels = True
    lookup_candidates = False

    def begin(self, cfg: GenerationConfig, max_len: int) -> None:
        self.drafter = Drafter(self.head, cfg.tree, max_len)
        self.root_out = None
        self.pending = []

    def observe(self, features: Tensor, next_tokens: Tensor, future: Tensor | None) -> None:
        self.pending.append((features, next_tokens))
        self.future = future  # only the latest future prediction is ever used

    def propose(self, max_nodes: int, depth: int) -> DraftTree | None:
        if self.pending:
            features, tokens = zip(*self.pending, strict=True)
            self.root_out = self.drafter.catch_up(torch.cat(features), torch.cat(tokens), self.future)
            self.pending = []
        return self.drafter.draft_tree(self.root_out, max_nodes=max_nodes, depth=depth)


class MergedProposer:
    """Two proposers as one: each round the second's tree joins the first's (`tree.merge_trees`: a candidate
    both propose is verified once, credited to the first), and the best-scored `max_nodes` of the union are
    proposed, under the configured node bound too (a fixed tree keeps its size). Tree sizing then weighs every
    node by its score against its verify row, whichever proposer it came from."""

    def __init__(self, first: Proposer, second: Proposer):
        self.first, self.second = first, second
        self.name = f"{first.name}+{second.name}"
        if first.feature_layers and second.feature_layers and first.feature_layers != second.feature_layers:
            raise ValueError("merged proposers must read the same target features")
        self.feature_layers = first.feature_layers or second.feature_layers
        self.drafts_levels = first.drafts_levels or second.drafts_levels
        self.lookup_candidates = first.lookup_candidates or second.lookup_candidates
        self.total_nodes = 0

    def begin(self, cfg: GenerationConfig, max_len: int) -> None:
        self.first.begin(cfg, max_len)
        self.second.begin(cfg, max_len)
        self.total_nodes = cfg.tree.total_nodes

    def observe(self, features: Tensor, next_tokens: Tensor, future: Tensor | None) -> None:
        self.first.observe(features, next_tokens, future)
        self.second.observe(features, next_tokens, future)

    def propose(self, max_nodes: int, depth: int) -> DraftTree | None:
        trees = [p.propose(max_nodes, depth) for p in (self.first, self.second) if asks_for_tree(p, depth)]
        trees = [t for t in trees if t is not None and len(t)]
        if len(trees) < 2:
            return trees[0] if trees else None
        return merge_trees(*trees, max_nodes=min(max_nodes, self.total_nodes))


@dataclass
class ExtraRows:
    """Rows a verify extension appends after the verify rows (they attend in their own call)."""

    embeds: Tensor  # (c, H)
    positions: Tensor  # (c,)
    mask: Tensor  # (c, rows + c) over the verify rows and the extra rows
    plan: Any = None  # what the extension made these rows from, handed back to its `future`


class VerifyExtension(Protocol):
    """What a method adds to the target's verify pass (`PlainVerify`: nothing; `ContemplateSlots`: ConFu's)."""

    # Whether the last prompt token goes through a draftless first round of its own instead of the prompt's pass.
    root_round_in_prefill: bool

    def begin(self, cfg: GenerationConfig) -> None:
        """A new sequence."""

    def soft_prompt(self) -> list[tuple[Tensor, Tensor]] | None:
        """Per target layer (keys, values) at the head of the cache, or None."""

    def extra_rows(self, tree: DraftTree | None, positions: Tensor, mask: Tensor, route: Tensor) -> ExtraRows | None:
        """Rows to append to a verify pass over (positions, mask); `route` is the features of the latest token
        the target has processed."""

    def future(self, last_hidden: Tensor, accepted: list[int], extra: ExtraRows | None) -> Tensor | None:
        """The prediction for the next round from the pass's `extra` rows (`extra_rows`' answer for that pass),
        given the accepted path."""

    def extra_row_count(self, nodes: int) -> int:
        """Rows `extra_rows` adds to a pass over `nodes` tree nodes (what tree sizing must pay for)."""


class PlainVerify:
    """Verification with nothing added: the target's pass over the root and the tree nodes."""

    root_round_in_prefill = False  # the whole prompt goes in one pass

    @classmethod
    def for_head(cls, head: Eagle3Head) -> PlainVerify:
        return cls()

    def begin(self, cfg: GenerationConfig) -> None:
        pass

    def soft_prompt(self) -> list[tuple[Tensor, Tensor]] | None:
        return None

    def extra_rows(self, tree: DraftTree | None, positions: Tensor, mask: Tensor, route: Tensor) -> ExtraRows | None:
        return None

    def future(self, last_hidden: Tensor, accepted: list[int], extra: ExtraRows | None) -> Tensor | None:
        return None

    def extra_row_count(self, nodes: int) -> int:
        return 0


class ContemplateSlots(PlainVerify):
    """ConFu's target side: the soft prompt at the head of the cache, `[con]` rows attached to verify rows,
    and `f`, the `[con]` state of the accepted path's end (`confu.engine.contemplate`)."""

    # The last prompt token is the root of a first, draftless round: its [con] row then sees exactly what
    # every later round's root slot sees, and is routed on the token before it.
    root_round_in_prefill = True

    def __init__(self, head: ConFuHead):
        self.head = head
        self.budget: int | None = None
        self.zero_future = False

    @classmethod
    def for_head(cls, head: ConFuHead) -> ContemplateSlots:
        return cls(head)

    def begin(self, cfg: GenerationConfig) -> None:
        self.budget = cfg.contemplate
        self.zero_future = cfg.zero_future

    def soft_prompt(self) -> list[tuple[Tensor, Tensor]]:
        return self.head.soft_prompt_kv()

    def extra_rows(self, tree: DraftTree | None, positions: Tensor, mask: Tensor, route: Tensor) -> ExtraRows:
        plan = plan_contemplate_slots(tree, self.budget)
        return ExtraRows(*plan.slot_inputs(positions, mask, self.head, route), plan=plan)

    def future(self, last_hidden: Tensor, accepted: list[int], extra: ExtraRows) -> Tensor:
        plan: ContemplatePlan = extra.plan
        f = plan.future_of(last_hidden, accepted)
        return torch.zeros_like(f) if self.zero_future else f

    def extra_row_count(self, nodes: int) -> int:
        return 1 + (nodes if self.budget is None else min(self.budget, nodes))

