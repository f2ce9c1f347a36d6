"""SamplingConfig validation and logits_to_probs against transformers' own warpers."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from confu.engine.sampling import SamplingConfig, logits_to_probs, sample_token
from confu.errors import InputError


def _hf_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution HF ``generate(do_sample=True)`` samples from, built from the warpers it would add."""
    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=cfg.top_p))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return warpers(input_ids, logits.float()).softmax(dim=-1)


def test_defaults_are_greedy() -> None:
    cfg = SamplingConfig()
    assert cfg.greedy
    assert not SamplingConfig(temperature=0.7).greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.2},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_k": True},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(InputError):
        SamplingConfig(**kwargs)


def test_greedy_is_one_hot_of_first_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    probs = logits_to_probs(logits, SamplingConfig(temperature=0.0, top_p=0.5, top_k=3))
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    list(itertools.product([0.3, 1.0, 1.7], [0, 1, 7, 200], [1.0, 0.95, 0.6, 0.05])),
)
def test_matches_hf_warpers(temperature: float, top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(6, 100, generator=gen) * 3
    # Exact ties exercise HF's "keep everything tied with the k-th score" and the top-p boundary rule.
    logits[0, 10:20] = logits[0, 5]
    logits[1] = torch.randint(0, 4, (100,), generator=gen).float()
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = logits_to_probs(logits, cfg)
    ref = _hf_probs(logits, cfg)
    assert ours.dtype == torch.float32
    assert torch.equal(ours > 0, ref > 0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(6), atol=1e-5, rtol=0)


def test_leading_dims_and_half_input() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 50, generator=gen)
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)
    ours = logits_to_probs(logits.half(), cfg)
    assert ours.shape == (2, 3, 50) and ours.dtype == torch.float32
    ref = _hf_probs(logits.half().float().reshape(6, 50), cfg).reshape(2, 3, 50)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_top_p_always_keeps_the_best_token() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_empty_vocabulary_rejected() -> None:
    with pytest.raises(InputError):
        logits_to_probs(torch.zeros(3, 0), SamplingConfig(temperature=1.0))


def test_sample_token_is_reproducible_and_follows_probs() -> None:
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    a = [sample_token(probs, torch.Generator().manual_seed(3)) for _ in range(5)]
    assert len(set(a)) == 1
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample_token(probs, gen)] += 1
    assert counts[1] == 0
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)
    with pytest.raises(InputError):
        sample_token(probs[None], gen)
