"""The payoff, measured: SmolLM2-135M base vs fine-tuned on teacher traces from the demo world's train split.

    .venv/bin/python bench/uplift_demo.py --train-traces 100 --heldout-tasks 44

1. collect teacher traces (train split) through the real agent, browser and store;
2. held-out task success of the base model (the demo world, real browser) and its step scores on held-out teacher
   traces (BFCL-style);
3. LoRA SFT (TRL + PEFT on CPU, Unsloth on CUDA) on the train rows;
4. the same held-out tasks and steps for the fine-tuned adapter, served beside the base by the embedded endpoint.
Goal: base ~0 % -> fine-tuned >= 60 % task success, irrelevance not worse, training <= 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from mcpft.agent.endpoint import CompletionSettings, Endpoint
from mcpft.config import data_dir
from mcpft.dataset import rows_from_traces
from mcpft.demo.world import DEMO_TAG, collect, evaluate_tasks, pick_tasks
from mcpft.evaluate import EndpointGenerator, evaluate_rows
from mcpft.serve import create_app, load_backends, serve_in_thread
from mcpft.store import Store
from mcpft.train import TrainConfig, check_out_dir, train


def collect_traces(store: Store, n: int, split: str) -> list[dict]:
    """Training rows of `n` teacher traces of the split: collected, unless a rerun's store already holds enough
    (collection takes tasks in a fixed order, so its first `n` are those `n` would collect)."""
    if len(store.traces(tags=[DEMO_TAG, split])) < n:
        bar = tqdm(total=n, desc=f"collect {split}", file=sys.stderr)
        report = asyncio.run(collect(store, n, split, on_task=lambda o: bar.update()))
        bar.close()
        print(f"collected {n} {split} teacher traces: {report.totals()['successes']} solved", file=sys.stderr)
    traces = sorted(store.traces(tags=[DEMO_TAG, split]), key=lambda t: t.created)[:n]
    return rows_from_traces(traces)


def score_model(base_url: str, model: str, heldout_tasks: int, heldout_rows: list[dict], max_steps: int,
                max_new_tokens: int, transcripts: Path) -> dict:
    """Task success in the real browser (each run's messages appended to `transcripts`) and step scores."""
    bar = tqdm(total=heldout_tasks, desc=f"tasks {model}", file=sys.stderr)
    task_ids = [task.id for task in pick_tasks("heldout", heldout_tasks)]  # every template before any repeats
    settings = CompletionSettings(temperature=0.0, max_tokens=max_new_tokens)
    tasks = asyncio.run(evaluate_tasks(Endpoint(base_url, model), "heldout", max_steps=max_steps, settings=settings,
                                       on_task=lambda o: bar.update(), task_ids=task_ids,
                                       transcripts=transcripts))
    bar.close()
    steps = evaluate_rows(heldout_rows, EndpointGenerator(base_url, model, max_new_tokens=max_new_tokens))
    return {"tasks": tasks.to_dict(), "steps": steps}


def served(adapter: Path | None):
    backends = load_backends(None, adapter, data_dir())
    base_url, stop = serve_in_thread(create_app(backends))
    return base_url, list(backends), stop


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-traces", type=int, default=100)
    parser.add_argument("--heldout-tasks", type=int, default=44, help="held-out tasks for task success (templates "
                                                                      "taken in turn: 13 = one of each)")
    parser.add_argument("--heldout-traces", type=int, default=13, help="held-out teacher traces for step scores")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--agent-max-steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=192, help="per step (a teacher step needs ~100)")
    parser.add_argument("--out", type=Path, default=None, help="work dir (a rerun reuses its collected traces)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="mcpft-uplift-"))
    work.mkdir(parents=True, exist_ok=True)
    adapter_dir = check_out_dir(work / "adapter")  # refused now, not after the long baseline
    store = Store(work / "demo.db")
    train_rows = collect_traces(store, args.train_traces, "train")
    heldout_rows = collect_traces(store, args.heldout_traces, "heldout")

    base_url, names, stop = served(None)
    try:
        before = score_model(base_url, names[0], args.heldout_tasks, heldout_rows, args.agent_max_steps,
                             args.max_new_tokens, work / "transcripts-base.jsonl")
    finally:
        stop()

    bar = tqdm(desc="train", file=sys.stderr)

    def on_progress(p):
        bar.total = p.total
        bar.n = p.step
        bar.set_postfix(loss=p.loss)
        bar.refresh()

    started = time.monotonic()
    result = train(TrainConfig(epochs=args.epochs, learning_rate=args.lr, max_length=args.max_length,
                                gradient_accumulation_steps=args.grad_accum), train_rows,
                   adapter_dir, on_progress=on_progress)
    bar.close()
    train_minutes = (time.monotonic() - started) / 60

    base_url, names, stop = served(result.adapter_dir)
    try:
        after = score_model(base_url, names[-1], args.heldout_tasks, heldout_rows, args.agent_max_steps,
                            args.max_new_tokens, work / "transcripts-tuned.jsonl")
    finally:
        stop()

    summary = {"train_traces": args.train_traces, "train_rows": result.rows_used, "train_steps": result.steps,
               "final_loss": result.final_loss, "train_minutes": round(train_minutes, 1), "path": result.path,
               "before": {"tasks": before["tasks"]["totals"], "steps": before["steps"]["totals"]},
               "after": {"tasks": after["tasks"]["totals"], "steps": after["steps"]["totals"]}}
    (work / "uplift.json").write_text(json.dumps({**summary, "details": {"before": before, "after": after}}, indent=2))
    print(f"work dir: {work}")
    print(f"training: {result.rows_used} rows, {result.steps} steps, {train_minutes:.1f} min ({result.path}), "
          f"final loss {result.final_loss}")
    print(f"{'held-out':28} {'base':>8} {'fine-tuned':>11}")
    for group, key in (("tasks", "success_rate"), ("tasks", "unneeded_calls"), ("tasks", "tool_errors"),
                       ("steps", "valid_call_rate"), ("steps", "tool_name_accuracy"),
                       ("steps", "argument_accuracy"), ("steps", "irrelevance_accuracy")):
        b, a = summary["before"][group].get(key), summary["after"][group].get(key)
        fmt = (lambda v: "-" if v is None else f"{v:.0%}") if "rate" in key or "accuracy" in key else str
        print(f"{group + ' ' + key:28} {fmt(b):>8} {fmt(a):>11}")


if __name__ == "__main__":
    main()
