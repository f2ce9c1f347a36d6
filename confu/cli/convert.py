"""`confu convert`: a draft between confu's layout and the official / SpecForge and speculators EAGLE-3 layouts.
The engine is imported inside the handler: `confu --help` must stay fast."""

from __future__ import annotations

from typing import Any

from confu.cli.common import add_target_args

LAYOUT_CHOICES = ("confu", "eagle3", "speculators")


def cmd_convert(args) -> None:
    from confu.engine.convert import ExportOptions, TargetInfo, convert

    options = ExportOptions(verifier=args.verifier, speculative_tokens=args.speculative_tokens)
    report = convert(args.src, TargetInfo.load(args.target), args.to, args.out, options, force=args.force)
    for note in report.notes:
        print(f"note: {note}")
    print(f"read {args.src} ({report.source_layout} layout), wrote {report.out} ({report.layout} layout)")


def add_parser(subparsers: Any) -> None:
    """`confu convert`."""
    c = subparsers.add_parser(
        "convert", help="convert an EAGLE-3 draft between confu, official / SpecForge and speculators layouts",
        description="SRC may be any of the three layouts (detected from its files). eagle3 is what SGLang and "
                    "llama.cpp's convert_hf_to_gguf.py read; speculators is what vLLM reads.")
    c.add_argument("src", help="draft directory (config.json + model.safetensors or pytorch_model.bin)")
    add_target_args(c)
    c.add_argument("--to", required=True, choices=LAYOUT_CHOICES, help="layout to write")
    c.add_argument("--out", required=True, help="output directory (new or empty, unless --force)")
    c.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its draft")
    c.add_argument("--verifier", default=None,
                   help="speculators: the target's name for other engines, e.g. a Hugging Face id (default: an "
                        "embedded target's Hugging Face id, else the name of its directory or GGUF file)")
    c.add_argument("--speculative-tokens", type=int, default=3,
                   help="speculators: proposal_methods[0].speculative_tokens, vLLM's default draft length")
    c.set_defaults(func=cmd_convert)
