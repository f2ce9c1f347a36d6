"""The decoding loop in named stages: prefill -> draft -> verify -> accept -> cache update.

One loop serves plain autoregressive decoding (no draft: every round verifies the root alone), EAGLE-3 and
ConFu. ConFu adds contemplate slots to the verify pass (`confu.engine.contemplate`) and feeds the resulting future
prediction `f` to the draft for the next round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from confu.engine.contemplate import ContemplatePlan, plan_contemplate_slots
from confu.engine.draft import Eagle3Head
from confu.engine.drafter import Drafter
from confu.engine.sampling import SamplingConfig, logits_to_probs, sample_token
from confu.engine.target import Target, TargetCache
from confu.engine.tree import DraftTree, TreeConfig
from confu.engine.verify import MappedRows, Rows, verify_greedy, verify_sampling
from confu.errors import InputError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    contemplate: int | None = None  # ConFu: None = a slot on every node, N = the N likeliest round ends
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.contemplate is not None and self.contemplate < 0:
            raise InputError(f"--contemplate must be 'all' or a count >= 0 (got {self.contemplate})")


@dataclass
class StepRecord:
    """One verification round. tau counts `accepted + 1` (the bonus / corrected token)."""

    accepted: int
    tree_nodes: int
    contemplate_slots: int
    verify_tokens: int  # rows in the target pass: root + nodes + contemplate slots
    draft_s: float  # drafting the tree, plus the draft's catch-up on the tokens this round accepted
    verify_s: float  # the target pass, acceptance and the cache commit


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


@dataclass
class RoundState:
    """What the next round starts from."""

    root: int  # the token the target has not seen yet (already emitted)
    root_out: Tensor | None  # draft hidden of the last verified row (drafts level 1)
    con_features: Tensor | None  # ConFu: features routing the next [con] embedding


class Decoder:
    """Holds a target and an optional draft head; `stream` / `generate` decode one prompt."""

    def __init__(self, target: Target, draft: Eagle3Head | None = None):
        self.target = target
        self.draft = draft

    @property
    def confu(self) -> bool:
        return self.draft is not None and self.draft.is_confu

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
        for new, step, reason in self._run(prompt_ids, cfg):
            tokens.extend(new)
            if step is not None:
                steps.append(step)
            if reason:
                stop_reason = reason
        return GenerationResult(tokens, steps, time.perf_counter() - start, stop_reason)

    def stream(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[list[int]]:
        """Yields the tokens each round adds."""
        for new, _, _ in self._run(prompt_ids, cfg):
            if new:
                yield new

    # -- stages ---------------------------------------------------------------------------------------------

    def _pick(self, logits: Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> int:
        if cfg.sampling.greedy:
            return int(logits.argmax())
        return sample_token(logits_to_probs(logits, cfg.sampling), gen)

    def prefill(self, cache: TargetCache, prompt: Tensor, cfg: GenerationConfig, gen) -> tuple[int, Tensor, Tensor | None]:
        """Prompt forward. Returns (first token, features of every prompt row, f or None).

        ConFu runs the prompt in two parts, prompt[:-1] and then [last token, con], so that the [con]
        router sees the features of the latest token the target already processed, as in every later round.
        """
        t = self.target
        n = len(prompt)
        if not self.confu:
            out = t.forward(cache, torch.arange(n), _causal(n), input_ids=prompt)
            cache.commit(None)
            return self._pick(out.logits[-1], cfg, gen), out.features, None
        features = []
        if n > 1:
            head_out = t.forward(cache, torch.arange(n - 1), _causal(n - 1), input_ids=prompt[:-1])
            cache.commit(None)
            features.append(head_out.features)
            route = head_out.features[-1]
        else:
            route = torch.zeros(3 * t.hidden_size, dtype=t.dtype)
        embeds = torch.cat([t.embed(prompt[-1:]), self.draft.contemplate_embedding(route)[None]])
        mask = torch.ones(2, 2, dtype=torch.bool).tril()
        out = t.forward(cache, torch.tensor([n - 1, n]), mask, inputs_embeds=embeds, contemplate_rows=1)
        cache.commit(torch.tensor([0]))
        features.append(out.features[:1])
        return self._pick(out.logits[0], cfg, gen), torch.cat(features), out.last_hidden[1]

    def verify_pass(self, cache: TargetCache, tree: DraftTree | None, state: RoundState, plan: ContemplatePlan | None):
        """One target pass over root + tree nodes (+ contemplate slots)."""
        t = self.target
        pos0 = cache.num_tokens
        n_nodes = 0 if tree is None else len(tree.tokens)
        ids = torch.tensor([state.root])
        positions = torch.tensor([pos0])
        mask = torch.ones(1, 1, dtype=torch.bool)
        if n_nodes:
            ids = torch.cat([ids, tree.tokens])
            positions = torch.cat([positions, pos0 + tree.depths])
            mask = torch.ones(n_nodes + 1, n_nodes + 1, dtype=torch.bool).tril()
            mask[1:, 1:] = tree.ancestor_mask  # every node sees the root, its ancestors and itself
            mask[0, 1:] = False
        rows = n_nodes + 1
        if plan is None:
            return t.forward(cache, positions, mask, input_ids=ids), rows
        embeds, positions, mask = plan.extend_inputs(t.embed(ids), positions, mask, self.draft, state.con_features)
        out = t.forward(cache, positions, mask, inputs_embeds=embeds, contemplate_rows=plan.num_slots)
        return out, rows

    def _run(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[tuple[list[int], StepRecord | None, str]]:
        self._check_prompt(prompt_ids)
        t = self.target
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator().manual_seed(cfg.seed)
        prompt = torch.tensor(prompt_ids)
        with torch.no_grad():
            cache = t.new_cache(self.draft.soft_prompt_kv() if self.confu else None)
            first, features, f = self.prefill(cache, prompt, cfg, gen)
            drafter = None
            root_out = None
            if self.draft is not None:
                drafter = Drafter(self.draft, cfg.tree, t.max_context + 1)
                root_out = drafter.catch_up(features, torch.cat([prompt[1:], torch.tensor([first])]), f)
            state = RoundState(first, root_out, features[-1])
            emitted = 0
            new, reason = self._clip([first], emitted, cfg)
            emitted += len(new)
            yield new, None, reason
            while not reason:
                room = t.max_context - cache.num_tokens
                if room < 1:
                    yield [], None, "context"
                    return
                tic = time.perf_counter()
                tree = None
                if drafter is not None and room > 1:
                    tree = drafter.draft_tree(state.root_out, max_nodes=room - 1)
                plan = plan_contemplate_slots(tree, cfg.contemplate) if self.confu else None
                toc = time.perf_counter()
                out, rows = self.verify_pass(cache, tree, state, plan)
                accepted, bonus = self._accept(tree, out.logits, cfg, gen)
                keep = torch.tensor([0] + [i + 1 for i in accepted])
                cache.commit(keep)
                verified = time.perf_counter()
                if drafter is not None:
                    new_f = plan.future_of(out.last_hidden, accepted) if plan is not None else None
                    path_tokens = [int(tree.tokens[i]) for i in accepted]
                    next_tokens = torch.tensor(path_tokens + [bonus])
                    state.root_out = drafter.catch_up(out.features[keep], next_tokens, new_f)
                    state.con_features = out.features[keep[-1]]
                    new_tokens = path_tokens + [bonus]
                else:
                    new_tokens = [bonus]
                state.root = bonus
                step = StepRecord(
                    accepted=len(accepted),
                    tree_nodes=0 if tree is None else len(tree.tokens),
                    contemplate_slots=0 if plan is None else plan.num_slots,
                    verify_tokens=len(out.features),
                    # the draft's catch-up on the accepted tokens is draft work, done after verification
                    draft_s=(toc - tic) + (time.perf_counter() - verified),
                    verify_s=verified - toc,
                )
                new, reason = self._clip(new_tokens, emitted, cfg)
                emitted += len(new)
                yield new, step, reason

    def _accept(self, tree: DraftTree | None, logits: Rows, cfg: GenerationConfig, gen) -> tuple[list[int], int]:
        if tree is None or len(tree.tokens) == 0:
            return [], self._pick(logits[0], cfg, gen)
        if cfg.sampling.greedy:
            return verify_greedy(tree, logits)
        return verify_sampling(tree, MappedRows(logits, lambda row: logits_to_probs(row, cfg.sampling)), gen)

    def _clip(self, new_tokens: list[int], emitted: int, cfg: GenerationConfig) -> tuple[list[int], str]:
        """Cut the round's tokens at EOS or the token budget; returns (tokens to emit, stop reason or '')."""
        if cfg.stop_at_eos:
            for i, tok in enumerate(new_tokens):
                if tok in self.target.eos_ids:
                    return new_tokens[: i + 1], "eos"
        room = cfg.max_new_tokens - emitted
        if len(new_tokens) >= room:
            return new_tokens[:room], "max_new_tokens"
        return new_tokens, ""


def _causal(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()
