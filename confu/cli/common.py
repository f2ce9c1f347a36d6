"""argparse helpers shared by the sub-commands: option types and the option groups several commands take."""

from __future__ import annotations

import argparse

from confu.engine import TARGET_NUMERICS


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is none (None) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def parse_contemplate(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError("--contemplate takes 'all' or a number of slots") from err


def parse_tree_nodes(value: str) -> int | str:
    """`--tree-nodes`: 'auto' (sized per round for this machine) or a fixed node count >= 1."""
    if value == "auto":
        return value
    try:
        nodes = int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError("--tree-nodes takes 'auto' or a number of nodes") from err
    if nodes < 1:
        raise argparse.ArgumentTypeError(f"--tree-nodes must be 'auto' or >= 1 (got {nodes})")
    return nodes


def comma_list(kind, flag: str):
    """argparse type for `1,2,3`-style option values."""

    def parse(text: str) -> list:
        try:
            values = [kind(p) for p in text.split(",") if p.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {getattr(kind, '__name__', 'values')}") from err
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return values

    return parse


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a local HF model directory, or a .gguf file")


def add_numerics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numerics", choices=TARGET_NUMERICS, default="auto",
                   help="the target's linear layers: auto = GGUF-exact CPU kernels where the weights are GGUF blocks "
                        "(else transformers'); reference = transformers' own; q8 = the GGUF weights with activations "
                        "rounded to 8-bit blocks, llama.cpp's numerics (AVX512-VNNI; faster verify passes)")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that decodes (generate, bench)."""
    p.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens a prompt generates")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the probability mass kept (1 = all)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--depth", type=int, default=6, help="draft tree depth (under --tree-nodes auto: the most)")
    p.add_argument("--topk", type=int, default=8, help="children expanded per draft node")
    p.add_argument("--contemplate", type=parse_contemplate, default=None,
                   help="ConFu: 'all' (default) or the number of contemplate slots besides the root")
    p.add_argument("--zero-future", action="store_true",
                   help="ConFu probe: the draft gets f = 0 every round (measures what the future prediction adds)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
