"""The demo in one click, at the top of the Evaluate tab: `mcpft demo payoff` (collect teacher traces in the browser,
train, run the held-out tasks with the base and the fine-tuned model) with progress per stage, then the verdict in one
sentence, a grouped bar per measure, and each task with both models' answers side by side.

It needs nothing from the other tabs. One run at a time in the app (it uses every CPU core); a reloaded page finds
the running run, or the visitor's last finished one, again.
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from mcpft.demo.payoff import (REPORT_FILE, STAGE_NAMES, STAGES, PayoffError, PayoffRecipe, plain_metrics,
                               run_payoff, task_sentence)
from mcpft.ui.owner import owner_slug, require_owner
from mcpft.ui.state import AppContext, Shared

HEARTBEAT_S = 1.0  # the status line's clock moves at least this often, also while a stage prepares
SMALL_SAMPLE = 20
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


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def bars_html(report: dict) -> str:
    """One group per measure: the base's bar beside the fine-tuned one's, each with its figure."""
    groups = []
    for name, base, tuned in plain_metrics(report):
        bars = "".join(
            f'<div class="mcpft-bar-row"><span class="mcpft-bar-label">{label}</span>'
            f'<span class="mcpft-bar {kind}" style="width:{0 if value is None else 100 * value:.0f}%"></span>'
            f'<span class="mcpft-bar-value">{_percent(value)}</span></div>'
            for label, kind, value in (("base", "base", base), ("fine-tuned", "tuned", tuned)))
        groups.append(f'<div class="mcpft-bar-group"><div class="mcpft-bar-name">{html.escape(name)}</div>{bars}</div>')
    return f'<div class="mcpft-bars">{"".join(groups)}</div>'


def _verdict(side: dict | None) -> str:
    if not side:
        return '<span class="mcpft-fail">not run</span>'
    answer = html.escape(side.get("answer") or "(no answer)")
    mark = '<span class="mcpft-pass">✓ passed</span>' if side["success"] else \
        f'<span class="mcpft-fail">✗ failed</span> <small>({html.escape(side.get("reason") or "")})</small>'
    return f"{mark}<br>{answer}<br><small>{side.get('steps', 0)} step(s)</small>"


def tasks_html(report: dict) -> str:
    """Each task once: its prompt and a right answer, then each model's answer and verdict (wraps, no sideways
    scrolling)."""
    rows = "".join(
        f"<tr><td><b>{html.escape(task['prompt'].replace('{base_url}', SITE))}</b><br><small>Expected: {html.escape(task['expected'])}"
        f"</small></td><td>{_verdict(task.get('base'))}</td><td>{_verdict(task.get('tuned'))}</td></tr>"
        for task in report.get("tasks", []))
    return ('<table class="mcpft-tasks"><colgroup><col style="width:40%"><col style="width:30%"><col style="width:30%">'
            "</colgroup><thead><tr><th>Held-out task</th><th>Base model</th><th>Fine-tuned model</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


CSS = """
.mcpft-bars {display: flex; flex-wrap: wrap; gap: 1.5em;}
.mcpft-bar-group {flex: 1 1 16em;}
.mcpft-bar-name {font-weight: 600; margin-bottom: .3em;}
.mcpft-bar-row {display: flex; align-items: center; gap: .5em; margin: .2em 0;}
.mcpft-bar-label {width: 6.5em; font-size: .9em;}
.mcpft-bar {display: inline-block; height: 1.1em; min-width: 2px; max-width: 60%; border-radius: 3px;}
.mcpft-bar.base {background: #9ca3af;}
.mcpft-bar.tuned {background: #f97316;}
.mcpft-tasks {width: 100%; table-layout: fixed; border-collapse: collapse;}
.mcpft-tasks td, .mcpft-tasks th {border-top: 1px solid #e5e7eb; padding: .4em; vertical-align: top;
                                  overflow-wrap: anywhere; text-align: left;}
.mcpft-pass {color: #15803d; font-weight: 600;}
.mcpft-fail {color: #b91c1c; font-weight: 600;}
"""


def finished_outputs(report: dict | None) -> tuple:
    if report is None:
        return "", "", ""
    return result_markdown(report), bars_html(report), tasks_html(report)


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
        if not owner:
            return "", *finished_outputs(None)
        job = jobs.running(owner)
        if job is not None:
            return (status_markdown(job) + "\n\nStill running: press the button to follow it live.",
                    *finished_outputs(None))
        report = jobs.last_report(owner)
        return ("Your last demo run:" if report else ""), *finished_outputs(report)

    button.click(run, [shared.owner], [status, result, bars, tasks], concurrency_limit=None)
    gr.on([tab.select, shared.owner.change], show, [shared.owner], [status, result, bars, tasks],
          show_progress="hidden")
