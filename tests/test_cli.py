"""The CLI: every verb takes --db and --json; a JSON summary on stdout, errors as one clear line."""

import json
import subprocess
import sys

from mcpft.cli import main


def run(capsys, *argv):
    code = main([*argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, db, *argv):
    code, out, err = run(capsys, *argv, "--db", str(db), "--json")
    assert code == 0, err
    return json.loads(out)


def test_import_list_curate_export(capsys, tmp_path, trelis_dir):
    db = tmp_path / "cli.db"
    summary = run_json(capsys, db, "import", str(trelis_dir), "--tag", "trelis")
    assert (summary["imported"], summary["duplicates"], summary["rejected"]) == (3, 0, [])
    listed = run_json(capsys, db, "traces", "list")["traces"]
    assert len(listed) == 3 and all(t["tags"] == ["trelis"] for t in listed)
    first = listed[0]["id"]
    shown = run_json(capsys, db, "traces", "show", first[:6])
    assert shown["id"] == first and shown["messages"][0]["role"] == "user"
    original = run_json(capsys, db, "traces", "show", first, "--original")
    assert set(original) == {"timestamp", "model", "messages", "tools"}
    run_json(capsys, db, "traces", "exclude", first)
    exported = run_json(capsys, db, "export", "--out", str(tmp_path / "rows.jsonl"))
    assert exported["rows"] == 2
    assert run_json(capsys, db, "traces", "undo", first)["undone"] == "exclude"
    exported = run_json(capsys, db, "export", "--out", str(tmp_path / "rows.parquet"), "--format", "parquet",
                        "--no-unroll")
    assert exported == {"out": str(tmp_path / "rows.parquet"), "rows": 3, "traces": 3, "format": "parquet"}
    validated = run_json(capsys, db, "traces", "validate")
    assert validated == {"checked": 3, "flagged": {}}


def test_errors_are_one_clear_line(capsys, tmp_path):
    db = tmp_path / "empty.db"
    code, out, err = run(capsys, "traces", "show", "nope", "--db", str(db))
    assert code == 2 and err.strip() == "mcpft traces: no trace 'nope' in the store"
    code, out, err = run(capsys, "export", "--out", str(tmp_path / "x.jsonl"), "--db", str(db))
    assert code == 2 and "no rows: 0 trace(s) selected" in err
    (tmp_path / "bad.json").write_text("{")
    code, out, err = run(capsys, "import", str(tmp_path / "bad.json"), "--db", str(db))
    assert code == 1 and "rejected" in out and "bad.json: invalid JSON" in out


def test_console_script_and_default_data_dir(tmp_path, trelis_dir):
    env = {"MCPFT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    mcpft = [sys.executable, "-m", "mcpft"]
    done = subprocess.run([*mcpft, "import", str(trelis_dir), "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == 3
    assert (tmp_path / "home" / "mcpft.db").exists()
