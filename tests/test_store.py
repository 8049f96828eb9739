"""The SQLite store: WAL, schema version, per-message commits, one transaction per trace, undo, kill -9 safety."""

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from mcpft import curate
from mcpft.store import SCHEMA_VERSION, NotFound, Store
from mcpft.trace import Trace, TraceError, normalize_trace

CONVERSATION = [
    {"role": "system", "content": "You browse."},
    {"role": "user", "content": "go"},
    {"role": "user", "content": "to a.test"},
    {"role": "assistant", "content": "", "reasoning_content": "nav",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "nav", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "page"},
    {"role": "assistant", "content": "done"},
]
TOOLS = [{"type": "function", "function": {"name": "nav", "description": "", "parameters": {}}}]


def other_connection_count(path, table="messages"):
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_wal_and_schema_version(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this mcpft"):
        Store(path)


def test_each_append_is_committed_at_once(store):
    trace_id = store.start_trace(Trace(messages=[], tools=TOOLS, model="m", base_url="http://x/v1"))
    for i, message in enumerate(CONVERSATION):
        store.append_message(trace_id, message)
        # Another connection (another process after a crash) sees every completed step.
        assert other_connection_count(store.path) == i + 1
    trace = store.get(trace_id)
    assert [m["role"] for m in trace.messages] == [m["role"] for m in CONVERSATION]
    assert trace.flags == []


def test_bad_append_stores_nothing(store):
    trace_id = store.start_trace(Trace(messages=[], tools=TOOLS))
    with pytest.raises(TraceError, match="role"):
        store.append_message(trace_id, {"role": "wizard", "content": "x"})
    with pytest.raises(NotFound):
        store.append_message("nope", {"role": "user", "content": "x"})
    assert store.get(trace_id).messages == []


def test_flags_follow_appends(store):
    trace_id = store.start_trace(Trace(messages=[], tools=TOOLS))
    for message in CONVERSATION[:4]:
        store.append_message(trace_id, message)
    assert [f["code"] for f in store.get(trace_id).flags] == ["unanswered_call"]
    store.append_message(trace_id, CONVERSATION[4])
    assert [f["code"] for f in store.get(trace_id).flags] == ["no_final_assistant"]
    store.append_message(trace_id, CONVERSATION[5])
    assert store.get(trace_id).flags == []


def test_duplicates_are_per_owner(store):
    trace = normalize_trace({"messages": CONVERSATION, "tools": TOOLS})
    first = store.add_trace(trace)
    assert first.added
    assert store.add_trace(trace)[:2] == (first.id, False)
    trace.owner = "someone-else"
    assert store.add_trace(trace)[1]
    assert len(store.ids(owner="")) == 1 and len(store.ids(owner="someone-else")) == 1


def test_every_edit_is_undoable(store):
    trace_id = store.add_trace(normalize_trace({"messages": CONVERSATION, "tools": TOOLS})).id
    original = store.get(trace_id)
    curate.merge_user_turns(store, trace_id, 1)
    curate.delete_messages(store, trace_id, [0])
    curate.edit_message(store, trace_id, 2, "content", "PAGE")
    curate.set_system_in_training(store, trace_id, False)
    curate.set_included(store, trace_id, False)
    curate.rate(store, trace_id, 5)
    curate.set_tags(store, trace_id, ["good", " good", "demo"])
    edited = store.get(trace_id)
    assert [m["role"] for m in edited.messages] == ["user", "assistant", "tool", "assistant"]
    assert edited.messages[0]["content"] == "go\n\nto a.test" and edited.messages[2]["content"] == "PAGE"
    assert (edited.included, edited.rating, edited.tags, edited.train_system) == (False, 5, ["good", "demo"], False)
    while curate.undo(store, trace_id):
        pass
    restored = store.get(trace_id)
    assert restored.messages == original.messages
    assert (restored.included, restored.rating, restored.tags, restored.train_system) == (True, None, [], True)
    assert len(store.history(trace_id)) == 7 and all(h["undone"] for h in store.history(trace_id))


def test_curate_errors(store):
    trace_id = store.add_trace(normalize_trace({"messages": CONVERSATION, "tools": TOOLS})).id
    with pytest.raises(IndexError, match="has no message 9"):
        curate.delete_messages(store, trace_id, [9])
    with pytest.raises(ValueError, match="nothing to merge"):
        curate.merge_user_turns(store, trace_id, 2)
    with pytest.raises(ValueError, match="rating must be"):
        curate.rate(store, trace_id, 9)
    with pytest.raises(TraceError):
        curate.edit_message(store, trace_id, 1, "role", "wizard")
    assert store.history(trace_id) == []  # failed edits leave no trace in the history


def test_original_json_stays_retrievable(store, trelis_dir):
    path = sorted(trelis_dir.glob("get_the_title*.json"))[0]
    text = path.read_text()
    trace_id = store.add_trace(normalize_trace(json.loads(text)), original=text).id
    original = store.original(trace_id)
    assert isinstance(original["messages"][1]["tool_calls"][0]["function"]["arguments"], dict)
    assert isinstance(store.get(trace_id).messages[1]["tool_calls"][0]["function"]["arguments"], str)


KILLED_IMPORT = """
import sys
from mcpft.store import Store
from mcpft.ingest import import_paths
import_paths(Store(sys.argv[1]), [sys.argv[2]])
"""


def test_import_killed_midway_leaves_a_consistent_database(tmp_path):
    folder = tmp_path / "traces"
    folder.mkdir()
    n_files = 400
    for i in range(n_files):
        messages = [{"role": "user", "content": f"task {i}"}] + CONVERSATION[3:] * (1 + i % 5)
        (folder / f"t{i:04d}.json").write_text(json.dumps({"messages": messages, "tools": TOOLS, "model": "m"}))
    db = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IMPORT, str(db), str(folder)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if other_connection_count(db, "traces") >= 20:
                break
        except sqlite3.OperationalError:
            pass  # the schema is not there yet
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the import finished before it could be killed"
    with Store(db) as store:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = store.ids()
        assert 20 <= len(ids) < n_files
        for trace_id in ids:
            trace = store.get(trace_id)
            i = int(trace.messages[0]["content"].split()[1])
            assert len(trace.messages) == 1 + 3 * (1 + i % 5), "a trace was stored in part"


def test_id_prefixes_are_matched_literally(store):
    trace_id = store.add_trace(normalize_trace({"messages": CONVERSATION, "tools": TOOLS})).id
    assert store.resolve_id(trace_id[:4]) == trace_id
    for pattern in ("%", "_", trace_id[:3] + "%", ""):  # LIKE wildcards and the empty prefix match nothing
        with pytest.raises(NotFound):
            store.resolve_id(pattern)


def test_an_agent_trace_never_stores_a_key_in_its_url(store):
    from mcpft.recording import open_trace

    trace_id = open_trace(store, model="m", base_url="https://me:sk-in-url@llm.example/v1?api_key=sk-in-query",
                          tools=[], settings={"extra": {"headers": {"Authorization": "Bearer sk-in-header"}}})
    stored = store.get(trace_id)
    assert "sk-" not in stored.base_url + json.dumps(stored.settings)
    assert stored.base_url.startswith("https://llm.example/v1")
