"""The agent loop end to end: the real embedded endpoint (scripted model), a real MCP server, a real store."""

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mcpft.agent.endpoint import Endpoint
from mcpft.agent.loop import NOT_RUN, REJECTED, Agent, AgentConfig, endpoint_generate
from mcpft.agent.mcp import ToolHub, load_mcp_config
from mcpft.recording import open_trace, sink_for
from mcpft.serve import create_app, serve_in_thread
from tests.scripted import ScriptedBackend
from tests.test_mcp import child_pid

TINY_SERVER = Path(__file__).parent / "tiny_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(TINY_SERVER), "one"]}}}


@pytest.fixture(scope="module")
def endpoint_url():
    backends = {"scripted": ScriptedBackend(calls=1), "looping": ScriptedBackend(calls=10**6),
                "hanging": ScriptedBackend(calls=1, tool="hang"), "measuring": ScriptedBackend(calls=1, tool="measure"),
                "picturing": ScriptedBackend(calls=1, tool="picture")}
    url, stop = serve_in_thread(create_app(backends))
    yield url
    stop()


async def run_agent(store, url, text, model="scripted", approve=None, config=None, tmp=None, on_delta=None):
    async with ToolHub(load_mcp_config(MCP_CONFIG), tmp) as hub:
        endpoint = Endpoint(base_url=url, model=model)
        trace_id = open_trace(store, model=model, base_url=url, tools=hub.openai_tools(), settings={"max_steps": 5})
        agent = Agent(endpoint_generate(endpoint), hub, sink=sink_for(store, trace_id), approve=approve,
                      on_delta=on_delta, system_prompt="Use the tools.", config=config)
        result = await agent.send(text)
        return agent, trace_id, result


