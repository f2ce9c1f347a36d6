"""The Spec-Bench harness (`confu bench`): tau and speed-up of ar / hf / EAGLE-3 / ConFu per category.

`confu bench` runs every question x method x setting (temperatures x tree sizes; `ar` / `hf` once per
temperature), interleaved per question so machine drift hits all methods alike, after untimed warm-up runs.
Records are appended to `records.jsonl` in the output directory one question at a time, so a re-run with the
same directory resumes where it stopped. Metrics and the report live in `confu.bench.report`.

`--repeats R` times every question R times, the methods interleaved within each repeat; a record's tokens,
rounds and τ are its first run's, its tokens/s the mean over the R runs, and `timings` keeps every run so
the report's intervals on speed-ups carry the run-to-run noise. Each decoder runs with a stage clock
(`confu.bench.probes`): per-round stage times, the KV tensors it allocated and, for ConFu, its routers'
decisions go into the record of the first run.

torch and the engine are imported inside functions: `confu --help` must stay fast.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

from confu.bench.markdown import render_report
from confu.bench.plots import write_plots
from confu.bench.probes import RouterTap, StageClock, kv_footprint, peak_rss_bytes
from confu.bench.report import NO_ROUND_KINDS, summarize
from confu.bench.timing import timed
from confu.bench.vllm_engine import VLLM, VLLM_EAGLE3, VllmEngine, VllmRound
from confu.chat import encode_prompt, read_prompts_file
from confu.engine.registry import HEAD_METHODS, MATCH
from confu.errors import InputError

if TYPE_CHECKING:
    from confu.engine.generate import Decoder, GenerationConfig
    from confu.engine.sampling import SamplingConfig
    from confu.engine.target import Target

RECORDS_NAME = "records.jsonl"
RUN_NAME = "run.json"
# Decoding options that change what a record means: a resumed run must use the same ones.
PINNED_OPTIONS = ("target", "numerics", "max_new_tokens", "top_p", "top_k", "depth", "topk", "contemplate",
                  "zero_future", "seed", "repeats")
# Per-round fields of `StepRecord` kept in a record, as parallel lists over rounds.
STEP_FIELDS = ("accepted", "tree_nodes", "depth", "contemplate_slots", "verify_tokens", "draft_s", "verify_s",
               "nodes_by_source", "accepted_sources")


# -- methods and questions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    kind: str  # ar | hf | match | a head method (`HEAD_METHODS`), alone or +match | vllm | vllm-eagle3
    label: str
    draft_dir: str | None = None


def parse_methods(text: str) -> list[MethodSpec]:
    """`ar,hf,match,eagle3[+match]:DIR[=label],confu[+match]:DIR[=label],vllm,vllm-eagle3:DIR[=label]` -> specs;
    labels default to the directory's name (+match; vllm-NAME for vLLM's)."""
    specs: list[MethodSpec] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item in ("ar", "hf", MATCH, VLLM):
            specs.append(MethodSpec(item, item))
            continue
        kind, sep, rest = item.partition(":")
        head_kind = kind.removesuffix("+" + MATCH)
        if not sep or not rest or (head_kind not in HEAD_METHODS and kind != VLLM_EAGLE3):
            heads = ", ".join(f"{name}[+match]:DIR[=label]" for name in HEAD_METHODS)
            raise InputError(f"--methods: {item!r} is not ar, hf, match, {heads}, {VLLM} or "
                             f"{VLLM_EAGLE3}:DIR[=label]")
        path, eq, label = rest.rpartition("=")
        if not eq or "/" in label or not label:  # no '=label' (a path may itself contain '=')
            name = Path(rest.rstrip("/")).name
            path, label = rest, (f"{VLLM}-{name}" if kind == VLLM_EAGLE3 else name + kind[len(head_kind):])
        specs.append(MethodSpec(kind, label, path))
    if not specs:
        raise InputError("--methods is empty")
    labels = Counter(s.label for s in specs)
    if dup := [lab for lab, n in labels.items() if n > 1]:
        raise InputError(f"--methods: duplicate labels {dup}; give each draft its own with DIR=label")
    return specs


@dataclass(frozen=True)
class Question:
    question_id: Any
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path, categories: Sequence[str] | None = None,
                   limit_per_category: int | None = None) -> list[Question]:
    """Spec-Bench JSONL (`question_id`, `category`, `turns`), filtered, in file order. A `.txt` file is a
    prompt file instead (`confu generate --prompt-file`: one prompt per line, `#` comments): each prompt is
    a one-turn question of category "prompts", numbered from 1."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"question file not found: {p}")
    wanted = set(categories) if categories else None
    taken: Counter[str] = Counter()
    seen: set[str] = set()
    out: list[Question] = []
    for where, q in _prompt_file_questions(p) if p.suffix == ".txt" else _spec_bench_questions(p):
        if not q.turns:
            raise InputError(f"{where}: question {q.question_id} has no turns")
        if wanted is not None and q.category not in wanted:
            continue
        if limit_per_category is not None and taken[q.category] >= limit_per_category:
            continue
        if str(q.question_id) in seen:  # results are keyed by it
            raise InputError(f"{where}: question_id {q.question_id} appears twice")
        seen.add(str(q.question_id))
        taken[q.category] += 1
        out.append(q)
    if wanted is not None and (missing := sorted(wanted - set(taken))):
        raise InputError(f"no questions of categories {missing} in {p}")
    if not out:
        raise InputError(f"no questions selected from {p}")
    return out


