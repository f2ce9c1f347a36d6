"""`confu generate` and `confu init-draft`: decoding one prompt (or a prompt file) and writing an untrained
draft head. The engine is imported inside the handlers: `confu --help` must stay fast."""

from __future__ import annotations

import json
import sys
from typing import Any

from confu.chat import encode_prompt, read_prompts_file
from confu.cli.common import add_decoding_args, add_numerics_arg, add_target_args, parse_tree_nodes
from confu.engine.registry import HEAD_METHODS


def load_decoder(target_spec: str, draft: str, numerics: str = "auto", match: bool = False,
                 match_history: int = 0):
    """The decoder for `--draft` (a directory or 'none'), with match candidates under `--match` (kept across
    sequences up to `match_history` tokens)."""
    from confu.engine.convert import load_draft
    from confu.engine.generate import Decoder
    from confu.engine.matcher import MatchConfig
    from confu.engine.target import Target

    target = Target.load(target_spec, numerics=numerics)
    head = None if draft == "none" else load_draft(draft, target)
    return Decoder.for_head(target, head, MatchConfig(history_tokens=match_history) if match else None)


def add_match_arg(p) -> None:
    """`--match`, for every command that builds a decoder from `--draft`."""
    p.add_argument("--match", action="store_true",
                   help="add draft candidates matched in the prompt and the text so far (no training needed; "
                        "with --draft none they are the only draft)")


def generation_config(args, tree_nodes: int | str):
    from confu.engine.generation_config import GenerationConfig, tree_setting
    from confu.engine.sampling import SamplingConfig

    tree, auto = tree_setting(tree_nodes, args.depth, args.topk)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_p, args.top_k),
        tree=tree,
        auto_tree=auto,
        contemplate=args.contemplate,
        zero_future=args.zero_future,
        seed=args.seed,
    )


def result_record(decoder, res) -> dict:
    record = {
        "text": decoder.target.tokenizer.decode(res.tokens, skip_special_tokens=True),
        "new_tokens": len(res.tokens),
        "steps": len(res.steps),
        "tau": round(res.tau, 4),
        "tokens_per_s": round(res.tokens_per_s, 3),
        "accept_lengths": res.accept_lengths,
        "stop_reason": res.stop_reason,
        "numerics": decoder.target.numerics,
    }
    drafted = [s for s in res.steps if s.tree_nodes]
    if res.steps and decoder.proposer is not None:
        # the tree shape each round verified: under --tree-nodes auto it is chosen per round
        record["tree"] = {"nodes": [s.tree_nodes for s in res.steps], "depth": [s.depth for s in res.steps],
                          "rounds_without_draft": len(res.steps) - len(drafted),
                          "mean_nodes": round(sum(s.tree_nodes for s in res.steps) / len(res.steps), 2)}
        # where the verified and accepted candidates came from: the draft "head", "match"es in the text so far
        record["sources"] = res.by_source()
    if any(s.contemplate_slots for s in res.steps):
        record["contemplate_slots"] = [s.contemplate_slots for s in res.steps]
        record["verify_tokens"] = [s.verify_tokens for s in res.steps]
    return record


def cmd_generate(args) -> None:
    decoder = load_decoder(args.target, args.draft, args.numerics, args.match)
    cfg = generation_config(args, args.tree_nodes)
    tok = decoder.target.tokenizer
    if args.prompt_file:
        # One JSON line per prompt, then the summary: tau pooled over every step of every prompt (as
        # `confu.bench.report` pools it), not a mean of per-prompt taus.
        lengths, speeds = [], []
        for text in read_prompts_file(args.prompt_file):
            res = decoder.generate(encode_prompt(tok, text, args.raw), cfg)
            lengths.extend(res.accept_lengths)
            speeds.append(res.tokens_per_s)
            print(json.dumps({"prompt": text, **result_record(decoder, res)}), flush=True)
        print(json.dumps({"summary": {"prompts": len(speeds), "steps": len(lengths),
                                      "tau": round(sum(lengths) / max(1, len(lengths)), 4),
                                      "mean_tokens_per_s": round(sum(speeds) / len(speeds), 3)}}))
        return
    prompt_ids = encode_prompt(tok, args.prompt, args.raw)
    if args.json:
        print(json.dumps(result_record(decoder, decoder.generate(prompt_ids, cfg))))
        return
    shown: list[int] = []
    text_so_far = ""
    for new in decoder.stream(prompt_ids, cfg):
        shown.extend(new)
        text = tok.decode(shown, skip_special_tokens=True)
        sys.stdout.write(text[len(text_so_far):])
        sys.stdout.flush()
        text_so_far = text
    sys.stdout.write("\n")


def cmd_init_draft(args) -> None:
    from confu.engine.checkpoint import new_draft, save_draft
    from confu.engine.target import Target

    target = Target.load(args.target)
    head = new_draft(target, args.method, draft_vocab_size=args.draft_vocab_size, seed=args.seed,
                     soft_prompt_len=args.soft_prompt_len, n_expert=args.n_expert, top_k_expert=args.top_k_expert)
    save_draft(head, args.out)
    print(f"wrote an untrained {args.method} draft for {args.target} to {args.out}")


def add_parser(subparsers: Any) -> None:
    """`confu generate` and `confu init-draft`."""
    g = subparsers.add_parser("generate", help="decode one prompt (plain, EAGLE-3, ConFu, matches in the text)")
    add_target_args(g)
    add_numerics_arg(g)
    g.add_argument("--draft", default="none", help="a draft directory, or 'none' for plain decoding")
    add_match_arg(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompt-file", help="prompts, one per line: prints a JSON line each and a pooled summary")
    g.add_argument("--raw", action="store_true", help="skip the chat template")
    g.add_argument("--tree-nodes", type=parse_tree_nodes, default="auto",
                   help="'auto' (default: depth and nodes chosen per round from measured costs) or a fixed count")
    add_decoding_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    i = subparsers.add_parser("init-draft", help="write an untrained EAGLE-3 or ConFu head for a target")
    add_target_args(i)
    i.add_argument("--method", choices=HEAD_METHODS, default="eagle3")
    i.add_argument("--out", required=True)
    i.add_argument("--draft-vocab-size", type=int, default=8192)
    i.add_argument("--soft-prompt-len", type=int, default=16)
    i.add_argument("--n-expert", type=int, default=8)
    i.add_argument("--top-k-expert", type=int, default=2)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_init_draft)
