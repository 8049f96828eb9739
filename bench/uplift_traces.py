"""Before/after step scores: train on one folder of recorded traces, score base and fine-tuned on another.

    .venv/bin/python bench/uplift_traces.py --train TRACES_DIR --heldout TRACES_DIR [--base-model M] [--max-steps N]

Each folder is imported into a temporary store of its own (the same import, validation and unroll as `mcpft import`),
so flagged traces are left out exactly as in the app; the two folders must differ and neither may hold the other (or
held-out traces would be trained on). The base model is scored once the training rows passed their length and
template checks. Prints the comparison as Markdown on stderr and the totals as JSON on stdout; `--out` (a new or
empty folder) keeps the adapter and writes `uplift.json` (full reports and comparison) beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mcpft.dataset import rows_from_traces
from mcpft.evaluate import compare, compare_markdown, evaluate_rows, local_generator
from mcpft.ingest import import_paths
from mcpft.store import Store
from mcpft.train import TrainConfig, TrainError, check_out_dir, train


def rows_of(folder: Path, db: Path) -> list[dict]:
    with Store(db) as store:
        report = import_paths(store, [folder])
        rows = rows_from_traces(store.traces())
    print(f"{folder}: {len(report.imported)} traces imported, {len(report.flagged)} flagged, "
          f"{len(report.rejected)} rejected -> {len(rows)} rows", file=sys.stderr)
    if not rows:
        sys.exit(f"{folder}: no usable traces")
    return rows


def check_folders(train_dir: Path, heldout_dir: Path) -> None:
    """Exit unless the two folders are apart: the same folder, or one inside the other, shares traces."""
    a, b = train_dir.resolve(), heldout_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        sys.exit(f"--train {train_dir} and --heldout {heldout_dir} overlap: held-out traces would be trained on; "
                 "give two separate folders")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="folder of traces to train on")
    parser.add_argument("--heldout", type=Path, required=True, help="folder of traces to score")
    parser.add_argument("--base-model", default=None, help="default: the packaged SmolLM2")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=None, help="default: 4096 on CPU, 32768 on CUDA")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="keep the adapter and reports here (new or empty)")
    args = parser.parse_args()
    check_folders(args.train, args.heldout)
    try:
        if args.out:
            check_out_dir(args.out)  # before the long base scoring, not after it
    except TrainError as error:
        sys.exit(str(error))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        train_rows = rows_of(args.train, workdir / "train.db")
        heldout_rows = rows_of(args.heldout, workdir / "heldout.db")
        out = args.out or workdir / "adapter"
        config = TrainConfig(max_steps=args.max_steps, epochs=args.epochs, max_length=args.max_length)
        result = train(config, train_rows, out, base_model=args.base_model, baseline=lambda: evaluate_rows(
            heldout_rows, local_generator(args.base_model, max_new_tokens=args.max_new_tokens)))
        tuned = evaluate_rows(heldout_rows, local_generator(args.base_model, adapter=out,
                                                            max_new_tokens=args.max_new_tokens))
    base = result.baseline
    comparison = compare(base, tuned)
    print(compare_markdown(comparison), file=sys.stderr)
    if args.out:
        (args.out / "uplift.json").write_text(json.dumps({"base": base, "tuned": tuned, "comparison": comparison},
                                                         indent=2, ensure_ascii=False))
    print(json.dumps({"train": result.summary(), "base": base["totals"], "tuned": tuned["totals"],
                      "changes": comparison["changes"]}))


if __name__ == "__main__":
    main()
