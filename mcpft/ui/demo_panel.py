"""The demo in one click, at the top of the Evaluate tab: `mcpft demo payoff` (collect teacher traces in the browser,
train, run the held-out tasks with the base and the fine-tuned model) with progress per stage, then the verdict in one
sentence, a grouped bar per measure, and each task with both models' answers side by side.

It needs nothing from the other tabs. One run at a time in the app (it uses every CPU core); a reloaded page finds
the running run, or the visitor's last finished one, again.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from mcpft.demo.payoff import (REPORT_FILE, STAGE_NAMES, STAGES, PayoffError, PayoffRecipe, plain_metrics,
                               run_payoff, task_sentence)
from mcpft.evaluate import SMALL_SAMPLE
from mcpft.ui.charts import CSS, Attempt, bars_html, side_by_side_html
from mcpft.ui.owner import owner_slug, require_owner
from mcpft.ui.state import AppContext, Shared

HEARTBEAT_S = 1.0  # the status line's clock moves at least this often, also while a stage prepares
NO_RUN_YET = "No demo run yet."
SITE = "the demo site"  # a task's prompt names the site's address, which changes with every task


@dataclass
class PayoffJob:
    owner: str
    work_dir: Path
    recipe: PayoffRecipe
    started: float = field(default_factory=time.monotonic)
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (done, total)
    report: dict | None = None
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.progress[stage] = (done, total)

    def run(self, base_model: str | None) -> None:
        try:
            self.report = run_payoff(self.recipe, self.work_dir, base_model, self.on_progress).to_dict()
        except Exception as error:  # shown on the page, whatever stage failed
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.finished.set()


class PayoffJobs:
    """The app's one demo run, and each visitor's folder of runs."""

    def __init__(self, ctx: AppContext):
        self.ctx, self.lock, self.current = ctx, threading.Lock(), None

    def folder(self, owner: str) -> Path:
        return self.ctx.data_dir / "payoff" / owner_slug(owner)

    def start_or_join(self, owner: str) -> PayoffJob:
        with self.lock:
            job = self.current
            if job is not None and not job.finished.is_set():
                if job.owner != owner:
                    raise gr.Error("Another visitor's demo is running (it uses every CPU core): try again in a few "
                                   "minutes.")
                return job
            try:
                recipe = PayoffRecipe.from_settings(self.ctx.settings)
            except PayoffError as error:
                raise gr.Error(str(error)) from None
            work_dir = self.folder(owner) / time.strftime("%Y%m%d-%H%M%S")
            job = self.current = PayoffJob(owner, work_dir, recipe)
        threading.Thread(target=job.run, args=(self.ctx.default_model,), daemon=True, name="payoff").start()
        return job

    def running(self, owner: str) -> PayoffJob | None:
        job = self.current
        return job if job is not None and job.owner == owner and not job.finished.is_set() else None

    def last_report(self, owner: str) -> dict | None:
        reports = sorted(self.folder(owner).glob(f"*/{REPORT_FILE}"))
        return json.loads(reports[-1].read_text()) if reports else None


# ---- what the page shows --------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def status_markdown(job: PayoffJob) -> str:
    """Each stage with where it stands, and the time since the start (it moves every second: a heartbeat)."""
    lines = [f"**Running the demo** · {_clock(time.monotonic() - job.started)} so far (about 20 minutes on 2 CPU "
             "cores)"]
    current = next((stage for stage in reversed(STAGES) if stage in job.progress), None)
    for number, stage in enumerate(STAGES, 1):
        done, total = job.progress.get(stage, (0, 0))
        if stage not in job.progress:
            state = "waiting"
        elif stage != current or (total and done >= total):
            state = f"done ({done} of {total})"
        elif done == 0:
            state = "preparing…"
        else:
            state = f"{done} of {total}…"
        lines.append(f"{number}. {STAGE_NAMES[stage]}: {state}")
    return "\n".join(lines)


def result_markdown(report: dict) -> str:
    seconds = report.get("seconds", {})
    train = report.get("train", {})
    lines = [f"**{task_sentence(report)}**",
             f"Trained on {report['train_traces']} teacher traces ({train.get('steps')} training steps) in "
             f"{_clock(seconds.get('total', 0))} all told: collect {_clock(seconds.get('collect', 0))}, train "
             f"{_clock(seconds.get('train', 0))}, base {_clock(seconds.get('base', 0))}, fine-tuned "
             f"{_clock(seconds.get('tuned', 0))}."]
    if report["heldout_tasks"] < SMALL_SAMPLE:
        k = report["heldout_tasks"]
        lines.append(f"That is a small sample ({k} task{'s' if k != 1 else ''}, fewer than {SMALL_SAMPLE}): one task "
                     f"more or less moves the share by {100 / k:.0f} points.")
    return "\n\n".join(lines)


def _attempt(side: dict | None) -> Attempt:
    if not side:
        return Attempt(None, "")
    steps = f"{side.get('steps', 0)} step(s)"
    return Attempt(side["success"], side.get("answer") or "",
                   steps if side["success"] else f"{side.get('reason') or 'failed'}; {steps}")


def tasks_html(report: dict) -> str:
    """Each task once: its prompt and a right answer, then each model's answer and verdict."""
    return side_by_side_html("Held-out task", [
        (task["prompt"].replace("{base_url}", SITE), task["expected"], _attempt(task.get("base")),
         _attempt(task.get("tuned"))) for task in report.get("tasks", [])])


