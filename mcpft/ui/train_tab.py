"""Train tab: LoRA fine-tune a base model on the visitor's curated traces, with a live loss plot, then merge or push.
One training run at a time per app; it goes on when the page closes and a reloaded page follows it again; stop keeps the
last step."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import gradio as gr
import pandas as pd

from mcpft.hub import PushError, hub_failure, push_model
from mcpft.models import ModelError, model_name
from mcpft.render import RenderError
from mcpft.selection import HELDOUT_TAG, SelectionError, store_rows
from mcpft.train import (BACKENDS, CPU_MAX_LENGTH, GPU_MAX_LENGTH, MERGE_DTYPES, Progress, TrainConfig, TrainError,
                         choose_path, config_from_settings, merge_adapter, read_run_record, train, training_plan)
from mcpft.ui.owner import owner_slug, require_owner
from mcpft.ui.state import AppContext, Shared

PURPOSE = ("**Train** teaches a small model from your kept traces (LoRA fine-tuning): check what will train, start, "
           "and watch the loss fall.")
HEARTBEAT_S = 1.0  # the progress line's clock moves this often, also while the run prepares
MERGED_SUFFIX = "-merged"


def runs_dir(ctx: AppContext, owner: str) -> Path:
    return ctx.data_dir / "runs" / owner_slug(owner)


def list_runs(ctx: AppContext, owner: str) -> list[tuple[str, str]]:
    """(label, folder) of the owner's trained adapters, newest first."""
    folder = runs_dir(ctx, owner)
    runs = sorted((p for p in folder.glob("*") if (p / "adapter_config.json").is_file()), reverse=True) \
        if folder.is_dir() else []
    choices = []
    for run in runs:
        record = read_run_record(run)
        loss = record.get("final_loss")
        label = (f"{run.name} · {record.get('base_model_name', '?')} · {record.get('steps', '?')} steps"
                 + (f" · loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
                 + (" · stopped" if record.get("status") == "stopped" else ""))
        choices.append((label, str(run)))
    return choices


def owned_run(ctx: AppContext, owner: str, run: str | None) -> Path:
    if not run:
        raise gr.Error("Pick a trained run first (train one above).")
    path = Path(run)
    if path.parent != runs_dir(ctx, require_owner(owner)) or not path.is_dir():
        raise gr.Error(f"No run {path.name!r}.")
    return path


def device_text(backend: str = "auto") -> str:
    import torch

    try:
        path, why = choose_path(backend)
    except TrainError as error:
        return f"**Training path unavailable:** {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        device = f"CPU only ({os.cpu_count()} cores)"
    return f"**Device:** {device} · **path:** {path} ({why})"


def training_rows(ctx: AppContext, owner: str, tags: str, heldout_tag: str, include_flagged: bool):
    """The owner's rows to train on: their included traces (with `tags`), never those tagged as held out."""
    wanted = [t.strip() for t in (tags or "").split(",") if t.strip()]
    try:
        rows, source = store_rows(ctx.store, wanted, include_flagged, owner=owner,
                                  heldout_tag=(heldout_tag or "").strip())
    except SelectionError as error:
        raise gr.Error(str(error)) from None
    return rows, source["traces"]


def plan_text(plan: dict, n_traces: int) -> str:
    """What a run would train, in words: rows that fit and those that do not (named, with why), tokens, time."""
    lines = [f"**{plan['rows_used']} of {plan['rows']} row(s) will train** (from {n_traces} trace(s)): "
             f"{plan['tokens']:,} tokens, {plan['trained_tokens']:,} of them trained, longest row {plan['longest']:,} "
             f"of the max length {plan['max_length']:,}; {plan['steps']} optimizer step(s)."]
    speed = plan["speed"]
    if speed is not None:
        basis = (f"this machine's last run, carried to these rows: {speed['tokens_per_s']:,.0f} tokens/s"
                 if speed["source"] == "this machine" else
                 "the speed measured on a reference 2-core CPU; a first run here measures this machine's")
        lines.append(f"Estimated time on this CPU: about {max(1, round(speed['seconds'] / 60))} min (from "
                     f"{basis}; loading adds about half a minute).")
    if plan["rows_left_out"]:
        lines.append(f"**{len(plan['rows_left_out'])} row(s) will be left out:** " + "; ".join(
            f"`{item['id']}` ({item['n_tokens']:,} tokens: {item['reason']})" for item in plan["rows_left_out"][:10])
            + (" …" if len(plan["rows_left_out"]) > 10 else "") + ". Raise the max length to keep them.")
    return "\n\n".join(lines)


def progress_html(step: int, total: int, note: str) -> str:
    return (f'<progress value="{step}" max="{max(total, 1)}" style="width:100%"></progress>'
            f'<div id="train-progress-text">{escape(note)}</div>')


def progress_note(p: Progress) -> str:
    parts = [f"step {p.step}/{p.total}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.tokens_per_s:
        parts.append(f"{p.tokens_per_s:.0f} tokens/s")
    if p.eta_s is not None:
        parts.append(f"ETA {p.eta_s:.0f} s")
    return " · ".join(parts)


def loss_frame(points: list[tuple[int, float]]) -> pd.DataFrame:
    """Typed columns even when empty: the plot takes its axis types from the first frame it gets."""
    return pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                         "loss": pd.Series([p[1] for p in points], dtype="float64")})


