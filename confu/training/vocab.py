"""Draft vocabulary: the most frequent target tokens of the training data (EAGLE-3's reduced lm_head).

A draft head that scores only ``Vd`` of the target's ``V`` tokens trains and drafts faster; the tokens it can
never propose cost acceptance only in proportion to how rarely the target emits them. The frequencies are
counted over loss-masked (assistant) tokens, because those are the tokens the draft must predict.

Mapping conventions (see DESIGN.md): draft ids are ordered by ascending target id and
``target_id = draft_id + d2t[draft_id]``; ``t2d`` is a bool mask over the target vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from confu.errors import InputError


@dataclass
class DraftVocab:
    d2t: Tensor  # (Vd,) long, offset form
    t2d: Tensor  # (V,) bool
    coverage: float  # fraction of the counted data tokens the draft vocabulary contains
    counted: str  # "loss" (loss-masked tokens), "loss+all" (fell back to all tokens) or "none"

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def target_vocab_size(self) -> int:
        return int(self.t2d.numel())

    @property
    def target_ids(self) -> Tensor:
        """(Vd,) target id of every draft id, ascending."""
        return torch.arange(self.draft_vocab_size, dtype=torch.long) + self.d2t

    def to_target(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    def to_draft(self, target_ids: Tensor) -> Tensor:
        """Draft id of each target id, ``-1`` for target ids outside the draft vocabulary."""
        index = torch.cumsum(self.t2d.long(), 0) - 1
        return torch.where(self.t2d[target_ids], index[target_ids], torch.full_like(target_ids, -1))


def check_vocab(d2t: Tensor, t2d: Tensor) -> None:
    """Raise :class:`InputError` unless ``d2t`` / ``t2d`` describe the same ascending id set.

    A checkpoint's buffers can be edited or mixed up by hand; a mismatch would make the draft propose
    target ids it never scored, which shows up only as a silently low acceptance rate.
    """
    if d2t.dim() != 1 or t2d.dim() != 1 or d2t.dtype != torch.long or t2d.dtype != torch.bool:
        raise InputError("d2t must be a 1-D long tensor and t2d a 1-D bool tensor")
    if d2t.numel() > t2d.numel() or int(t2d.sum()) != d2t.numel():
        raise InputError(f"d2t has {d2t.numel()} entries but t2d marks {int(t2d.sum())} of {t2d.numel()} ids")
    target_ids = torch.arange(d2t.numel(), dtype=torch.long, device=d2t.device) + d2t
    expected = torch.nonzero(t2d).flatten().to(d2t.device)
    if not torch.equal(target_ids, expected):
        raise InputError("d2t does not map draft ids onto the target ids marked in t2d, in ascending order")


def _fields(sample: Any) -> tuple[Sequence[int], Sequence[int]]:
    # Accept data.Sample objects and the plain dicts of a prepared JSONL file alike.
    if isinstance(sample, dict):
        return sample["input_ids"], sample["loss_mask"]
    return sample.input_ids, sample.loss_mask


def count_tokens(samples: Iterable[Any], vocab_size: int) -> tuple[Tensor, Tensor]:
    """(loss_counts, all_counts), each (V,) long: token frequencies over masked and over all positions."""
    loss_counts = torch.zeros(vocab_size, dtype=torch.long)
    all_counts = torch.zeros(vocab_size, dtype=torch.long)
    for n, sample in enumerate(samples):
        ids_list, mask_list = _fields(sample)
        if len(ids_list) != len(mask_list):
            raise InputError(f"sample {n}: input_ids and loss_mask differ in length")
        if not ids_list:
            continue
        ids = torch.as_tensor(ids_list, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise InputError(f"sample {n}: token id outside the target vocabulary of {vocab_size}; "
                             f"was the data tokenized for another target?")
        mask = torch.as_tensor(mask_list, dtype=torch.bool)
        all_counts += torch.bincount(ids, minlength=vocab_size)
        loss_counts += torch.bincount(ids[mask], minlength=vocab_size)
    return loss_counts, all_counts


def _by_frequency(counts: Tensor) -> Tensor:
    """Ids with a nonzero count, most frequent first, ties broken by the lower id (deterministic)."""
    ids = torch.nonzero(counts > 0).flatten()  # ascending
    order = torch.sort(counts[ids], descending=True, stable=True).indices
    return ids[order]


def build_draft_vocab(samples: Iterable[Any], target_vocab_size: int, draft_vocab_size: int,
                      always_include: Iterable[int] = (),
                      eos_token_id: int | Sequence[int] | None = None) -> DraftVocab:
    """Pick ``draft_vocab_size`` target tokens: required ids, then by loss-masked frequency.

    Order of preference: EOS and ``always_include`` ids; tokens seen at loss-masked positions, most
    frequent first; when those are too few, tokens seen anywhere (prompts included), most frequent first;
    finally the lowest unused target ids. ``draft_vocab_size >= target_vocab_size`` gives the identity
    mapping (the full vocabulary). ``coverage`` is measured on loss-masked tokens (all tokens when there are
    none; 0.0 for empty data except the identity, which covers everything by construction).
    """
    if target_vocab_size <= 0 or draft_vocab_size <= 0:
        raise InputError("vocabulary sizes must be positive")
    loss_counts, all_counts = count_tokens(samples, target_vocab_size)
    counts = loss_counts if int(loss_counts.sum()) > 0 else all_counts
    total = int(counts.sum())

    if draft_vocab_size >= target_vocab_size:
        return DraftVocab(d2t=torch.zeros(target_vocab_size, dtype=torch.long),
                          t2d=torch.ones(target_vocab_size, dtype=torch.bool), coverage=1.0,
                          counted="loss" if int(loss_counts.sum()) > 0 else "all" if total else "none")

    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    required = list(dict.fromkeys(int(t) for t in [*eos, *always_include]))
    bad = [t for t in required if not 0 <= t < target_vocab_size]
    if bad:
        raise InputError(f"always-included token ids {bad} are outside the target vocabulary")
    if len(required) > draft_vocab_size:
        raise InputError(f"{len(required)} always-included ids do not fit a draft vocabulary of "
                         f"{draft_vocab_size}")

    chosen = torch.zeros(target_vocab_size, dtype=torch.bool)
    chosen[required] = True
    n_chosen = len(required)
    counted = "loss"
    candidates = [_by_frequency(loss_counts)]
    if int((loss_counts > 0).sum()) + n_chosen < draft_vocab_size:
        # Too few distinct answer tokens (tiny data): prompt tokens are the next-best evidence.
        candidates.append(_by_frequency(all_counts))
        counted = "loss+all"
    candidates.append(torch.arange(target_vocab_size))  # lowest unused ids fill any remaining slots
    for ranked in candidates:
        fresh = ranked[~chosen[ranked]]
        take = fresh[: draft_vocab_size - n_chosen]
        chosen[take] = True
        n_chosen += int(take.numel())
        if n_chosen == draft_vocab_size:
            break

    target_ids = torch.nonzero(chosen).flatten()  # ascending, so draft ids follow target order
    d2t = target_ids - torch.arange(draft_vocab_size, dtype=torch.long)
    coverage = float(counts[chosen].sum()) / total if total else 0.0
    if total == 0:
        counted = "none"
    vocab = DraftVocab(d2t=d2t, t2d=chosen, coverage=coverage, counted=counted)
    check_vocab(vocab.d2t, vocab.t2d)  # cheap; guards the offset arithmetic above
    return vocab
