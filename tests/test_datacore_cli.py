"""The data verbs' refusals through the real CLI: a bad trace id, malformed edit JSON, an export target that holds
other data, and a push that cannot happen are each one clear line and a non-zero exit, never a traceback."""

import os
import socket
import subprocess
import sys

import pytest

from mcpft.cli import main
from mcpft.store import Store
from mcpft.trace import normalize_trace

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATION = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run(capsys, *argv):
    code = main([*argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path):
    """A store with two traces whose ids share the prefix `ab`."""
    path = tmp_path / "cli.db"
    with Store(path) as store:
        for trace_id, answer in (("ab01", "hello"), ("ab02", "hi there")):
            trace = normalize_trace({**CONVERSATION, "messages": [CONVERSATION["messages"][0],
                                                                  {"role": "assistant", "content": answer}]})
            trace.id = trace_id
            store.add_trace(trace)
    return path


TRACE_ACTIONS = [["show", "{id}"], ["show", "{id}", "--original"], ["validate", "ab01", "{id}"], ["include", "{id}"],
                 ["exclude", "{id}"], ["rate", "{id}", "3"], ["tag", "{id}", "x"], ["drop-system", "{id}"],
                 ["keep-system", "{id}"], ["delete-messages", "{id}", "0"], ["edit", "{id}", "0", "content", "x"],
                 ["merge-users", "{id}", "0"], ["undo", "{id}"], ["delete", "{id}"]]


@pytest.mark.parametrize("action", TRACE_ACTIONS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("bad_id, error", [("nope", "no trace 'nope' in the store"),
                                           ("", "empty trace id (see `mcpft traces list` for the ids)"),
                                           ("ab", "trace id prefix 'ab' is ambiguous")])
def test_every_traces_action_refuses_a_bad_id_in_one_line(capsys, db, action, bad_id, error):
    code, out, err = run(capsys, "traces", *[bad_id if a == "{id}" else a for a in action], "--db", str(db))
    assert (code, out, err) == (2, "", f"mcpft traces: {error}\n")
    with Store(db) as store:  # nothing was changed
        assert store.ids() == ["ab01", "ab02"] and all(store.history(t) == [] for t in store.ids())


def test_malformed_tool_calls_json_names_the_field_and_position(capsys, db):
    code, out, err = run(capsys, "traces", "edit", "ab01", "1", "tool_calls", '[{"id": "a",}]', "--db", str(db))
    assert code == 2
    assert err == ("mcpft traces: the new messages[1].tool_calls is not valid JSON: Expecting property name enclosed "
                   "in double quotes at line 1 column 13 (character 12)\n")


def test_export_refuses_to_replace_a_folder(capsys, db, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    code, out, err = run(capsys, "export", "--out", str(folder), "--db", str(db))
    assert code == 2 and err.startswith(f"mcpft export: {folder} exists and is not a file: --format jsonl writes one")
    code, out, err = run(capsys, "export", "--out", str(folder), "--format", "hf", "--db", str(db))
    assert code == 2 and "holds other data than an earlier --format hf export" in err
    assert [p.name for p in folder.iterdir()] == ["mine.txt"] and (folder / "mine.txt").read_text() == "keep me"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("repo_id, env, error", [
    ("me/rows", {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"},
     "cannot push to me/rows: HF_HUB_OFFLINE is set, so the Hub is never contacted; unset it to push"),
    ("me/rows", {"HF_HUB_OFFLINE": "0"},
     "cannot push to me/rows: no Hugging Face token; set HF_TOKEN or log in with `hf auth login`"),
    ("not a repo!", {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake"}, "repo id 'not a repo!' is not valid ("),
    ("me/rows", {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake", "HF_ENDPOINT": "http://127.0.0.1:{port}"},
     "cannot reach the Hub at http://127.0.0.1:{port} to push me/rows ("),
], ids=["offline", "no token", "bad repo id", "unreachable"])
def test_push_failures_say_what_failed_and_what_to_do(db, tmp_path, repo_id, env, error):
    port = closed_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    done = subprocess.run([sys.executable, "-m", "mcpft", "push", "--repo-id", repo_id, "--db", str(db)],
                          env={**clean, "HF_HOME": str(tmp_path / "hf-home"), **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"mcpft push: {error.format(port=port)}"), done.stderr
    assert done.stderr.count("\n") == 1 and "hf_fake" not in done.stderr + done.stdout
