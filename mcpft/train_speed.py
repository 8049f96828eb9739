"""How fast training runs on this machine, for the time a run is estimated at before it starts.

Every finished CPU run records the rate it measured (tokens/s over its training steps) for this machine, model and
precision in the data dir; a plan uses the latest such rate, and the reference rates measured for SmolLM2-135M on
2 cores (docs/benchmarks.md) until this machine has one. A rate is kept as if LoRA were in every layer, so a run
with another shape (full fine-tuning, LoRA in the last layers only) prices the next one of any shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

from mcpft.trace import now_iso

SPEED_FILE = "train_speed.json"  # in the data dir: {machine: {"model · precision": rate}}
# LoRA SFT tokens/s of SmolLM2-135M on 2 CPU cores at 1k- and 4k-token rows (bench/train_throughput.py): per token,
# long rows cost more (attention is quadratic), so a rate measured at one row length is carried to another by these.
REFERENCE_TOKENS_PER_S = {"bf16": (264.0, 146.0), "fp32": (168.0, 106.0)}
FULL_FINETUNE_COST = 1.15  # full fine-tuning's time per row over LoRA's: 1,253 s against 1,087 s, 97 demo rows, fp32
# The share of a LoRA step's time that runs only from the lowest LoRA layer up (the backward pass and the LoRA
# products): 97 demo rows trained in 656 s with LoRA in SmolLM2's last 15 of 30 layers, 1,087 s in all 30 (fp32 CPU).
LORA_BACKWARD_SHARE = 0.8


def run_cost(full_finetune: bool, lora_layers: list[int] | None) -> float:
    """A run's time per token against LoRA in every decoder layer (`lora_layers`: the indices of the model's last
    layers that get LoRA, so the last index + 1 is its depth; None: all)."""
    if full_finetune:
        return FULL_FINETUNE_COST
    if lora_layers is None:
        return 1.0
    return 1 - LORA_BACKWARD_SHARE + LORA_BACKWARD_SHARE * len(lora_layers) / (lora_layers[-1] + 1)


def reference_rate(precision: str, mean_row: float) -> float:
    """Reference tokens/s at rows of `mean_row` tokens (interpolated between 1k and 4k, flat outside)."""
    short, long_ = REFERENCE_TOKENS_PER_S[precision]
    return short + (long_ - short) * min(1.0, max(0.0, (mean_row - 1000) / 3000))


def machine() -> str:
    """This machine as far as training speed goes: its CPU model and core count."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{cpu or platform.processor() or platform.machine()} · {os.cpu_count()} cores"


def _key(model: str, precision: str) -> str:
    return f"{model} · {precision}"


def _read(data_dir: Path) -> dict:
    path = Path(data_dir) / SPEED_FILE
    try:
        speeds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: the estimate falls back to the reference rates
        return {}
    return speeds if isinstance(speeds, dict) else {}


def record_speed(data_dir: Path, model: str, precision: str, tokens_per_s: float, mean_row: float, cost: float,
                 run: str) -> None:
    """Keep a finished run's measured rate for this machine (the file written whole: a temporary file of this
    process renamed over it). A data dir that cannot be written only costs the next estimate its local figure."""
    speeds, here = _read(data_dir), machine()
    mine = speeds.get(here) if isinstance(speeds.get(here), dict) else {}
    mine[_key(model, precision)] = {"tokens_per_s": round(tokens_per_s * cost, 2), "mean_row": round(mean_row),
                                    "measured": now_iso(), "run": run}
    speeds[here] = mine
    path = Path(data_dir) / SPEED_FILE
    tmp = path.with_name(f".{SPEED_FILE}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(speeds, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def estimate(data_dir: Path, model: str, precision: str, tokens: float, mean_row: float, cost: float) -> dict:
    """Seconds to train `tokens` tokens in rows of `mean_row` tokens at `cost`, and where the rate comes from:
    {"seconds", "tokens_per_s", "source": "this machine" | "reference", "measured_at_row"}."""
    measured = (_read(data_dir).get(machine()) or {}).get(_key(model, precision))
    rate = reference_rate(precision, mean_row)
    source, measured_row = "reference", None
    if isinstance(measured, dict) and measured.get("tokens_per_s", 0) > 0 and measured.get("mean_row", 0) > 0:
        measured_row = measured["mean_row"]
        rate = measured["tokens_per_s"] * rate / reference_rate(precision, measured_row)
        source = "this machine"
    return {"seconds": round(tokens / rate * cost), "tokens_per_s": round(rate / cost, 1), "source": source,
            "measured_at_row": measured_row}
