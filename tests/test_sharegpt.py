"""The ShareGPT source: a JSON array cut off mid-record is read up to the cut, and prompts are filtered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confu.errors import InputError
from confu.training.sharegpt import EvaluationSet, ShareGPTStats, read_sharegpt, sharegpt_prompts


def _conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": text} for who, text in turns]}


def _write_cut(path: Path, records: list[dict], torn: dict) -> None:
    """A JSON array of `records`, then `torn` cut in the middle, as the wheel's file ends."""
    whole = json.dumps(records + [torn], indent=2)
    cut = whole.rindex(json.dumps(torn["id"])) + 3
    path.write_text(whole[:cut])


def test_reads_every_complete_record_and_stops_at_the_cut(tmp_path: Path, monkeypatch) -> None:
    import confu.training.sharegpt as sharegpt

    monkeypatch.setattr(sharegpt, "READ_CHUNK", 64)  # records span chunk boundaries
    records = [_conv(f"c{i}", ("human", f"question {i} " * 9), ("gpt", "answer")) for i in range(5)]
    path = tmp_path / "sg.json"
    _write_cut(path, records, _conv("torn", ("human", "never read")))
    stats = ShareGPTStats()
    assert [r["id"] for r in read_sharegpt(path, stats)] == [f"c{i}" for i in range(5)]
    assert stats.complete == 5 and stats.cut_off
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(records))
    stats = ShareGPTStats()
    assert len(list(read_sharegpt(whole, stats))) == 5 and not stats.cut_off


def test_prompts_keep_user_turns_and_drop_evaluation_overlap_duplicates_and_long(tmp_path: Path) -> None:
    spec_question = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting culture."
    records = [
        _conv("a", ("human", "Write a haiku about rain."), ("gpt", "..."), ("human", "Another one")),
        _conv("b", ("gpt", "Hello! How can I help?"), ("human", "Explain  recursion.")),  # opens with the model
        _conv("c", ("human", spec_question.upper() + " Please.")),  # the same opening as an evaluation prompt
        _conv("d", ("human", "write a haiku   about rain.")),  # the same first turn as "a" after folding
        _conv("e", ("human", "x" * 500)),
        _conv("f", ("gpt", "only the model speaks")),
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(records))
    kept, stats = sharegpt_prompts(path, None, EvaluationSet([spec_question]), max_chars=200)
    assert [r["id"] for r in kept] == ["a", "b"]
    assert kept[0]["messages"] == [{"role": "user", "content": "Write a haiku about rain."}]  # one turn by default
    assert kept[1]["messages"] == [{"role": "user", "content": "Explain  recursion."}]
    assert (stats.evaluation_overlap, stats.duplicate, stats.too_long, stats.no_user_turn) == (1, 1, 1, 1)
    two, _ = sharegpt_prompts(path, 1, EvaluationSet([]), max_chars=200, max_turns=2)
    assert [m["content"] for m in two[0]["messages"]] == ["Write a haiku about rain.", "Another one"]


def test_not_an_array_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "sg.json"
    path.write_text('{"id": 1}')
    with pytest.raises(InputError, match="not a JSON array"):
        list(read_sharegpt(path, ShareGPTStats()))
    with pytest.raises(InputError, match="no such file"):
        list(read_sharegpt(tmp_path / "missing.json", ShareGPTStats()))
