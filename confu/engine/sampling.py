"""Sampling configuration and the map from target logits to the distribution that decoding preserves.

Speculative sampling is lossless with respect to *whatever* distribution the verifier is given, so the
processed distribution (temperature, then top-k, then top-p) is computed once here and used both by plain
autoregressive decoding and by tree verification. The warpers follow transformers'
``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper`` (in the order ``generate`` applies
them) so a ConFu run samples from the same distribution as ``model.generate(do_sample=True, ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from confu.errors import InputError

__all__ = ["SamplingConfig", "logits_to_probs", "sample_token"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the target's logits.

    ``temperature == 0`` means greedy decoding (``top_p`` and ``top_k`` are then irrelevant).
    ``top_k == 0`` and ``top_p == 1`` disable the respective filters, as in transformers.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        # bool is an int subclass; ``top_k=True`` is almost certainly a mistake, so reject it explicitly.
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise InputError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise InputError(f"top_p must be a number, got {self.top_p!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0


def _one_hot_argmax(logits: Tensor) -> Tensor:
    # torch.argmax returns the first maximal index on ties, the same choice verify_greedy makes.
    idx = logits.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, idx, 1.0)


def _top_k_filter(scores: Tensor, top_k: int) -> Tensor:
    """Mask everything below the k-th largest score; ties with the k-th score survive (as in HF)."""
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def _top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter with HF's exact tie and boundary behaviour.

    Sorting ascending and removing the tokens whose cumulative probability is <= 1 - top_p keeps the smallest
    set of most likely tokens whose mass reaches top_p; the most likely token is always kept.
    """
    sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, -math.inf)


def logits_to_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """Processed target distribution p for logits of shape (..., V), float32.

    Greedy configs give the one-hot of the argmax, which makes sampling-based verification coincide with
    greedy verification.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise InputError(f"logits need a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    scores = logits.float()
    if cfg.greedy:
        return _one_hot_argmax(scores)
    scores = scores / cfg.temperature
    if cfg.top_k > 0:
        scores = _top_k_filter(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = _top_p_filter(scores, cfg.top_p)
    return scores.softmax(dim=-1)


def sample_token(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token id from probs (V,); unnormalised non-negative weights are accepted too."""
    if probs.dim() != 1:
        raise InputError(f"sample_token expects a 1-D distribution, got shape {tuple(probs.shape)}")
    return int(torch.multinomial(probs, 1, generator=generator).item())
