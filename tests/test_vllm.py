"""vLLM beside confu in `confu bench` (methods `vllm`, `vllm-eagle3:DIR`).

Fast tests (in `make test`): the method syntax, the rounds rebuilt from vLLM's counters, the error without vLLM's
virtualenv, and a whole bench run on the tiny Llama through the real worker script, with a stub `vllm` package
standing in for vLLM. Interop tests (`make test-vllm`, after `make anchors`): real vLLM on the embedded target with
the shipped EAGLE-3 draft.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from confu.bench.specbench import BenchConfig, parse_methods, run_bench
from confu.bench.vllm_engine import (
    ARGS_ENV,
    PYTHON_ENV,
    SPECULATIVE_TOKENS,
    export_eagle3,
    rounds_from_counters,
    vllm_python,
)
from confu.cli import main
from confu.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_EAGLE3 = REPO / "drafts" / "smollm2-135m-eagle3"

# A stand-in for vLLM, for the worker script run by confu's own python: it answers with tokens that depend only
# on the prompt, and per request counts three draft rounds, accepting 0, 1 and 3 tokens.
STUB_VLLM = '''
import json
from pathlib import Path
from types import SimpleNamespace

__version__ = "stub"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class LLM:
    def __init__(self, model, speculative_config=None, disable_log_stats=True, **kwargs):
        assert not disable_log_stats, "the counters are log stats"
        assert kwargs["enforce_eager"] is True, "the test's CONFU_VLLM_ARGS"
        self.drafts, self.per_pos = 0, []
        if speculative_config is not None:
            draft = json.loads((Path(speculative_config["model"]) / "config.json").read_text())
            assert draft["speculators_model_type"] == "eagle3", draft
            assert speculative_config["num_speculative_tokens"] == 3
            self.per_pos = [0, 0, 0]

    def generate(self, prompts, params, use_tqdm=True):
        ids = prompts[0]["prompt_token_ids"]
        tokens = [10 + (len(ids) + i) % 50 for i in range(params.max_tokens)]
        if self.per_pos:
            self.drafts += 3
            self.per_pos = [self.per_pos[0] + 2, self.per_pos[1] + 1, self.per_pos[2] + 1]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason="length")])]

    def get_metrics(self):
        if not self.per_pos:
            return []
        return [SimpleNamespace(name="vllm:spec_decode_num_drafts", value=self.drafts),
                SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=list(self.per_pos))]
'''
STUB_INPUTS = "def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers."]


def test_parse_vllm_methods():
    specs = parse_methods("vllm,vllm-eagle3:/x/e3_run,vllm-eagle3:/y/d=lab")
    assert [(s.kind, s.label, s.draft_dir) for s in specs] == [
        ("vllm", "vllm", None), ("vllm-eagle3", "vllm-e3_run", "/x/e3_run"), ("vllm-eagle3", "lab", "/y/d")]
    for bad in ("vllm-eagle3", "vllm-eagle3:", "vllm-eagle3+match:/x", "vllm:/x"):
        with pytest.raises(InputError, match="vllm-eagle3:DIR"):
            parse_methods(bad)


def test_rounds_from_counters():
    # 4 drafts; 3 accepted a first token, 1 of them a second, none a third: rounds accepted 0, 1, 1 and 2
    assert [r.accepted for r in rounds_from_counters(4, [3, 1, 0])] == [0, 1, 1, 2]
    assert {r.depth for r in rounds_from_counters(4, [3, 1, 0])} == {3}
    assert rounds_from_counters(0, []) == []
    assert rounds_from_counters(0, [0, 0, 0]) == []


def test_without_vllm_the_methods_name_make_anchors(monkeypatch, tiny_llama_dir, tmp_path, capsys):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(InputError, match="make anchors"):
        vllm_python()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there.\n")
    argv = ["bench", "--target", str(tiny_llama_dir), "--methods", "ar,vllm", "--questions", str(prompts),
            "--max-new-tokens", "4", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert "make anchors" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.fixture
def stub_vllm(monkeypatch, tmp_path) -> None:
    """The worker runs under confu's own python, which finds the stub as `vllm`."""
    package = tmp_path / "stub" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(STUB_VLLM))
    (package / "inputs.py").write_text(STUB_INPUTS)
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    monkeypatch.setenv(ARGS_ENV, '{"enforce_eager": true}')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(package.parent),
                                                                  os.environ.get("PYTHONPATH")])))


