"""`confu` command line: a thin layer over the library. Each module adds its own sub-command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from confu.errors import ConfuError, InputError


def parse_contemplate(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError("--contemplate takes 'all' or a number of slots") from err


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a local HF model directory, or a .gguf file")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that decodes (generate, bench)."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--depth", type=int, default=6, help="draft tree depth")
    p.add_argument("--topk", type=int, default=8, help="children expanded per draft node")
    p.add_argument("--contemplate", type=parse_contemplate, default=None,
                   help="ConFu: 'all' (default) or the number of contemplate slots besides the root")
    p.add_argument("--seed", type=int, default=0)


def encode_prompt(tokenizer, text: str, raw: bool) -> list[int]:
    """Token ids of a prompt, through the target's chat template unless `raw`."""
    if not text.strip():
        raise InputError("the prompt is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer(text, add_special_tokens=True).input_ids
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    ))


def load_decoder(target_spec: str, draft: str):
    from confu.checkpoint import load_draft
    from confu.generate import Decoder
    from confu.target import Target

    target = Target.load(target_spec)
    head = None if draft == "none" else load_draft(draft, target)
    return Decoder(target, head)


def generation_config(args, tree_nodes: int):
    from confu.generate import GenerationConfig
    from confu.sampling import SamplingConfig
    from confu.tree import TreeConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_p, args.top_k),
        tree=TreeConfig(total_nodes=tree_nodes, depth=args.depth, topk=args.topk),
        contemplate=args.contemplate,
        seed=args.seed,
    )


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line (lines starting with # are comments); a line that is a JSON object may
    give `prompt` or `turns` (its first turn)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read the prompt file {path}: {err.strerror}") from err
    prompts = []
    for number, line in enumerate((raw.strip() for raw in lines), start=1):
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
                line = rec.get("prompt") or rec["turns"][0]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                raise InputError(
                    f"{path}:{number}: a JSON line must be an object with 'prompt' or a non-empty 'turns' ({err})"
                ) from err
            if not isinstance(line, str):
                raise InputError(f"{path}:{number}: the prompt must be a string")
        prompts.append(line)
    if not prompts:
        raise InputError(f"no prompts in {path}")
    return prompts


def comma_list(kind: type, flag: str):
    """argparse type for `1,2,3`-style option values."""

    def parse(text: str) -> list:
        try:
            values = [kind(p) for p in text.split(",") if p.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {kind.__name__} values") from err
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return values

    return parse


def result_record(decoder, res) -> dict:
    record = {
        "text": decoder.target.tokenizer.decode(res.tokens, skip_special_tokens=True),
        "new_tokens": len(res.tokens),
        "steps": len(res.steps),
        "tau": round(res.tau, 4),
        "tokens_per_s": round(res.tokens_per_s, 3),
        "accept_lengths": res.accept_lengths,
        "stop_reason": res.stop_reason,
    }
    if decoder.confu:
        record["contemplate_slots"] = [s.contemplate_slots for s in res.steps]
        record["verify_tokens"] = [s.verify_tokens for s in res.steps]
    return record


def cmd_generate(args) -> None:
    decoder = load_decoder(args.target, args.draft)
    cfg = generation_config(args, args.tree_nodes)
    tok = decoder.target.tokenizer
    if args.prompt_file:
        # One JSON line per prompt, then the pooled summary (tau over all steps, NOTES section 3).
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
    from confu.checkpoint import new_draft, save_draft
    from confu.target import Target

    target = Target.load(args.target)
    head = new_draft(target, args.method, draft_vocab_size=args.draft_vocab_size, seed=args.seed,
                     soft_prompt_len=args.soft_prompt_len, n_expert=args.n_expert, top_k_expert=args.top_k_expert)
    save_draft(head, args.out)
    print(f"wrote an untrained {args.method} draft for {args.target} to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="confu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode one prompt (plain, EAGLE-3 or ConFu)")
    add_target_args(g)
    g.add_argument("--draft", default="none", help="a draft directory, or 'none' for plain decoding")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompt-file", help="prompts, one per line: prints a JSON line each and a pooled summary")
    g.add_argument("--raw", action="store_true", help="skip the chat template")
    g.add_argument("--tree-nodes", type=int, default=60)
    add_decoding_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("init-draft", help="write an untrained EAGLE-3 or ConFu head for a target")
    add_target_args(i)
    i.add_argument("--method", choices=["eagle3", "confu"], default="eagle3")
    i.add_argument("--out", required=True)
    i.add_argument("--draft-vocab-size", type=int, default=8192)
    i.add_argument("--soft-prompt-len", type=int, default=16)
    i.add_argument("--n-expert", type=int, default=8)
    i.add_argument("--top-k-expert", type=int, default=2)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_init_draft)

    from confu import bench, data, microbench, train  # each registers its own sub-commands

    for module in (data, train, bench, microbench):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfuError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
