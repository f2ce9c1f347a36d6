"""`confu bench`, `bench-ar` and `bench-verify` on the tiny random Llama, and hand-computed metrics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from statistics import fmean

import pytest

from confu.bench import timing
from confu.bench.report import acceptance_profile, speedup, summarize, timing_breakdown
from confu.bench.specbench import load_questions, parse_methods, record_key
from confu.bench.timing import measure_interleaved
from confu.cli import main
from confu.engine.quant import draft_numerics
from confu.errors import InputError

# Our own questions (not Spec-Bench): two categories, one MT-bench-like 2-turn question; the third writing
# question is cut by --limit-per-category and the "math" one by --categories.
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about the sea.", "Now make it sad."]},
    {"question_id": 2, "category": "writing", "turns": ["Explain speculative decoding in one sentence."]},
    {"question_id": 3, "category": "writing", "turns": ["Write a long letter."]},
    {"question_id": 4, "category": "qa", "turns": ["What is the capital of France?"]},
    {"question_id": 5, "category": "math", "turns": ["What is two plus three?"]},
    {"question_id": 6, "category": "qa", "turns": ["Why is the sky blue?"]},
]
SETTINGS_PER_T = 1 + 1 + 2 + 2  # ar, hf, eagle3 x 2 tree sizes, confu x 2 tree sizes


@pytest.fixture
def tick_clock(monkeypatch):
    """The benchmarks' clock advances one millisecond per reading: every timed call lasts exactly 1 ms, so a
    reported speed is tokens per call, a function of what ran and not of the machine."""
    ticks = itertools.count()
    monkeypatch.setattr(timing, "perf_counter", lambda: next(ticks) / 1000)


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _bench_argv(model: Path, drafts: tuple[Path, Path], questions: Path, out: Path) -> list[str]:
    e3, cf = drafts
    return [
        "bench", "--target", str(model), "--methods", f"ar,hf,eagle3:{e3},confu:{cf}",
        "--questions", str(questions), "--categories", "writing", "qa", "--limit-per-category", "2",
        "--temperatures", "0,0.7", "--tree-nodes", "4,8", "--max-new-tokens", "8", "--out", str(out),
        "--no-progress",
    ]


def test_bench_end_to_end_and_resume(tiny_llama_dir, tiny_drafts, tmp_path, capsys, tick_clock):
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "run"
    argv = _bench_argv(tiny_llama_dir, tiny_drafts, qfile, out)
    assert main(argv) == 0
    last = _last_json(capsys)
    n_settings = 2 * SETTINGS_PER_T
    assert len(last["settings"]) == n_settings
    for s in last["settings"]:
        assert set(s) == {"method", "temperature", "tree_nodes", "tau", "sr_vs_ar", "sr_vs_hf",
                          "tokens_per_s"}
    assert {s["method"] for s in last["settings"]} == {"ar", "hf", "e3", "cf"}

    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert len(records) == 4 * n_settings  # questions 1, 2, 4, 6
    assert {r["question_id"] for r in records} == {1, 2, 4, 6}
    for r in records:
        assert r["new_tokens"] == sum(t["new_tokens"] for t in r["turns"]) >= 1
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["wall_s"])
        assert all(len(t["tokens"]) == t["new_tokens"] <= 8 for t in r["turns"])
        assert len(r["turns"]) == (2 if r["question_id"] == 1 else 1)
        if r["kind"] == "hf":
            assert r["steps"] is None and r["tree_nodes"] is None
        else:
            assert len(r["steps"]["accepted"]) == len(r["steps"]["verify_s"]) >= 1
        if r["kind"] == "ar":
            assert set(r["steps"]["accepted"]) == {0}
        if r["kind"] == "confu":
            assert all(c >= 1 for c in r["steps"]["contemplate_slots"])

    # Greedy decoding is lossless and HF counts tokens like us: every method emits ar's tokens at T=0.
    greedy = [r for r in records if r["temperature"] == 0]
    ar_tokens = {r["question_id"]: [t["tokens"] for t in r["turns"]] for r in greedy if r["kind"] == "ar"}
    for r in greedy:
        tokens = [t["tokens"] for t in r["turns"]]
        assert tokens == ar_tokens[r["question_id"]], (r["method"], r["tree_nodes"])
    # Each setting's speed is its records'; with every turn one tick long, speed is tokens, and at T=0, where every
    # method emits ar's tokens, no method is faster or slower than either baseline.
    for s in last["settings"]:
        mine = [r for r in records if (r["method"], r["temperature"], r["tree_nodes"]) == (s["method"],
                                                                                            s["temperature"],
                                                                                            s["tree_nodes"])]
        assert s["tokens_per_s"] == pytest.approx(fmean(r["tokens_per_s"] for r in mine), abs=1e-3)
        if s["temperature"] == 0:
            assert s["sr_vs_ar"] == pytest.approx(1.0) and s["sr_vs_hf"] == pytest.approx(1.0), s

    summary = results["summary"]
    assert summary["categories"] == ["writing", "qa"]
    by_key = {(s["method"], s["temperature"], s["tree_nodes"]): s for s in summary["settings"]}
    assert by_key[("ar", 0.0, None)]["avg"]["tau"] == 1.0
    assert by_key[("ar", 0.0, None)]["avg"]["sr_vs_ar"] == pytest.approx(1.0)
    assert by_key[("hf", 0.7, None)]["avg"]["sr_vs_hf"] == pytest.approx(1.0)
    assert by_key[("e3", 0.0, 8)]["greedy_identity_vs_ar"] == {"compared": 4, "identical": 4}
    cf_timing = by_key[("cf", 0.0, 4)]["timing"]
    assert cf_timing["contemplate_split"] == "verify-cost curve" and 0 <= cf_timing["contemplate_share_est"] < 1
    # the stage clock timed every round; ConFu's routers and KV tensors were read
    for s in summary["settings"]:
        if s["kind"] == "hf":
            continue
        assert set(s["timing"]["stages"]) == {"draft", "verify rows", "contemplate rows", "accept", "bookkeeping"}
        assert sum(v["share"] for v in s["timing"]["stages"].values()) == pytest.approx(1.0)
        assert s["memory"]["target_kv_per_token"] > 0
        assert (s["memory"]["soft_prompt"] > 0) == (s["kind"] == "confu")
        assert (s["memory"]["draft_kv_per_token"] > 0) == (s["kind"] != "ar")
        assert (s["routing"] is not None) == (s["kind"] == "confu")
    con = by_key[("cf", 0.0, 4)]["routing"]["con"]
    assert con["decisions"] >= 2 and sum(con["chosen_share"]) == pytest.approx(con["top_k"])

    report = (out / "report.md").read_text()
    assert "| Method | Nodes | T | WRIT τ | WRIT SR | QA τ | QA SR | AVG τ | AVG SR |" in report
    assert "estimate" in report and "AVG pools all questions" in report
    assert f"- draft numerics: {draft_numerics()} (" in report
    for heading in ("AVG: τ and speed-up with 95% intervals", "Per-step latency", "KV-cache footprint",
                    "MoE utilisation"):
        assert heading in report
    for png in ("accept_e3.png", "accept_cf.png", "latency.png", "moe_cf.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in report

    # A re-run with the same directory does nothing new.
    jsonl = out / "records.jsonl"
    before = jsonl.read_text()
    assert main(argv) == 0
    assert _last_json(capsys)["settings"] == last["settings"]
    assert jsonl.read_text() == before
    assert json.loads((out / "results.json").read_text())["run"]["ran"] == 0

    # Interrupted mid-way: the last question's records are gone and a line is cut short.
    lines = before.splitlines(keepends=True)
    kept = [ln for ln in lines if json.loads(ln)["question_id"] != 6]
    jsonl.write_text("".join(kept) + lines[-1][:40])
    assert main(argv + ["--warmup", "0"]) == 0
    capsys.readouterr()
    run = json.loads((out / "results.json").read_text())["run"]
    assert (run["ran"], run["resumed"]) == (n_settings, 3 * n_settings)

    # Other decoding options would mix incomparable records into one directory.
    assert main(argv[:-1] + ["--top-k", "5", "--no-progress"]) == 2


def test_bench_method_tag_must_match_checkpoint(tiny_llama_dir, tiny_drafts, tmp_path, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps(QUESTIONS[3]) + "\n")
    _, cf = tiny_drafts
    argv = ["bench", "--target", str(tiny_llama_dir), "--methods", f"ar,eagle3:{cf}",
            "--questions", str(qfile), "--out", str(tmp_path / "o"), "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 2
    assert "holds a 'confu' draft" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_second_turn_feeds_back_the_first_answer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from confu.bench.specbench import encode_turn

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = tok.decode(encode_turn(tok, [("Name a river.", "The Nile.")], "How long is it?"))
    assert text == ("<|im_start|>user\nName a river.<|im_end|>\n<|im_start|>assistant\nThe Nile.<|im_end|>\n"
                    "<|im_start|>user\nHow long is it?<|im_end|>\n<|im_start|>assistant\n")


def test_load_questions_filters_and_checks(tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    picked = load_questions(qfile, ["qa", "writing"], limit_per_category=1)
    assert [(q.question_id, len(q.turns)) for q in picked] == [(1, 2), (4, 1)]
    with pytest.raises(InputError, match="categories"):
        load_questions(qfile, ["coding"])
    qfile.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps(QUESTIONS[0]) + "\n")
    with pytest.raises(InputError, match="twice"):
        load_questions(qfile)


def test_a_prompt_file_is_one_turn_questions(tmp_path):
    pfile = tmp_path / "mine.txt"
    pfile.write_text("# our prompts\nWrite a haiku about rain.\n\nName three rivers.\n")
    picked = load_questions(pfile)
    assert [(q.question_id, q.category, q.turns) for q in picked] == [
        (1, "prompts", ("Write a haiku about rain.",)), (2, "prompts", ("Name three rivers.",))]
    assert [q.question_id for q in load_questions(pfile, limit_per_category=1)] == [1]
    pfile.write_text("# only a comment\n")
    with pytest.raises(InputError, match="no prompts"):
        load_questions(pfile)


def test_parse_methods():
    specs = parse_methods("ar, hf,eagle3:/x/e3_run,confu:/x/c=a/run=mine")
    assert [(s.kind, s.label, s.draft_dir) for s in specs] == [
        ("ar", "ar", None), ("hf", "hf", None), ("eagle3", "e3_run", "/x/e3_run"),
        ("confu", "mine", "/x/c=a/run"),
    ]
    with pytest.raises(InputError, match="duplicate"):
        parse_methods("eagle3:/a/d,confu:/b/d")
    with pytest.raises(InputError):
        parse_methods("medusa:/x")


# -- hand-computed metrics -----------------------------------------------------------------------------------


def _rec(qid, cat, method, kind, tokens, wall, accepted=None, temperature=0.0, nodes=None, **steps):
    rec = {"question_id": qid, "category": cat, "method": method, "kind": kind, "temperature": temperature,
           "tree_nodes": nodes, "new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "turns": [], "steps": None}
    if accepted is not None:
        n = len(accepted)
        per_round = nodes if isinstance(nodes, int) else 2 if nodes == "auto" else 0  # "auto": 2 nodes a round
        rec["steps"] = {"accepted": accepted, "tree_nodes": [per_round] * n,
                        "contemplate_slots": steps.get("slots", [0] * n),
                        "verify_tokens": steps.get("rows", [1 + per_round] * n),
                        "draft_s": steps.get("draft_s", [0.01] * n),
                        "verify_s": steps.get("verify_s", [0.02] * n)}
    return rec


def test_summarize_hand_computed():
    records = [
        _rec(1, "writing", "ar", "ar", 10, 2.0, [0] * 9),  # 5 tok/s
        _rec(2, "qa", "ar", "ar", 12, 2.0, [0] * 11),  # 6 tok/s
        _rec(1, "writing", "hf", "hf", 10, 2.5),  # 4 tok/s
        _rec(2, "qa", "hf", "hf", 12, 2.0),  # 6 tok/s
        _rec(1, "writing", "e3", "eagle3", 10, 1.0, [2, 3, 1], nodes=30,  # 10 tok/s
             draft_s=[0.01, 0.02, 0.03], verify_s=[0.1, 0.2, 0.3]),
        _rec(2, "qa", "e3", "eagle3", 12, 1.5, [4, 0, 2, 1], nodes=30,  # 8 tok/s
             draft_s=[0.04, 0.05, 0.06, 0.07], verify_s=[0.4, 0.5, 0.6, 0.7]),
    ]
    summary = summarize(records)
    assert summary["categories"] == ["writing", "qa"]
    order = [(s["method"], s["tree_nodes"]) for s in summary["settings"]]
    assert order == [("ar", None), ("hf", None), ("e3", 30)]
    e3 = summary["settings"][2]
    # tau pools steps: (3 + 4 + 2 + 5 + 1 + 3 + 2) / 7, not the mean of per-question taus (3 and 2.75).
    assert e3["avg"]["tau"] == pytest.approx(20 / 7)
    assert e3["per_category"]["writing"]["tau"] == pytest.approx(3.0)
    assert e3["per_category"]["qa"]["tau"] == pytest.approx(2.75)
    # SR = mean method tokens/s / mean baseline tokens/s (not the mean of per-question ratios, 5/3).
    assert e3["avg"]["tokens_per_s"] == pytest.approx(9.0)
    assert e3["avg"]["sr_vs_ar"] == pytest.approx(9 / 5.5)
    assert e3["avg"]["sr_vs_hf"] == pytest.approx(9 / 5)
    assert e3["per_category"]["writing"]["sr_vs_ar"] == pytest.approx(2.0)
    assert e3["per_category"]["qa"]["sr_vs_ar"] == pytest.approx(8 / 6)
    assert e3["per_category"]["writing"]["sr_vs_hf"] == pytest.approx(2.5)
    assert summary["settings"][0]["avg"]["tau"] == 1.0 and summary["settings"][1]["avg"]["tau"] == 1.0
    assert summary["settings"][1]["avg"]["sr_vs_ar"] == pytest.approx(5 / 5.5)
    assert e3["timing"]["draft_ms"] == pytest.approx(40.0)
    assert e3["timing"]["verify_ms"] == pytest.approx(400.0)
    assert e3["timing"]["rounds_share_of_wall"] == pytest.approx((0.28 + 2.8) / 2.5)
    # Depth d: rounds accepting >= d among those accepting >= d - 1, over accepted = [2, 3, 1, 4, 0, 2, 1].
    per_depth = e3["acceptance"]["per_depth"]
    assert [p["rate"] for p in per_depth] == pytest.approx([6 / 7, 4 / 6, 2 / 4, 1 / 2])
    assert [p["p"] for p in e3["acceptance"]["survival"]] == pytest.approx([1, 6 / 7, 4 / 7, 2 / 7, 1 / 7])


def test_settings_sort_auto_before_fixed_node_counts():
    # `--tree-nodes auto,16,2`: the report once sorted "auto" against 16 and failed at the end of the run
    records = [_rec(1, "qa", "ar", "ar", 10, 2.0, [0] * 9)] + [
        _rec(1, "qa", "e3", "eagle3", 10, 1.0, [1] * 5, nodes=n) for n in (16, "auto", 2)]
    assert [s["tree_nodes"] for s in summarize(records)["settings"]] == [None, "auto", 2, 16]


def test_speedup_uses_common_questions_and_contemplate_estimate():
    base = [_rec(1, "qa", "ar", "ar", 10, 2.0, [0] * 9)]
    method = [_rec(1, "qa", "m", "eagle3", 10, 1.0, [1] * 5),
              _rec(2, "qa", "m", "eagle3", 100, 1.0, [1] * 50)]
    assert speedup(method, base) == pytest.approx(2.0)  # question 2 has no baseline yet
    confu = [_rec(1, "qa", "c", "confu", 10, 1.0, [1, 1], nodes=4, slots=[5, 2], rows=[10, 8],
                  verify_s=[0.1, 0.3])]
    t = timing_breakdown(confu)
    assert t["contemplate_share_est"] == pytest.approx((0.5 + 0.25) / 2)
    assert t["contemplate_ms_est"] == pytest.approx(1000 * (0.05 + 0.075) / 2)
    assert acceptance_profile([])["per_depth"] == []
    assert record_key(1, "m", 0, None) == record_key("1", "m", 0.0, None)


# -- bench-ar and bench-verify -------------------------------------------------------------------------------


def test_interleaved_timing_discards_warmup_and_never_times_a_reset(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing, "perf_counter", lambda: now[0])
    calls: list[str] = []

    def work(key: str, seconds: float):
        def fn() -> str:
            now[0] += 1.0 if key not in calls else seconds  # the first call (the warm-up) is slow
            calls.append(key)
            return key
        return fn

    def reset(key: str) -> None:
        calls.append("reset")
        now[0] += 100.0

    timings = measure_interleaved({"a": work("a", 0.002), "b": work("b", 0.005)}, warmup=1, repeats=3, reset=reset)
    assert calls == ["a", "reset", "b", "reset"] * 4, "round-robin, the warm-up round included"
    assert timings["a"].samples == pytest.approx([0.002] * 3) and timings["b"].median == pytest.approx(0.005)
    assert timings["a"].result == "a"


def test_bench_verify_tiny(tiny_llama_dir, capsys, tick_clock):
    argv = ["bench-verify", "--target", str(tiny_llama_dir), "--nodes", "4,8", "--budgets", "all,1",
            "--repeats", "1", "--warmup", "0"]
    assert main(argv) == 0
    res = _last_json(capsys)
    assert res["columns"] == ["ar (1 token)", "eagle3", "confu all", "confu 1"]
    for row in res["rows"]:
        n = row["nodes"]
        assert row["tree_nodes"] == n
        tokens = {c: v["tokens"] for c, v in row["columns"].items()}
        assert tokens == {"ar (1 token)": 1, "eagle3": n + 1, "confu all": 2 * (n + 1), "confu 1": n + 3}
        # every timed pass lasted one tick: the cells are the timed calls' medians, in milliseconds
        assert all(v["ms"] == pytest.approx(1.0) == v["best_ms"] for v in row["columns"].values())


def test_bench_ar_tiny(tiny_llama_dir, tmp_path, capsys, tick_clock):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write a haiku about the sea.\n\nWhat is two plus three?\n")
    argv = ["bench-ar", "--target", str(tiny_llama_dir), "--prompts-file", str(prompts),
            "--max-new-tokens", "8", "--repeats", "1"]
    assert main(argv) == 0
    res = _last_json(capsys)
    assert res["identical"] is True
    # every timed generation lasted one tick: a rate is the tokens of the two prompts (1 to 8 each) over two
    # ticks, and the same tokens in the same time are a ratio of 1
    tokens = res["ours_tokens_per_s"] * 2e-3
    assert tokens == pytest.approx(round(tokens)) and 2 <= round(tokens) <= 16
    assert res["hf_tokens_per_s"] == pytest.approx(res["ours_tokens_per_s"]) and res["ratio"] == pytest.approx(1.0)
