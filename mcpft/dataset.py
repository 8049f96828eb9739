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
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mcpft.trace import Trace

EXPORT_FORMATS = ("jsonl", "parquet", "hf")


def unroll(trace: Trace, by_turn: bool = True) -> list[dict]:
    """Training rows of one trace: one per user turn (`by_turn`), or one for the whole trace with every step trained."""
    tools_json = json.dumps(trace.tools, ensure_ascii=False)  # once per trace, shared by its rows
    messages = [dict(m) for m in trace.messages if trace.train_system or m["role"] != "system"]
    for m in messages:
        m.pop("flags", None)
    if not by_turn:
        ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not ends:
            return []
        row_messages = [_marked(m, True) for m in messages[: ends[-1] + 1]]
        return [_row(trace, 0, row_messages, tools_json)]
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
    if not keep_reasoning:
        marked.pop("reasoning_content", None)
    return marked


def _row(trace: Trace, turn: int, messages: list[dict], tools_json: str) -> dict:
    return {"id": f"{trace.id}-{turn}", "trace_id": trace.id, "turn": turn, "timestamp": trace.created,
            "model": trace.model, "messages": messages, "tools": tools_json}


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


def _atomic_target(out: Path):
    """A temporary path beside `out`, renamed over it only once the write finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) / out.name


def export_rows(rows: list[dict], out: str | Path, fmt: str = "jsonl") -> Path:
    """Write rows as JSONL, Parquet or a `datasets` folder (`save_to_disk`). Nothing half-written is left behind."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not rows:
        raise ValueError("nothing to export: the selection has no rows (are all traces flagged or excluded?)")
    out = Path(out)
    tmp = _atomic_target(out)
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        to_hf_dataset(rows).to_parquet(str(tmp))
    else:
        to_hf_dataset(rows).save_to_disk(str(tmp))
    if out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp, out)
    tmp.parent.rmdir()
    return out


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
        row["messages"] = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
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
    from huggingface_hub import HfApi

    if not rows:
        raise ValueError("nothing to push: the selection has no rows")
    token = token or os.environ.get("HF_TOKEN")
    to_hf_dataset(rows).push_to_hub(repo_id, private=private, token=token)
    # Uploaded as a file: DatasetCard.push_to_hub validates on huggingface.co directly, ignoring HF_ENDPOINT.
    HfApi(token=token).upload_file(path_or_fileobj=dataset_card(rows, repo_id).encode("utf-8"), path_in_repo="README.md",
                                   repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"
