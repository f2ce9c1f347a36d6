"""Draft candidates that cost no training: continuations of the text so far, found where its last tokens occurred
before (in the prompt, in the generated tokens, and, if asked, in earlier sequences).

Text copies itself: a summary or an answer over a document quotes it, code edits repeat the code, a poem repeats
its lines. `MatchProposer` indexes every `min_match`-token n-gram of the token stream (prompt and output) by the
position after it. Each round it looks up the stream's last `min_match` tokens, extends every earlier occurrence
backwards to its full match length (up to `max_match`), and proposes what followed the occurrences as a tree:
occurrences are taken longest match first, their continuations merged where they agree. A continuation that
runs into the end of the stream goes on with the tokens it predicts itself: text repeating with period p
(the distance from the occurrence to the end) keeps repeating.

Scores are log estimates of acceptance, so tree sizing can weigh a match against a draft head's nodes and
against its verify rows: a node at depth d that a share s of its match-length group's occurrences continue
with scores log(s * h(L)^d), where h(L) is the rate at which a continuation of a match of length L has held
token by token. h is learned online from what the target then emitted (from a prior that trusts long matches
more), per match-length band, and kept across sequences. Candidates are only ever proposed: verification
checks every one, so a match never changes the output, only how many tokens a round yields.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from confu.engine.tree import DraftTree, best_subtree
from confu.errors import InputError

if TYPE_CHECKING:
    from confu.engine.generation_config import GenerationConfig

MATCH_SOURCE = "match"
RATE_DECAY = 0.98  # weight of the past in a band's hit rate: about the last fifty checked tokens count
PRIOR_TRIALS = 4.0  # the prior's weight in a band's hit rate, in checked tokens


@dataclass(frozen=True)
class MatchConfig:
    """How the matcher looks for continuations.

    min_match: the shortest suffix that counts as a match (the n-gram the index is keyed on).
    max_match: match lengths are measured up to this many tokens (longer ones score as this).
    max_occurrences: the most recent occurrences of the suffix examined in each stream per round.
    history_tokens: tokens of earlier sequences kept to match against (0: none; a server's option, since it
        lets one request's text become another's draft candidates, never its output).
    """

    min_match: int = 2
    max_match: int = 32
    max_occurrences: int = 16
    history_tokens: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_match <= self.max_match:
            raise InputError(f"the matcher needs 1 <= min_match <= max_match (got {self.min_match}, {self.max_match})")
        if self.max_occurrences < 1 or self.history_tokens < 0:
            raise InputError("the matcher needs max_occurrences >= 1 and history_tokens >= 0")


class TokenIndex:
    """A growing token stream with the positions right after each of its `key`-token n-grams."""

    def __init__(self, key: int):
        self.key = key
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        for end in range(max(start + 1, self.key), len(self.tokens) + 1):
            self.after.setdefault(tuple(self.tokens[end - self.key: end]), []).append(end)

    def occurrences(self, suffix: list[int], max_match: int, limit: int, live: bool) -> list[tuple[int, int]]:
        """(match length, position after the match) of the latest `limit` earlier occurrences of `suffix`'s last
        `key` tokens, each match extended backwards as far as it agrees with `suffix`. `live`: `suffix` is this
        stream's own end, whose occurrence there is no match."""
        n = len(suffix)
        ends = self.after.get(tuple(suffix[n - self.key:]), [])
        stop = len(ends) - (live and bool(ends) and ends[-1] == len(self.tokens))
        found = []
        for end in reversed(ends[max(0, stop - limit): stop]):
            length = self.key
            while length < max_match and length < end and length < n \
                    and self.tokens[end - 1 - length] == suffix[n - 1 - length]:
                length += 1
            found.append((length, end))
        return found

    def continuation(self, end: int, depth: int, live: bool) -> list[int]:
        """Up to `depth` tokens from position `end` on. In the live stream a continuation that reaches the end
        goes on with its own first tokens (the text so far repeats with period len - end)."""
        out: list[int] = []
        n = len(self.tokens)
        for j in range(depth):
            if end + j < n:
                out.append(self.tokens[end + j])
            elif live:
                out.append(out[end + j - n])
            else:
                break
        return out


def rate_band(length: int) -> int:
    """Match lengths 2-3, 4-7, 8-15, ... share a learned hit rate."""
    return length.bit_length()


