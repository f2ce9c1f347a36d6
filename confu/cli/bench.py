"""`confu bench` (Spec-Bench, `confu.bench.specbench`), `confu bench-ar` and `confu bench-verify`
(`confu.bench.micro`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from confu.bench.micro import AR_PROMPTS, parse_budgets, run_bench_ar, run_bench_verify
from confu.bench.report import compact_summary, render_ar_console, render_bench_console, render_verify_console
from confu.bench.specbench import BenchConfig, parse_methods, run_bench
from confu.chat import read_prompts_file
from confu.cli.common import add_decoding_args, add_numerics_arg, add_target_args, comma_list, parse_tree_nodes


def cmd_bench(args) -> None:
    categories = None
    if args.categories:
        categories = [c for part in args.categories for c in part.split(",") if c]
    cfg = BenchConfig(
        target=args.target, numerics=args.numerics, methods=parse_methods(args.methods), questions=args.questions,
        out=args.out,
        categories=categories, limit_per_category=args.limit_per_category,
        temperatures=args.temperatures or [args.temperature], tree_nodes=args.tree_nodes,
        max_new_tokens=args.max_new_tokens, top_p=args.top_p, top_k=args.top_k, depth=args.depth,
        topk=args.topk, contemplate=args.contemplate, zero_future=args.zero_future, seed=args.seed,
        warmup=args.warmup, repeats=args.repeats,
        progress=not args.no_progress,
    )
    res = run_bench(cfg)
    run = res["run"]
    print(f"{run['ran']} runs done, {run['resumed']} taken from earlier runs; wrote "
          + ", ".join(str(Path(cfg.out) / f) for f in res["files"]))
    compact = compact_summary(res["summary"])
    print(render_bench_console(compact))
    print(json.dumps({"out": str(cfg.out), "settings": compact}))


def _add_bench(subparsers: Any) -> None:
    """`confu bench`."""
    b = subparsers.add_parser("bench", help="Spec-Bench: tau and speed-up of ar / hf / EAGLE-3 / ConFu")
    add_target_args(b)
    add_numerics_arg(b)
    b.add_argument("--methods", required=True,
                   help="comma-separated: ar, hf, match (draft candidates matched in the text so far), "
                        "eagle3:DIR[=label], confu:DIR[=label], and eagle3+match:DIR / confu+match:DIR (a head's "
                        "trees with matches); vllm and vllm-eagle3:DIR[=label] run vLLM's plain decoding and vLLM with "
                        "an EAGLE-3 draft, in vLLM's own virtualenv (make anchors)")
    b.add_argument("--questions", required=True,
                   help="Spec-Bench question.jsonl, or a .txt prompt file (one prompt per line)")
    b.add_argument("--categories", nargs="+", help="only these categories (space or comma separated)")
    b.add_argument("--limit-per-category", type=int, help="first K questions of each category")
    b.add_argument("--temperatures", type=comma_list(float, "--temperatures"),
                   help="comma-separated (default: --temperature)")
    b.add_argument("--tree-nodes", type=comma_list(parse_tree_nodes, "--tree-nodes"), default=["auto"],
                   help="comma-separated: 'auto' (sized per round for this machine) and/or node counts")
    b.add_argument("--out", required=True, help="output directory; re-running with it resumes")
    b.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of the first question per method and setting")
    b.add_argument("--repeats", type=int, default=1,
                   help="timed runs of every question x method x setting, interleaved (intervals on speed-ups "
                        "then carry the run-to-run noise)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_decoding_args(b)
    b.set_defaults(func=cmd_bench)


def cmd_bench_ar(args) -> None:
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else list(AR_PROMPTS)
    res = run_bench_ar(args.target, prompts, args.max_new_tokens, args.repeats, args.warmup, args.profile,
                       numerics=args.numerics)
    print(render_ar_console(res))
    if args.profile:
        print("\n== cProfile: ours ==\n" + res["profile_ours"] + "\n== cProfile: hf ==\n" + res["profile_hf"])
    print(json.dumps({k: res[k] for k in ("ours_tokens_per_s", "hf_tokens_per_s", "ratio", "within_10pct",
                                          "identical", "ours_best_tokens_per_s", "hf_best_tokens_per_s",
                                          "best_ratio", "max_new_tokens", "repeats")}))


def cmd_bench_verify(args) -> None:
    res = run_bench_verify(args.target, args.nodes, parse_budgets(args.budgets), args.repeats, args.warmup,
                           args.draft_eagle3, args.draft_confu, args.depth, args.topk, seed=args.seed,
                           numerics=args.numerics)
    print(render_verify_console(res))
    print(json.dumps(res))


def _add_micro(subparsers: Any) -> None:
    """`confu bench-ar` and `confu bench-verify`."""
    a = subparsers.add_parser("bench-ar", help="tokens/s of our plain decoding vs transformers generate")
    add_target_args(a)
    add_numerics_arg(a)
    a.add_argument("--prompts-file", help="one prompt per line (default: built-in prompts)")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--warmup", type=int, default=1)
    a.add_argument("--profile", action="store_true", help="also print a cProfile of one run of each")
    a.set_defaults(func=cmd_bench_ar)

    v = subparsers.add_parser("bench-verify",
                              help="verify-pass time: EAGLE-3 trees vs ConFu contemplate slots")
    add_target_args(v)
    add_numerics_arg(v)
    v.add_argument("--draft-eagle3", help="an eagle3 draft directory (default: an untrained head)")
    v.add_argument("--draft-confu", help="a confu draft directory (default: an untrained head)")
    v.add_argument("--nodes", type=comma_list(int, "--nodes"), default=[16, 32, 60])
    v.add_argument("--budgets", default="all,1,4,8", help="contemplate budgets: 'all' and/or counts")
    v.add_argument("--repeats", type=int, default=5)
    v.add_argument("--warmup", type=int, default=1)
    v.add_argument("--depth", type=int, default=6)
    v.add_argument("--topk", type=int, default=8)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_bench_verify)


def add_parser(subparsers: Any) -> None:
    """`confu bench`, `confu bench-ar` and `confu bench-verify`."""
    _add_bench(subparsers)
    _add_micro(subparsers)
