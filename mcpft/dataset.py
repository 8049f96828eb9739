"""From curated traces to training rows: unroll, length check, export (JSONL / Parquet / HF folder) and push.

Row k of a trace holds the conversation up to the last assistant message that answers user turn k; only turn k's
assistant messages are trained (`train: true`) and only they keep their reasoning, as Qwen3's template does at
inference. So a row is exactly what the model saw when it produced that turn. Unlike the Trelis script, which cuts
only at assistant messages right after a user message, every step of a turn (also the ones after tool results) is
trained: three user turns give three rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mcpft.trace import Trace

EXPORT_FORMATS = ("jsonl", "parquet", "hf")
# Message keys that are no training text: validation flags, MCP structured results (their text is the content;
# arbitrary shapes would also break the one Arrow schema of the rows) and what an MCP result was (`mcp_result`).
NOT_TRAINING_KEYS = ("flags", "structured_content", "mcp_result")
# What a one-row-per-trace row carries besides the conversation, so that importing it back restores the curation.
CURATION_FIELDS = ("tags", "rating", "notes", "train_system", "base_url")
# The files `Dataset.save_to_disk` writes (datasets' arrow_dataset.py), and the cache files `datasets` adds beside
# a dataset loaded from there: a folder of only these is an earlier `--format hf` export, safe to replace.
HF_EXPORT_FILE = re.compile(r"state\.json|dataset_info\.json|data-\d{5}-of-\d{5}\.arrow|cache-\w+\.arrow")


class ExportError(ValueError):
    """An export that cannot be written where asked; the message names the path and why."""


def unroll(trace: Trace, by_turn: bool = True) -> list[dict]:
    """Training rows of one trace: one per user turn (`by_turn`), or one for the whole trace with every step trained."""
    tools_json = json.dumps(trace.tools, ensure_ascii=False)  # once per trace, shared by its rows
    messages = [{k: v for k, v in m.items() if k not in NOT_TRAINING_KEYS}
                for m in trace.messages if trace.train_system or m["role"] != "system"]
    if not by_turn:
        ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not ends:
            return []
        row_messages = [_marked(m, True) for m in messages[: ends[-1] + 1]]
        return [{**_row(trace, 0, row_messages, tools_json), **_curation(trace)}]
    rows = []
    for turn, (start, end) in enumerate(_turn_spans(messages)):
        row_messages = [_marked(m, False, keep_reasoning=False) for m in messages[:start]]
        row_messages += [_marked(m, True) for m in messages[start:end]]
        rows.append(_row(trace, turn, row_messages, tools_json))
    return rows


def _turn_spans(messages: list[dict]) -> list[tuple[int, int]]:
    """(start, end) per user turn that has an answer: from the user message to just after its last assistant message."""
    user_indices = [i for i, m in enumerate(messages) if m["role"] == "user"]
    spans = []
    for k, start in enumerate(user_indices):
        stop = user_indices[k + 1] if k + 1 < len(user_indices) else len(messages)
        answers = [i for i in range(start, stop) if messages[i]["role"] == "assistant"]
        if answers:
            spans.append((start, answers[-1] + 1))
    return spans


def _marked(message: dict, train: bool, keep_reasoning: bool = True) -> dict:
    if message["role"] != "assistant":
        return message
    marked = {**message, "train": train}
    return marked if keep_reasoning else _unreasoned(marked)


def _unreasoned(message: dict) -> dict:
    return {key: value for key, value in message.items() if key != "reasoning_content"}


def without_reasoning(rows: list[dict]) -> list[dict]:
    """The rows with no assistant reasoning anywhere: trained on, a model learns to call and answer without thinking
    aloud first (a small model copies a teacher's reasoning sentences and errs inside them)."""
    return [{**row, "messages": [_unreasoned(m) for m in row["messages"]]} for row in rows]


def _row(trace: Trace, turn: int, messages: list[dict], tools_json: str) -> dict:
    return {"id": f"{trace.id}-{turn}", "trace_id": trace.id, "turn": turn, "timestamp": trace.created,
            "model": trace.model, "messages": messages, "tools": tools_json}


def _curation(trace: Trace) -> dict:
    """The trace's curation for its one row; settings as a JSON string, as tools are (their shapes differ)."""
    return {**{name: getattr(trace, name) for name in CURATION_FIELDS},
            "settings": json.dumps(trace.settings, ensure_ascii=False)}


def rows_from_traces(traces: list[Trace], by_turn: bool = True, include_flagged: bool = False) -> list[dict]:
    """Rows of the included traces; flagged ones are left out unless `include_flagged`."""
    rows = []
    for trace in traces:
        if trace.included and (include_flagged or not trace.flags):
            rows += unroll(trace, by_turn)
    return rows


# -- length check ------------------------------------------------------------------------------------------------


@dataclass
class LengthReport:
    max_length: int
    longest: int
    longest_id: str
    over: list[str]  # ids of rows longer than max_length: reported and left out, never cut

    def to_dict(self) -> dict:
        return {"max_length": self.max_length, "longest": self.longest, "longest_id": self.longest_id,
                "over": self.over}


def count_tokens(tokenizer, rows: list[dict], max_length: int | None = None) -> LengthReport:
    """Adds `n_tokens` to every row and reports the longest and those over `max_length`."""
    from mcpft.render import render_many

    rendered = render_many(tokenizer, rows, max_length=max_length)
    for row, r in zip(rows, rendered):
        row["n_tokens"] = r.n_tokens
    longest = max(rows, key=lambda r: r["n_tokens"], default=None)
    return LengthReport(
        max_length=max_length or 0,
        longest=longest["n_tokens"] if longest else 0,
        longest_id=longest["id"] if longest else "",
        over=[row["id"] for row, r in zip(rows, rendered) if r.over_length],
    )


# -- export and load ----------------------------------------------------------------------------------------------


def export_rows(rows: list[dict], out: str | Path, fmt: str = "jsonl") -> Path:
    """Write rows as JSONL, Parquet or a `datasets` folder (`save_to_disk`). The rows are written beside `out` and
    renamed over it once complete, so nothing half-written is left behind. What is at `out` is replaced only when
    it is a file (jsonl, parquet) or an empty folder or earlier hf export (hf): other data is never deleted."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not rows:
        raise ValueError("nothing to export: the selection has no rows (are all traces flagged or excluded?)")
    target = Path(out).resolve()  # `.` or `x/..` name no file of their own
    _check_replaceable(target, fmt, out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        written = staging / target.name
        _write_rows(rows, written, fmt)
        _move_into_place(written, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(out)


def _check_replaceable(target: Path, fmt: str, out) -> None:
    if not target.exists():
        return
    if fmt != "hf" and not target.is_file():
        raise ExportError(f"{out} exists and is not a file: --format {fmt} writes one file "
                          f"(give a file path such as {Path(out) / f'rows.{fmt}'})")
    if fmt == "hf" and not target.is_dir():
        raise ExportError(f"{out} exists and is not a folder: --format hf writes a folder (give a new folder's path)")
    if fmt == "hf" and not _is_hf_export_or_empty(target):
        raise ExportError(f"{out} is a folder that holds other data than an earlier --format hf export: "
                          "give a new or empty folder (nothing was written or deleted)")


def _is_hf_export_or_empty(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return not entries or (any(p.name == "state.json" for p in entries)
                           and all(p.is_file() and HF_EXPORT_FILE.fullmatch(p.name) for p in entries))


def _write_rows(rows: list[dict], path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        to_hf_dataset(rows).to_parquet(str(path))
    else:
        to_hf_dataset(rows).save_to_disk(str(path))


def _move_into_place(written: Path, target: Path, staging: Path) -> None:
    """Rename `written` to `target`; a folder already there (checked replaceable) is first moved into `staging`, to be
    removed with it, and moved back if the rename fails."""
    if not target.is_dir():
        os.replace(written, target)  # atomic over an earlier file
        return
    replaced = written.with_name(f"{written.name}.replaced")
    os.replace(target, replaced)
    try:
        os.replace(written, target)
    except BaseException:
        os.replace(replaced, target)
        raise


def to_hf_dataset(rows: list[dict]):
    import datasets

    # Messages become Arrow structs (absent keys are null); `tools` is a JSON string because tool sets differ.
    return datasets.Dataset.from_list(rows)


def load_rows(path: str | Path) -> list[dict]:
    """Rows from an export: a JSONL file, a Parquet file, or a `datasets` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if path.is_dir():
        import datasets

        return clean_rows(datasets.load_from_disk(str(path)).to_list())
    if path.suffix == ".parquet":
        import datasets

        return clean_rows(datasets.Dataset.from_parquet(str(path)).to_list())
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def clean_rows(rows: list[dict]) -> list[dict]:
    """Arrow gives every message every key (None where absent): drop those Nones again."""
    for row in rows:
        if isinstance(row.get("messages"), list):  # anything else is named by the row checks
            row["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                               for m in row["messages"]]
    return rows


# -- push ---------------------------------------------------------------------------------------------------------


def dataset_card(rows: list[dict], repo_id: str) -> str:
    traces = {r["trace_id"] for r in rows}
    models = Counter(r["model"] for r in rows)
    tools = Counter(t["function"]["name"] for r in rows for t in json.loads(r["tools"]))
    lines = [
        "---", "tags:", "- mcpft", "- tool-calling", "- agent-traces", "---", "",
        f"# {repo_id}", "",
        "Agent traces with MCP tool calls, curated and unrolled by [mcpft](https://github.com/) into training rows "
        "(OpenAI chat format; assistant messages carry `train: true|false`; `tools` is a JSON string).", "",
        f"- traces: {len(traces)}", f"- rows: {len(rows)}",
        f"- models: {', '.join(f'{m} ({n})' for m, n in models.most_common()) or '-'}",
        f"- tools: {', '.join(sorted(tools)) or '-'}",
    ]
    return "\n".join(lines) + "\n"


def push_rows(rows: list[dict], repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload rows with `datasets`' push_to_hub and a dataset card. Token: the argument, `HF_TOKEN`, or the login."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    if not rows:
        raise ValueError("nothing to push: the selection has no rows")
    validate_repo_id(repo_id)  # a bad id fails here, before the rows are converted and uploads begin
    token = token or get_token()  # HF_TOKEN, then the stored login
    if not token:  # checked here: without one the Hub's refusal would come only after the conversion
        raise LocalTokenNotFoundError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    to_hf_dataset(rows).push_to_hub(repo_id, private=private, token=token)
    # Uploaded as a file: DatasetCard.push_to_hub validates on huggingface.co directly, ignoring HF_ENDPOINT.
    HfApi(token=token).upload_file(path_or_fileobj=dataset_card(rows, repo_id).encode("utf-8"), path_in_repo="README.md",
                                   repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"