@dataclass
class TrainJob:
    """One visitor's training run as the page shows it. It lives in the app (`ctx.train_jobs`), not in the page, so
    a reloaded page shows the running or last run's progress, plot and log again."""

    out: Path
    plan: str
    lines: list[str]
    started: float = field(default_factory=time.monotonic)
    latest: Progress | None = None
    steps_done: tuple[int, int] = (0, 1)  # (steps, total) once the run ended
    points: list[tuple[int, float]] = field(default_factory=list)
    result: str = ""
    error: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def on_progress(self, event: Progress) -> None:
        if event.loss is not None:
            self.points.append((event.step, event.loss))
        self.latest = event
        self.lines.append(progress_note(event))

    def finish(self, outcome) -> None:
        loss = "–" if outcome.final_loss is None else f"{outcome.final_loss:.4f}"
        verb = "stopped" if outcome.stopped else "finished"
        self.lines.append(f"{verb}: {outcome.steps}/{outcome.total_steps} steps in {outcome.runtime_s:.0f} s, "
                          f"final loss {loss}")
        self.steps_done = (outcome.steps, outcome.total_steps)
        self.result = (f"**{verb.capitalize() if outcome.stopped else 'Done'}** via {outcome.path}: {outcome.steps}/"
                       f"{outcome.total_steps} steps, final loss {loss}. Adapter: `{outcome.summary()['adapter_dir']}`"
                       + (f" · {len(outcome.rows_left_out)} row(s) left out (too long)"
                          if outcome.rows_left_out else ""))
        self.finished.set()

    def fail(self, error: Exception) -> None:
        self.error = str(error) if isinstance(error, (TrainError, ModelError, RenderError)) else \
            f"{type(error).__name__}: {error}"
        self.lines.append(f"failed: {self.error}")
        self.finished.set()

    def view(self) -> tuple:
        """(progress bar, loss plot, log, result or plan) as the page shows them."""
        if self.finished.is_set():
            (step, total), note = self.steps_done, self.lines[-1]
        elif self.latest is None:  # the heartbeat: loading the model and rendering rows say nothing for a while
            step, total, note = 0, 1, f"preparing… {time.monotonic() - self.started:.0f} s"
        else:
            step, total, note = self.latest.step, self.latest.total, progress_note(self.latest)
        return (progress_html(step, total, note), loss_frame(self.points), "\n".join(self.lines),
                self.result or self.plan)


