"""`mcpft`: one verb per action. Every command takes `--db PATH` and `--json` (a machine-readable summary on stdout);
progress and human messages go to stderr or stdout as text when `--json` is absent."""

from __future__ import annotations

import argparse
import sys

from mcpft.cli import agent, data, demo, train
from mcpft.cli.common import CliError, common_options

# Each module adds its verbs; the order is the one `mcpft --help` lists them in.
VERB_MODULES = [data, agent, demo, train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcpft", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    parent = common_options()
    for module in VERB_MODULES:
        module.register(verbs, parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except CliError as e:
        print(f"mcpft {args.verb}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