def test_approved_call_runs_and_every_step_is_stored(store, endpoint_url, tmp_path):
    deltas = []
    agent, trace_id, result = asyncio.run(run_agent(store, endpoint_url, "hello", tmp=tmp_path,
                                                    on_delta=lambda kind, text: deltas.append((kind, text))))
    assert (result.stop_reason, result.answer, result.tool_calls, result.tool_errors) == \
        ("answer", "The tool said: one: hello", 1, 0)
    trace = store.get(trace_id)
    assert [m["role"] for m in trace.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = trace.messages[2]["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("echo", {"text": "hello"})
    assert trace.messages[2]["reasoning_content"] == "I should call echo."
    assert trace.messages[3]["content"] == "one: hello" and trace.messages[3]["name"] == "echo"
    assert trace.flags == [] and trace.base_url == endpoint_url and len(trace.tools) >= 5
    assert "".join(t for k, t in deltas if k == "reasoning").strip().startswith("I should call echo.")
    assert "The tool said" in "".join(t for k, t in deltas if k == "content")


def test_rejected_call_never_runs(store, endpoint_url, tmp_path):
    asked = []

    async def reject_all(calls):
        asked.append([c["function"]["name"] for c in calls])
        return [False] * len(calls)

    _, trace_id, result = asyncio.run(run_agent(store, endpoint_url, "hi", approve=reject_all, tmp=tmp_path))
    trace = store.get(trace_id)
    assert asked == [["echo"]] and result.rejected == 1
    assert trace.messages[3] == {"role": "tool", "tool_call_id": trace.messages[2]["tool_calls"][0]["id"],
                                 "name": "echo", "content": REJECTED}
    assert result.answer == f"The tool said: {REJECTED}"


def test_step_limit(store, endpoint_url, tmp_path):
    _, trace_id, result = asyncio.run(run_agent(store, endpoint_url, "again", model="looping",
                                                config=AgentConfig(max_steps=3), tmp=tmp_path))
    assert (result.stop_reason, result.steps, result.tool_calls) == ("step_limit", 3, 3)
    assert [f["code"] for f in store.get(trace_id).flags] == ["step_limit", "no_final_assistant"]


def test_stop_during_a_hanging_tool_call(store, endpoint_url, tmp_path):
    async def main():
        async def approve_then_stop(calls):
            asyncio.get_running_loop().call_later(0.2, agent_box[0].stop)
            return [True] * len(calls)

        agent_box = []
        async with ToolHub(load_mcp_config(MCP_CONFIG), tmp_path) as hub:
            trace_id = open_trace(store, model="hanging", base_url=endpoint_url, tools=hub.openai_tools())
            agent = Agent(endpoint_generate(Endpoint(endpoint_url, "hanging")), hub, sink=sink_for(store, trace_id),
                          approve=approve_then_stop, config=AgentConfig(tool_timeout=120))
            agent_box.append(agent)
            started = time.monotonic()
            result = await agent.send("wait")
            return trace_id, result, time.monotonic() - started

    trace_id, result, seconds = asyncio.run(main())
    assert result.stop_reason == "stopped" and seconds < 60 and result.not_run == 1
    messages = store.get(trace_id).messages  # the call cut short is answered as not run, so none stays open
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"] and messages[-1]["content"] == NOT_RUN


def test_unreachable_endpoint_is_recorded_and_flagged(store, tmp_path):
    _, trace_id, result = asyncio.run(run_agent(store, "http://127.0.0.1:9/v1", "hello", tmp=tmp_path))
    assert result.stop_reason == "error" and "127.0.0.1:9" in result.error
    trace = store.get(trace_id)
    assert trace.messages[-1]["content"] == "" and trace.messages[-1]["flags"][0].startswith("endpoint error")
    assert {f["code"] for f in trace.flags} >= {"malformed_output"}


KILLED_AGENT = """
import asyncio, sys
from tests.test_agent import run_agent
from mcpft.store import Store
asyncio.run(run_agent(Store(sys.argv[1]), sys.argv[2], "forever", model="looping", tmp=sys.argv[3],
                      config=__import__("mcpft.agent.loop", fromlist=["AgentConfig"]).AgentConfig(max_steps=10**6)))
"""


def test_kill_9_mid_run_keeps_every_completed_step(endpoint_url, tmp_path):
    db = tmp_path / "agent.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AGENT, str(db), endpoint_url, str(tmp_path)],
                            cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 90
    count = 0
    while time.monotonic() < deadline and proc.poll() is None and count < 12:
        try:
            with sqlite3.connect(db) as conn:
                count = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        except sqlite3.OperationalError:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert count >= 12, "the agent did not get far enough before the deadline"
    from mcpft.store import Store

    with Store(db) as store:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (trace_id,) = store.ids()
        messages = store.get(trace_id).messages
        assert len(messages) >= 12
        assert [m["role"] for m in messages[:2]] == ["system", "user"]
        steps = messages[2:]
        assert [m["role"] for m in steps] == ["assistant", "tool"] * (len(steps) // 2) + ["assistant"] * (len(steps) % 2)
        for assistant, tool in zip(steps[0::2], steps[1::2]):
            assert tool["tool_call_id"] == assistant["tool_calls"][0]["id"] and tool["content"] == "one: forever"


def test_structured_content_is_recorded_beside_the_text(store, endpoint_url, tmp_path):
    agent, trace_id, result = asyncio.run(run_agent(store, endpoint_url, "two words", model="measuring", tmp=tmp_path))
    stored = store.get(trace_id).messages[3]
    assert stored == agent.messages[3] and stored["name"] == "measure"
    assert stored["structured_content"] == {"chars": 9, "words": 2} == json.loads(stored["content"])
    assert "structured_content" not in store.get(trace_id).messages[2]


def test_a_server_killed_while_idle_is_restarted_by_the_next_call_and_the_model_told(store, endpoint_url, tmp_path):
    marker = f"loop-{uuid.uuid4().hex[:8]}"
    config = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(TINY_SERVER), marker]}}}

    async def main():
        async with ToolHub(load_mcp_config(config), tmp_path) as hub:
            trace_id = open_trace(store, model="scripted", base_url=endpoint_url, tools=hub.openai_tools())
            agent = Agent(endpoint_generate(Endpoint(endpoint_url, "scripted")), hub, sink=sink_for(store, trace_id))
            await agent.send("before")
            os.kill(child_pid(marker), signal.SIGKILL)
            return trace_id, [await agent.send(text) for text in ("during", "after")]

    trace_id, (crashed, recovered) = asyncio.run(main())
    assert (crashed.stop_reason, crashed.tool_errors, recovered.stop_reason, recovered.tool_errors) == \
        ("answer", 0, "answer", 0)
    results = [m["content"] for m in store.get(trace_id).messages if m["role"] == "tool"]
    assert results[0] == f"{marker}: before"
    assert results[1] == f"(the MCP server 'tiny' had stopped and was restarted: its process had exited)\n{marker}: during"
    assert results[2] == f"{marker}: after"


# --------------------------------------------------------------------------------------------------------- CLI


