"""The decoding loop in named stages: prefill -> draft -> verify -> accept -> cache update.

One loop serves plain autoregressive decoding (no draft: every round verifies the root alone), EAGLE-3, ConFu
and matches in the text so far, alone or with a head. ConFu adds contemplate slots to the verify pass
(`confu.engine.contemplate`) and feeds the resulting future prediction `f` to the draft for the next round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from confu.engine.draft import Eagle3Head
from confu.engine.generation_config import GenerationConfig
from confu.engine.matcher import MatchConfig
from confu.engine.methods import ExtraRows, PlainVerify, Proposer, VerifyExtension, asks_for_tree
from confu.engine.registry import method_for_head
from confu.engine.sampling import logits_to_probs, sample_token
from confu.engine.sizing import AutoSizer, VerifyCosts, load_verify_costs
from confu.engine.target import RowLogits, Target, TargetCache, TargetOutput, check_feature_layers
from confu.engine.tree import DraftTree
from confu.engine.verify import MappedRows, verify_greedy, verify_sampling
from confu.errors import InputError

# Verification reads a target row per accepted node. Alone, a row of the embedded target's 49,152-token head
# costs about 1.5 ms (its weights streamed once); in one call with the root's, about 0.3 ms more. So the rows of
# the draft's likeliest path go with the root's while the draft gives them at least this chance of being read.
PREFETCH_MIN_PROB = 0.25


@dataclass
class StepRecord:
    """One verification round. tau counts `accepted + 1` (the bonus / corrected token)."""

    accepted: int
    tree_nodes: int
    depth: int  # levels the verified tree reaches: drafted, or looked up at no draft cost (0: no tree)
    contemplate_slots: int
    verify_tokens: int  # rows in the target pass: root + nodes + contemplate slots
    draft_s: float  # drafting the tree, plus the draft's catch-up on the tokens this round accepted
    verify_s: float  # the target pass, acceptance and the cache commit
    # what proposed the tree's nodes (a draft "head", "match"es in the text so far): nodes verified per source,
    # and the source of each accepted node, in path order
    nodes_by_source: dict[str, int] = field(default_factory=dict)
    accepted_sources: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    tokens: list[int]
    steps: list[StepRecord]
    elapsed_s: float
    stop_reason: str

    @property
    def accept_lengths(self) -> list[int]:
        return [s.accepted + 1 for s in self.steps]

    @property
    def tau(self) -> float:
        return sum(self.accept_lengths) / max(1, len(self.steps))

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def by_source(self) -> dict[str, dict[str, int]]:
        """Per source of draft candidates: the nodes verified and accepted over every round."""
        totals: dict[str, dict[str, int]] = {}
        for step in self.steps:
            for source, n in step.nodes_by_source.items():
                totals.setdefault(source, {"nodes": 0, "accepted": 0})["nodes"] += n
            for source in step.accepted_sources:
                totals[source]["accepted"] += 1
        return totals


# The stages of a round, in order, as `RoundHooks.stage_done` names them.
STAGE_DRAFT = "draft"  # the draft's catch-up on the last round's tokens, the tree, tree sizing's node choice
STAGE_VERIFY = "verify"  # the target pass: root, nodes and the extension's rows ([con] slots) in one forward
STAGE_ACCEPT = "accept"  # the logits rows verification reads, the acceptance test or sampling
STAGE_BOOKKEEPING = "bookkeeping"  # cache commit, the next round's future and features, tree sizing's clock
STAGES = (STAGE_DRAFT, STAGE_VERIFY, STAGE_ACCEPT, STAGE_BOOKKEEPING)


class RoundHooks(Protocol):
    """Observes the decoding loop (`Decoder.hooks`); None, the default, costs one attribute test a stage.

    Per sequence: `sequence_start` with the target cache it decodes into (its tensors are what the KV
    footprint is read from); per round: `round_start`, then `stage_done` after each of `STAGES` in order,
    then `round_done`. A benchmark's stage clock is one (`confu.bench.probes.StageClock`).
    """

    def sequence_start(self, cache: TargetCache) -> None: ...

    def round_start(self) -> None: ...

    def stage_done(self, stage: str) -> None: ...

    def round_done(self) -> None: ...


@dataclass
class VerifyRows:
    """The rows of one verify pass: the root and the tree nodes, then the extension's (`extra`)."""

    ids: Tensor  # (1 + nodes,)
    positions: Tensor  # (1 + nodes,)
    mask: Tensor  # (1 + nodes, 1 + nodes) bool: each row sees the root, its ancestors and itself
    extra: ExtraRows | None


