"""`confu bench` with match candidates: the method names, the per-source summary, and a run of matches alone and
merged with a head, token-identical to plain decoding, its report showing candidates by source."""

from __future__ import annotations

import json

import pytest

from confu.bench.report import candidate_sources
from confu.bench.specbench import MethodSpec, parse_methods
from confu.cli import main
from confu.errors import InputError


def test_match_method_names():
    specs = parse_methods("ar,match,eagle3+match:/d/e3,confu+match:/d/cf=CF,eagle3:/d/e3")
    assert specs == [MethodSpec("ar", "ar"), MethodSpec("match", "match"),
                     MethodSpec("eagle3+match", "e3+match", "/d/e3"), MethodSpec("confu+match", "CF", "/d/cf"),
                     MethodSpec("eagle3", "e3", "/d/e3")]
    with pytest.raises(InputError, match="is not ar, hf, match"):
        parse_methods("ar+match:/d/e3")


def test_candidate_sources_hand_computed():
    steps = {"nodes_by_source": [{}, {"head": 2, "match": 3}, {"match": 1}],
             "accepted_sources": [[], ["head", "match"], ["match"]]}
    got = candidate_sources([{"steps": steps}, {"steps": None}])
    assert got == {"head": {"nodes_per_round": 2 / 3, "accepted_per_round": 1 / 3, "acceptance": 0.5,
                            "share_of_accepted": 1 / 3},
                   "match": {"nodes_per_round": 4 / 3, "accepted_per_round": 2 / 3, "acceptance": 0.5,
                             "share_of_accepted": 2 / 3}}
    assert candidate_sources([{"steps": {"accepted": [0]}}]) is None, "records from before sources were kept"


def test_bench_with_matches(tiny_llama_dir, tmp_path, capsys):
    from confu.engine.checkpoint import new_draft, save_draft
    from confu.engine.target import Target

    e3 = save_draft(new_draft(Target.load(str(tiny_llama_dir)), "eagle3", draft_vocab_size=256), tmp_path / "e3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three one two three one two three\nThe cat reads a book. The cat reads a\n")
    out = tmp_path / "run"
    assert main(["bench", "--target", str(tiny_llama_dir), "--methods", f"ar,match,eagle3+match:{e3}",
                 "--questions", str(prompts), "--tree-nodes", "4", "--max-new-tokens", "12", "--out", str(out),
                 "--no-progress", "--warmup", "0"]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    ar = {r["question_id"]: [t["tokens"] for t in r["turns"]] for r in records if r["kind"] == "ar"}
    for r in records:
        assert [t["tokens"] for t in r["turns"]] == ar[r["question_id"]], r["method"]
        steps = r["steps"]
        assert len(steps["nodes_by_source"]) == len(steps["accepted_sources"]) == len(steps["accepted"])
        assert [len(p) for p in steps["accepted_sources"]] == steps["accepted"]
        if r["kind"] == "eagle3+match":  # a fixed tree: every round drafts, the best 4 of both proposers' nodes
            assert all(1 <= sum(counts.values()) <= 4 for counts in steps["nodes_by_source"])
            assert any("head" in counts for counts in steps["nodes_by_source"])
        else:
            assert all(set(counts) <= {"match"} for counts in steps["nodes_by_source"])
    by_method = {s["method"]: s for s in results["summary"]["settings"]}
    assert by_method["ar"]["sources"] is None
    assert by_method["e3+match"]["sources"] == candidate_sources([r for r in records if r["method"] == "e3+match"])
    assert "## Draft candidates by source" in (out / "report.md").read_text()
