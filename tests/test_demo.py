"""`make demo` (scripts/demo.py) on the tiny random Llama: the verify-cost curve tree sizing reads is measured
before the first timed generation, once, and the demo says so once."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from confu.engine import sizing
from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder
from tests.helpers import load_target

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_the_cost_curve_is_measured_before_any_timed_generation(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setenv("CONFU_CACHE", str(tmp_path / "cache"))  # a fresh machine: no curve cached
    events: list[str] = []
    measure, generate = sizing.measure_verify_costs, Decoder.generate
    monkeypatch.setattr(sizing, "measure_verify_costs", lambda target: events.append("measure") or measure(target))
    monkeypatch.setattr(Decoder, "generate", lambda self, *args: events.append("generate") or generate(self, *args))
    monkeypatch.setattr(demo, "Target", SimpleNamespace(load=lambda name: load_target(tiny_llama_dir)))
    monkeypatch.setattr(demo, "ROOT", tmp_path)  # no shipped drafts: untrained heads
    monkeypatch.setattr(demo, "new_draft", lambda target, method, **_: new_draft(target, method, draft_vocab_size=256))
    monkeypatch.setattr(demo, "PROMPTS", demo.PROMPTS[:1])
    demo.main()
    assert events[0] == "measure" and events.count("measure") == 1, events
    assert events.count("generate") > 2
    assert capsys.readouterr().out.count("verify-cost curve") == 1
