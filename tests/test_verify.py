"""Tree verification: hand-made greedy cases and a statistical check that rejection sampling is lossless.

The statistical tests decode from a synthetic target, a fixed Markov chain over V tokens
(row ``P[a]`` = p(next | previous token a)), with random draft trees whose shapes and tokens (duplicates
included) come from a separate generator, i.e. are independent of the verifier's randomness as a real
draft is. The joint law of the first ``K`` emitted tokens is compared with the exact chain law by a
chi-square goodness-of-fit test; a deliberately biased verifier shows the test has power.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from confu.engine.sampling import SamplingConfig, logits_to_probs
from confu.engine.tree import DraftTree
from confu.engine.verify import verify_greedy, verify_sampling
from confu.errors import InputError
from tests.helpers import biased_verify, chi_square_p_value

V = 6  # synthetic vocabulary
K = 3  # emitted tokens whose joint law is tested
TRIALS = 5_000
ALPHA = 1e-3
START = 0  # last accepted token before decoding starts

Verifier = Callable[[DraftTree, torch.Tensor, torch.Generator], tuple[list[int], int]]


# --- greedy -------------------------------------------------------------------------------------------


def _hand_tree() -> DraftTree:
    #   root -> 0 (tok 1) -> 2 (tok 3) -> 4 (tok 5)
    #                     -> 3 (tok 4)
    #        -> 1 (tok 2)
    return DraftTree.from_parents([1, 2, 3, 4, 5], [-1, -1, 0, 0, 2], [-0.1, -0.2, -0.3, -0.4, -0.5])


def _argmax_rows(*winners: int, vocab: int = 8) -> torch.Tensor:
    logits = torch.randn(len(winners), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(winners)), torch.tensor(winners)] = 10.0
    return logits


@pytest.mark.parametrize(
    ("winners", "accepted", "bonus"),
    [
        ((1, 3, 0, 5, 0, 7), [0, 2, 4], 7),  # full acceptance down the deepest path
        ((1, 4, 0, 0, 6, 0), [0, 3], 6),  # sibling branch at depth 2, then the leaf's bonus
        ((1, 7, 0, 0, 0, 0), [0], 7),  # partial: depth-2 mismatch gives the correction token
        ((7, 3, 0, 5, 0, 7), [], 7),  # nothing accepted
        ((2, 3, 0, 5, 0, 7), [1], 0),  # the lower-scored root child is selected
    ],
)
def test_verify_greedy_hand_made(winners: tuple[int, ...], accepted: list[int], bonus: int) -> None:
    assert verify_greedy(_hand_tree(), _argmax_rows(*winners)) == (accepted, bonus)


def test_verify_greedy_prefers_longer_duplicate_branch() -> None:
    # Two root children carry token 1; only the second one's child matches the next argmax.
    tree = DraftTree.from_parents([1, 1, 2, 3], [-1, -1, 0, 1], [-0.1, -0.2, -0.3, -0.4])
    assert verify_greedy(tree, _argmax_rows(1, 4, 4, 0, 0)) == ([0], 4)
    assert verify_greedy(tree, _argmax_rows(1, 4, 3, 0, 5)) == ([1, 3], 5)


def test_verify_greedy_empty_tree_and_shape_check() -> None:
    assert verify_greedy(DraftTree.chain([]), _argmax_rows(5)) == ([], 5)
    with pytest.raises(InputError):
        verify_greedy(_hand_tree(), torch.zeros(5, 8))


def _random_tree(gen: torch.Generator, logits: torch.Tensor, last: int, max_nodes: int = 8) -> DraftTree:
    """A random draft below ``last``: random shape, tokens from a noisy target copy (duplicates allowed)."""
    n = int(torch.randint(1, max_nodes + 1, (), generator=gen))
    parents: list[int] = []
    tokens: list[int] = []
    for i in range(n):
        p = int(torch.randint(-1, i, (), generator=gen))
        prev = last if p < 0 else tokens[p]
        q = (logits[prev] + 1.5 * torch.randn(logits.shape[1], generator=gen)).softmax(-1)
        parents.append(p)
        tokens.append(int(torch.multinomial(q, 1, generator=gen)))
    return DraftTree.from_parents(tokens, parents, torch.rand(n, generator=gen).log())


def test_verify_greedy_equals_autoregressive_greedy() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(V, V, generator=gen) * 2
    greedy_next = logits.argmax(-1).tolist()
    for _ in range(300):
        last = int(torch.randint(0, V, (), generator=gen))
        tree = _random_tree(gen, logits, last)
        rows = logits[[last, *tree.tokens.tolist()]]
        accepted, bonus = verify_greedy(tree, rows)
        emitted = [*tree.tokens[accepted].tolist(), bonus]
        expected = [last]
        for _ in emitted:
            expected.append(greedy_next[expected[-1]])
        assert emitted == expected[1:]
        # One-hot targets make sampling verification deterministic: equal to greedy if no sibling repeats.
        if all(len(set(tree.tokens[c].tolist())) == len(c) for c in tree.children):
            one_hot = logits_to_probs(rows, SamplingConfig(temperature=0.0))
            assert verify_sampling(tree, one_hot, gen) == (accepted, bonus)


# --- sampling: unit cases -----------------------------------------------------------------------------


def test_verify_sampling_certain_and_impossible_children() -> None:
    tree = DraftTree.from_parents([2, 3, 1], [-1, -1, 0], [-0.1, -0.2, -0.3])
    rows = torch.zeros(4, 4)
    rows[0, 3] = 1.0  # root: only token 3 possible -> child 0 (token 2) rejected surely, child 1 accepted
    rows[2] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # after node 1 (a leaf): bonus must be 3
    rows[1] = 0.25
    rows[3] = 0.25
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert verify_sampling(tree, rows, gen) == ([1], 3)


def test_duplicate_sibling_is_never_accepted_after_rejection() -> None:
    # Three copies of token 0 under the root: once the first is rejected p(0) = 0, copies 2 and 3 never win.
    tree = DraftTree.from_parents([0, 0, 0], [-1, -1, -1], [-0.1, -0.2, -0.3])
    rows = torch.full((4, 3), 1 / 3)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(2000):
        accepted, token = verify_sampling(tree, rows, gen)
        assert accepted in ([0], [])
        counts[token if not accepted else 3] += 1
    assert counts[0] == 0  # the correction never repeats a rejected token
    torch.testing.assert_close(counts / 2000, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]), atol=0.03, rtol=0)


def test_verify_sampling_rejects_bad_input() -> None:
    tree = DraftTree.chain([1, 2])
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(InputError):
        verify_sampling(tree, torch.full((2, 4), 0.25), gen)
    with pytest.raises(InputError):
        verify_sampling(tree, torch.zeros(3, 4), gen)
    assert verify_sampling(DraftTree.chain([]), torch.tensor([[0.0, 1.0]]), gen) == ([], 1)


# --- sampling: losslessness ---------------------------------------------------------------------------


Draft = tuple[DraftTree, list[int], torch.Tensor]  # tree, its tokens, its target rows


def _draft_pool(logits: torch.Tensor, probs: torch.Tensor, per_token: int, seed: int) -> list[list[Draft]]:
    """Random drafts (with their target rows) for each last token, drawn once to keep the test fast."""
    gen = torch.Generator().manual_seed(seed)
    pool: list[list[Draft]] = []
    for last in range(V):
        trees = [_random_tree(gen, logits, last) for _ in range(per_token)]
        pool.append([(t, t.tokens.tolist(), probs[[last, *t.tokens.tolist()]]) for t in trees])
    return pool


def _emitted_counts(verify: Verifier, pool: list[list[Draft]], seed: int) -> torch.Tensor:
    """Histogram of the first K emitted tokens over TRIALS decodes, as a flat (V ** K,) tensor."""
    verify_gen = torch.Generator().manual_seed(seed)
    draft_gen = torch.Generator().manual_seed(seed + 1)  # tree choice: independent of the verifier's draws
    counts = torch.zeros(V**K, dtype=torch.float64)
    for _ in range(TRIALS):
        emitted: list[int] = []
        last = START
        while len(emitted) < K:
            drafts = pool[last]
            tree, tokens, rows = drafts[int(torch.randint(0, len(drafts), (), generator=draft_gen))]
            accepted, bonus = verify(tree, rows, verify_gen)
            emitted += [tokens[i] for i in accepted] + [bonus]
            last = emitted[-1]
        cell = 0
        for t in emitted[:K]:
            cell = cell * V + t
        counts[cell] += 1
    return counts


def _chain_law(probs: torch.Tensor) -> torch.Tensor:
    """Exact law of K tokens from the chain started after START, flattened like _emitted_counts."""
    p = probs.double()
    law = p[START]
    for _ in range(K - 1):
        # cell index = prefix * V + next; the next token depends only on the prefix's last token.
        law = (law[:, None] * p[torch.arange(law.numel()) % V]).reshape(-1)
    return law


def _target_logits() -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(42)) * 1.5


def _run(verify: Verifier, cfg: SamplingConfig, seed: int) -> tuple[float, torch.Tensor]:
    logits = _target_logits()
    probs = logits_to_probs(logits, cfg)
    pool = _draft_pool(logits, probs, per_token=40, seed=seed)
    counts = _emitted_counts(verify, pool, seed)
    return chi_square_p_value(counts, _chain_law(probs)), probs


def test_chain_law_helper() -> None:
    probs = logits_to_probs(_target_logits(), SamplingConfig(temperature=1.0))
    law = _chain_law(probs)
    a, b, c = 2, 5, 1
    expected = probs[START, a] * probs[a, b] * probs[b, c]
    torch.testing.assert_close(law[a * V * V + b * V + c].float(), expected)
    torch.testing.assert_close(law.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_verify_sampling_is_lossless() -> None:
    p_value, _ = _run(verify_sampling, SamplingConfig(temperature=1.0), seed=11)
    assert p_value > ALPHA, f"emitted-token law differs from the target (p = {p_value:.2e})"


def test_verify_sampling_is_lossless_for_processed_distribution() -> None:
    # Temperature and nucleus filtering change p; verification must preserve the processed p, zeros included.
    p_value, probs = _run(verify_sampling, SamplingConfig(temperature=0.7, top_p=0.9), seed=12)
    assert (probs == 0).any(), "the synthetic target should have filtered tokens for this test to bite"
    assert p_value > ALPHA, f"emitted-token law differs from the processed target (p = {p_value:.2e})"


def test_chi_square_check_detects_a_biased_verifier() -> None:
    p_value, _ = _run(biased_verify, SamplingConfig(temperature=1.0), seed=11)
    assert p_value < ALPHA, f"the biased verifier went undetected (p = {p_value:.2e})"


def test_chi_square_p_value_sanity() -> None:
    law = torch.full((10,), 0.1, dtype=torch.float64)
    assert chi_square_p_value(torch.full((10,), 100.0, dtype=torch.float64), law) == pytest.approx(1.0)
    skewed = torch.tensor([190.0] + [90.0] * 9, dtype=torch.float64)
    # stat = 90^2/100 + 9 * 10^2/100 = 90, dof 9: far in the tail.
    assert chi_square_p_value(skewed, law) < 1e-10
    assert math.isfinite(chi_square_p_value(skewed, law))
