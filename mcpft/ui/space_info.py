"""What the page says on a Hugging Face Space (who the visitor is, the hardware, where data is kept), and ZeroGPU's
wrapping of the GPU work (training, evaluation) with a duration estimated from each request."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import gradio as gr

from mcpft.config import PERSISTENT_ROOT
from mcpft.space import ZeroGPULimit, evaluation_seconds, gpu, hardware_note, on_zero_gpu, training_seconds
from mcpft.ui.state import AppContext


def visitor_text(profile: gr.OAuthProfile | None) -> str:
    """Signed in or not, and what that means for what is kept (Gradio fills `profile` from the Space's OAuth)."""
    if profile is not None:
        return (f"Signed in as **{profile.username}**: your traces, runs and exports are kept under your Hugging Face "
                "account on this Space, and only you see them.")
    return ("**You are not signed in.** You can use everything; your traces and runs are kept under a private id "
            "stored in this browser, so another browser (or cleared site data) starts afresh, and pushing to the Hub "
            "needs a sign-in. Sign in with Hugging Face to keep them under your account.")


def space_banner(ctx: AppContext) -> str:
    """The hardware and whether the data survives a restart."""
    return f"{hardware_note()} {storage_note(Path(ctx.data_dir))}"


def storage_note(data_dir: Path) -> str:
    """Where data is kept: on /data (persistent storage), where MCPFT_HOME says (the owner's choice), or in the
    container only (no persistent storage: `mcpft.config.data_dir` found no writable /data)."""
    if data_dir.resolve().is_relative_to(PERSISTENT_ROOT):
        return f"Data is kept in `{data_dir}` on the Space's persistent storage."
    if os.environ.get("MCPFT_HOME"):
        return f"Data is kept in `{data_dir}` (MCPFT_HOME)."
    return (f"**No persistent storage**: data is in `{data_dir}` and is lost when the Space restarts (the owner "
            "can turn persistent storage on in the Space's settings).")


def _bound(fn, args, kwargs) -> dict:
    try:
        return inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}


def _count(value, default: int = 0) -> int:
    try:
        return int(value or default)
    except (TypeError, ValueError):
        return default


def training_duration(ctx: AppContext, fn):
    """Seconds of GPU for one Train tab start: its max steps, else its rows × epochs ÷ accumulation."""
    from mcpft.ui.train_tab import training_rows

    def duration(*args, **kwargs) -> int:
        given = _bound(fn, args, kwargs)
        steps = _count(given.get("steps"))
        if steps <= 0:
            try:
                rows, _ = training_rows(ctx, given["owner"], given["tag_text"], given["heldout"],
                                        bool(given["flagged"]))
            except (KeyError, gr.Error):
                rows = []
            steps = math.ceil(len(rows) * max(1, _count(given.get("n_epochs"), 1)) /
                              max(1, _count(given.get("accum"), 1)))
        return _within_limit(training_seconds, steps)

    return duration


def evaluation_duration(ctx: AppContext, fn):
    """Seconds of GPU for one Evaluate run: the held-out assistant steps, scored by two models."""
    from mcpft.ui.evaluate_tab import heldout_rows

    def duration(*args, **kwargs) -> int:
        given = _bound(fn, args, kwargs)
        try:
            rows = heldout_rows(ctx, given["owner"], given["tag"])
        except (KeyError, gr.Error):
            rows = []
        steps = sum(1 for row in rows for message in row.get("messages", []) if message.get("role") == "assistant")
        return _within_limit(evaluation_seconds, steps)

    return duration


def _within_limit(estimate, steps: int) -> int:
    try:
        return estimate(steps)
    except ZeroGPULimit as error:
        raise gr.Error(str(error)) from None


GPU_WORK = {"train": training_duration, "evaluate": evaluation_duration}  # concurrency ids the tabs give that work


def wrap_gpu_work(demo: gr.Blocks, ctx: AppContext) -> None:
    """On ZeroGPU, run each training and evaluation request inside `spaces.GPU` with a duration estimated from
    that request. The tabs name that work by its concurrency id, so they need not know about ZeroGPU."""
    if not on_zero_gpu():
        return
    for block_fn in demo.fns.values():
        make_duration = GPU_WORK.get(block_fn.concurrency_id)
        if make_duration is not None and block_fn.fn is not None:
            block_fn.fn = gpu(make_duration(ctx, block_fn.fn))(block_fn.fn)