def build(ctx: AppContext, shared: Shared) -> None:
    try:
        defaults, settings_error = config_from_settings(ctx.settings.get("training")), ""
    except TrainError as error:  # shown on the tab; the app still starts, on TrainConfig's own defaults
        defaults, settings_error = TrainConfig(), str(error)
    known = [spec for spec in dict.fromkeys([ctx.default_model, *((ctx.settings.get("base_model") or {}).values()
                                                                  if isinstance(ctx.settings.get("base_model"), dict)
                                                                  else [])]) if spec]
    with gr.Tab("Train", id="train") as tab:
        gr.Markdown(PURPOSE, elem_id="train-purpose")
        device = gr.Markdown("**Device:** (checked when you open this tab)", elem_id="train-device")
        if settings_error:
            gr.Markdown(f"**space.yaml's training defaults are not used:** {settings_error}")
        with gr.Row():
            base_model = gr.Dropdown(known, value=ctx.default_model, allow_custom_value=True,
                                     label="Base model (folder, Hub id, or smollm2)", scale=3, elem_id="base-model")
            backend = gr.Radio(list(BACKENDS), value="auto", label="Path", scale=2)
        with gr.Row():
            tags = gr.Textbox(label="Only traces tagged (comma-separated; empty = all included traces)")
            heldout_tag = gr.Textbox(HELDOUT_TAG, label="Never train on traces tagged (the held-out set)")
            include_flagged = gr.Checkbox(False, label="Include flagged traces")
        with gr.Accordion("Hyperparameters (TrainConfig)", open=True):
            with gr.Row():
                lora_r = gr.Number(defaults.lora_r, label="LoRA r", precision=0, minimum=1)
                lora_alpha = gr.Number(defaults.lora_alpha, label="LoRA alpha", precision=0, minimum=1)
                lora_layers = gr.Number(defaults.lora_layers or 0, label="LoRA in the last N layers (0 = all)",
                                        precision=0, minimum=0, elem_id="lora-layers")
                learning_rate = gr.Number(defaults.learning_rate, label="Learning rate")
                epochs = gr.Number(defaults.epochs, label="Epochs")
            with gr.Row():
                accumulation = gr.Number(defaults.gradient_accumulation_steps, label="Gradient accumulation steps",
                                         precision=0, minimum=1)
                max_steps = gr.Number(defaults.max_steps or 0, label="Max steps (0 = by epochs)", precision=0,
                                      minimum=0, elem_id="max-steps")
                max_length = gr.Number(defaults.max_length or 0, label=f"Max length (0 = {CPU_MAX_LENGTH} on CPU, "
                                       f"{GPU_MAX_LENGTH} on GPU, capped by the model)", precision=0, minimum=0,
                                       elem_id="max-length")
                seed = gr.Number(defaults.seed, label="Seed", precision=0)
                reasoning = gr.Checkbox(defaults.reasoning, label="Train the thinking too (off: calls and answers "
                                        "only, what the demo's small model learns best)", elem_id="train-reasoning")
        with gr.Row():
            plan_button = gr.Button("Check what will train", elem_id="train-plan-button")
            start_button = gr.Button("Start training", variant="primary", elem_id="train-start")
            stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
        plan_note = gr.Markdown(elem_id="train-plan")
        progress = gr.HTML(progress_html(0, 1, "not started"), elem_id="train-progress")
        loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=280,
                                elem_id="loss-plot")
        log = gr.Textbox(label="Log", lines=8, max_lines=16, autoscroll=True, interactive=False, elem_id="train-log")
        result = gr.Markdown(elem_id="train-result")
        gr.Markdown("### Trained runs")
        with gr.Row():
            run = gr.Dropdown([], label="Run", scale=4, elem_id="train-run")
            refresh_button = gr.Button("Refresh", size="sm", scale=0)
        with gr.Row():
            merge_dtype = gr.Radio(list(MERGE_DTYPES), value="bf16", label="Merged weights")
            merge_button = gr.Button("Merge adapter into the base model")
        with gr.Row():
            if ctx.on_space:
                gr.LoginButton()
            what = gr.Radio(["adapter", "merged"], value="adapter", label="Push")
            repo_id = gr.Textbox(label="Hub model repo (OWNER/NAME)")
            private = gr.Checkbox(True, label="Private")
            token = gr.Textbox(label="Hugging Face token", type="password", visible=not ctx.on_space)
            push_button = gr.Button("Push")
        run_note = gr.Markdown()

    def run_config(path, r, alpha, layers, lr, n_epochs, accum, steps, length, seed_, thinking) -> TrainConfig:
        try:
            return TrainConfig(lora_r=int(r), lora_alpha=int(alpha), lora_layers=int(layers) or None,
                               learning_rate=float(lr), epochs=float(n_epochs),
                               gradient_accumulation_steps=int(accum), max_steps=int(steps) or None,
                               max_length=int(length) or None, seed=int(seed_), backend=path,
                               reasoning=bool(thinking))
        except (TrainError, TypeError, ValueError) as error:
            raise gr.Error(f"Hyperparameters: {error}") from None

    def check_plan(owner, base, path, tag_text, heldout, flagged, *hyperparameters):
        require_owner(owner)
        config = run_config(path, *hyperparameters)
        rows, n_traces = training_rows(ctx, owner, tag_text, heldout, bool(flagged))
        try:
            return plan_text(training_plan(config, rows, base or None, ctx.data_dir), n_traces)
        except (TrainError, ModelError, RenderError) as error:
            return f"**Nothing would train:** {error}"

    def start(owner, base, path, tag_text, heldout, flagged, *hyperparameters):
        require_owner(owner)
        config = run_config(path, *hyperparameters)
        rows, n_traces = training_rows(ctx, owner, tag_text, heldout, bool(flagged))
        try:  # said before the run starts, above all the rows it will leave out
            plan = plan_text(training_plan(config, rows, base or None, ctx.data_dir), n_traces)
        except (TrainError, ModelError, RenderError) as error:
            raise gr.Error(f"Nothing would train: {error}") from None
        if any(not job.finished.is_set() for job in ctx.train_jobs.values()):
            raise gr.Error("A training run is in progress (one at a time: it uses every CPU core). Its progress "
                           "shows here; try again when it ends.")
        out = runs_dir(ctx, owner) / time.strftime("%Y%m%d-%H%M%S")
        job = ctx.train_jobs[owner] = TrainJob(out, plan, [
            device_text(path).replace("**", ""), f"{len(rows)} row(s) from {n_traces} trace(s); base model "
            f"{model_name(base or None)}; output {out}", "preparing: loading the model, rendering the rows…"])

        def work():
            try:
                job.finish(train(config, rows, out, base_model=base or None, data_dir=ctx.data_dir,
                                 on_progress=job.on_progress, stop_event=job.stop_event,
                                 source={"kind": "store", "app": True, "traces": n_traces}))
            except Exception as error:
                job.fail(error)

        threading.Thread(target=work, name="mcpft-train", daemon=True).start()
        yield from follow(job, owner)

    def follow(job: TrainJob, owner: str):
        """The job's view every HEARTBEAT_S until it ends. Leaving the page does not stop the run: a reloaded page
        follows it again."""
        while not job.finished.wait(HEARTBEAT_S):
            yield *job.view(), gr.update()
        if job.error:
            raise gr.Error(f"Training failed: {job.error}")
        yield *job.view(), gr.update(choices=list_runs(ctx, owner), value=str(job.out))

    def show_job(owner):
        """On opening the tab: the visitor's running run, followed live, or their last run of this app session."""
        job = ctx.train_jobs.get(owner) if owner else None
        if job is None:
            yield gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
            return
        yield from follow(job, owner)

    def stop(owner):
        job = ctx.train_jobs.get(require_owner(owner))
        if job is None or job.finished.is_set():
            raise gr.Error("No training run of yours is in progress.")
        job.stop_event.set()
        return "Stopping after the current step (its adapter is kept)…"

    def refresh(owner):
        return gr.update(choices=list_runs(ctx, owner) if owner else [])

    def merge(owner, run_dir, dtype):
        folder = owned_run(ctx, owner, run_dir)
        out = folder.with_name(folder.name + MERGED_SUFFIX)
        try:
            merge_adapter(folder, out, dtype=dtype, data_dir=ctx.data_dir)
        except (TrainError, ModelError) as error:
            raise gr.Error(str(error)) from None
        return f"Merged into `{out}` ({dtype})."

    def push(owner, run_dir, which, repo, is_private, hf_token, oauth_token: gr.OAuthToken | None = None):
        folder = owned_run(ctx, owner, run_dir)
        if which == "merged":
            folder = folder.with_name(folder.name + MERGED_SUFFIX)
            if not folder.is_dir():
                raise gr.Error("This run has not been merged yet: merge it first.")
        credential = oauth_token.token if oauth_token is not None else (hf_token or None)
        try:
            url = push_model(folder, (repo or "").strip(), private=bool(is_private), token=credential)
        except PushError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # the Hub's refusals come in many types; the message is what matters
            raise gr.Error(f"The push failed: {hub_failure(error, (repo or '').strip()) or error}") from None
        return f"Pushed `{folder.name}` to [{url}]({url})."

    owner = shared.owner
    train_inputs = [owner, base_model, backend, tags, heldout_tag, include_flagged, lora_r, lora_alpha,
                    lora_layers, learning_rate, epochs, accumulation, max_steps, max_length, seed, reasoning]
    plan_button.click(check_plan, train_inputs, [plan_note])
    start_button.click(start, train_inputs, [progress, loss_plot, log, result, run],
                       concurrency_limit=1, concurrency_id="train")
    stop_button.click(stop, [owner], [result])
    tab.select(lambda b, o: (device_text(b), refresh(o)), [backend, owner], [device, run], show_progress="hidden")
    gr.on([tab.select, owner.change], show_job, [owner], [progress, loss_plot, log, result, run],
          show_progress="hidden")
    owner.change(refresh, [owner], [run], show_progress="hidden")
    backend.change(device_text, [backend], [device])
    refresh_button.click(refresh, [owner], [run])
    merge_button.click(merge, [owner, run, merge_dtype], [run_note])
    push_button.click(push, [owner, run, what, repo_id, private, token], [run_note])
