"""Train tab: LoRA fine-tune a base model on the visitor's curated traces, with a live loss plot, then merge or push.
One training job runs at a time per app (Gradio's queue shows the others their place); stop keeps the last step."""

from __future__ import annotations

import os
import queue
import threading
import time
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

POLL_S = 30.0  # the stream re-checks a silent training thread this often
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
    if plan["estimated_s"] is not None:
        lines.append(f"Estimated time on this CPU: about {max(1, round(plan['estimated_s'] / 60))} min (from the "
                     "training speed measured on 2 cores; loading adds about half a minute).")
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


def build(ctx: AppContext, shared: Shared) -> None:
    try:
        defaults, settings_error = config_from_settings(ctx.settings.get("training")), ""
    except TrainError as error:  # shown on the tab; the app still starts, on TrainConfig's own defaults
        defaults, settings_error = TrainConfig(), str(error)
    known = [spec for spec in dict.fromkeys([ctx.default_model, *((ctx.settings.get("base_model") or {}).values()
                                                                  if isinstance(ctx.settings.get("base_model"), dict)
                                                                  else [])]) if spec]
    with gr.Tab("Train", id="train") as tab:
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

    def run_config(path, r, alpha, lr, n_epochs, accum, steps, length, seed_) -> TrainConfig:
        try:
            return TrainConfig(lora_r=int(r), lora_alpha=int(alpha), learning_rate=float(lr), epochs=float(n_epochs),
                               gradient_accumulation_steps=int(accum), max_steps=int(steps) or None,
                               max_length=int(length) or None, seed=int(seed_), backend=path)
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

    def start(owner, base, path, tag_text, heldout, flagged, r, alpha, lr, n_epochs, accum, steps, length, seed_):
        require_owner(owner)
        config = run_config(path, r, alpha, lr, n_epochs, accum, steps, length, seed_)
        rows, n_traces = training_rows(ctx, owner, tag_text, heldout, bool(flagged))
        try:  # said before the run starts, above all the rows it will leave out
            plan = plan_text(training_plan(config, rows, base or None, ctx.data_dir), n_traces)
        except (TrainError, ModelError, RenderError) as error:
            raise gr.Error(f"Nothing would train: {error}") from None
        out = runs_dir(ctx, owner) / time.strftime("%Y%m%d-%H%M%S")
        stop_event = threading.Event()
        ctx.train_stops[owner] = stop_event
        events: queue.Queue = queue.Queue()

        def work():
            try:
                events.put(train(config, rows, out, base_model=base or None, data_dir=ctx.data_dir,
                                 on_progress=events.put, stop_event=stop_event,
                                 source={"kind": "store", "app": True, "traces": n_traces}))
            except Exception as error:
                events.put(error)

        lines = [device_text(path).replace("**", ""), f"{len(rows)} row(s) from {n_traces} trace(s); base model "
                 f"{model_name(base or None)}; output {out}", "preparing: loading the model, rendering the rows…"]
        points: list[tuple[int, float]] = []
        worker = threading.Thread(target=work, name="mcpft-train", daemon=True)
        worker.start()
        yield progress_html(0, 1, "preparing…"), loss_frame(points), "\n".join(lines), plan, gr.update()
        try:
            while True:
                try:
                    event = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if isinstance(event, Progress):
                    if event.loss is not None:
                        points.append((event.step, event.loss))
                    lines.append(progress_note(event))
                    yield (progress_html(event.step, event.total, progress_note(event)), loss_frame(points),
                           "\n".join(lines), "", gr.update())
                    continue
                if isinstance(event, Exception):
                    message = str(event) if isinstance(event, (TrainError, ModelError, RenderError)) else \
                        f"{type(event).__name__}: {event}"
                    raise gr.Error(f"Training failed: {message}")
                summary = event.summary()
                loss = "–" if event.final_loss is None else f"{event.final_loss:.4f}"
                lines.append(f"{'stopped' if event.stopped else 'finished'}: {event.steps}/{event.total_steps} steps "
                             f"in {event.runtime_s:.0f} s, final loss {loss}")
                done = (f"**{'Stopped' if event.stopped else 'Done'}** via {event.path}: {event.steps}/"
                        f"{event.total_steps} steps, final loss {loss}. Adapter: `{summary['adapter_dir']}`"
                        + (f" · {len(event.rows_left_out)} row(s) left out (too long)" if event.rows_left_out else ""))
                choices = list_runs(ctx, owner)
                yield (progress_html(event.steps, event.total_steps, lines[-1]), loss_frame(points), "\n".join(lines),
                       done, gr.update(choices=choices, value=summary["adapter_dir"]))
                return
        finally:
            if worker.is_alive():  # the visitor left or the stream failed: end the run cleanly
                stop_event.set()
                worker.join()
            ctx.train_stops.pop(owner, None)

    def stop(owner):
        stop_event = ctx.train_stops.get(require_owner(owner))
        if stop_event is None:
            raise gr.Error("No training run of yours is in progress.")
        stop_event.set()
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
                    learning_rate, epochs, accumulation, max_steps, max_length, seed]
    plan_button.click(check_plan, train_inputs, [plan_note])
    start_button.click(start, train_inputs, [progress, loss_plot, log, result, run],
                       concurrency_limit=1, concurrency_id="train")
    stop_button.click(stop, [owner], [result])
    tab.select(lambda b, o: (device_text(b), refresh(o)), [backend, owner], [device, run], show_progress="hidden")
    owner.change(refresh, [owner], [run], show_progress="hidden")
    backend.change(device_text, [backend], [device])
    refresh_button.click(refresh, [owner], [run])
    merge_button.click(merge, [owner, run, merge_dtype], [run_note])
    push_button.click(push, [owner, run, what, repo_id, private, token], [run_note])
