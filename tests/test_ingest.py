"""Import: the Trelis recorder format, JSONL, our own exports; bad files rejected one by one, nothing half-stored."""

import json

import pytest

from mcpft.dataset import export_rows, rows_from_traces
from mcpft.ingest import MAX_TRACE_BYTES, import_paths
from mcpft.store import Store

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_trelis_traces_import_clean(store, trelis_dir):
    report = import_paths(store, [trelis_dir])
    assert (len(report.imported), report.duplicates, report.flagged, report.rejected) == (3, 0, [], [])
    again = import_paths(store, [trelis_dir])
    assert (len(again.imported), again.duplicates) == (0, 3)
    models = {t.model for t in store.traces()}
    assert models == {"Qwen/Qwen3-30B-A3B-FP8"}


def test_bad_files_are_rejected_with_file_and_field(store, tmp_path):
    cases = {
        "invalid.json": b'{"messages": [',
        "shape.json": b'"just a string"',
        "binary.json": b'\xff\xfe{"messages": []}',
        "role.json": json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}).encode(),
        "missing.json": json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
        "good.json": json.dumps(GOOD).encode(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(100 * 2**20)  # a 100 MB file, refused before it is read
    report = import_paths(store, [tmp_path])
    errors = {r["file"].split("/")[-1]: r["error"] for r in report.rejected}
    assert len(report.imported) == 1
    assert errors["invalid.json"].startswith("invalid JSON at line 1")
    assert errors["shape.json"] == "trace: expected a JSON object, got str"
    assert errors["binary.json"].startswith("not UTF-8 text")
    assert errors["role.json"].startswith("messages[1].role: unknown role 'robot'")
    assert errors["missing.json"] == "messages[0].tool_call_id: missing field"
    assert errors["huge.json"].startswith("file is 100 MB, over the") and str(MAX_TRACE_BYTES // 2**20) in errors["huge.json"]
    assert len(store.ids()) == 1


def test_jsonl_bad_line_does_not_stop_the_others(store, tmp_path):
    path = tmp_path / "many.jsonl"
    lines = [json.dumps(GOOD), "{not json", json.dumps({**GOOD, "messages": GOOD["messages"][:1] + [{"role": "assistant", "content": "hey"}]}), "", json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    report = import_paths(store, [path])
    assert len(report.imported) == 2 and report.duplicates == 1
    assert [r["file"] for r in report.rejected] == [f"{path}:2"]


def test_flagged_traces_are_stored_and_reported(store, tmp_path):
    broken = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\n"},
                           {"role": "tool", "tool_call_id": "lost", "content": "result"},
                           {"role": "assistant", "content": "answer"}]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    report = import_paths(store, [tmp_path])
    assert len(report.flagged) == 1 and any("lose its tool_calls" in r for r in report.flagged[0]["reasons"])
    assert rows_from_traces(store.traces()) == []
    assert len(rows_from_traces(store.traces(), include_flagged=True)) == 1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_export_import_round_trip(store, trelis_dir, tmp_path, fmt):
    import_paths(store, [trelis_dir])
    rows = rows_from_traces(store.traces(), by_turn=False)
    out = export_rows(rows, tmp_path / f"export.{fmt}", fmt)
    if fmt == "jsonl":
        again = Store(tmp_path / "again.db")
        assert len(import_paths(again, [out]).imported) == 3
    else:
        from mcpft.dataset import load_rows

        again = Store(tmp_path / "again.db")
        jsonl = export_rows(load_rows(out), tmp_path / "reexport.jsonl", "jsonl")
        assert len(import_paths(again, [jsonl]).imported) == 3
    before = {t.created: (t.messages, t.tools, t.model) for t in store.traces()}
    after = {t.created: (t.messages, t.tools, t.model) for t in again.traces()}
    assert before == after
