"""Unroll: one row per user turn, only that turn's assistant messages trained, old reasoning dropped."""

import json

import pytest

from mcpft.dataset import ExportError, export_rows, load_rows, rows_from_traces, unroll, without_reasoning
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


def test_rows_without_reasoning_keep_everything_else():
    rows = unroll(THREE_TURNS)
    bare = without_reasoning(rows)
    assert not any("reasoning_content" in m for row in bare for m in row["messages"])
    assert [trained(row) for row in bare] == [trained(row) for row in rows]  # the same turns trained, same words
    for before, after in zip(rows, bare):
        assert [{k: v for k, v in m.items() if k != "reasoning_content"} for m in before["messages"]] == \
            after["messages"]
        assert {k: v for k, v in before.items() if k != "messages"} == {k: v for k, v in after.items() if k != "messages"}
    assert rows[2]["messages"][-1]["reasoning_content"] == "r3b"  # the rows given are left as they were


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


def test_structured_tool_results_stay_in_the_trace_but_out_of_the_rows(store):
    structured = [{"title": "A", "links": [1, 2]}, {"title": 3}]  # shapes that share no Arrow type
    trace = normalize_trace({"tools": TOOLS, "messages": [
        {"role": "user", "content": "one"}, assistant("", calls=["a"]),
        {"role": "tool", "tool_call_id": "a", "content": "A", "structured_content": structured[0]},
        assistant("ok"), {"role": "user", "content": "two"}, assistant("", calls=["b"]),
        {"role": "tool", "tool_call_id": "b", "content": "B", "structured_content": structured[1]}, assistant("ok")]})
    stored = store.get(store.add_trace(trace).id)
    assert [m["structured_content"] for m in stored.messages if "structured_content" in m] == structured
    for by_turn in (True, False):
        rows = rows_from_traces([stored], by_turn=by_turn)
        assert not any("structured_content" in m for row in rows for m in row["messages"])
    assert len(load_rows(export_rows(rows_from_traces([stored]), store.path.parent / "rows.parquet", "parquet"))) == 2


@pytest.fixture
def rows():
    return unroll(THREE_TURNS)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_never_replaces_a_folder_with_a_file(rows, tmp_path, fmt):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"^{folder} exists and is not a file: --format {fmt} writes one file"):
        export_rows(rows, folder, fmt)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind


def test_export_to_the_current_folder_is_refused_cleanly(rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    for fmt in ("jsonl", "hf"):
        with pytest.raises(ExportError, match=r"^\. "):
            export_rows(rows, ".", fmt)
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_hf_export_replaces_only_an_empty_folder_or_an_earlier_hf_export(rows, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    export_rows(rows, out, "hf")  # into an empty folder
    export_rows(rows[:1], out, "hf")  # over the earlier export
    assert len(load_rows(out)) == 1
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="holds other data than an earlier --format hf export"):
        export_rows(rows, out, "hf")
    assert (out / "mine.txt").read_text() == "keep me" and len(load_rows(out)) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is not a folder: --format hf writes a folder"):
        export_rows(rows, tmp_path / "file", "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf"]


def test_a_failed_export_leaves_the_earlier_one_and_no_temporary_files(rows, tmp_path):
    out = export_rows(rows, tmp_path / "rows.jsonl")
    earlier = out.read_bytes()
    with pytest.raises(TypeError):  # a row that is not JSON fails mid-write
        export_rows([*rows, {**rows[0], "id": {"not", "json"}}], out)
    assert out.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
