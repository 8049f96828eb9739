"""What every verb shares: `--db` / `--json`, opening the store, and printing a summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mcpft.config import default_db_path


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--db", type=Path, default=None,
                        help="SQLite store (default: the data dir: $MCPFT_HOME, /data/mcpft on a Space, "
                             "or ~/.local/share/mcpft)")
    parent.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    return parent


def open_store(args):
    from mcpft.store import Store

    return Store(args.db or default_db_path())


def emit(args, summary: dict, text: str | None = None):
    """The JSON summary with `--json`, else the human text (or the summary, pretty)."""
    if args.json:
        json.dump(summary, sys.stdout, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(text if text is not None else json.dumps(summary, indent=2, ensure_ascii=False, default=str))


def progress(iterable=None, **kwargs):
    """A progress bar on stderr (kept off stdout so `--json` stays parseable); hidden when stderr is no terminal."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)
