"""The payoff, measured: `mcpft.demo.payoff` at full scale, with every figure the benchmarks table needs.

    .venv/bin/python bench/uplift_demo.py --out /tmp/payoff-1                       # space.yaml's demo recipe
    .venv/bin/python bench/uplift_demo.py --out /tmp/payoff-2 --train-traces 60 --epochs 3 --lr 1e-3

Runs what `mcpft demo payoff` runs (collect teacher traces in the real browser, train, the held-out tasks with the
base and the fine-tuned model), with the recipe's settings open to override, and adds what an attempt's row in
docs/benchmarks.md records: rows, tokens per row, trained share, training time. Writes OUT/payoff.json.
Goal: held-out task success base <= 15 % -> fine-tuned >= 60 %, collect + train + evaluate <= 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcpft.config import data_dir, default_base_model, load_settings  # noqa: E402
from mcpft.demo.payoff import PayoffRecipe, payoff_table, run_payoff  # noqa: E402
from mcpft.models import load_tokenizer  # noqa: E402
from mcpft.render import render  # noqa: E402


def row_figures(work: Path, base_model: str | None, recipe: PayoffRecipe) -> dict:
    """Tokens per training row and the trained share, from the run's own store, as the recipe trains them."""
    from mcpft.dataset import rows_from_traces, without_reasoning
    from mcpft.store import Store

    tokenizer = load_tokenizer(base_model, data_dir())
    with Store(work / "demo.db") as store:
        rows = rows_from_traces(store.traces(tags=["demo", "train"]))
    rows = rows if recipe.train_reasoning else without_reasoning(rows)
    rendered = [render(tokenizer, row) for row in rows]
    tokens = [r.n_tokens for r in rendered]
    trained = sum(sum(r.train_mask) for r in rendered)
    return {"rows": len(rows), "tokens_per_row": round(sum(tokens) / max(1, len(tokens))),
            "longest_row": max(tokens, default=0), "trained_share": round(trained / max(1, sum(tokens)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="new or empty work dir")
    parser.add_argument("--base-model", default=None, help="default: space.yaml's base_model")
    for name, kind in (("train-traces", int), ("heldout-tasks", int), ("epochs", float), ("lr", float),
                       ("grad-accum", int), ("lora-r", int), ("lora-layers", int), ("agent-max-steps", int), ("max-new-tokens", int)):
        parser.add_argument(f"--{name}", type=kind, default=None, help="default: space.yaml's demo recipe")
    parser.add_argument("--train-reasoning", action=argparse.BooleanOptionalAction, default=None,
                        help="train the teacher's reasoning too (default: space.yaml's demo recipe)")
    args = parser.parse_args()
    settings = load_settings()
    recipe = PayoffRecipe.from_settings(
        settings, train_traces=args.train_traces, heldout_tasks=args.heldout_tasks, epochs=args.epochs,
        learning_rate=args.lr, gradient_accumulation_steps=args.grad_accum, lora_r=args.lora_r,
        lora_layers=args.lora_layers, agent_max_steps=args.agent_max_steps, max_new_tokens=args.max_new_tokens,
        train_reasoning=args.train_reasoning)
    base_model = args.base_model or default_base_model(settings)
    bars: dict[str, tqdm] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:  # one bar a stage (setdefault would open a new one on every call)
            bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr)
        bar = bars[stage]
        bar.total, bar.n = total, done
        bar.refresh()

    report = run_payoff(recipe, args.out, base_model, on_progress)
    for bar in bars.values():
        bar.close()
    figures = {**report.to_dict(), "row_figures": row_figures(args.out, base_model, recipe)}
    (args.out / "payoff.json").write_text(json.dumps(figures, indent=2, default=str))
    print(payoff_table(report))
    print(json.dumps({k: figures[k] for k in ("base_success", "tuned_success", "seconds", "train", "row_figures")},
                     default=str))


if __name__ == "__main__":
    main()
