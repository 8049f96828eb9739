"""LoRA supervised fine-tuning on training rows: TRL + PEFT everywhere, Unsloth on CUDA when it is installed.

The rows come from the dataset stage (unroll) and are rendered here with `mcpft.render`, so the trained tokens are
exactly render's `train_mask`: the trainer gets a pre-tokenized dataset (`input_ids` + `assistant_masks`), from which
TRL's SFTTrainer builds the labels (-100 wherever the mask is 0). Rows longer than `max_length` are reported and left
out, never cut. Batch size 1 with gradient accumulation means no padding at all.

The output folder must be new or empty (a previous run's weights beside a new record would mix two runs); it holds
the PEFT adapter, the tokenizer with a chat template that renders tools, `mcpft_run.json` (config, data summary,
losses, outcome) and TensorBoard logs under `runs/`. Everything that can fail on the settings or the data (the
output folder, the path, the template, the length check) is checked before any weights load.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mcpft.config import data_dir as default_data_dir
from mcpft.dataset import without_reasoning
from mcpft.models import (adapter_problem, explain_out_of_memory, load_tokenizer, model_context, model_layers,
                          model_name, resolve_model)
from mcpft.render import Rendered, render_many
from mcpft.selection import rows_problem
from mcpft.trace import now_iso
from mcpft.train_speed import estimate, record_speed, run_cost

RUN_RECORD = "mcpft_run.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_MAX_LENGTH = 32768
CPU_MAX_LENGTH = 8192  # a browser agent's trace with Playwright's 25 tools is ~8k tokens
# Without recomputation a CPU step holds ~2.1 MB of activations per token (10.1 GB at 4.1k tokens,
# docs/benchmarks.md), and recomputing costs a third more time: by default on CPU only rows past this length do it.
CPU_CHECKPOINT_ABOVE = 4096
BACKENDS = ("auto", "unsloth", "trl+peft")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
END_OF_TURN = "<|im_end|>"
MEASURED_STEPS = 2  # a run this long or longer records its rate (after its first step) for this machine's estimates


class TrainError(Exception):
    """Training cannot start or went wrong in a way the user can fix; the message says what to change."""


def _option(default, help_text: str, **extra):
    """A TrainConfig field with its help text (a `None` default's text says what None means); the CLI's flags are
    generated from these, so they cannot drift. `extra`: `aliases` (more flags), `choices`, `settings_key` (its
    name in space.yaml's `training:` block)."""
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """The Trelis workshop's LoRA SFT recipe; `None` fields are resolved per device when training starts."""

    lora_r: int = _option(16, "LoRA rank")
    lora_alpha: int = _option(32, "LoRA alpha (updates are scaled by alpha / r)")
    lora_dropout: float = _option(0.0, "dropout on the LoRA layers")
    target_modules: tuple[str, ...] = _option(LORA_TARGETS, "modules that get LoRA layers (comma-separated)")
    lora_layers: int | None = _option(None, "LoRA layers in the model's last N decoder layers only (default: all): "
                                            "the backward pass stops below them, so a step costs less")
    learning_rate: float = _option(2e-4, "peak learning rate", aliases=("--lr",))
    epochs: float = _option(1.0, "passes over the training rows", settings_key="num_train_epochs")
    batch_size: int = _option(1, "rows per batch (1: no padding at all)")
    gradient_accumulation_steps: int = _option(4, "batches per optimizer step", aliases=("--grad-accum",))
    max_steps: int | None = _option(None, "optimizer steps, overriding epochs (default: as many as epochs give)")
    max_length: int | None = _option(None, f"tokens per row, longer rows are left out (default: {GPU_MAX_LENGTH} on "
                                           f"CUDA, {CPU_MAX_LENGTH} on CPU, capped by the model's context)")
    optim: str | None = _option(None, "transformers optimizer name (default: adamw_8bit on CUDA with "
                                      "bitsandbytes, else adamw_torch)")
    lr_scheduler_type: str = _option("linear", "transformers learning-rate schedule name")
    warmup_steps: float = _option(0.0, "warm-up steps; below 1, a fraction of all steps")
    weight_decay: float = _option(0.0, "weight decay")
    seed: int = _option(42, "seed of the LoRA init, the shuffling and the eval split")
    shuffle: bool = _option(True, "rows in a new seeded order each epoch; --no-shuffle trains them in the order "
                                  "given (the store's: the demo collects its templates in turn)")
    eval_fraction: float = _option(0.0, "share of traces held out for an eval loss (split by trace, never by row)")
    load_in_4bit: bool = _option(False, "QLoRA: 4-bit base weights (Unsloth path only)")
    full_finetune: bool = _option(False, "train every weight instead of LoRA layers (TRL, no PEFT): the output is a "
                                         "whole model, used as a model (--model DIR), not as an adapter")
    gradient_checkpointing: bool | None = _option(None, "recompute activations to save memory (default: on with "
                                                        f"CUDA; on CPU, for the rows over {CPU_CHECKPOINT_ABOVE} "
                                                        "tokens only)")
    backend: str = _option("auto", "auto: Unsloth on CUDA when installed, else TRL + PEFT", choices=BACKENDS)
    precision: str = _option("auto", "mixed precision: auto = bf16 autocast on a GPU or CPU with native bf16, fp16 "
                                     "on older GPUs, fp32 on other CPUs", choices=PRECISIONS)
    reasoning: bool = _option(True, "train the assistant's reasoning (its thinking) too; --no-reasoning drops it "
                                    "from the rows, so the model calls and answers without thinking aloud")

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.backend not in BACKENDS:
            raise TrainError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        for name in ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise TrainError(f"lora_layers must be at least 1 (or unset: all layers), got {self.lora_layers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_length is not None and self.max_length < 16:
            raise TrainError(f"max_length must be at least 16 tokens, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.full_finetune and (self.backend == "unsloth" or self.load_in_4bit or self.lora_layers):
            raise TrainError("full_finetune trains every weight with TRL: it cannot go with backend unsloth, "
                             "load_in_4bit or lora_layers (LoRA only here)")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise TrainError("learning_rate and epochs must be positive")


def config_from_settings(training: dict | None, **overrides) -> TrainConfig:
    """A TrainConfig from space.yaml's `training:` block (TrainConfig's field names; `num_train_epochs` for `epochs`,
    as the UI reads it), `overrides` taking precedence."""
    names = {f.name: f.name for f in fields(TrainConfig)}
    names |= {f.metadata["settings_key"]: f.name for f in fields(TrainConfig) if "settings_key" in f.metadata}
    training = training or {}
    if not isinstance(training, dict):
        raise TrainError(f"space.yaml training: must map TrainConfig fields to values, got {training!r}")
    unknown = sorted(set(training) - set(names))
    if unknown:
        raise TrainError(f"space.yaml training: unknown key(s) {', '.join(unknown)}; known: {', '.join(names)}")
    try:
        return TrainConfig(**({names[key]: value for key, value in training.items()} | overrides))
    except TypeError as error:  # a value of the wrong type, e.g. `lora_r: sixteen`
        raise TrainError(f"space.yaml training: {error}") from None


@dataclass
class Progress:
    """One finished optimizer step, as the progress callback sees it."""

    step: int
    total: int
    loss: float | None
    lr: float | None
    tokens_per_s: float | None
    eta_s: float | None
    epoch: float | None = None


@dataclass
class TrainResult:
    out_dir: Path
    path: str  # "unsloth", "trl+peft" or "trl" (full fine-tuning)
    why: str
    steps: int  # finished optimizer steps
    total_steps: int
    final_loss: float | None
    stopped: bool  # a stop request ended training early
    adapter_dir: Path | None  # None when stopped before the first step finished
    rows_used: int
    rows_left_out: list[dict]
    eval_loss: float | None = None
    runtime_s: float = 0.0
    baseline: dict | None = field(default=None, repr=False)  # the `baseline` callable's report, when one was given
    precision: str = ""  # "bf16", "fp16" or "fp32": what the steps ran in ("auto" follows the CPU or GPU)

    def summary(self) -> dict:
        return {"out": str(self.out_dir), "path": self.path, "why": self.why, "steps": self.steps,
                "total_steps": self.total_steps, "final_loss": self.final_loss, "eval_loss": self.eval_loss,
                "stopped": self.stopped, "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
                "rows_used": self.rows_used, "rows_left_out": self.rows_left_out,
                "runtime_s": round(self.runtime_s, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Choices made before anything is loaded


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_path(backend: str = "auto") -> tuple[str, str]:
    """("unsloth" | "trl+peft", why): Unsloth on CUDA when it is importable, TRL + PEFT otherwise."""
    if backend == "trl+peft":
        return "trl+peft", "TRL + PEFT was asked for"
    has_cuda = cuda_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if backend == "unsloth":
        if not (has_cuda and has_unsloth):
            missing = "a CUDA device" if not has_cuda else "the unsloth package (pip install -r requirements.txt)"
            raise TrainError(f"the Unsloth path was asked for, but it needs {missing}")
        return "unsloth", "Unsloth was asked for"
    if not has_cuda:
        return "trl+peft", "no CUDA device, so TRL + PEFT (Unsloth needs CUDA)"
    if not has_unsloth:
        return "trl+peft", "CUDA is available but unsloth is not installed, so TRL + PEFT"
    import torch

    return "unsloth", f"CUDA device {torch.cuda.get_device_name(0)} and unsloth installed"


def training_path(config: TrainConfig) -> tuple[str, str]:
    """choose_path for this config; full fine-tuning is TRL without PEFT (Unsloth's path here is LoRA only)."""
    if config.full_finetune:
        return "trl", "full fine-tuning: TRL without PEFT"
    return choose_path(config.backend)


def resolve_max_length(config: TrainConfig, model_context: int | None, on_cuda: bool) -> int:
    """The configured max_length, else the device default; never beyond the model's context."""
    length = config.max_length or (GPU_MAX_LENGTH if on_cuda else CPU_MAX_LENGTH)
    return min(length, model_context) if model_context else length


def resolve_optim(config: TrainConfig, on_cuda: bool) -> str:
    if config.optim:
        return config.optim
    if on_cuda and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit"
    return "adamw_torch"


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` must be new or an empty folder: an old run's adapter beside a new run record would mix two runs."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"output folder {out} is a file: choose a new folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        held = "a previous run" if (out / RUN_RECORD).exists() else f"{len(entries)} other file(s)"
        raise TrainError(f"output folder {out} already holds {held} ({', '.join(entries[:4])}"
                         f"{', …' if len(entries) > 4 else ''}): choose a new folder or remove it")
    return out


@dataclass
class PreparedRows:
    train: list[tuple[dict, Rendered]]
    eval: list[tuple[dict, Rendered]]
    left_out: list[dict]  # {"id", "reason", "n_tokens"}
    max_length: int

    def summary(self) -> dict:
        kept = self.train + self.eval
        return {
            "rows": len(kept) + len(self.left_out), "rows_used": len(self.train), "eval_rows": len(self.eval),
            "rows_left_out": self.left_out, "traces": len({row["trace_id"] for row, _ in self.train}),
            "tokens": sum(r.n_tokens for _, r in self.train),
            "trained_tokens": sum(sum(r.train_mask) for _, r in self.train),
            "longest": max((r.n_tokens for _, r in kept), default=0), "max_length": self.max_length,
        }

    def mean_row(self) -> float:
        """Tokens in a training row, on average (what a rate of tokens/s depends on)."""
        return sum(r.n_tokens for _, r in self.train) / max(1, len(self.train))


def prepare_rows(tokenizer, rows: list[dict], max_length: int, eval_fraction: float = 0.0,
                 seed: int = 42) -> PreparedRows:
    """Render every row, leave out (and report) those over `max_length` or with nothing to train, split by trace."""
    kept, left_out = [], []
    for row, rendered in zip(rows, render_many(tokenizer, rows, max_length=max_length)):
        if rendered.over_length:
            left_out.append({"id": row.get("id"), "reason": f"longer than max_length {max_length}",
                             "n_tokens": rendered.n_tokens})
        elif not any(rendered.train_mask):
            left_out.append({"id": row.get("id"), "reason": "no trained assistant message",
                             "n_tokens": rendered.n_tokens})
        else:
            kept.append((row, rendered))
    if not kept:
        raise TrainError(f"all {len(rows)} row(s) were left out: " + "; ".join(
            f"{item['id']}: {item['reason']} ({item['n_tokens']} tokens)" for item in left_out[:5]))
    held_out = _held_out_traces([row.get("trace_id", row.get("id")) for row, _ in kept], eval_fraction, seed)
    train = [pair for pair in kept if pair[0].get("trace_id", pair[0].get("id")) not in held_out]
    evaluation = [pair for pair in kept if pair[0].get("trace_id", pair[0].get("id")) in held_out]
    return PreparedRows(train=train, eval=evaluation, left_out=left_out, max_length=max_length)


def _held_out_traces(trace_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded share of the traces (at least one, never all), so no trace has rows on both sides."""
    unique = sorted(set(trace_ids))
    if fraction <= 0 or len(unique) < 2:
        return set()
    random.Random(seed).shuffle(unique)
    count = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    return set(unique[:count])


def to_dataset(pairs: list[tuple[dict, Rendered]]):
    """The pre-tokenized dataset TRL trains on: `assistant_masks` becomes the labels' mask (see module doc)."""
    import datasets

    return datasets.Dataset.from_dict({
        "input_ids": [r.input_ids for _, r in pairs],
        "assistant_masks": [r.train_mask for _, r in pairs],
    })


# ---------------------------------------------------------------------------------------------------------------
# The run record


def read_run_record(folder: str | Path) -> dict:
    path = Path(folder) / RUN_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_run_record(folder: str | Path, record: dict) -> None:
    """Write `mcpft_run.json` whole (a temporary file renamed over it, so a reader never sees half a file)."""
    path = Path(folder) / RUN_RECORD
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def update_run_record(folder: str | Path, **fields) -> dict:
    record = {**read_run_record(folder), **fields}
    write_run_record(folder, record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Training


class _ProgressCallback:
    """Reports every logged step, records losses, and turns a stop request into a clean stop after that step."""

    def __init__(self, on_progress: Callable[[Progress], None] | None, stop_event: threading.Event | None):
        self.on_progress, self.stop_event = on_progress, stop_event
        self.losses: list[dict] = []
        self.started = time.monotonic()
        self.first_step: tuple[float, int] | None = None  # (seconds, tokens) when the first step was logged
        self.steady_tokens_per_s: float | None = None  # from the first step's end on (it pays for warming up)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_stop(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return  # an eval or end-of-training summary, not a step
        elapsed = time.monotonic() - self.started
        step, total = state.global_step, state.max_steps
        entry = {"step": step, "loss": logs["loss"], "lr": logs.get("learning_rate"), "epoch": logs.get("epoch")}
        self.losses.append(entry)
        tokens = logs.get("num_tokens")
        if tokens:
            if self.first_step is None:
                self.first_step = (elapsed, tokens)
            elif elapsed > self.first_step[0]:
                self.steady_tokens_per_s = (tokens - self.first_step[1]) / (elapsed - self.first_step[0])
        if self.on_progress:
            self.on_progress(Progress(
                step=step, total=total, loss=entry["loss"], lr=entry["lr"], epoch=entry["epoch"],
                tokens_per_s=tokens / elapsed if tokens and elapsed > 0 else None,
                eta_s=elapsed / step * (total - step) if step else None))
        self._maybe_stop(control)

    def _maybe_stop(self, control):
        if self.stop_event is not None and self.stop_event.is_set():
            control.should_training_stop = True


@dataclass
class Checked:
    """A run's choices and checked rows, settled before any weights load."""

    out_dir: Path
    path: str
    why: str
    on_cuda: bool
    folder: Path  # the base model's local folder
    tokenizer: object
    rows: PreparedRows
    lora_layers: list[int] | None  # the decoder layers that get LoRA layers (None: all)
    data_dir: Path  # where the base model was found and this machine's training speed is kept


@dataclass
class Prepared:
    """Everything set up for a run; `trainer` is TRL's SFTTrainer, ready for `.train()`."""

    trainer: object
    tokenizer: object
    path: str
    why: str
    rows: PreparedRows
    record: dict
    memory_advice: str  # what to lower when training runs out of memory
    callback: _ProgressCallback = field(repr=False)


def check_training(config: TrainConfig, rows: list[dict], out_dir: str | Path, base_model: str | None = None,
                   data_dir: Path | None = None) -> Checked:
    """What can fail on the settings or the data, before any weights load: the output folder, the rows' shape, the
    path, the tokenizer's ChatML markup, the length check."""
    out_dir = check_out_dir(out_dir)
    _check_row_shapes(rows)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    path, why = training_path(config)
    if config.load_in_4bit and path != "unsloth":
        raise TrainError("load_in_4bit needs the Unsloth path (a CUDA device with unsloth installed)")
    if path == "unsloth":
        import unsloth  # noqa: F401  (must come before trl/transformers are used, so that its patches apply)
    folder, tokenizer, prepared_rows = _checked_rows(config, rows, base_model, data_dir)
    return Checked(out_dir=out_dir, path=path, why=why, on_cuda=cuda_available(), folder=folder, tokenizer=tokenizer,
                   rows=prepared_rows, lora_layers=_lora_layers(config, folder, data_dir), data_dir=data_dir)


def _check_row_shapes(rows: list[dict]) -> None:
    if not rows:
        raise TrainError("no training rows: the selection is empty (are all traces flagged or excluded?)")
    if problem := rows_problem(rows):
        raise TrainError(f"training rows: {problem}")


def _lora_layers(config: TrainConfig, folder: Path, data_dir: Path) -> list[int] | None:
    """The indices of the last `config.lora_layers` decoder layers (None: all layers)."""
    if config.lora_layers is None:
        return None
    layers = model_layers(str(folder), data_dir)
    if layers is None:
        raise TrainError(f"lora_layers {config.lora_layers}: the model at {folder} does not say how many decoder "
                         "layers it has (no num_hidden_layers in its config); leave lora_layers unset")
    if config.lora_layers > layers:
        raise TrainError(f"lora_layers {config.lora_layers}: the model at {folder} has only {layers} decoder layers")
    return list(range(layers - config.lora_layers, layers))


def _checked_rows(config: TrainConfig, rows: list[dict], base_model: str | None, data_dir: Path):
    """(model folder, tokenizer, rows rendered and length-checked) for this device."""
    folder = resolve_model(base_model, data_dir)
    tokenizer = load_tokenizer(str(folder), data_dir)
    _check_chat_markup(tokenizer, base_model)
    max_length = resolve_max_length(config, model_context(str(folder), data_dir), cuda_available())
    rows = rows if config.reasoning else without_reasoning(rows)
    prepared_rows = prepare_rows(tokenizer, rows, max_length, config.eval_fraction, config.seed)
    if not prepared_rows.train:
        raise TrainError("every row was held out for evaluation: lower eval_fraction")
    return folder, tokenizer, prepared_rows


def training_plan(config: TrainConfig, rows: list[dict], base_model: str | None = None,
                  data_dir: Path | None = None) -> dict:
    """What a run would train, before it starts: rows kept and left out (with why), tokens, steps, and on a CPU an
    estimated time from this machine's last measured rate, else the reference rates (`mcpft.train_speed`); a GPU's
    rate is only known once it has run."""
    _check_row_shapes(rows)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    folder, _, prepared = _checked_rows(config, rows, base_model, data_dir)
    lora_layers = _lora_layers(config, folder, data_dir)
    plan = prepared.summary()
    per_epoch = math.ceil(plan["rows_used"] / (config.batch_size * config.gradient_accumulation_steps))
    plan["steps"] = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    plan["speed"] = None  # a CPU estimate (its "seconds"), or None: a GPU's rate is only known once it has run
    if not cuda_available():
        mean_row = prepared.mean_row()
        rows_trained = min(plan["rows_used"] * config.epochs,
                           plan["steps"] * config.batch_size * config.gradient_accumulation_steps)
        plan["speed"] = estimate(data_dir, model_name(base_model), resolve_precision(config, on_cuda=False),
                                 rows_trained * mean_row, mean_row, run_cost(config.full_finetune, lora_layers))
    return plan


def prepare_training(config: TrainConfig, rows: list[dict], out_dir: str | Path, base_model: str | None = None,
                     data_dir: Path | None = None, on_progress: Callable[[Progress], None] | None = None,
                     stop_event: threading.Event | None = None, source: dict | None = None) -> Prepared:
    """Check the settings and rows, load the model and build the trainer (nothing trained yet)."""
    return build_trainer(check_training(config, rows, out_dir, base_model, data_dir), config, base_model,
                         on_progress, stop_event, source)


def build_trainer(checked: Checked, config: TrainConfig, base_model: str | None = None,
                  on_progress: Callable[[Progress], None] | None = None, stop_event: threading.Event | None = None,
                  source: dict | None = None) -> Prepared:
    """Load the model with its LoRA layers (none with full_finetune) and build the trainer on the checked rows."""
    on_cuda, max_length = checked.on_cuda, checked.rows.max_length
    gradient_checkpointing = config.gradient_checkpointing
    recompute_above = None  # every row recomputes when gradient_checkpointing is on, unless this says otherwise
    if gradient_checkpointing is None:
        gradient_checkpointing = on_cuda or checked.rows.summary()["longest"] > CPU_CHECKPOINT_ABOVE
        recompute_above = None if on_cuda else CPU_CHECKPOINT_ABOVE
    advice = _memory_advice(config, checked.rows, gradient_checkpointing)
    with explain_out_of_memory(f"loading {model_name(base_model)!r} for training", advice):
        if checked.path == "unsloth":
            model = _unsloth_model(checked.folder, config, max_length, gradient_checkpointing, checked.lora_layers)
            peft_config = None
        else:
            model = _plain_model(checked.folder, on_cuda, full=config.full_finetune)
            peft_config = None if config.full_finetune else _lora_config(config, checked.lora_layers)
    checked.out_dir.mkdir(parents=True, exist_ok=True)
    args = _sft_config(config, checked.out_dir, max_length, on_cuda, gradient_checkpointing)
    callback = _ProgressCallback(on_progress, stop_event)
    fused = checked.path == "unsloth" or fused_loss_available(on_cuda)
    trainer = _sft_trainer(model, args, checked.tokenizer, checked.rows, peft_config, callback, fused)
    if gradient_checkpointing and recompute_above is not None and not fused:
        trainer.recompute_above = recompute_above
    record = {
        "status": "prepared", "created": now_iso(), "path": checked.path, "why": checked.why,
        "base_model": base_model, "base_model_name": model_name(base_model), "base_model_path": str(checked.folder),
        "config": {**asdict(config), "max_length": max_length, "optim": args.optim,
                   "gradient_checkpointing": gradient_checkpointing,
                   "recompute_rows_over": getattr(trainer, "recompute_above", None),
                   "device": "cuda" if on_cuda else "cpu", "precision": resolve_precision(config, on_cuda),
                   "loss": "trl fused (triton)" if fused else "cross-entropy at trained positions"},
        "data": {"source": source or {"kind": "rows"}, **checked.rows.summary()},
    }
    return Prepared(trainer=trainer, tokenizer=checked.tokenizer, path=checked.path, why=checked.why,
                    rows=checked.rows, record=record, memory_advice=advice, callback=callback)


def _memory_advice(config: TrainConfig, rows: PreparedRows, gradient_checkpointing: bool) -> str:
    """The settings that lower a training run's memory, with their values now."""
    longest = rows.summary()["longest"]
    tips = [f"lower max_length (now {rows.max_length}; the longest kept row has {longest} tokens; longer rows are "
            "left out)",
            f"keep batch_size at 1 (now {config.batch_size}) and raise gradient_accumulation_steps (now "
            f"{config.gradient_accumulation_steps}) instead"]
    if not gradient_checkpointing:
        tips.append("turn gradient_checkpointing on")
    if not config.load_in_4bit:
        tips.append("set load_in_4bit (Unsloth path, CUDA) for 4-bit base weights")
    return "To fit: " + "; ".join(tips) + "."


def _check_chat_markup(tokenizer, spec: str | None) -> None:
    """Rows render as ChatML; a vocabulary without `<|im_end|>` would train the end of a turn as plain text."""
    if END_OF_TURN not in tokenizer.get_vocab():
        raise TrainError(
            f"model {model_name(spec)!r}: its chat template cannot render tool calls, and its tokenizer has no "
            f"{END_OF_TURN} token, so mcpft's Hermes/ChatML template cannot be given to it either; "
            "pick a ChatML model (Qwen, SmolLM2, Hermes)")


def _lora_config(config: TrainConfig, layers: list[int] | None):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), layers_to_transform=layers, bias="none",
                      task_type="CAUSAL_LM")


def _plain_model(folder: Path, on_cuda: bool, full: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    # Frozen base weights may be bf16 on a GPU; weights that train stay fp32 (bf16 would round small updates away).
    dtype = torch.bfloat16 if on_cuda and not full and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to("cuda") if on_cuda else model


def _unsloth_model(folder: Path, config: TrainConfig, max_length: int, gradient_checkpointing: bool,
                   layers: list[int] | None):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=max_length, dtype=None,
                                                 load_in_4bit=config.load_in_4bit)
    return FastLanguageModel.get_peft_model(
        model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), layers_to_transform=layers, bias="none", random_state=config.seed,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)


def resolve_precision(config: TrainConfig, on_cuda: bool) -> str:
    """bf16 autocast where the hardware computes bf16 natively (a recent GPU, a CPU with AVX512-BF16 or AMX: 1.75x
    faster on this project's CPU with the same loss curve, docs/benchmarks.md), fp16 on older GPUs, else fp32."""
    import torch

    from mcpft.models import cpu_has_native_bf16

    if config.precision != "auto":
        if config.precision == "fp16" and not on_cuda:
            raise TrainError("precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
        return config.precision
    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _sft_config(config: TrainConfig, out_dir: Path, max_length: int, on_cuda: bool, gradient_checkpointing: bool):
    from trl import SFTConfig

    precision = resolve_precision(config, on_cuda)
    return SFTConfig(
        output_dir=str(out_dir), max_length=max_length, packing=False, padding_free=False,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=1,
        gradient_accumulation_steps=config.gradient_accumulation_steps, num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, optim=resolve_optim(config, on_cuda), seed=config.seed,
        train_sampling_strategy="random" if config.shuffle else "sequential",
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not on_cuda,
        gradient_checkpointing=gradient_checkpointing, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=["tensorboard"], disable_tqdm=True, dataloader_pin_memory=on_cuda)


def fused_loss_available(on_cuda: bool) -> bool:
    """TRL 1.15 computes the SFT loss with a Triton kernel (fused LM head): CUDA with Triton only."""
    return on_cuda and importlib.util.find_spec("triton") is not None


def _sft_trainer_class(fused: bool):
    from trl import SFTTrainer

    if fused:
        return SFTTrainer

    class TrainedLogitsSFTTrainer(SFTTrainer):
        """SFTTrainer with the causal-LM loss computed from logits at the trained positions only (as TRL's docs
        advise: override `compute_loss`), for devices where its Triton kernel cannot run. An agent row trains ~8 %
        of its tokens; the LM head over a 49k vocabulary at all the others cost a fifth of a CPU step and most of its
        memory. Counts tokens the way SFTTrainer does, for tokens/s. With `recompute_above` set, only rows longer
        than that many tokens recompute their activations (short rows need not pay a third more time for memory
        they do not use)."""

        recompute_above: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.recompute_above is not None:
                set_recompute(model, inputs["input_ids"].shape[1] > self.recompute_above)
            if model.training:
                self._total_train_tokens += int(inputs["attention_mask"].sum())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            # Trainer divides by the accumulation steps itself unless the model takes `num_items_in_batch`.
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            outputs, loss = trained_positions_loss(model, inputs, items)
            return (loss, outputs) if return_outputs else loss

    return TrainedLogitsSFTTrainer


def set_recompute(model, on: bool) -> None:
    """Turn activation checkpointing on or off for the next forward pass, once it was set up for the model."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = on


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None):
    """(outputs, loss): the model's next-token cross-entropy where `labels` is not -100, from logits computed at
    those positions only (`logits_to_keep` as indices). Equal to the loss over full logits; summed and divided by
    `num_items_in_batch` under gradient accumulation, as transformers' own loss is."""
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]  # the token at t+1 is predicted at position t
    positions = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs, logits_to_keep=positions, use_cache=False)
    logits = outputs.logits.float()
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, positions].reshape(-1),
                                             ignore_index=-100, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return outputs, loss


def _sft_trainer(model, args, tokenizer, rows: PreparedRows, peft_config, callback: _ProgressCallback,
                 fused: bool):
    from transformers import PrinterCallback, TrainerCallback

    SFTTrainer = _sft_trainer_class(fused)
    bridge = type("MCPFTProgress", (TrainerCallback,), {
        name: getattr(callback, name) for name in ("on_train_begin", "on_step_end", "on_log")})()
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(rows.train),
                         eval_dataset=to_dataset(rows.eval) if rows.eval else None, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[bridge])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout, which `--json` owns
    return trainer


def train(config: TrainConfig, rows: list[dict], out_dir: str | Path, base_model: str | None = None,
          data_dir: Path | None = None, on_progress: Callable[[Progress], None] | None = None,
          stop_event: threading.Event | None = None, source: dict | None = None,
          record_extra: dict | None = None, baseline: Callable[[], dict] | None = None) -> TrainResult:
    """Fine-tune `base_model` (None = packaged SmolLM2) on `rows`; the adapter and tokenizer land in `out_dir`, which
    must be new or empty.

    `stop_event` stops after the step in progress; the adapter of the last finished step is kept. `record_extra`
    goes into `mcpft_run.json` as is. `baseline` (the base model's held-out scores) is called once the settings and
    rows passed their checks and before the model loads for training; its report is recorded as `baseline`.
    """
    checked = check_training(config, rows, out_dir, base_model, data_dir)
    baseline_report = baseline() if baseline is not None else None
    prepared = build_trainer(checked, config, base_model, on_progress, stop_event, source)
    out_dir = checked.out_dir
    record = {**prepared.record, **(record_extra or {}), "status": "running", "started": now_iso()}
    if baseline_report is not None:
        record["baseline"] = baseline_report
    write_run_record(out_dir, record)
    started = time.monotonic()
    try:
        with explain_out_of_memory("training", prepared.memory_advice):
            prepared.trainer.train()
            state = prepared.trainer.state
            adapter_dir = _save(prepared, out_dir) if state.global_step else None
            eval_loss = None
            if prepared.rows.eval and state.global_step:
                eval_loss = prepared.trainer.evaluate().get("eval_loss")
    except BaseException as error:  # also a second Ctrl-C: the record must not stay "running"
        write_run_record(out_dir, {**record, "status": "failed", "error": repr(error),
                                   "losses": prepared.callback.losses})
        raise
    stopped = stop_event is not None and stop_event.is_set() and state.global_step < state.max_steps
    losses = prepared.callback.losses
    result = TrainResult(
        out_dir=out_dir, path=prepared.path, why=prepared.why, steps=state.global_step, total_steps=state.max_steps,
        final_loss=losses[-1]["loss"] if losses else None, stopped=stopped, adapter_dir=adapter_dir,
        rows_used=len(prepared.rows.train), rows_left_out=prepared.rows.left_out, eval_loss=eval_loss,
        runtime_s=time.monotonic() - started, baseline=baseline_report, precision=record["config"]["precision"])
    write_run_record(out_dir, {**record, "status": "stopped" if stopped else "finished", "finished": now_iso(),
                               "losses": losses, **result.summary()})
    if not checked.on_cuda and state.global_step >= MEASURED_STEPS and prepared.callback.steady_tokens_per_s:
        record_speed(checked.data_dir, model_name(base_model), result.precision,
                     prepared.callback.steady_tokens_per_s, prepared.rows.mean_row(),
                     run_cost(config.full_finetune, checked.lora_layers), str(out_dir))
    return result


def _save(prepared: Prepared, out_dir: Path) -> Path:
    """The adapter (with full_finetune, the whole model) and the tokenizer (its chat template renders tools) side by
    side in `out_dir`."""
    prepared.trainer.model.save_pretrained(out_dir)
    prepared.tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Using an adapter: load it, merge it


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise TrainError(f"adapter {str(adapter_dir)!r}: no such folder")
    if problem := adapter_problem(folder):
        raise TrainError(f"adapter {str(adapter_dir)!r}: {problem} (train one with `mcpft train --out DIR`)")
    return folder


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model spec an adapter was trained on: the run record's, else the adapter config's."""
    record = read_run_record(adapter_dir)
    if "base_model" in record:
        return record["base_model"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path")


def load_adapter_tokenizer(adapter_dir: Path):
    from transformers import AutoTokenizer

    from mcpft.chat_template import ensure_tool_template

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    ensure_tool_template(tokenizer)
    return tokenizer


def load_adapter_model(adapter_dir: str | Path, base_model: str | None = None, data_dir: Path | None = None,
                       device: str | None = None, dtype=None):
    """`(PeftModel, tokenizer)` for inference: the base (`base_model`, else the one it was trained on) + the adapter."""
    from peft import PeftModel

    from mcpft.models import load_model

    folder = check_adapter_dir(adapter_dir)
    spec = base_model if base_model is not None else adapter_base(folder)
    model, _ = load_model(spec, Path(data_dir) if data_dir else default_data_dir(), dtype=dtype, device=device)
    peft_model = PeftModel.from_pretrained(model, folder)
    peft_model.eval()
    return peft_model, load_adapter_tokenizer(folder)


MERGE_DTYPES = ("bf16", "fp16", "fp32")


# What an adapter folder holds that an average writes anew (the rest, the tokenizer and its template, is copied).
_AVERAGED_FILES = ("adapter_model.safetensors", "adapter_config.json", RUN_RECORD, "README.md", "runs")


def average_adapters(adapter_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One LoRA adapter whose weight change is the mean of the adapters' (a "model soup" of trainings that differ by
    seed or data: they err in different places; docs/benchmarks.md, sixteenth session, for what it did on the demo).
    Exact: adapter i changes a weight by s_i·B_i·A_i, so stacking the A's along the rank and the B's, each times
    s_i / n, gives the mean at rank Σr_i (alpha = rank, so the new scale is 1)."""
    import torch
    from safetensors.torch import load_file, save_file

    if len(adapter_dirs) < 2:
        raise TrainError(f"averaging needs at least two adapters, got {len(adapter_dirs)}")
    folders = [check_adapter_dir(folder) for folder in adapter_dirs]
    configs = [_averageable_config(folder) for folder in folders]
    bases = {adapter_base(folder) for folder in folders}
    if len(bases) > 1:
        raise TrainError(f"the adapters were trained on different base models ({', '.join(map(str, bases))}): "
                         "only adapters of one base can be averaged")
    weights = [load_file(folder / "adapter_model.safetensors") for folder in folders]
    if len({frozenset(w) for w in weights}) > 1:
        raise TrainError("the adapters have LoRA layers in different modules: train them with the same "
                         "target_modules and lora_layers")
    out_dir = check_out_dir(out_dir)
    averaged = {}
    for name in weights[0]:
        if ".lora_A." in name:
            averaged[name] = torch.cat([w[name] for w in weights], dim=0)
        elif ".lora_B." in name:
            averaged[name] = torch.cat([w[name] * _lora_scale(c) / len(weights) for w, c in zip(weights, configs)],
                                       dim=1)
        else:
            raise TrainError(f"adapter {folders[0]}: {name} is neither a LoRA A nor B matrix; only plain LoRA "
                             "adapters can be averaged")
    rank = sum(config["r"] for config in configs)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folders[0], out_dir, ignore=shutil.ignore_patterns(*_AVERAGED_FILES), dirs_exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in averaged.items()}, out_dir / "adapter_model.safetensors",
              metadata={"format": "pt"})
    config = {**configs[0], "r": rank, "lora_alpha": rank, "use_rslora": False}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_run_record(out_dir, {**_shared_record(folders), "status": "finished",
                               "averaged": {"adapters": [str(f.resolve()) for f in folders], "at": now_iso()}})
    return out_dir


def _shared_record(folders: list[Path]) -> dict:
    """What the adapters' run records agree on: the base model, and the training settings all of them had (one they
    differ in, such as the seed, is left out), so readers of an average's record see its recipe."""
    records = [read_run_record(folder) for folder in folders]
    shared = {key: records[0][key] for key in ("base_model", "base_model_name") if key in records[0]}
    configs = [record.get("config", {}) for record in records]
    if config := {key: value for key, value in configs[0].items() if all(c.get(key) == value for c in configs)}:
        shared["config"] = config
    return shared


def _averageable_config(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern") \
            or config.get("modules_to_save"):
        raise TrainError(f"adapter {folder}: only plain LoRA adapters (one rank and alpha, no modules_to_save) can "
                         "be averaged")
    return config


def _lora_scale(config: dict) -> float:
    """PEFT's scale of a LoRA layer's B·A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16", base_model: str | None = None,
                  data_dir: Path | None = None) -> Path:
    """Base + adapter merged into plain safetensors weights (`dtype`), with the tool-calling chat template."""
    import torch

    if dtype not in MERGE_DTYPES:
        raise TrainError(f"dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}")
    folder = check_adapter_dir(adapter_dir)
    # Merge in fp32 on the CPU (exact), then cast once.
    model, tokenizer = load_adapter_model(folder, base_model, data_dir, device="cpu", dtype=torch.float32)
    with explain_out_of_memory(f"merging adapter {folder} into its base (fp32 on the CPU, then {dtype})",
                               "Merging holds the base in fp32 (4 bytes per parameter) and its cast copy in RAM: "
                               "free RAM, or merge on a machine with more."):
        merged = model.merge_and_unload()
        merged = merged.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = merged.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if end_of_turn is not None and end_of_turn not in eos_ids:
        merged.generation_config.eos_token_id = [*eos_ids, end_of_turn]  # generation must stop at the end of turn
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = read_run_record(folder)
    write_run_record(out_dir, {**record, "merged": {"adapter": str(folder.resolve()), "dtype": dtype,
                                                    "at": now_iso()}})
    return out_dir