def _spec_bench_questions(p: Path) -> Iterator[tuple[str, Question]]:
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            q = Question(rec["question_id"], str(rec["category"]), tuple(str(t) for t in rec["turns"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{p}:{n}: not a Spec-Bench question record ({err})") from err
        yield f"{p}:{n}", q


def _prompt_file_questions(p: Path) -> Iterator[tuple[str, Question]]:
    for i, prompt in enumerate(read_prompts_file(str(p)), 1):
        yield f"{p} prompt {i}", Question(i, "prompts", (prompt,))


def encode_turn(tokenizer, history: Sequence[tuple[str, str]], question: str) -> list[int]:
    """Prompt ids for the next turn: earlier (question, answer) pairs go back in as user / assistant turns."""
    if not history:
        return encode_prompt(tokenizer, question, raw=False)
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True).input_ids


def turn_seed(seed: int, question_id: Any, turn: int) -> int:
    """A per question and turn seed, stable across runs (hash() of a str is salted per process)."""
    return (seed * 1_000_003 + zlib.crc32(f"{question_id}:{turn}".encode())) % (2**31)


# -- one generation ------------------------------------------------------------------------------------------


def hf_generate(target: Target, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
                seed: int | None = None) -> list[int]:
    """transformers `generate` on the target's own model, counting new tokens up to and including EOS as ours.

    It runs the model as transformers loads it (`Target.reference_model`: no quantized kernels), which is
    the baseline a user of `generate()` has.

    Every sampling option is passed explicitly: in transformers 5 only options left unset fall back to the
    model's `generation_config`, whose defaults (top_k, repetition penalty...) could differ from ours.
    """
    import torch

    eos = sorted(target.eos_ids)
    room = max(1, min(max_new_tokens, target.max_context - len(prompt_ids)))
    kwargs: dict[str, Any] = {"max_new_tokens": room, "min_new_tokens": 0, "num_beams": 1,
                              "repetition_penalty": 1.0, "eos_token_id": eos, "pad_token_id": eos[0]}
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k)
        if seed is not None:
            torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = target.reference_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = out[0, len(prompt_ids):].tolist()
    for i, tok in enumerate(new):
        if tok in target.eos_ids:
            return new[: i + 1]
    return new


@dataclass
class LoadedMethod:
    spec: MethodSpec
    decoder: Decoder | None  # None for hf and vLLM
    clock: StageClock | None = None  # the decoder's hooks
    tap: RouterTap | None = None  # a ConFu decoder's [con] / [f] routers
    engine: VllmEngine | None = None  # vLLM's methods

    def __post_init__(self) -> None:
        if self.decoder is not None:
            self.clock = StageClock()
            self.decoder.hooks = self.clock
            tap = RouterTap(self.decoder)
            self.tap = tap if tap.active else None


def load_methods(target: Target, specs: Sequence[MethodSpec]) -> list[LoadedMethod]:
    from confu.engine.checkpoint import read_config
    from confu.engine.convert import load_draft
    from confu.engine.generate import Decoder
    from confu.engine.matcher import MatchConfig

    loaded = []
    for spec in specs:
        match = MatchConfig() if spec.kind.endswith(MATCH) else None
        if spec.kind in (VLLM, VLLM_EAGLE3):
            loaded.append(LoadedMethod(spec, None, engine=VllmEngine(target, spec.draft_dir)))
            continue
        if spec.kind in ("ar", "hf", MATCH):
            dec = Decoder.for_head(target, None, match) if spec.kind != "hf" else None
            loaded.append(LoadedMethod(spec, dec))
            continue
        kind = spec.kind.removesuffix("+" + MATCH)
        method = read_config(spec.draft_dir).method
        if method != kind:
            raise InputError(f"--methods: {spec.kind}:{spec.draft_dir} holds a {method!r} draft, not {kind!r}")
        head = load_draft(spec.draft_dir, target)
        loaded.append(LoadedMethod(spec, Decoder.for_head(target, head, match)))
    for lm in loaded:  # last: vLLM takes tens of seconds to start, and every draft has been checked by now
        if lm.engine is not None:
            lm.engine.start()
    return loaded


# -- the Spec-Bench run --------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    target: str
    methods: list[MethodSpec]
    questions: str
    out: str
    numerics: str = "auto"  # `Target(numerics=...)`
    categories: list[str] | None = None
    limit_per_category: int | None = None
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    tree_nodes: list[int | str] = field(default_factory=lambda: ["auto"])  # counts and/or "auto"
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 0
    depth: int = 6
    topk: int = 8
    contemplate: int | None = None  # None = a slot on every node
    zero_future: bool = False  # ConFu probe: f = 0 (`GenerationConfig.zero_future`)
    seed: int = 0
    warmup: int = 1
    repeats: int = 1  # timed runs of every question x method x setting
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = parse_methods(self.methods)
        if not self.temperatures or not self.tree_nodes:
            raise InputError("--temperatures and --tree-nodes need at least one value each")
        if any(n != "auto" and (not isinstance(n, int) or n < 1) for n in self.tree_nodes):
            raise InputError(f"--tree-nodes must be 'auto' or >= 1 (got {self.tree_nodes})")
        if self.warmup < 0 or (self.limit_per_category is not None and self.limit_per_category < 1):
            raise InputError("--warmup must be >= 0 and --limit-per-category >= 1")
        if self.repeats < 1:
            raise InputError(f"--repeats must be >= 1 (got {self.repeats})")


@dataclass(frozen=True)
class Run:
    """One method x setting; `ar` / `hf` have no tree size."""

    method: LoadedMethod
    temperature: float
    tree_nodes: int | None

    def key(self, question_id: Any) -> str:
        return record_key(question_id, self.method.spec.label, self.temperature, self.tree_nodes)


def record_key(question_id: Any, method: str, temperature: float, tree_nodes: int | None) -> str:
    return json.dumps([str(question_id), method, float(temperature), tree_nodes])


class ResultStore:
    """`records.jsonl`: every finished record; appended per question and fsynced, read back on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        self._needs_newline = False
        if not path.is_file():
            return
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that question simply runs again
            self.records[record_key(rec["question_id"], rec["method"], rec["temperature"],
                                    rec.get("tree_nodes"))] = rec
        self._needs_newline = bool(text) and not text.endswith("\n")

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            if self._needs_newline:
                f.write("\n")
                self._needs_newline = False
            for rec in records:
                f.write(json.dumps(rec) + "\n")
                self.records[record_key(rec["question_id"], rec["method"], rec["temperature"],
                                        rec.get("tree_nodes"))] = rec
            f.flush()
            os.fsync(f.fileno())


def _check_run_file(out: Path, cfg: BenchConfig) -> dict:
    """Write `run.json` on the first run; refuse to resume with options that would change the records."""
    pinned = {k: getattr(cfg, k) for k in PINNED_OPTIONS}
    drafts = {m.label: str(Path(m.draft_dir).resolve()) for m in cfg.methods if m.draft_dir}
    path = out / RUN_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        before = {"numerics": "auto", "repeats": 1, "zero_future": False, **old["pinned"]}  # options older files lacked
        diff = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in pinned.items() if before.get(k) != v]
        diff += [f"label {lab}: {old['drafts'][lab]} -> {d}" for lab, d in drafts.items()
                 if old["drafts"].get(lab, d) != d]
        if diff:
            raise InputError(f"{out} holds results made with other options ({'; '.join(diff)}); "
                             "use another --out or the same options")
        drafts = {**old["drafts"], **drafts}
    path.write_text(json.dumps({"pinned": pinned, "drafts": drafts}, indent=2) + "\n")
    return pinned


class BenchRunner:
    def __init__(self, target: Target, cfg: BenchConfig):
        self.target = target
        self.cfg = cfg

    def generation_config(self, temperature: float, tree_nodes: int | str | None, seed: int) -> GenerationConfig:
        from confu.engine.generation_config import GenerationConfig, tree_setting
        from confu.engine.sampling import SamplingConfig

        c = self.cfg
        tree, auto = tree_setting(tree_nodes or 1, c.depth, c.topk)
        return GenerationConfig(
            max_new_tokens=c.max_new_tokens,
            sampling=SamplingConfig(temperature, c.top_p, c.top_k),
            tree=tree,
            auto_tree=auto,
            contemplate=c.contemplate,
            zero_future=c.zero_future,
            seed=seed,
        )

    def _generate(self, run: Run, ids: list[int], seed: int) -> tuple[list[int], float, str, Any]:
        """One turn: (new tokens, wall seconds, stop reason, the decoder's or vLLM's result, None for hf)."""
        from confu.engine.sampling import SamplingConfig

        lm = run.method
        sampling = SamplingConfig(run.temperature, self.cfg.top_p, self.cfg.top_k)
        if lm.engine is not None:
            turn = lm.engine.generate(ids, self.cfg.max_new_tokens, sampling, seed)
            return turn.tokens, turn.wall_s, turn.stop_reason, turn
        if lm.decoder is None:
            tokens, wall = timed(partial(hf_generate, self.target, ids, self.cfg.max_new_tokens, sampling, seed))
            return tokens, wall, "eos" if tokens and tokens[-1] in self.target.eos_ids else "max_new_tokens", None
        gcfg = self.generation_config(run.temperature, run.tree_nodes, seed)
        res, wall = timed(partial(lm.decoder.generate, ids, gcfg))
        return res.tokens, wall, res.stop_reason, res

    def run(self, run: Run, q: Question) -> dict:
        """Every turn of one question with one method x setting; the record `confu.bench.report` summarizes."""
        from confu.engine.generate import STAGES

        lm, tok = run.method, self.target.tokenizer
        history: list[tuple[str, str]] = []
        turns: list[dict] = []
        fields = STEP_FIELDS if lm.decoder is not None else VllmRound._fields  # vLLM's: what its counters tell
        steps: dict[str, Any] | None = None if lm.spec.kind in NO_ROUND_KINDS else {k: [] for k in fields}
        memory: dict[str, int] = {}
        if lm.clock is not None:
            lm.clock.reset()
        for i, text in enumerate(q.turns):
            ids = encode_turn(tok, history, text)
            tokens, wall, stop, res = self._generate(run, ids, turn_seed(self.cfg.seed, q.question_id, i))
            if res is not None:
                for s in res.steps:
                    for k in fields:
                        steps[k].append(getattr(s, k))
            if lm.decoder is not None:
                turn_memory = kv_footprint(lm.clock.cache, lm.decoder.proposer)
                memory = {k: max(v, memory.get(k, 0)) for k, v in turn_memory.items()}
            answer = tok.decode(tokens, skip_special_tokens=True).strip()
            history.append((text, answer))
            turns.append({"prompt_tokens": len(ids), "new_tokens": len(tokens), "wall_s": wall,
                          "stop_reason": stop, "tokens": tokens, "text": answer})
        if lm.clock is not None:
            steps["stage_s"] = lm.clock.by_stage(STAGES)
        new_tokens = sum(t["new_tokens"] for t in turns)
        wall_s = sum(t["wall_s"] for t in turns)
        return {
            "question_id": q.question_id, "category": q.category, "method": lm.spec.label,
            "kind": lm.spec.kind, "draft_dir": lm.spec.draft_dir, "temperature": run.temperature,
            "tree_nodes": run.tree_nodes, "new_tokens": new_tokens, "wall_s": wall_s,
            "tokens_per_s": new_tokens / wall_s if wall_s > 0 else 0.0, "turns": turns, "steps": steps,
            "timings": [{"new_tokens": new_tokens, "wall_s": wall_s}], "memory": memory or None,
            "routing": lm.tap.take() if lm.tap is not None else None,
        }

    def retime(self, run: Run, q: Question, record: dict) -> None:
        """Time the question again on the prompts of the record's first run; its tokens/s becomes the mean."""
        history: list[tuple[str, str]] = []
        new_tokens, wall_s = 0, 0.0
        for i, (text, turn) in enumerate(zip(q.turns, record["turns"], strict=True)):
            ids = encode_turn(self.target.tokenizer, history, text)
            tokens, wall, _, _ = self._generate(run, ids, turn_seed(self.cfg.seed, q.question_id, i))
            history.append((text, turn["text"]))
            new_tokens += len(tokens)
            wall_s += wall
        if run.method.tap is not None:
            run.method.tap.take()  # its first run's decisions are the record's
        record["timings"].append({"new_tokens": new_tokens, "wall_s": wall_s})
        record["tokens_per_s"] = fmean(t["new_tokens"] / t["wall_s"] for t in record["timings"] if t["wall_s"] > 0)


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs"


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes results.json, report.md, plots; returns results + summary."""
    from confu.engine.target import Target

    questions = load_questions(cfg.questions, cfg.categories, cfg.limit_per_category)
    target = Target.load(cfg.target, numerics=cfg.numerics)
    methods = load_methods(target, cfg.methods)  # checks every draft before anything is written
    try:
        return _run_loaded(cfg, questions, target, methods)
    finally:
        for m in methods:
            if m.engine is not None:
                m.engine.close()


def _run_loaded(cfg: BenchConfig, questions: list[Question], target: Target,
                methods: list[LoadedMethod]) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from confu.engine.quant import draft_numerics
    from confu.engine.sizing import load_verify_costs

    loaded_rss = peak_rss_bytes()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, cfg)
    runs = []
    for t in cfg.temperatures:
        for m in methods:
            # vLLM drafts fixed chains: tree sizes are confu's alone
            sizes: list[int | None] = [None] if m.spec.kind in ("ar", "hf", VLLM, VLLM_EAGLE3) else list(cfg.tree_nodes)
            runs += [Run(m, float(t), n) for n in sizes]
    store = ResultStore(out / RECORDS_NAME)
    todo = [(q, [r for r in runs if r.key(q.question_id) not in store.records]) for q in questions]
    todo = [(q, rs) for q, rs in todo if rs]
    n_todo = sum(len(rs) for _, rs in todo)
    runner = BenchRunner(target, cfg)
    if n_todo and cfg.warmup:
        # Untimed: the first calls pay for allocator growth and kernel selection, not for decoding.
        warm = tqdm(total=cfg.warmup * len(runs), desc="warm-up", disable=not cfg.progress, file=sys.stderr)
        for run in runs:
            for _ in range(cfg.warmup):
                runner.run(run, questions[0])
                warm.update()
        warm.close()
    bar = tqdm(total=n_todo, desc="bench", unit="run", disable=not cfg.progress, file=sys.stderr)
    for q, q_runs in todo:
        # Every method x setting on this question in turn, so machine drift hits all of them alike.
        recs = []
        for run in q_runs:
            recs.append(runner.run(run, q))
            bar.update()
        for _ in range(cfg.repeats - 1):
            for run, rec in zip(q_runs, recs, strict=True):
                runner.retime(run, q, rec)
        store.append(recs)
    bar.close()

    records = [store.records[r.key(q.question_id)] for q in questions for r in runs]
    # The verify pass's cost against its rows (tree sizing's cached curve): what splits a pass's time between
    # its verify rows and its contemplate rows.
    costs = load_verify_costs(target)
    summary = summarize(records, max_depth=cfg.depth, verify_costs=(costs.rows, costs.seconds))
    run_info = {
        "target": cfg.target, "methods": [asdict(m) for m in cfg.methods], "questions": str(cfg.questions),
        "n_questions": len(questions), "questions_per_category": dict(Counter(q.category for q in questions)),
        "temperatures": cfg.temperatures, "tree_nodes": cfg.tree_nodes, "max_new_tokens": cfg.max_new_tokens,
        "top_p": cfg.top_p, "top_k": cfg.top_k, "depth": cfg.depth, "topk": cfg.topk,
        "contemplate": "all" if cfg.contemplate is None else cfg.contemplate, "zero_future": cfg.zero_future,
        "seed": cfg.seed,
        "warmup": cfg.warmup, "repeats": cfg.repeats, "machine": _machine(),
        "rss_after_load_bytes": loaded_rss, "peak_rss_bytes": peak_rss_bytes(), "numerics": runner.target.numerics,
        "draft_numerics": draft_numerics(runner.target.device), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "ran": n_todo, "resumed": len(questions) * len(runs) - n_todo,
        "vllm": {m.spec.label: m.engine.describe() for m in methods if m.engine is not None} or None,
    }
    plots = write_plots(summary, out)
    (out / "report.md").write_text(render_report(summary, run_info, plots), encoding="utf-8")
    results = {"run": run_info, "summary": summary, "records": records}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return {**results, "files": ["results.json", "report.md", RECORDS_NAME, *plots]}
