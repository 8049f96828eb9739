"""Unroll: one row per user turn, only that turn's assistant messages trained, old reasoning dropped."""

import json

from mcpft.dataset import rows_from_traces, unroll
from mcpft.trace import normalize_trace

TOOLS = [{"type": "function", "function": {"name": "nav", "description": "", "parameters": {}}}]


def assistant(text, reasoning=None, calls=()):
    m = {"role": "assistant", "content": text}
    if reasoning:
        m["reasoning_content"] = reasoning
    if calls:
        m["tool_calls"] = [{"id": c, "type": "function", "function": {"name": "nav", "arguments": "{}"}} for c in calls]
    return m


THREE_TURNS = normalize_trace({"tools": TOOLS, "messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "one"}, assistant("", "r1a", ["a"]), {"role": "tool", "tool_call_id": "a", "content": "A"},
    assistant("answer one", "r1b"),
    {"role": "user", "content": "two"}, assistant("answer two", "r2"),
    {"role": "user", "content": "three"}, assistant("", "r3a", ["b"]), {"role": "tool", "tool_call_id": "b", "content": "B"},
    assistant("answer three", "r3b"),
]})
THREE_TURNS.id = "t"


def trained(row):
    return [m["content"] for m in row["messages"] if m.get("train")]


def test_three_user_turns_give_three_rows_each_training_every_step():
    rows = unroll(THREE_TURNS)
    assert [r["id"] for r in rows] == ["t-0", "t-1", "t-2"]
    assert [len(r["messages"]) for r in rows] == [5, 7, 11]
    assert trained(rows[0]) == ["", "answer one"]
    assert trained(rows[1]) == ["answer two"]
    assert trained(rows[2]) == ["", "answer three"]
    last = rows[2]["messages"]
    assert [m.get("reasoning_content") for m in last if m["role"] == "assistant"] == [None, None, None, "r3a", "r3b"]
    assert all(m["train"] is False for m in last[:7] if m["role"] == "assistant")
    assert "train" not in last[0] and "train" not in last[3]
    assert json.loads(rows[0]["tools"]) == TOOLS


def test_without_unroll_one_row_trains_everything():
    (row,) = unroll(THREE_TURNS, by_turn=False)
    assert trained(row) == ["", "answer one", "answer two", "", "answer three"]
    assert [m.get("reasoning_content") for m in row["messages"] if m["role"] == "assistant"] == \
        ["r1a", "r1b", "r2", "r3a", "r3b"]


def test_system_prompt_can_be_kept_out_of_training():
    THREE_TURNS.train_system = False
    try:
        assert all(r["messages"][0]["role"] == "user" for r in unroll(THREE_TURNS))
    finally:
        THREE_TURNS.train_system = True
    assert unroll(THREE_TURNS)[0]["messages"][0]["role"] == "system"


def test_unanswered_last_turn_and_trailing_tool_results_are_not_rows():
    trace = normalize_trace({"tools": TOOLS, "messages": [
        {"role": "user", "content": "one"}, assistant("ok"), {"role": "user", "content": "two"}]})
    assert [r["turn"] for r in unroll(trace)] == [0]


def test_excluded_and_flagged_traces_are_left_out(store):
    good = store.add_trace(THREE_TURNS).id
    store.update(good, "exclude", included=False)
    assert rows_from_traces(store.traces()) == []
    store.update(good, "include", included=True)
    assert len(rows_from_traces(store.traces())) == 3


def test_trelis_rows(store, trelis_dir):
    from mcpft.ingest import import_paths

    import_paths(store, [trelis_dir])
    rows = rows_from_traces(store.traces())
    assert len(rows) == 3  # one user turn each
    by_first = {r["messages"][0]["content"]: r for r in rows}
    parallel = by_first["find the title of the page trelis.com"]
    assert [m["role"] for m in parallel["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert len(parallel["messages"][1]["tool_calls"]) == 2
    assert all(m["train"] and m["reasoning_content"] for m in parallel["messages"] if m["role"] == "assistant")
