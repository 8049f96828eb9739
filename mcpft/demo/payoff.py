"""The payoff in one call: from an empty store to held-out task success of the base model and its fine-tune.

    collect  N teacher traces of the demo world's train split, in the real browser, into a new store
    train    the demo recipe (LoRA SFT) on them
    base     K held-out tasks (unseen products and templates) with the base model, in the real browser
    tuned    the same K tasks with the fine-tuned adapter, served beside its base

The recipe's defaults live in space.yaml's `demo:` block, so the CLI (`mcpft demo payoff`), the app and the bench run
the same thing. This module sits after the train stage: it is a client of the demo world, the data core, training and
the embedded endpoint, and nothing imports it but the CLI and the app.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mcpft.agent.endpoint import CompletionSettings, Endpoint
from mcpft.dataset import rows_from_traces
from mcpft.demo.tasks import load_tasks
from mcpft.demo.world import DEMO_TAG, check_shares, collect, evaluate_tasks, pick_tasks
from mcpft.store import Store

STAGES = ("collect", "train", "base", "tuned")
STAGE_NAMES = {"collect": "Collect teacher traces in the browser", "train": "Train the small model on them",
               "base": "Held-out tasks with the base model", "tuned": "Held-out tasks with the fine-tuned model"}
REPORT_FILE = "payoff.json"  # in the work dir: the report of a finished run, as `--json` prints it


class PayoffError(Exception):
    """The payoff cannot run as asked (a bad recipe, a work dir in use); the message says which setting."""


@dataclass
class PayoffRecipe:
    """What `demo payoff` runs: how much data, how it trains, how the held-out tasks are run."""

    train_traces: int = 97  # 97 of the 107 train tasks, each in a world of its own (what ~100 steps in 20 min hold)
    heldout_tasks: int = 44  # the whole held-out split (13: one task per template)
    epochs: float = 1.5  # 146 steps: about one held-out task of 44 more than one pass, ~4.5 min more
    learning_rate: float = 1e-3
    gradient_accumulation_steps: int = 1
    lora_r: int = 16
    lora_layers: int | None = None  # LoRA in the last N decoder layers only (None: all)
    agent_max_steps: int = 6
    max_new_tokens: int = 320  # per agent step: a 4-field browser_fill_form call alone is ~170 tokens
    train_reasoning: bool = False  # the teacher's reasoning left out of the rows: 135M copies its sentences wrong
    # Train templates given a part of the traces of their own (`pick_tasks`), the others taken in turn.
    template_shares: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("train_traces", "heldout_tasks", "gradient_accumulation_steps", "lora_r", "agent_max_steps",
                     "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PayoffError(f"demo recipe: {name} must be a whole number of at least 1, got "
                                  f"{getattr(self, name)!r}")
        if self.lora_layers is not None and (not isinstance(self.lora_layers, int) or self.lora_layers < 1):
            raise PayoffError(f"demo recipe: lora_layers must be a whole number of at least 1 (or unset: all "
                              f"layers), got {self.lora_layers!r}")
        if not isinstance(self.train_reasoning, bool):
            raise PayoffError(f"demo recipe: train_reasoning must be true or false, got {self.train_reasoning!r}")
        try:
            check_shares(self.template_shares, {task.template for task in load_tasks("train")})
        except ValueError as error:
            raise PayoffError(f"demo recipe: {error}") from None
        for name in ("epochs", "learning_rate"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise PayoffError(f"demo recipe: {name} must be a positive number, got {getattr(self, name)!r}")

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> PayoffRecipe:
        """space.yaml's `demo:` block, then `overrides` (None values ignored)."""
        block = settings.get("demo") or {}
        if not isinstance(block, dict):
            raise PayoffError(f"space.yaml: 'demo' must be a mapping of recipe settings, got {block!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise PayoffError(f"space.yaml: unknown demo setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        return cls(**{**block, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class PayoffReport:
    recipe: PayoffRecipe
    base_model: str
    work_dir: str
    seconds: dict[str, float] = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # demo-world totals of the base model on the held-out tasks
    tuned: dict = field(default_factory=dict)
    outcomes: list[dict] = field(default_factory=list)  # per task: prompt, base and tuned verdicts

    def to_dict(self) -> dict:
        return {"base_success": self.base.get("success_rate"), "tuned_success": self.tuned.get("success_rate"),
                "base_successes": self.base.get("successes"), "tuned_successes": self.tuned.get("successes"),
                "heldout_tasks": self.recipe.heldout_tasks, "train_traces": self.recipe.train_traces,
                "base_model": self.base_model, "work_dir": self.work_dir, "seconds": self.seconds,
                "train": self.train, "base": self.base, "tuned": self.tuned, "recipe": asdict(self.recipe),
                "tasks": self.outcomes}


ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


def run_payoff(recipe: PayoffRecipe, work_dir: Path, base_model: str | None = None,
               on_progress: ProgressCallback | None = None) -> PayoffReport:
    """Run the four stages in `work_dir` (new or empty: its store, adapter and transcripts land there)."""
    from mcpft.config import data_dir
    from mcpft.models import model_name
    from mcpft.train import check_out_dir

    work_dir = Path(work_dir)
    if work_dir.exists() and any(work_dir.iterdir()):
        raise PayoffError(f"work dir {work_dir} is not empty: the payoff starts from an empty store")
    work_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = check_out_dir(work_dir / "adapter")
    progress = on_progress or (lambda stage, done, total: None)
    report = PayoffReport(recipe=recipe, base_model=model_name(base_model), work_dir=str(work_dir))
    started = time.monotonic()

    with _timed(report, "collect"), Store(work_dir / "demo.db") as store:
        counter = _Counter("collect", recipe.train_traces, progress)
        asyncio.run(collect(store, recipe.train_traces, "train", on_task=counter.tick, shares=recipe.template_shares))
        rows = rows_from_traces(store.traces(tags=[DEMO_TAG, "train"], include_flagged=False))
    with _timed(report, "train"):
        report.train = _train(recipe, rows, adapter_dir, base_model, progress)
    backends = _serve(base_model, adapter_dir, data_dir())
    try:
        base_name, tuned_name = list(backends.names)
        for stage, name in (("base", base_name), ("tuned", tuned_name)):
            with _timed(report, stage):
                outcome = _heldout(recipe, Endpoint(backends.url, name), work_dir / f"transcripts-{stage}.jsonl",
                                   _Counter(stage, recipe.heldout_tasks, progress))
                setattr(report, stage, outcome.totals())
                _merge_outcomes(report.outcomes, stage, outcome.tasks)
    finally:
        backends.stop()
    report.seconds["total"] = round(time.monotonic() - started, 1)
    (work_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report


class _timed:
    def __init__(self, report: PayoffReport, stage: str):
        self.report, self.stage = report, stage

    def __enter__(self):
        self.started = time.monotonic()

    def __exit__(self, *exc):
        self.report.seconds[self.stage] = round(time.monotonic() - self.started, 1)


class _Counter:
    """Counts a stage's tasks for `progress`; made when the stage starts, which it reports (0 done) at once."""

    def __init__(self, stage: str, total: int, progress: ProgressCallback):
        self.stage, self.total, self.progress, self.done = stage, total, progress, 0
        progress(stage, 0, total)

    def tick(self, *_):
        self.done += 1
        self.progress(self.stage, self.done, self.total)


def _train(recipe: PayoffRecipe, rows: list[dict], adapter_dir: Path, base_model: str | None,
           progress: ProgressCallback) -> dict:
    from mcpft.train import TrainConfig, train

    if not rows:
        raise PayoffError("no teacher trace was collected unflagged: nothing to train on")
    config = TrainConfig(epochs=recipe.epochs, learning_rate=recipe.learning_rate, lora_r=recipe.lora_r,
                         lora_alpha=2 * recipe.lora_r, lora_layers=recipe.lora_layers,
                         gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                         reasoning=recipe.train_reasoning)
    result = train(config, rows, adapter_dir, base_model=base_model,
                   on_progress=lambda p: progress("train", p.step, p.total))
    # The precision follows the CPU (bf16 autocast where it has native BF16): figures from different hosts differ.
    return {"rows": result.rows_used, "steps": result.steps, "final_loss": result.final_loss, "path": result.path,
            "precision": result.precision, "adapter": str(result.adapter_dir)}


@dataclass
class _Served:
    url: str
    names: list[str]
    stop: Callable[[], None]


def _serve(base_model: str | None, adapter_dir: Path, data_dir: Path) -> _Served:
    from mcpft.serve import create_app, load_backends, serve_in_thread

    backends = load_backends(base_model, adapter_dir, data_dir)
    url, stop = serve_in_thread(create_app(backends))
    return _Served(url, list(backends), stop)


def _heldout(recipe: PayoffRecipe, endpoint: Endpoint, transcripts: Path, counter: _Counter):
    task_ids = [task.id for task in pick_tasks("heldout", recipe.heldout_tasks)]  # every template before a repeat
    settings = CompletionSettings(temperature=0.0, max_tokens=recipe.max_new_tokens)
    return asyncio.run(evaluate_tasks(endpoint, "heldout", max_steps=recipe.agent_max_steps, settings=settings,
                                      on_task=counter.tick, task_ids=task_ids, transcripts=transcripts))


def _merge_outcomes(outcomes: list[dict], stage: str, tasks) -> None:
    """One entry per task: its prompt and expected answer once, then each model's verdict beside the other's."""
    by_id = {o["task_id"]: o for o in outcomes}
    known = {task.id: task for task in pick_tasks("heldout", len(tasks))}
    for outcome in tasks:
        entry = by_id.get(outcome.task_id)
        if entry is None:
            task = known.get(outcome.task_id)
            entry = {"task_id": outcome.task_id, "template": outcome.template,
                     "prompt": task.prompt if task else "", "expected": task.expected if task else ""}
            outcomes.append(entry)
            by_id[outcome.task_id] = entry
        entry[stage] = {"success": outcome.success, "answer": outcome.answer, "reason": outcome.reason,
                        "steps": outcome.steps}


def task_sentence(report: dict) -> str:
    """The verdict in words, task level: "Fine-tuned passed 9 of 13 held-out tasks (base 1 of 13)." """
    k = report["heldout_tasks"]
    return (f"Fine-tuned passed {report.get('tuned_successes') or 0} of {k} held-out tasks (base "
            f"{report['base_model']}: {report.get('base_successes') or 0} of {k}).")


def _share(part, whole) -> float | None:
    return part / whole if whole else None


def plain_metrics(report: dict) -> list[tuple[str, float | None, float | None]]:
    """(what it measures in words, base, fine-tuned) as fractions, for bars a person reads without a glossary."""
    rows = [("Held-out tasks passed", lambda t: t.get("success_rate")),
            ("Tool calls that worked", lambda t: _share(t["tool_calls"] - t["tool_errors"], t["tool_calls"])),
            ("No-tool questions answered without the browser",
             lambda t: _share(t["no_tool_tasks_without_calls"], t["no_tool_tasks"]))]
    return [(name, read(report["base"]) if report.get("base") else None,
             read(report["tuned"]) if report.get("tuned") else None) for name, read in rows]


def payoff_table(report: PayoffReport) -> str:
    """The before/after as a person reads it: one sentence first, then the figures."""
    base, tuned = report.base, report.tuned
    lines = [task_sentence(report.to_dict()),
             f"Trained on {report.recipe.train_traces} teacher traces ({report.train.get('rows')} rows, "
             f"{report.train.get('steps')} steps, final loss {report.train.get('final_loss')}).", "",
             f"{'held-out tasks':24} {'base':>8} {'fine-tuned':>11}"]
    for key in ("success_rate", "tool_calls", "tool_errors", "unneeded_calls", "no_tool_tasks_without_calls"):
        b, t = base.get(key), tuned.get(key)
        fmt = (lambda v: "-" if v is None else f"{v:.0%}") if key.endswith("rate") else (lambda v: str(v))
        lines.append(f"{key:24} {fmt(b):>8} {fmt(t):>11}")
    lines += ["", "seconds: " + ", ".join(f"{stage} {report.seconds.get(stage, 0):.0f}"
                                          for stage in (*STAGES, "total"))]
    return "\n".join(lines)
