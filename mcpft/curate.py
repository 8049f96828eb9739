"""Curation: the edits a person makes to stored traces. Each is one undoable step of the store's edit history."""

from __future__ import annotations

from mcpft.store import Store
from mcpft.trace import Trace

EDITABLE_MESSAGE_FIELDS = ("content", "reasoning_content", "tool_calls", "tool_call_id", "name", "role")


def _messages(store: Store, trace_id: str) -> list[dict]:
    return [dict(m) for m in store.get(trace_id).messages]


def _check_index(messages: list[dict], index: int, trace_id: str):
    if not 0 <= index < len(messages):
        raise IndexError(f"trace {trace_id} has no message {index} (it has {len(messages)})")


def delete_messages(store: Store, trace_id: str, indices: list[int]) -> Trace:
    messages = _messages(store, trace_id)
    for index in indices:
        _check_index(messages, index, trace_id)
    dropped = set(indices)
    kept = [m for i, m in enumerate(messages) if i not in dropped]
    return store.update(trace_id, f"delete messages {sorted(indices)}", messages=kept)


def edit_message(store: Store, trace_id: str, index: int, field: str, value) -> Trace:
    """Set one field of one message (`value` None removes an optional field such as reasoning_content)."""
    if field not in EDITABLE_MESSAGE_FIELDS:
        raise ValueError(f"cannot edit message field {field!r}; editable: {', '.join(EDITABLE_MESSAGE_FIELDS)}")
    messages = _messages(store, trace_id)
    _check_index(messages, index, trace_id)
    if value is None:
        messages[index].pop(field, None)
    else:
        messages[index][field] = value
    return store.update(trace_id, f"edit messages[{index}].{field}", messages=messages)


def merge_user_turns(store: Store, trace_id: str, index: int) -> Trace:
    """Merge the user message at `index` with the consecutive user messages after it (joined by a blank line)."""
    messages = _messages(store, trace_id)
    _check_index(messages, index, trace_id)
    end = index + 1
    while end < len(messages) and messages[end]["role"] == "user":
        end += 1
    if messages[index]["role"] != "user" or end == index + 1:
        raise ValueError(f"messages[{index}] is not followed by another user message: nothing to merge")
    merged = {"role": "user", "content": "\n\n".join(m["content"] for m in messages[index:end])}
    return store.update(trace_id, f"merge user turns {index}..{end - 1}", messages=[*messages[:index], merged, *messages[end:]])


def set_system_in_training(store: Store, trace_id: str, train: bool) -> Trace:
    """Keep or drop the system prompt from training rows; it stays in the record either way."""
    return store.update(trace_id, "train system prompt" if train else "drop system prompt from training",
                        train_system=train)


def set_included(store: Store, trace_id: str, included: bool) -> Trace:
    return store.update(trace_id, "include" if included else "exclude", included=included)


def rate(store: Store, trace_id: str, rating: int | None) -> Trace:
    if rating is not None and not 1 <= rating <= 5:
        raise ValueError(f"rating must be 1-5 or empty, got {rating}")
    return store.update(trace_id, f"rate {rating}", rating=rating)


def set_tags(store: Store, trace_id: str, tags: list[str]) -> Trace:
    clean = list(dict.fromkeys(t.strip() for t in tags if t.strip()))
    return store.update(trace_id, f"tags {clean}", tags=clean)


def set_notes(store: Store, trace_id: str, notes: str) -> Trace:
    return store.update(trace_id, "notes", notes=notes)


def undo(store: Store, trace_id: str) -> str | None:
    """Undo the latest edit; returns what it was, or None when nothing is left to undo."""
    return store.undo(trace_id)
