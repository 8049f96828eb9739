"""Choosing the rows to train on and to hold out: a selection of the store's traces, an export (JSONL / Parquet /
`datasets` folder), or a Hub dataset, every row checked for shape. Traces tagged `heldout` are the held-out set of
the CLI and the app alike, and never training rows."""

from __future__ import annotations

import json
from pathlib import Path

from mcpft.dataset import clean_rows, load_rows, rows_from_traces
from mcpft.models import HUB_ID

HELDOUT_TAG = "heldout"
STORE = "store"  # `data` naming the store's traces rather than a file or a Hub dataset
ROLES = ("system", "user", "assistant", "tool")


class SelectionError(ValueError):
    """Rows that cannot be had or are not training rows; the message names the source and the row or line."""



def rows_problem(rows: list) -> str | None:
    """The first row not shaped as a training row (docs/architecture.md), named by number and id; None if all are."""
    for number, row in enumerate(rows, 1):
        if problem := _row_problem(row):
            name = f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else ""
            return f"row {number}{name}: {problem}"
    return None


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected a row object, got {_brief(row)}"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list of message objects, got {_brief(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] must be an object with a role in {', '.join(ROLES)}, got {_brief(message)}"
        if not isinstance(message.get("content") or "", str):
            return f"messages[{i}].content must be a string, got {_brief(message['content'])}"
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
            return f"messages[{i}].tool_calls must be a list of call objects, got {_brief(calls)}"
    return None


def _brief(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:59] + '…'}"


def read_rows(path: str | Path) -> list[dict]:
    """Rows of an export (JSONL / Parquet / `datasets` folder), checked: a broken JSONL line or row is named."""
    path = Path(path).expanduser()
    try:
        rows = load_rows(path)
    except json.JSONDecodeError:
        raise SelectionError(f"{path}: {_broken_line(path)}") from None
    except UnicodeDecodeError:
        raise SelectionError(f"{path}: not UTF-8 text, so not a JSONL export (nor Parquet: its name ends otherwise)") \
            from None
    except ValueError as error:  # pyarrow's ArrowInvalid: a corrupt or truncated Parquet or Arrow file
        raise SelectionError(f"{path}: not a readable {_export_kind(path)} export ({error})") from None
    except FileNotFoundError as error:  # `datasets` says so of a folder that holds no saved dataset
        raise SelectionError(f"{path}: {error}") from None
    if problem := rows_problem(rows):
        raise SelectionError(f"{path}: {problem}")
    return rows


def _export_kind(path: Path) -> str:
    return "`datasets` folder" if path.is_dir() else "Parquet" if path.suffix == ".parquet" else "JSONL"


