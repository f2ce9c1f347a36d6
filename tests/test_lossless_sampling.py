"""Speculative sampling through the whole decoder keeps the target's distribution (temperature, top-p, top-k).

The law of the first K generated tokens is computed exactly from the tiny target (batched forwards over every
prefix likely enough to matter) and compared with speculative samples by a chi-square goodness-of-fit test.
Trees hold the target's own likeliest tokens, so acceptances and rejections are both frequent. A verifier
with a planted bias must fail the same test.
"""

from __future__ import annotations

import pytest
import torch

import confu.engine.generate as generate_mod
from confu.engine.checkpoint import new_draft
from confu.engine.generate import GenerationConfig
from confu.engine.sampling import SamplingConfig, logits_to_probs
from confu.engine.tree import TreeConfig
from tests.helpers import (
    PROMPTS,
    TargetTopProposer,
    biased_verify,
    chat_ids,
    chi_square_p_value,
    decoder_with,
    load_target,
)

K = 3  # tokens per sample: the first comes from the prefill, the others from tree verification
N = 500  # samples per setting
MIN_EXPECTED = 5.0


@torch.no_grad()
def exact_law(target, prompt: list[int], sampling: SamplingConfig, n: int) -> dict[tuple[int, ...], float]:
    """P(first K tokens = cell) for every cell expecting at least MIN_EXPECTED of n draws.

    A prefix expecting fewer draws cannot have such a cell below it, so only likely prefixes are expanded.
    """
    level: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(K):
        keys = [c for c, p in level.items() if p * n >= MIN_EXPECTED]
        if not keys:
            return {}
        probs = logits_to_probs(target.model(torch.tensor([prompt + list(c) for c in keys])).logits[:, -1], sampling)
        nxt = {}
        for c, row in zip(keys, probs.double(), strict=True):
            for tok in torch.nonzero(row * level[c] * n >= MIN_EXPECTED).flatten().tolist():
                nxt[(*c, tok)] = level[c] * float(row[tok])
        level = nxt
    return level


def cell_counts(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, law) over the likely cells plus one last cell for everything else, for `chi_square_p_value`."""
    counts = torch.tensor([sum(s == c for s in samples) for c in law] + [0], dtype=torch.float64)
    counts[-1] = len(samples) - counts[:-1].sum()
    probs = torch.tensor([*law.values(), 0.0], dtype=torch.float64)
    probs[-1] = (1 - probs[:-1].sum()).clamp(min=0)
    return counts, probs


def speculative_samples(target, head, prompt: list[int], sampling: SamplingConfig) -> list[tuple[int, ...]]:
    TargetTopProposer.model = target.model
    TargetTopProposer.first_token = prompt[0]
    out = []
    for seed in range(N):
        cfg = GenerationConfig(max_new_tokens=K, sampling=sampling, tree=TreeConfig(6, 3, 2), auto_tree=False, seed=seed,
                               stop_at_eos=False)
        res = decoder_with(target, head, TargetTopProposer).generate(prompt, cfg)
        assert len(res.tokens) == K
        out.append(tuple(res.tokens))
    return out


SETTINGS = [
    ("eagle3", SamplingConfig(temperature=1.0)),
    ("eagle3", SamplingConfig(temperature=0.7, top_p=0.9)),
    ("confu", SamplingConfig(temperature=1.0, top_p=0.9, top_k=20)),
]


@pytest.fixture
def sampling_setup(tiny_llama_dir):
    target = load_target(tiny_llama_dir)
    with torch.no_grad():
        # Sharper than the random init (whose next-token law is near uniform over 512 tokens): the law of
        # three tokens then has dozens of cells likely enough to test, and drafts get accepted.
        target.model.lm_head.weight.mul_(4.0)
    return target, chat_ids(target, PROMPTS[5])


@pytest.mark.parametrize(("method", "sampling"), SETTINGS, ids=lambda x: getattr(x, "temperature", x))
def test_speculative_sampling_matches_target_law(sampling_setup, method, sampling, record_property):
    target, prompt = sampling_setup
    head = new_draft(target, method, draft_vocab_size=256)
    samples = speculative_samples(target, head, prompt, sampling)
    law = exact_law(target, prompt, sampling, N)
    p_value = chi_square_p_value(*cell_counts(samples, law))
    record_property("p_value", p_value)
    print(f"{method} {sampling}: {len(law)} cells, p = {p_value:.3g}")
    assert len(law) >= 10, "the law should spread over many cells for the test to have power"
    assert p_value > 1e-3


def test_planted_bias_is_detected(sampling_setup, monkeypatch):
    target, prompt = sampling_setup
    monkeypatch.setattr(generate_mod, "verify_sampling", biased_verify)
    sampling = SamplingConfig(temperature=1.0)
    samples = speculative_samples(target, new_draft(target, "eagle3", draft_vocab_size=256), prompt, sampling)
    assert chi_square_p_value(*cell_counts(samples, exact_law(target, prompt, sampling, N))) < 1e-6
