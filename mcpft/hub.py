"""Pushing a trained adapter or merged model to the Hugging Face Hub, with a model card built from `mcpft_run.json`.

The token comes from the argument, `HF_TOKEN`, or the stored login, and is only ever sent to the Hub: nothing here
writes it anywhere. TensorBoard logs (`runs/`) and the trainer's stub README are not uploaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcpft.models import HUB_ID

RATE_NAMES = ("valid_call_rate", "tool_name_accuracy", "argument_accuracy", "irrelevance_accuracy",
              "answer_accuracy", "pass_rate")
SKIPPED = {"README.md"}
SKIPPED_DIRS = {"runs"}
CONFIG_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "epochs", "batch_size",
               "gradient_accumulation_steps", "max_steps", "max_length", "optim", "lr_scheduler_type", "seed",
               "device")


class PushError(Exception):
    """A folder that cannot be pushed; the message says why."""


def hub_failure(error: Exception, repo_id: str) -> str | None:
    """What went wrong talking to the Hub about `repo_id` and what to do, for the errors `huggingface_hub` raises
    (None for any other error)."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, so the Hub is never contacted; unset it to push"
    if isinstance(error, LocalTokenNotFoundError):
        return f"cannot push to {repo_id}: no Hugging Face token; set HF_TOKEN or log in with `hf auth login`"
    if isinstance(error, HFValidationError):
        return f"repo id {repo_id!r} is not valid ({error}); give it as OWNER/NAME"
    if isinstance(error, HfHubHTTPError):
        return _refusal(error.response.status_code, repo_id, error)
    if isinstance(error, httpx.HTTPError):  # no answer at all: DNS, refused connection, timeout
        return (f"cannot reach the Hub at {constants.ENDPOINT} to push {repo_id} ({error}); check the network "
                "connection (or HF_ENDPOINT), then push again")
    return None


def _refusal(status: int, repo_id: str, error: Exception) -> str:
    if status == 401:
        return (f"the Hub refused the token for {repo_id} (HTTP 401): set HF_TOKEN to a valid token with write "
                "access, or log in with `hf auth login`")
    if status == 403:
        return f"the token may not write to {repo_id} (HTTP 403): use a token with write access to that namespace"
    return f"the Hub refused the upload to {repo_id} (HTTP {status}): {error}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _base_hub_id(record: dict) -> str | None:
    base = record.get("base_model")
    return base if isinstance(base, str) and HUB_ID.match(base) and not Path(base).exists() else None


def model_card(folder: str | Path, repo_id: str) -> str:
    """The README.md for a pushed adapter or merged model: base, data, config, before/after step scores."""
    from mcpft.train import read_run_record

    folder = Path(folder)
    record = read_run_record(folder)
    merged = "merged" in record or not (folder / "adapter_config.json").is_file()
    base_id = _base_hub_id(record)
    source = (record.get("data") or {}).get("source") or {}
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}"]
    if base_id:
        front.append(f"base_model: {base_id}")
    if source.get("kind") == "hub":
        front += ["datasets:", f"- {source['dataset']}"]
    front += ["tags:", "- mcpft", "- tool-calling", "- lora", "- sft", "---", ""]
    lines = front + [f"# {repo_id}", "",
                     ("A LoRA adapter merged into its base model" if merged else "A LoRA adapter") +
                     " fine-tuned by [mcpft](https://github.com/) on curated MCP agent traces (Hermes tool-call "
                     "format; the tokenizer's chat template renders tools).", ""]
    lines += _about(record, source) + _config_table(record) + _scores_table(record) + _usage(repo_id, merged, base_id)
    return "\n".join(lines) + "\n"


def _about(record: dict, source: dict) -> list[str]:
    data = record.get("data") or {}
    where = {"hub": f"Hub dataset `{source.get('dataset')}`", "file": "an exported dataset",
             "store": "traces selected from the mcpft store"}.get(source.get("kind"), "training rows")
    lines = [f"- base model: `{record.get('base_model_name') or record.get('base_model') or 'unknown'}`",
             f"- training path: {record.get('path', 'unknown')} ({record.get('why', '')})",
             f"- data: {where}; {data.get('rows_used', '?')} rows used from {data.get('traces', '?')} traces, "
             f"{len(data.get('rows_left_out') or [])} left out, {data.get('trained_tokens', '?')} trained tokens",
             f"- steps: {record.get('steps', '?')}; final loss: {record.get('final_loss')}"]
    if "merged" in record:
        lines.append(f"- merged to {record['merged'].get('dtype')} safetensors")
    return lines + [""]


def _config_table(record: dict) -> list[str]:
    config = record.get("config") or {}
    rows = [f"| {key} | {config[key]} |" for key in CONFIG_KEYS if key in config]
    return ["## Training configuration", "", "| setting | value |", "|---|---|", *rows, ""] if rows else []


def _scores_table(record: dict) -> list[str]:
    before = (record.get("baseline") or {}).get("totals")
    after = (record.get("after") or {}).get("totals")
    if not (before or after):
        return []
    steps = (after or before)["steps"]
    lines = ["## Step scores on held-out rows", "",
             f"BFCL-style step scores on {steps} held-out steps (see mcpft's evaluate module for the rules).", "",
             "| metric | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {name} | {_percent((before or {}).get(name))} | {_percent((after or {}).get(name))} |"
              for name in RATE_NAMES]
    return lines + [""]


def _usage(repo_id: str, merged: bool, base_id: str | None) -> list[str]:
    if merged:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    else:
        code = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
        if not base_id:
            code.insert(0, "# the base model was a local folder: load it and attach this adapter with PeftModel")
    return ["## Use", "", "```python", *code, "```", ""]


def upload_files(folder: Path) -> list[Path]:
    """The files of `folder` that go to the Hub (not the TensorBoard logs, not a stub README)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIPPED
                  and not SKIPPED_DIRS & set(p.relative_to(folder).parts[:-1]) and not p.name.endswith(".tmp"))


def push_model(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repo (if needed) and upload the folder with its model card in one commit; the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder")
    if not ((folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()):
        raise PushError(f"{folder} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    if not HUB_ID.match(repo_id):
        raise PushError(f"repo id {repo_id!r} must look like OWNER/NAME")
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in upload_files(folder)]
    operations.append(CommitOperationAdd(path_in_repo="README.md",
                                         path_or_fileobj=model_card(folder, repo_id).encode("utf-8")))
    api.create_commit(repo_id, operations=operations, commit_message="Upload model trained with mcpft",
                      repo_type="model")
    return str(url)
