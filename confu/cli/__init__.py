"""`confu` command line: a thin layer over the library. Each module of `confu.cli` adds its own sub-commands."""

from __future__ import annotations

import argparse
import sys

from confu.errors import ConfuError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="confu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from confu.cli import bench, convert, data, generate, serve, train  # each registers its own sub-commands

    for module in (generate, data, train, bench, convert, serve):
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
