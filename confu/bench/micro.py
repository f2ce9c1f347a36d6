"""Component benchmarks on one prompt set: plain decoding vs transformers `generate()` (`confu bench-ar`) and
the cost of one verify pass with and without contemplate slots (`confu bench-verify`).

Both interleave their variants per repeat (so machine drift hits all alike) and report medians.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from confu.bench.specbench import hf_generate
from confu.bench.timing import measure_interleaved
from confu.chat import encode_prompt
from confu.engine.tree import TreeConfig
from confu.errors import InputError

if TYPE_CHECKING:
    from confu.engine.generate import Decoder, GenerationConfig
    from confu.engine.target import Target


# -- bench-ar: plain decoding vs transformers generate -------------------------------------------------------

# Our own prompts (not Spec-Bench), chosen to make a small chat model write a long answer.
AR_PROMPTS = (
    "Describe, step by step, how the gears on a bicycle help a rider climb a steep hill.",
    "Write a short story about a lighthouse keeper who finds an old letter inside a glass bottle.",
    "Explain the difference between a list and a tuple in Python, with a small example of each.",
    "Plan a relaxed three-day visit to a mountain village, with one idea for every morning and evening.",
)


def _load_target(target: Target | str, numerics: str) -> Target:
    if isinstance(target, str):
        from confu.engine.target import Target

        return Target.load(target, numerics=numerics)
    return target


def _profile_text(fn, top: int = 18) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _our_tokens(decoder: Decoder, prompt_ids: list[int], cfg: GenerationConfig) -> list[int]:
    return decoder.generate(prompt_ids, cfg).tokens


def run_bench_ar(target: Target | str, prompts: Sequence[str] = AR_PROMPTS, max_new_tokens: int = 64,
                 repeats: int = 3, warmup: int = 1, profile: bool = False, numerics: str = "auto") -> dict[str, Any]:
    """Greedy tokens/s of `Decoder.for_head(target, None)` vs `model.generate(do_sample=False)`, interleaved.
    `numerics` (a target named by a string): how ours runs; `generate` always runs transformers' own modules."""
    from confu.engine.generate import Decoder, GenerationConfig
    from confu.engine.sampling import SamplingConfig

    target = _load_target(target, numerics)
    decoder = Decoder.for_head(target, None)
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingConfig(0.0))
    greedy = SamplingConfig(0.0)
    ids = [encode_prompt(target.tokenizer, p, raw=False) for p in prompts]
    fns = {}
    for i, prompt_ids in enumerate(ids):
        fns[(i, "ours")] = partial(_our_tokens, decoder, prompt_ids, gcfg)
        fns[(i, "hf")] = partial(hf_generate, target, prompt_ids, max_new_tokens, greedy)
    timings = measure_interleaved(fns, warmup=warmup, repeats=repeats)
    rows = []
    for i in range(len(ids)):
        ours, hf = timings[(i, "ours")], timings[(i, "hf")]
        a, b = ours.result, hf.result
        first_diff = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                          None if len(a) == len(b) else min(len(a), len(b)))
        rows.append({
            "prompt": i, "prompt_tokens": len(ids[i]), "ours_tokens": len(a), "hf_tokens": len(b),
            "ours_ms": 1000 * ours.median, "hf_ms": 1000 * hf.median,
            "ours_best_ms": 1000 * ours.min, "hf_best_ms": 1000 * hf.min,
            "ours_tokens_per_s": len(a) / ours.median, "hf_tokens_per_s": len(b) / hf.median,
            "identical": first_diff is None, "first_difference": first_diff,
        })

    def rate(side: str, stat: str) -> float:
        return sum(r[f"{side}_tokens"] for r in rows) / sum(r[f"{side}_{stat}"] / 1000 for r in rows)

    ours_tps, hf_tps = rate("ours", "ms"), rate("hf", "ms")
    # On a shared machine other processes only ever add time, so best-of-R is the cleaner view of the
    # intrinsic cost; the median is the headline, as in every other benchmark here.
    ours_best, hf_best = rate("ours", "best_ms"), rate("hf", "best_ms")
    result: dict[str, Any] = {
        "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps, "ratio": ours_tps / hf_tps,
        "ours_best_tokens_per_s": ours_best, "hf_best_tokens_per_s": hf_best,
        "best_ratio": ours_best / hf_best,
        "within_10pct": ours_tps >= 0.9 * hf_tps, "identical": all(r["identical"] for r in rows),
        "max_new_tokens": max_new_tokens, "repeats": repeats, "rows": rows,
    }
    if profile:
        result["profile_ours"] = _profile_text(fns[(0, "ours")])
        result["profile_hf"] = _profile_text(fns[(0, "hf")])
    return result


# -- bench-verify: one verify pass, with and without contemplate slots ---------------------------------------

VERIFY_PROMPT = ("Explain how a refrigerator keeps food cold, covering the compressor, the refrigerant and "
                 "why the coils at the back feel warm.")