def _broken_line(path: Path) -> str:
    """Which line of a JSONL file does not parse (the loader's error knows only the text of that line)."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                if line.strip():
                    json.loads(line.rstrip("\r\n"))  # the column counts within the line
            except json.JSONDecodeError as error:
                return f"line {number} is not valid JSON ({error.msg} at column {error.colno})"
    return "not valid JSON"


def store_selection(data: str | None) -> list[str] | None:
    """The tags of a store selection, `store` or `store:tag=A,tag=B` (traces with all of them); None when `data`
    names no store selection (a path or a Hub id)."""
    if data in (None, "", STORE):
        return []
    if not str(data).startswith(f"{STORE}:"):
        return None
    tags = []
    for part in str(data)[len(STORE) + 1:].split(","):
        key, _, value = (text.strip() for text in part.partition("="))
        if key != "tag" or not value:
            raise SelectionError(f"data {data!r}: a store selection reads store:tag=A,tag=B (got {part.strip()!r})")
        tags.append(value)
    return tags


def select_rows(data: str | Path | None = None, store=None, tags: list[str] | None = None,
                include_flagged: bool = False) -> tuple[list[dict], dict]:
    """(rows, where they came from): a store selection (`store_selection`: the store's included traces, never the
    held-out ones), an existing path = an export (JSONL / Parquet / `datasets` folder), else a Hub dataset id."""
    selected_tags = store_selection(None if data is None else str(data))
    if selected_tags is not None:
        if store is None:
            raise SelectionError("no data: pass a dataset path or Hub id, or a store to select traces from")
        return store_rows(store, [*selected_tags, *(tags or [])], include_flagged)
    path = Path(data).expanduser()
    if path.exists():
        rows = read_rows(path)
        source = {"kind": "file", "path": str(path)}
    elif HUB_ID.match(str(data)):
        rows = hub_rows(str(data))
        source = {"kind": "hub", "dataset": str(data)}
    else:
        raise SelectionError(f"data {str(data)!r}: no such file or folder, and not a Hub dataset id of the form "
                             "'org/name'")
    if not rows:
        raise SelectionError(f"data {str(data)!r} holds no rows")
    return rows, source


def store_rows(store, tags: list[str] | None, include_flagged: bool, owner: str | None = None,
               heldout_tag: str = HELDOUT_TAG) -> tuple[list[dict], dict]:
    """Rows of the store's selected traces (of `owner`, when given), leaving out the held-out set (`heldout_tag`)."""
    selected = store.traces(owner=owner, tags=tags or None)
    traces = [t for t in selected if not heldout_tag or heldout_tag not in t.tags]
    held_out = len(selected) - len(traces)
    rows = rows_from_traces(traces, by_turn=True, include_flagged=include_flagged)
    if not rows:
        excluded = sum(not t.included for t in traces)
        flagged = sum(bool(t.flags) and t.included for t in traces)
        where = f" with tags {', '.join(tags)}" if tags else ""
        raise SelectionError(
            f"no training rows: {len(selected)} trace(s) selected{where}, {held_out} tagged {heldout_tag!r} (held "
            f"out, never trained on), {excluded} excluded, {flagged} flagged"
            + ("" if include_flagged else " (flagged traces are left out unless you ask to include them)"))
    source = {"kind": "store", "tags": list(tags or []), "include_flagged": include_flagged,
              "traces": len({r["trace_id"] for r in rows}), "heldout_traces_left_out": held_out}
    return rows, source


def export_rows_of(traces: list, by_turn: bool = True, include_flagged: bool = False,
                   include_heldout: bool = False, heldout_tag: str = HELDOUT_TAG) -> list[dict]:
    """Rows to export or push: the included traces, flagged ones and the held-out set (`heldout_tag`) left out
    unless asked for; each row keeps its trace's tags, so a held-out row stays recognisable wherever it goes."""
    chosen = [t for t in traces if include_heldout or heldout_tag not in t.tags]
    tags = {t.id: list(t.tags) for t in chosen}
    return [{**row, "tags": tags[row["trace_id"]]} for row in rows_from_traces(chosen, by_turn, include_flagged)]


def store_heldout_rows(store) -> tuple[list[dict], dict]:
    """Rows of the store's included, unflagged traces tagged `heldout` (the app's held-out set), and their source."""
    rows = rows_from_traces(store.traces(tags=[HELDOUT_TAG]), by_turn=True, include_flagged=False)
    return rows, {"kind": "store", "tag": HELDOUT_TAG, "traces": len({r["trace_id"] for r in rows}),
                  "rows": len(rows)}


def hub_rows(dataset_id: str, split: str = "train") -> list[dict]:
    """Rows of a dataset pushed by `mcpft push` (or any with the same columns), via `datasets.load_dataset`."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except (FileNotFoundError, ValueError) as error:
        raise SelectionError(f"dataset {dataset_id!r}: {error}") from None
    missing = {"messages", "tools"} - set(loaded.column_names)
    if missing:
        raise SelectionError(f"dataset {dataset_id!r} has no {', '.join(sorted(missing))} column: not mcpft "
                             "training rows")
    rows = clean_rows(loaded.to_list())
    for i, row in enumerate(rows):
        row.setdefault("id", f"{dataset_id}-{i}")
        row.setdefault("trace_id", row["id"])
    return rows