@dataclass
class RoundState:
    """What the next round starts from."""

    root: int  # the token the target has not seen yet (already emitted)
    route: Tensor  # features of the latest token the target has processed (ConFu routes [con] on them)


class Decoder:
    """The decoding loop, handed a method: a proposer (None: plain decoding) and a verify extension.

    `Decoder.for_head(target, head, match)` builds the pair a draft head (and matches in the text so far) stand
    for (`confu.engine.methods`).
    """

    def __init__(self, target: Target, proposer: Proposer | None = None, extension: VerifyExtension | None = None):
        self.target = target
        self.proposer = proposer
        self.extension = extension or PlainVerify()
        self.feature_layers = (proposer.feature_layers if proposer is not None else ()) or target.feature_layers
        check_feature_layers(self.feature_layers, target.num_layers)
        self._verify_costs: VerifyCosts | None = None
        self._clock: tuple[float, list[float], int] | None = None  # the last sequence's AutoSizer.clock()
        self.hooks: RoundHooks | None = None

    def sizer(self, cfg: GenerationConfig) -> AutoSizer | None:
        """Per-sequence tree sizing under `auto_tree` (the cost curve is loaded, or measured, once)."""
        if not cfg.auto_tree or self.proposer is None:
            return None
        if self._verify_costs is None:
            self._verify_costs = load_verify_costs(self.target)
        # a proposer that drafts no levels (looked-up candidates only) leaves the sizer no depth to plan
        depth = cfg.tree.depth if self.proposer.drafts_levels else 0
        sizer = AutoSizer(self._verify_costs, depth, self.extension.extra_row_count)
        if self._clock is not None:
            sizer.set_clock(self._clock)
        return sizer

    @classmethod
    def for_head(cls, target: Target, head: Eagle3Head | None, match: MatchConfig | None = None) -> Decoder:
        return cls(target, *method_for_head(head, match))

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InputError("the prompt is empty")
        if len(prompt_ids) + 1 > self.target.max_context:
            raise InputError(
                f"the prompt has {len(prompt_ids)} tokens; the target's context holds {self.target.max_context}"
            )

    def generate(self, prompt_ids: list[int], cfg: GenerationConfig) -> GenerationResult:
        tokens: list[int] = []
        steps: list[StepRecord] = []
        start = time.perf_counter()
        stop_reason = "max_new_tokens"
        for new, step, reason in self.rounds(prompt_ids, cfg):
            tokens.extend(new)
            if step is not None:
                steps.append(step)
            if reason:
                stop_reason = reason
        return GenerationResult(tokens, steps, time.perf_counter() - start, stop_reason)

    def stream(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[list[int]]:
        """Yields the tokens each round adds."""
        for new, _, _ in self.rounds(prompt_ids, cfg):
            if new:
                yield new

    # -- stages ---------------------------------------------------------------------------------------------

    def _pick(self, logits: Tensor, cfg: GenerationConfig, gen) -> int:
        if cfg.sampling.greedy:
            return int(logits.argmax())
        return sample_token(logits_to_probs(logits, cfg.sampling), gen)

    def prefill(self, cache: TargetCache, prompt: Tensor, cfg: GenerationConfig, gen) -> tuple[int, Tensor, Tensor | None]:
        """Prompt forward. Returns (first token, features of every prompt row, the extension's future or None).

        A long prompt (at least `cfg.bulk_prefill` tokens) runs its first n - 1 rows in one pass through
        `Target.bulk_model` (transformers' own dense linear layers, MKL's GEMM, which beats the fp32
        row-independent kernels from about 80 rows, 2.8x at 1,024), then its last row like a short prompt's.
        Every method makes that same bulk call on the same rows, so they all start from the same cache bits.

        An extension that attaches rows to the round's root (ConFu's `[con]`) gets the last token as a
        draftless round, so its rows see what they see in every later round, routed on the token before it.
        """
        t = self.target
        n = len(prompt)
        features = []
        done = 0
        if cfg.bulk_prefill and n >= max(2, cfg.bulk_prefill):
            features.append(self._prompt_rows(cache, prompt, 0, n - 1, bulk=True).features)
            done = n - 1
        if not self.extension.root_round_in_prefill:
            out = self._prompt_rows(cache, prompt, done, n)
            features.append(out.features)
            return self._pick(out.logits[-1], cfg, gen), torch.cat(features), None
        if n - 1 > done:
            features.append(self._prompt_rows(cache, prompt, done, n - 1).features)
        route = features[-1][-1] if features else torch.zeros(3 * t.hidden_size, dtype=t.dtype, device=t.device)
        rows = self.verify_rows(None, RoundState(int(prompt[-1]), route), cache.num_tokens)
        out = self.run_verify(cache, rows)
        cache.commit(torch.zeros(1, dtype=torch.long, device=prompt.device))
        features.append(out.features[:1])
        return (self._pick(out.logits[0], cfg, gen), torch.cat(features),
                self.extension.future(out.last_hidden, [], rows.extra))

    def _prompt_rows(self, cache: TargetCache, prompt: Tensor, start: int, stop: int,
                     bulk: bool = False) -> TargetOutput:
        """Forward prompt[start:stop] causally after the cache's committed rows (`bulk`: as a long prompt's bulk
        rows, `Target.forward`), and commit them."""
        rows = stop - start
        out = self.target.forward(cache, torch.arange(start, stop, device=prompt.device), _causal(rows, prompt),
                                  input_ids=prompt[start:stop], feature_layers=self.feature_layers, bulk=bulk)
        cache.commit(None)
        return out

    def begin_sequence(self, prompt: Tensor, cfg: GenerationConfig, gen) -> tuple[TargetCache, RoundState]:
        """A new sequence: the extension begun and a cache holding its soft prompt, the prompt prefilled, and the
        proposer told what the target saw. The first token is the state's root (under `torch.no_grad()`)."""
        t = self.target
        self.extension.begin(cfg)
        cache = t.new_cache(self.extension.soft_prompt())
        if self.hooks is not None:
            self.hooks.sequence_start(cache)
        first, features, future = self.prefill(cache, prompt, cfg, gen)
        if self.proposer is not None:
            self.proposer.begin(cfg, t.max_context + 1)
            self.proposer.observe(features, torch.cat([prompt[1:], prompt.new_tensor([first])]), future)
        return cache, RoundState(first, features[-1])

    def verify_pass(self, cache: TargetCache, tree: DraftTree | None, state: RoundState,
                    extend: bool = True) -> TargetOutput:
        """One target pass over the root and the tree nodes, plus the extension's rows after them (unless
        `extend` is False: tree sizing drafts nothing this round, so a future for the next one is unlikely
        to be used and not worth its rows)."""
        return self.run_verify(cache, self.verify_rows(tree, state, cache.num_tokens, extend))

    def verify_rows(self, tree: DraftTree | None, state: RoundState, pos0: int,
                    extend: bool = True) -> VerifyRows:
        """The rows of a verify pass after `pos0` committed tokens: the root, the tree nodes, and the
        extension's rows (unless not `extend`)."""
        device = self.target.device
        n_nodes = 0 if tree is None else len(tree)
        ids = torch.tensor([state.root], device=device)
        positions = torch.tensor([pos0], device=device)
        mask = torch.ones(1, 1, dtype=torch.bool, device=device)
        if n_nodes:
            ids = torch.cat([ids, tree.tokens.to(device)])
            positions = torch.cat([positions, pos0 + tree.depths.to(device)])
            mask = torch.zeros(n_nodes + 1, n_nodes + 1, dtype=torch.bool, device=device)
            mask[:, 0] = True  # every node sees the root
            mask[1:, 1:] = tree.ancestor_mask.to(device)  # its ancestors and itself
        extra = self.extension.extra_rows(tree, positions, mask, state.route) if extend else None
        return VerifyRows(ids, positions, mask, extra)

    def run_verify(self, cache: TargetCache, verify: VerifyRows) -> TargetOutput:
        """The target's pass over `verify`'s rows; the extension's rows attend in their own call."""
        t, device = self.target, self.target.device
        ids, positions, mask, extra = verify.ids, verify.positions, verify.mask, verify.extra
        if extra is None:
            return t.forward(cache, positions, mask, input_ids=ids, feature_layers=self.feature_layers)
        rows, c = len(ids), len(extra.positions)
        full = torch.zeros(rows + c, rows + c, dtype=torch.bool, device=device)
        full[:rows, :rows] = mask
        full[rows:] = extra.mask
        return t.forward(cache, torch.cat([positions, extra.positions]), full,
                         inputs_embeds=torch.cat([t.embed(ids), extra.embeds.to(t.dtype)]),
                         contemplate_rows=c, feature_layers=self.feature_layers)

    def rounds(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[tuple[list[int], StepRecord | None, str]]:
        """Decode one prompt round by round: yields (tokens the round adds, its record or None, stop reason)."""
        self._check_prompt(prompt_ids)
        t = self.target
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator(device=t.device).manual_seed(cfg.seed)
        prompt = torch.tensor(prompt_ids, device=t.device)
        proposer, extension = self.proposer, self.extension
        sizer = self.sizer(cfg)
        hooks = self.hooks
        with torch.no_grad():
            cache, state = self.begin_sequence(prompt, cfg, gen)
            emitted = 0
            new, reason = self._clip([state.root], emitted, cfg)
            emitted += len(new)
            yield new, None, reason
            while not reason:
                room = t.max_context - cache.num_tokens
                if room < 1:
                    yield [], None, "context"
                    return
                if hooks is not None:
                    hooks.round_start()
                tic = time.perf_counter()
                depth = 0 if proposer is None or room < 2 else sizer.plan_round() if sizer else cfg.tree.depth
                budget = room - 1 if sizer is None else min(room - 1, sizer.draft_nodes())
                depth = min(depth, budget)  # a node d levels deep brings d - 1 ancestors: no deeper level fits
                asks = proposer is not None and budget > 0 and asks_for_tree(proposer, depth)
                tree = proposer.propose(max_nodes=budget, depth=depth) if asks else None
                if sizer is not None and tree is not None:
                    tree = sizer.choose_nodes(tree, time.perf_counter() - tic, drafted=depth > 0)
                if tree is not None and not len(tree):
                    tree = None
                toc = time.perf_counter()
                if hooks is not None:
                    hooks.stage_done(STAGE_DRAFT)
                extend = sizer is None or depth > 0
                rows = self.verify_rows(tree, state, cache.num_tokens, extend)
                out = self.run_verify(cache, rows)
                if hooks is not None:
                    hooks.stage_done(STAGE_VERIFY)
                accepted, bonus = self.accept(tree, out.logits, cfg, gen)
                if hooks is not None:
                    hooks.stage_done(STAGE_ACCEPT)
                keep = torch.tensor([0] + [i + 1 for i in accepted], device=t.device)
                cache.commit(keep)
                verified = time.perf_counter()
                new_tokens = [int(tree.tokens[i]) for i in accepted] + [bonus]
                if proposer is not None:
                    future = extension.future(out.last_hidden, accepted, rows.extra) if extend else None
                    proposer.observe(out.features[keep], torch.tensor(new_tokens, device=t.device), future)
                state = RoundState(bonus, out.features[keep[-1]])
                draft_s = (toc - tic) + (time.perf_counter() - verified)
                if sizer is not None:
                    if depth == 0:  # no level drafted: the time per token of rounds without a draft model
                        sizer.observe_plain((draft_s + verified - toc) / len(new_tokens))
                    sizer.observe(tree, depth, len(accepted), draft_s, verified - toc, accepted)
                    self._clock = sizer.clock()
                if hooks is not None:
                    hooks.stage_done(STAGE_BOOKKEEPING)
                    hooks.round_done()
                step = StepRecord(
                    accepted=len(accepted),
                    tree_nodes=0 if tree is None else len(tree),
                    depth=0 if tree is None else max(depth, tree.max_depth),
                    contemplate_slots=len(out.last_hidden) - len(out.logits),
                    verify_tokens=len(out.features),
                    # the draft's catch-up on the accepted tokens is draft work, done after verification
                    draft_s=draft_s,
                    verify_s=verified - toc,
                    nodes_by_source={} if tree is None else tree.count_by_source(range(len(tree))),
                    accepted_sources=[] if tree is None else tree.sources_of(accepted),
                )
                new, reason = self._clip(new_tokens, emitted, cfg)
                emitted += len(new)
                yield new, step, reason

    def accept(self, tree: DraftTree | None, logits: RowLogits, cfg: GenerationConfig, gen) -> tuple[list[int], int]:
        """The accepted nodes of `tree` (path order) and the token after them, from the verify pass's `logits`."""
        if tree is None or len(tree) == 0:
            return [], self._pick(logits[0], cfg, gen)
        logits.prefetch([0] + [node + 1 for node in tree.likely_path(PREFETCH_MIN_PROB)])
        if cfg.sampling.greedy:
            return verify_greedy(tree, logits)
        return verify_sampling(tree, MappedRows(logits, lambda row: logits_to_probs(row, cfg.sampling)), gen)

    def _clip(self, new_tokens: list[int], emitted: int, cfg: GenerationConfig) -> tuple[list[int], str]:
        """Cut the round's tokens at the token budget, then at EOS within it; returns (tokens to emit, stop reason
        or ''). The budget first: an EOS a round accepts beyond it is one plain decoding never emits."""
        room = cfg.max_new_tokens - emitted
        kept = new_tokens[:room]
        if cfg.stop_at_eos:
            for i, tok in enumerate(kept):
                if tok in self.target.eos_ids:
                    return kept[: i + 1], "eos"
        return kept, "max_new_tokens" if len(new_tokens) >= room else ""


def _causal(n: int, like: Tensor) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=like.device).tril()