def parse_budgets(text: str) -> list[int | None]:
    """`all,1,4,8` -> [None, 1, 4, 8] (None = a slot on every node)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError as err:
            raise InputError(f"--budgets: {part!r}: --contemplate takes 'all' or a number of slots") from err
    return out


def budget_name(budget: int | None) -> str:
    return "confu all" if budget is None else f"confu {budget}"


def run_bench_verify(target: Target | str, nodes: Sequence[int] = (16, 32, 60),
                     budgets: Sequence[int | None] = (None, 1, 4, 8), repeats: int = 5, warmup: int = 1,
                     eagle3_dir: str | None = None, confu_dir: str | None = None, depth: int = 6,
                     topk: int = 8, prompt: str = VERIFY_PROMPT, seed: int = 0,
                     numerics: str = "auto") -> dict[str, Any]:
    """Median wall time of one verification (target pass + greedy acceptance) for trees of each size, plain
    vs with contemplate slots, against a one-token step (the same, with no tree).

    Acceptance is timed too because logits are computed per row on first read: a pass's cost includes the
    rows verification reads. One tree per size, drafted on a real prompt, is shared by every column, so the
    columns differ only in the contemplate slots the pass carries. Untrained heads (`new_draft`) stand in for
    missing checkpoints: the pass's cost depends on the number of rows, not on how good the draft is.
    """
    import torch

    from confu.engine.checkpoint import new_draft
    from confu.engine.convert import load_draft
    from confu.engine.generate import Decoder, GenerationConfig
    from confu.engine.methods import ContemplateSlots

    target = _load_target(target, numerics)
    vocab = min(8192, target.vocab_size)

    def head_for(method: str, path: str | None):
        return load_draft(path, target) if path else new_draft(target, method, draft_vocab_size=vocab, seed=seed)

    eagle, confu = head_for("eagle3", eagle3_dir), head_for("confu", confu_dir)
    if (eagle.cfg.method, confu.cfg.method) != ("eagle3", "confu"):
        raise InputError("--draft-eagle3 must hold an eagle3 draft and --draft-confu a confu draft")
    prompt_ids = torch.tensor(encode_prompt(target.tokenizer, prompt, raw=False), device=target.device)
    gcfg = GenerationConfig(max_new_tokens=1, tree=TreeConfig(total_nodes=max(nodes), depth=depth, topk=topk))
    with torch.no_grad():
        # The plain pass (EAGLE-3 column) and its trees, from the eagle3 head.
        plain = Decoder.for_head(target, eagle)
        plain_cache, plain_state = plain.begin_sequence(prompt_ids, gcfg, None)
        trees = {n: plain.proposer.propose(max_nodes=n, depth=depth) for n in nodes}
        # The ConFu side: the verify extension alone (the trees are the eagle3 head's), one per contemplate
        # budget, each with its own cache holding the soft prompt.
        confu_runs = {}
        for budget in budgets:
            con = Decoder(target, extension=ContemplateSlots(confu))
            confu_runs[budget_name(budget)] = (con, *con.begin_sequence(prompt_ids, replace(gcfg, contemplate=budget),
                                                                        None))

    def verification(decoder: Decoder, cache, tree, state) -> None:
        out = decoder.verify_pass(cache, tree, state)
        decoder.accept(tree, out.logits, gcfg, None)

    columns = ["ar (1 token)", "eagle3"] + [budget_name(b) for b in budgets]
    fns, rows_of, cache_of = {}, {}, {}
    for n in nodes:
        tree = trees[n]
        for col in columns:
            key = (n, col)
            if col in confu_runs:
                con, con_cache, con_state = confu_runs[col]
                fns[key] = partial(verification, con, con_cache, tree, con_state)
                rows_of[key] = len(tree) + 1 + con.extension.extra_row_count(len(tree))
                cache_of[key] = con_cache
            else:
                t = None if col.startswith("ar") else tree
                fns[key] = partial(verification, plain, plain_cache, t, plain_state)
                rows_of[key], cache_of[key] = 1 + (0 if t is None else len(t)), plain_cache

    def reset(key) -> None:
        cache_of[key].rollback()  # drop what the pass appended: every repeat sees the same cache

    with torch.no_grad():
        timings = measure_interleaved(fns, warmup=warmup, repeats=repeats, reset=reset)
    table = []
    for n in nodes:
        cells = {col: {"ms": 1000 * timings[(n, col)].median, "best_ms": 1000 * timings[(n, col)].min,
                       "tokens": rows_of[(n, col)], "spread": timings[(n, col)].spread} for col in columns}
        table.append({"nodes": n, "tree_nodes": len(trees[n]), "columns": cells})
    return {"prompt_tokens": len(prompt_ids), "repeats": repeats, "columns": columns, "rows": table,
            "numerics": target.numerics,
            "drafts": {"eagle3": eagle3_dir or "untrained", "confu": confu_dir or "untrained"}}