def mcpft(home: Path, *args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, its data dir under `home`."""
    return subprocess.run([sys.executable, "-m", "mcpft", *args], input=stdin, capture_output=True, text=True,
                          timeout=180, cwd=Path(__file__).parent.parent,
                          env={**(os.environ if env is None else env), "MCPFT_HOME": str(home)})


def tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny-mcp.json"
    config.write_text(json.dumps(MCP_CONFIG))
    return config


def test_cli_run_prints_trace_id_and_answer(endpoint_url, tmp_path):
    db = tmp_path / "store" / "cli.db"
    done = mcpft(tmp_path, "run", "--task", "ping", "--base-url", endpoint_url, "--model", "picturing",
                 "--mcp-config", str(tiny_config(tmp_path)), "--auto-approve", "--db", str(db), "--json",
                 "--api-key", "sk-never-stored")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["answer"], summary["steps"], summary["tool_calls"]) == \
        ("The tool said: a red square\n[image: image-1.png]", 2, 1)
    from mcpft.store import Store

    with Store(db) as store:
        trace = store.get(summary["trace_id"])
        assert trace.source == "cli" and trace.settings["max_steps"] == 20
    # The screenshot the placeholder names lies beside the store --db chose, not in the default data dir.
    assert (db.parent / "tool-files" / "image-1.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "tool-files").exists()
    for written in tmp_path.rglob("*"):
        assert not written.is_file() or b"sk-never-stored" not in written.read_bytes(), written


def test_cli_agent_asks_per_call_shows_reasoning_and_prints_the_trace_at_eof(endpoint_url, tmp_path):
    db = tmp_path / "agent.db"
    done = mcpft(tmp_path, "agent", "--base-url", endpoint_url, "--model", "scripted", "--db", str(db),
                 "--mcp-config", str(tiny_config(tmp_path)), stdin="first\ny\nsecond\nn\n")  # then end of input
    assert done.returncode == 0, done.stderr
    assert 'run echo({"text": "first"})? [y/N]' in done.stdout and "I should call echo." in done.stderr
    trace_id = re.search(r"trace (\S+)\s*$", done.stdout)[1]
    from mcpft.store import Store

    with Store(db) as store:
        messages = store.get(trace_id).messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] * 2
    assert [m["content"] for m in messages if m["role"] == "tool"] == ["one: first", REJECTED]
    assert messages[-1]["content"] == f"The tool said: {REJECTED}"


@pytest.mark.parametrize("case, fragment", [
    ("missing config", r"MCP config \S+nowhere.json: cannot read it \(No such file or directory\)"),
    ("invalid config", r'MCP config \S+mcp.json: expected an object with an "mcpServers" object'),
    ("missing server", r"MCP server 'ghost' did not start: .*/nonexistent/mcp-server"),
    ("missing prompt", r"--system-prompt-file \S+prompt.txt: cannot read it \(No such file or directory\)"),
    ("headed, own config", r"--headed applies to the default browser only"),
    ("headed, no display", r"a visible browser was asked for, but there is no display"),
])
def test_cli_setup_mistakes_are_one_clear_line(case, fragment, tmp_path):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"ghost": {"command": "/nonexistent/mcp-server"}}}
                                 if case == "missing server" else {"servers": {}}))
    extra = {"missing config": ["--mcp-config", str(tmp_path / "nowhere.json")],
             "invalid config": ["--mcp-config", str(config)], "missing server": ["--mcp-config", str(config)],
             "missing prompt": ["--mcp-config", str(tiny_config(tmp_path)),
                                "--system-prompt-file", str(tmp_path / "prompt.txt")],
             "headed, own config": ["--headed", "--mcp-config", str(config)], "headed, no display": ["--headed"]}[case]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = mcpft(tmp_path, "run", "--task", "x", "--auto-approve", "--base-url", "http://127.0.0.1:9/v1",
                 "--model", "m", "--db", str(tmp_path / "x.db"), *extra, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(f"^mcpft run: {fragment}", done.stderr, re.MULTILINE | re.DOTALL), done.stderr


def test_cli_headed_makes_the_default_browser_visible(endpoint_url, tmp_path):
    done = mcpft(tmp_path, "run", "--task", "x", "--auto-approve", "--headed", "--base-url", endpoint_url,
                 "--model", "scripted", "--db", str(tmp_path / "x.db"), env={**os.environ, "DISPLAY": ":99"})
    assert done.returncode == 0, done.stderr  # the browser starts lazily: no window opened for this task
    written = json.loads((tmp_path / "browser" / "playwright-mcp.json").read_text())
    assert written["browser"]["launchOptions"]["headless"] is False


def test_cli_run_without_a_terminal_needs_auto_approve(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mcpft", "run", "--task", "x", "--db", str(tmp_path / "x.db")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "--auto-approve" in done.stderr
