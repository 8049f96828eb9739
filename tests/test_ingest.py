"""Import: the Trelis recorder format, JSONL, our own exports; bad files rejected one by one, nothing half-stored."""

import json

import pytest

from mcpft import curate
from mcpft.dataset import export_rows, load_rows, rows_from_traces
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
        "time.json": json.dumps({**GOOD, "timestamp": 1e20}).encode(),
        "flags.json": json.dumps({"messages": [GOOD["messages"][0], {**GOOD["messages"][1], "flags": 5}]}).encode(),
        "nested.json": b"[" * 100_000,
        # Valid JSON the store cannot encode (a lone surrogate): the last-resort catch makes it a rejection.
        "surrogate.json": b'{"messages": [{"role": "user", "content": "x\\ud800"}]}',
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
    assert errors["time.json"] == "timestamp: unix time 1e+20 is out of range"
    assert errors["flags.json"] == "messages[1].flags: expected a list of strings, got int"
    assert errors["nested.json"].startswith("JSON nested too deeply to read")
    assert errors["surrogate.json"] == ("messages[0].content: text that is not valid Unicode "
                                        "(a lone surrogate at character 1)")
    assert len(errors) == len(cases) and len(store.ids()) == 1


def test_jsonl_bad_line_does_not_stop_the_others(store, tmp_path):
    path = tmp_path / "many.jsonl"
    lines = [json.dumps(GOOD), "{not json", json.dumps({**GOOD, "messages": GOOD["messages"][:1] + [{"role": "assistant", "content": "hey"}]}), "", json.dumps(GOOD),
             "[" * 100_000, json.dumps({**GOOD, "created": 1e20})]
    path.write_text("\n".join(lines) + "\n")
    report = import_paths(store, [path])
    assert len(report.imported) == 2 and report.duplicates == 1
    assert [r["file"] for r in report.rejected] == [f"{path}:{n}" for n in (2, 6, 7)]
    assert report.rejected[2]["error"] == "created: unix time 1e+20 is out of range"


def test_the_stored_original_keeps_no_credentials(store, tmp_path):
    raw = {"model": "m", "api_key": "sk-live-1", "messages": GOOD["messages"],
           "settings": {"temperature": 0.2, "client": {"default_headers": {"Authorization": "Bearer sk-live-2"}}},
           "base_url": "https://bot:sk-live-3@api.example.com/v1?api_key=sk-live-4&deployment=a"}
    (tmp_path / "trace.json").write_text(json.dumps(raw))
    (trace_id,) = import_paths(store, [tmp_path / "trace.json"]).imported
    assert store.original(trace_id) == {"model": "m", "messages": GOOD["messages"],
                                        "settings": {"temperature": 0.2, "client": {"default_headers": {}}},
                                        "base_url": "https://api.example.com/v1?deployment=a"}
    store.close()
    for path in tmp_path.glob("mcpft.db*"):  # the database and its write-ahead log
        assert b"sk-live" not in path.read_bytes(), path.name


def test_flagged_traces_are_stored_and_reported(store, tmp_path):
    broken = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\n"},
                           {"role": "tool", "tool_call_id": "lost", "content": "result"},
                           {"role": "assistant", "content": "answer"}]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    report = import_paths(store, [tmp_path])
    assert len(report.flagged) == 1 and any("lose its tool_calls" in r for r in report.flagged[0]["reasons"])
    assert rows_from_traces(store.traces()) == []
    assert len(rows_from_traces(store.traces(), include_flagged=True)) == 1


def curated_traces(store: Store) -> list[dict]:
    """Every trace as a dict, oldest first, without what a new store assigns afresh (id, source file)."""
    return [{k: v for k, v in t.to_dict().items() if k not in ("id", "source")} for t in store.traces()]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_export_import_round_trip_keeps_the_curation(store, trelis_dir, tmp_path, fmt):
    """The real traces, recorded with settings and an endpoint, then curated: a --no-unroll export imports back
    to the same traces, curation included."""
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    endpoint = {"base_url": "http://127.0.0.1:8000/v1",
                "settings": {"temperature": 0.6, "max_tokens": 2048, "extra_body": {"top_k": 20}}}
    for path in sorted(trelis_dir.glob("*.json")):
        (recorded / path.name).write_text(json.dumps({**json.loads(path.read_text()), **endpoint}))
    first, second, third = import_paths(store, [recorded]).imported
    curate.set_tags(store, first, ["trelis", "navigation"])
    curate.rate(store, first, 5)
    curate.set_notes(store, first, "clean: both calls in parallel")
    curate.rate(store, second, 2)
    curate.set_system_in_training(store, third, False)
    rows = rows_from_traces(store.traces(), by_turn=False)
    out = export_rows(rows, tmp_path / f"export.{fmt}", fmt)
    jsonl = out if fmt == "jsonl" else export_rows(load_rows(out), tmp_path / "reexport.jsonl", "jsonl")
    with Store(tmp_path / "again.db") as again:
        assert len(import_paths(again, [jsonl]).imported) == 3
        assert curated_traces(again) == curated_traces(store)
    before = curated_traces(store)  # the comparison is not vacuous: the curation is there to compare
    assert {t["rating"] for t in before} == {5, 2, None} and {t["train_system"] for t in before} == {True, False}
    assert all((t["settings"], t["base_url"]) == (endpoint["settings"], endpoint["base_url"]) for t in before)