class MatchProposer:
    """A proposer (`confu.engine.methods.Proposer`) of continuations matched in the text so far.

    It reads no target features and runs no model: its candidates cost a dictionary lookup, so it proposes in
    rounds that draft no level too (`lookup_candidates`), and tree sizing decides how many of its nodes are
    worth their verify rows.
    """

    name = MATCH_SOURCE
    feature_layers: tuple[int, ...] = ()
    drafts_levels = False
    lookup_candidates = True

    def __init__(self, cfg: MatchConfig | None = None):
        self.cfg = cfg or MatchConfig()
        self.stream = TokenIndex(self.cfg.min_match)
        self.history: deque[TokenIndex] = deque()  # earlier sequences, oldest first
        self.depth = self.total_nodes = 0
        self.enabled = True
        # Per match-length band: decayed counts of continuation tokens checked against the target and held.
        self.hits: dict[int, float] = {}
        self.trials: dict[int, float] = {}
        self.checks: list[tuple[int, list[int]]] = []  # (band, the continuation) of each group last proposed

    def begin(self, cfg: GenerationConfig, max_len: int) -> None:
        self._keep_in_history(self.stream)
        self.stream = TokenIndex(self.cfg.min_match)
        self.depth, self.total_nodes = cfg.tree.depth, cfg.tree.total_nodes
        self.enabled = cfg.match
        self.checks = []

    def _keep_in_history(self, index: TokenIndex) -> None:
        budget = self.cfg.history_tokens
        if not budget or not index.tokens or not self.enabled:
            return
        if len(index.tokens) > budget:  # only the latest tokens fit
            trimmed = TokenIndex(self.cfg.min_match)
            trimmed.extend(index.tokens[-budget:])
            index = trimmed
        self.history.append(index)
        while sum(len(h.tokens) for h in self.history) > budget:
            self.history.popleft()

    def observe(self, features: Tensor, next_tokens: Tensor, future: Tensor | None) -> None:
        """The verified tokens extend the stream (the first call brings the prompt after its first token) and
        check what was last proposed: each continuation, token by token, until it first differs."""
        if not self.enabled:
            return
        new = next_tokens.tolist()
        for band, continuation in self.checks:
            for predicted, actual in zip(continuation, new, strict=False):
                held = predicted == actual
                self.hits[band] = RATE_DECAY * self.hits.get(band, 0.0) + held
                self.trials[band] = RATE_DECAY * self.trials.get(band, 0.0) + 1.0
                if not held:
                    break
        self.checks = []
        self.stream.extend(new)

    def hit_rate(self, length: int) -> float:
        """The learned chance that a match of this length continues one more token, given it held so far. The
        prior (weight PRIOR_TRIALS) expects the band's shortest length L to hold with L / (L + 2)."""
        band = rate_band(length)
        shortest = 1 << (band - 1)
        prior = shortest / (shortest + 2)
        return (self.hits.get(band, 0.0) + PRIOR_TRIALS * prior) / (self.trials.get(band, 0.0) + PRIOR_TRIALS)

    def propose(self, max_nodes: int, depth: int) -> DraftTree | None:
        """A tree of continuations up to the configured depth (looking up costs nothing, so the drafted
        `depth` does not bound it) and `max_nodes` nodes (and the configured bound); None when the text's end
        occurred nowhere before."""
        if not self.enabled or max_nodes < 1 or len(self.stream.tokens) < self.cfg.min_match:
            return None
        groups = self._groups()
        if not groups:
            return None
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        node_at: dict[tuple[int, int], int] = {}
        for length, continuations in groups:
            log_rate = math.log(self.hit_rate(length))
            counts: dict[int, int] = {}  # merged node -> this group's continuations through it
            for cont in continuations:
                parent = -1
                for tok in cont:
                    node = node_at.get((parent, tok))
                    if node is None:
                        node = node_at[parent, tok] = len(tokens)
                        tokens.append(tok)
                        parents.append(parent)
                        scores.append(-math.inf)
                    counts[node] = counts.get(node, 0) + 1
                    parent = node
            depths: dict[int, int] = {}
            for node in sorted(counts):  # parents first
                depths[node] = depths.get(parents[node], 0) + 1
                score = math.log(counts[node] / len(continuations)) + depths[node] * log_rate
                scores[node] = max(scores[node], score)  # the best group's estimate
            best = max(continuations, key=continuations.count)
            self.checks.append((rate_band(length), best))
        return best_subtree(tokens, parents, scores, min(max_nodes, self.total_nodes), [MATCH_SOURCE] * len(tokens))

    def _groups(self) -> list[tuple[int, list[list[int]]]]:
        """Continuations of the stream's end, grouped by match length, longest first: the live stream's
        occurrences, then earlier sequences' (latest first)."""
        suffix = self.stream.tokens
        cfg = self.cfg
        by_length: dict[int, list[list[int]]] = {}
        for index, live in [(self.stream, True), *((h, False) for h in reversed(self.history))]:
            for length, end in index.occurrences(suffix, cfg.max_match, cfg.max_occurrences, live):
                cont = index.continuation(end, self.depth, live)
                if cont:
                    by_length.setdefault(length, []).append(cont)
        return sorted(by_length.items(), reverse=True)