def finished_outputs(report: dict | None) -> tuple:
    if report is None:
        return "", "", ""
    return result_markdown(report), bars_html(plain_metrics(report)), tasks_html(report)


def build(ctx: AppContext, shared: Shared, tab) -> None:
    """The panel, inside the Evaluate tab (`tab`, whose selection shows the running or last run)."""
    jobs = PayoffJobs(ctx)
    recipe = ctx.settings.get("demo") or {}
    gr.Markdown("### The demo in one click\nNo other tab needed: the scripted teacher solves "
                f"{recipe.get('train_traces', '?')} tasks on a local shop website in a real browser, the small model "
                f"trains on those traces, then the base and the fine-tuned model each try "
                f"{recipe.get('heldout_tasks', '?')} tasks they have never seen. About 20 minutes on 2 CPU cores.")
    button = gr.Button("Run the demo: collect, train, compare", variant="primary", elem_id="demo-run")
    status = gr.Markdown(elem_id="demo-status")
    result = gr.Markdown(elem_id="demo-result")
    bars = gr.HTML(elem_id="demo-bars", css_template=CSS)
    tasks = gr.HTML(elem_id="demo-tasks", css_template=CSS)

    def run(owner):
        job = jobs.start_or_join(require_owner(owner))
        while not job.finished.wait(HEARTBEAT_S):
            yield status_markdown(job), gr.update(), gr.update(), gr.update()
        if job.error:
            raise gr.Error(f"The demo stopped: {job.error}")
        yield (f"Done in {_clock(job.report['seconds']['total'])}. Files: `{job.work_dir}`",
               *finished_outputs(job.report))

    def show(owner):
        if not owner:  # the page is still loading: its owner's own event follows
            return gr.update(), gr.update(), gr.update(), gr.update()
        job = jobs.running(owner)
        if job is not None:
            return (status_markdown(job) + "\n\nStill running: press the button to follow it live.",
                    *finished_outputs(None))
        report = jobs.last_report(owner)
        return ("Your last demo run:" if report else NO_RUN_YET), *finished_outputs(report)

    button.click(run, [shared.owner], [status, result, bars, tasks], concurrency_limit=None)
    gr.on([tab.select, shared.owner.change], show, [shared.owner], [status, result, bars, tasks],
          show_progress="hidden")
