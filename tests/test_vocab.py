"""Draft vocabulary selection: offsets, coverage, required ids, fallbacks, identity."""

from __future__ import annotations

import pytest
import torch

from confu.errors import InputError
from confu.training.data import Sample
from confu.training.vocab import build_draft_vocab, check_vocab, count_tokens

V = 20
EOS = 2


def _sample(ids: list[int], mask: list[int]) -> Sample:
    return Sample(input_ids=ids, loss_mask=mask)


# Loss-masked counts: 3 x5, 7 x3, 9 x1, 15 x1 (total 10). Token 1 is frequent but only in prompts.
TOY = [
    _sample([1, 1, 1, 3, 3, 7, 9], [0, 0, 0, 1, 1, 1, 1]),
    _sample([1, 1, 3, 3, 3, 7, 7, 15], [0, 0, 1, 1, 1, 1, 1, 1]),
]


def test_counts_split_loss_and_all_tokens() -> None:
    loss, full = count_tokens(TOY, V)
    assert loss.tolist()[:16] == [0, 0, 0, 5, 0, 0, 0, 3, 0, 1, 0, 0, 0, 0, 0, 1]
    assert int(full[1]) == 5 and int(full.sum()) == 15


def test_offsets_map_draft_ids_back_to_target_ids() -> None:
    vocab = build_draft_vocab(TOY, V, 4, eos_token_id=EOS)
    expected = [2, 3, 7, 9]  # EOS, then 3 and 7 by frequency, then 9 over 15 (tie -> lower id)
    assert vocab.d2t.dtype == torch.long and vocab.t2d.dtype == torch.bool
    assert vocab.d2t.shape == (4,) and vocab.t2d.shape == (V,)
    draft_ids = torch.arange(4)
    assert (draft_ids + vocab.d2t[draft_ids]).tolist() == expected
    assert vocab.to_target(draft_ids).tolist() == expected == vocab.target_ids.tolist()
    assert torch.nonzero(vocab.t2d).flatten().tolist() == expected
    assert vocab.to_draft(torch.tensor(expected)).tolist() == [0, 1, 2, 3]
    assert vocab.to_draft(torch.tensor([1, 15])).tolist() == [-1, -1]


def test_coverage_matches_a_hand_count() -> None:
    # Draft vocab {2, 3, 7}: covers 5 + 3 of the 10 loss-masked tokens.
    vocab = build_draft_vocab(TOY, V, 3, eos_token_id=EOS)
    assert vocab.target_ids.tolist() == [2, 3, 7]
    assert vocab.coverage == pytest.approx(0.8)
    assert vocab.counted == "loss"


def test_eos_and_always_include_are_kept_even_when_unseen() -> None:
    vocab = build_draft_vocab(TOY, V, 3, always_include=[19], eos_token_id=[EOS, 18])
    assert vocab.target_ids.tolist() == [2, 18, 19]
    assert vocab.coverage == 0.0
    with pytest.raises(InputError, match="do not fit"):
        build_draft_vocab(TOY, V, 1, always_include=[19], eos_token_id=EOS)
    with pytest.raises(InputError, match="outside"):
        build_draft_vocab(TOY, V, 3, always_include=[V])


def test_falls_back_to_all_tokens_then_lowest_ids() -> None:
    # 4 distinct loss tokens + EOS = 5 < 8: prompt token 1 comes next, then the lowest unused ids 0, 4.
    vocab = build_draft_vocab(TOY, V, 8, eos_token_id=EOS)
    assert vocab.target_ids.tolist() == [0, 1, 2, 3, 4, 7, 9, 15]
    assert vocab.counted == "loss+all"
    assert vocab.coverage == pytest.approx(1.0)
    empty = build_draft_vocab([], V, 3, eos_token_id=EOS)
    assert empty.target_ids.tolist() == [0, 1, 2] and empty.coverage == 0.0 and empty.counted == "none"


def test_selection_is_deterministic_under_ties() -> None:
    tied = [_sample([5, 4, 6, 8], [1, 1, 1, 1])]
    first = build_draft_vocab(tied, V, 2)
    assert first.target_ids.tolist() == [4, 5]  # equal counts: the lower ids win
    assert torch.equal(first.d2t, build_draft_vocab(tied, V, 2).d2t)


def test_full_size_draft_vocab_is_the_identity() -> None:
    for size in (V, V + 5):
        vocab = build_draft_vocab(TOY, V, size, eos_token_id=EOS)
        assert vocab.draft_vocab_size == V and vocab.target_vocab_size == V
        assert torch.equal(vocab.d2t, torch.zeros(V, dtype=torch.long))
        assert vocab.t2d.all() and vocab.coverage == 1.0
        assert vocab.to_target(torch.arange(V)).tolist() == list(range(V))


def test_rejects_ids_outside_the_target_vocab_and_bad_samples() -> None:
    with pytest.raises(InputError, match="outside the target vocabulary"):
        build_draft_vocab([_sample([0, V], [1, 1])], V, 4)
    with pytest.raises(InputError, match="differ in length"):
        build_draft_vocab([_sample([0, 1], [1])], V, 4)
    # Plain dicts (lines of a prepared dataset) are accepted too.
    vocab = build_draft_vocab([{"input_ids": [5, 5, 6], "loss_mask": [1, 1, 0]}], V, 1)
    assert vocab.target_ids.tolist() == [5] and vocab.coverage == 1.0


def test_check_vocab_rejects_inconsistent_buffers() -> None:
    vocab = build_draft_vocab(TOY, V, 4, eos_token_id=EOS)
    check_vocab(vocab.d2t, vocab.t2d)
    shifted = vocab.d2t.clone()
    shifted[1] += 1  # draft id 1 now points at target id 4, which t2d does not mark
    with pytest.raises(InputError, match="does not map"):
        check_vocab(shifted, vocab.t2d)
    with pytest.raises(InputError, match="marks"):
        check_vocab(vocab.d2t[:3], vocab.t2d)
    with pytest.raises(InputError, match="long"):
        check_vocab(vocab.d2t.int(), vocab.t2d)