def test_bench_runs_vllm_methods_through_the_worker(stub_vllm, tiny_llama_dir, tiny_drafts, tmp_path):
    e3, _ = tiny_drafts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    cfg = BenchConfig(target=str(tiny_llama_dir), methods=f"ar,vllm,vllm-eagle3:{e3}=v-e3", questions=str(prompts),
                      out=str(tmp_path / "run"), max_new_tokens=6, progress=False)
    res = run_bench(cfg)

    records = {(r["method"], r["question_id"]): r for r in res["records"]}
    for method in ("vllm", "v-e3"):
        for qid in (1, 2):
            rec = records[(method, qid)]
            turn = rec["turns"][0]
            assert turn["tokens"] == [10 + (turn["prompt_tokens"] + i) % 50 for i in range(6)]
            assert turn["stop_reason"] == "max_new_tokens"
            assert rec["tree_nodes"] is None and rec["tokens_per_s"] > 0
    assert records[("vllm", 1)]["steps"] is None
    assert records[("v-e3", 1)]["steps"] == {"accepted": [0, 1, 3], "depth": [3, 3, 3]}

    settings = {s["method"]: s for s in res["summary"]["settings"]}
    assert settings["vllm"]["avg"]["tau"] == 1.0
    assert settings["v-e3"]["avg"]["tau"] == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3 rounds
    rates = [p["rate"] for p in settings["v-e3"]["acceptance"]["per_depth"]]
    assert rates[:3] == pytest.approx([2 / 3, 1 / 2, 1.0]) and rates[3:] == [None] * (len(rates) - 3)
    assert settings["v-e3"]["greedy_identity_vs_vllm"] == {"compared": 2, "identical": 2}
    assert settings["v-e3"]["timing"]["rounds"] == 0  # vLLM's rounds carry no clocks
    assert res["run"]["vllm"]["v-e3"]["version"] == "stub"
    assert res["run"]["vllm"]["v-e3"]["speculative_tokens"] == SPECULATIVE_TOKENS
    assert res["run"]["vllm"]["v-e3"]["extra_args"] == {"enforce_eager": True}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "`v-e3`: vLLM stub" in report and "2/2 questions identical to `vllm`" in report


def test_vllm_eagle3_refuses_a_confu_draft(tiny_llama_dir, tiny_drafts, tmp_path):
    from confu.engine.target import Target

    _, cf = tiny_drafts
    with pytest.raises(InputError, match="'confu' draft"):
        export_eagle3(Target.load(str(tiny_llama_dir)), str(cf), tmp_path / "out")


# -- interop with the real vLLM -------------------------------------------------------------------------------


def _interop_skip_reason() -> str | None:
    if not os.environ.get("CONFU_TEST_VLLM"):
        return "vLLM interop runs under `make test-vllm` (it starts vLLM twice: minutes)"
    try:
        vllm_python()
    except InputError as err:
        return str(err)
    return None


SKIP_REASON = _interop_skip_reason()
interop = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


@pytest.fixture(scope="module")
def vllm_bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short bench run on the embedded target: our plain decoding, vLLM's, and vLLM with our EAGLE-3 draft."""
    out = tmp_path_factory.mktemp("vllm_bench")
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = BenchConfig(target="smollm2-135m", methods=f"ar,vllm,vllm-eagle3:{SHIPPED_EAGLE3}=vllm-e3",
                      questions=str(prompts), out=str(out / "run"), max_new_tokens=24, warmup=0, progress=False)
    return run_bench(cfg)


@pytest.mark.vllm
@interop
def test_vllm_eagle3_greedy_equals_vllm_plain(vllm_bench):
    tokens = {(r["method"], r["question_id"]): r["turns"][0]["tokens"] for r in vllm_bench["records"]}
    for qid in range(1, len(PROMPTS) + 1):
        assert tokens[("vllm-e3", qid)] == tokens[("vllm", qid)]
    settings = {s["method"]: s for s in vllm_bench["summary"]["settings"]}
    assert settings["vllm-e3"]["greedy_identity_vs_vllm"] == {"compared": 3, "identical": 3}


@pytest.mark.vllm
@interop
def test_vllm_methods_report_speed_and_acceptance(vllm_bench):
    for rec in vllm_bench["records"]:
        assert rec["tokens_per_s"] > 0 and rec["new_tokens"] > 0
    settings = {s["method"]: s for s in vllm_bench["summary"]["settings"]}
    assert settings["vllm"]["avg"]["tau"] == 1.0
    e3 = settings["vllm-e3"]
    assert 1.0 < e3["avg"]["tau"] <= 1 + SPECULATIVE_TOKENS  # the shipped draft is accepted, some of the time
    assert e3["acceptance"]["per_depth"][0]["reached"] > 0 and e3["acceptance"]["per_depth"][0]["rate"] > 0
    assert vllm_bench["run"]["vllm"]["vllm-e3"]["version"] == "0.32.0"
    report = (Path(vllm_bench["run"]["questions"]).parent / "run" / "report.md").read_text()
    assert "| vllm-e3 |" in report and "identical to `vllm`" in report
