"""Running as a Hugging Face Space: which hardware the app is on, the host it listens on, and ZeroGPU.

On ZeroGPU a process holds a GPU only inside a function wrapped with `spaces.GPU(duration=...)`, and only for that
duration; `gpu(duration)` is that wrapper there and changes nothing anywhere else (`spaces` absent, or present on
other hardware, where `spaces.GPU` itself is a no-op). Durations are estimated from the work: steps to train, steps to
score, capped at what one ZeroGPU call may ask for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# One call's ceiling: ZeroGPU refuses longer requests ("illegal duration"; its limit depends on the visitor's plan).
ZEROGPU_MAX_S = int(os.environ.get("MCPFT_ZEROGPU_MAX_S", "300"))
GPU_LOAD_S = 45  # loading the base model onto the GPU (Unsloth's patching included), measured order of magnitude
GPU_TRAIN_STEP_S = 1.5  # one optimizer step of a LoRA on a 0.6B model at a few thousand tokens, with margin
GPU_SCORE_STEP_S = 2.0  # one scored assistant step (a generation of up to a few hundred tokens), with margin

ZERO_GPU_LIMITS = (
    "On ZeroGPU a GPU is lent per call: training and evaluation each ask for one call of at most "
    f"{ZEROGPU_MAX_S} s (estimated from the steps; a longer run is refused before it starts: lower Max steps, or use "
    "GPU hardware). The embedded endpoint (the Agent tab's model and the Evaluate tab's live chat) is a server that "
    "runs all the time, which ZeroGPU cannot lend a GPU to: it serves on the CPU. Stop does not reach a run inside a "
    "ZeroGPU call; it ends at its step limit or its duration. ZeroGPU also runs only the torch versions it supports."
)


class ZeroGPULimit(RuntimeError):
    """The work needs more GPU time than one ZeroGPU call may have."""


def on_space() -> bool:
    """A Hugging Face Space sets SPACE_ID (owner/name) in the app's environment."""
    return bool(os.environ.get("SPACE_ID"))


def on_zero_gpu() -> bool:
    """ZeroGPU hardware: the same test as `spaces` itself (spaces/config.py: SPACES_ZERO_GPU is 1, t or true)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def server_host(requested: str | None) -> str | None:
    """The address to listen on: what was asked, else 0.0.0.0 on a Space (its proxy connects from outside the
    container), else None (Gradio's 127.0.0.1)."""
    if requested:
        return requested
    return "0.0.0.0" if on_space() else None


def hardware() -> str:
    """"zero-gpu", "gpu" (CUDA) or "cpu". On ZeroGPU CUDA is not asked about: only `spaces` may touch it first."""
    if on_zero_gpu():
        return "zero-gpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def hardware_note(kind: str | None = None) -> str:
    """What this hardware does, one paragraph for the page."""
    kind = kind or hardware()
    if kind == "zero-gpu":
        return "**Hardware: ZeroGPU.** " + ZERO_GPU_LIMITS
    if kind == "gpu":
        return ("**Hardware: GPU.** The embedded endpoint serves space.yaml's GPU base model; training takes the "
                "Unsloth path when Unsloth is installed (requirements.txt installs it), else TRL + PEFT.")
    return ("**Hardware: CPU.** The offline demo: the packaged SmolLM2 and the scripted teacher in the embedded "
            "endpoint, LoRA training with TRL + PEFT on the CPU (minutes for a few steps).")


def capped(seconds: float) -> int:
    """`seconds` rounded up, or ZeroGPULimit when one ZeroGPU call may not last that long."""
    needed = math.ceil(seconds)
    if needed > ZEROGPU_MAX_S:
        raise ZeroGPULimit(f"This needs about {needed} s of GPU, and one ZeroGPU call may have at most "
                           f"{ZEROGPU_MAX_S} s: ask for fewer steps, or run the Space on GPU hardware.")
    return needed


def training_seconds(steps: int) -> int:
    """GPU time for `steps` optimizer steps, model loading included."""
    return capped(GPU_LOAD_S + max(1, steps) * GPU_TRAIN_STEP_S)


def evaluation_seconds(scored_steps: int, models: int = 2) -> int:
    """GPU time to score `scored_steps` assistant steps with each of `models` models (base and fine-tuned)."""
    return capped(models * (GPU_LOAD_S + max(1, scored_steps) * GPU_SCORE_STEP_S))


def gpu(duration: Callable[..., int] | int) -> Callable[[F], F]:
    """`spaces.GPU(duration=duration)` on ZeroGPU (a callable gets the wrapped function's arguments and returns
    seconds); elsewhere the function unchanged."""
    if not on_zero_gpu():
        return lambda fn: fn
    import spaces  # on ZeroGPU the Space installs it; imported only here, so other hardware never needs it

    return spaces.GPU(duration=duration)
