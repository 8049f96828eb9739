"""Faults that used to break a run, each planted in a real server behind the real SDK client: an HTTP server restarted
while idle, a stdio server that dies during a call, bytes that are not UTF-8 on stdout, a server that does not start,
a content type no MCP version has, tools/list_changed, progress on a long call, the timeouts as settings, and secrets
of a server's config echoed back.

Servers: tests/fault_mcp_server.py (written by hand, so it can misbehave), tests/tiny_mcp_server.py (official SDK)
over streamable HTTP on 127.0.0.1. Agent-level tests add the scripted endpoint over HTTP on 127.0.0.1
(tests/scripted_endpoint.py), the agent loop and the SQLite store, and assert what is stored and what the model was told.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import anyio
import pytest

from mcpft.agent.endpoint import Endpoint
from mcpft.agent.loop import Agent, endpoint_generate
from mcpft.agent.mcp import MCPConfigError, MCPServerError, ServerSpec, ToolHub, ToolProgress, load_mcp_config
from mcpft.agent.session import AgentSession
from mcpft.recording import open_trace, sink_for
from tests.listening import listening
from tests.scripted_endpoint import ScriptedEndpoint, answer, calls

pytestmark = pytest.mark.anyio

FAULT_SERVER = str(Path(__file__).with_name("fault_mcp_server.py"))
TINY_SERVER = str(Path(__file__).with_name("tiny_mcp_server.py"))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


def fault(name: str, instance: str, *extra: str, **fields) -> ServerSpec:
    return ServerSpec(name, command=sys.executable, args=(FAULT_SERVER, instance, *extra), **fields)


def fault_config(instance: str = "F", **entry) -> dict:
    return {"mcpServers": {"faulty": {"command": sys.executable, "args": [FAULT_SERVER, instance], **entry}}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_over_http(instance: str, port: int):
    """tests/tiny_mcp_server.py serving streamable HTTP on 127.0.0.1:port until the block ends."""
    return listening([sys.executable, TINY_SERVER, instance, "--http", str(port)], port,
                     f"the HTTP MCP server {instance}")


def run_turn(store, url: str, model: str, config: dict, tool_dir: Path):
    """One turn of `model` through the real loop and hub: (trace id, turn result)."""
    async def main():
        async with ToolHub(load_mcp_config(config), tool_dir) as hub:
            trace_id = open_trace(store, model=model, base_url=url, tools=hub.openai_tools())
            agent = Agent(endpoint_generate(Endpoint(url, model)), hub, sink=sink_for(store, trace_id))
            return trace_id, await agent.send("go")

    return asyncio.run(main())


def told(endpoint: ScriptedEndpoint, model: str) -> list[str]:
    """The tool results the model was sent in its last request."""
    return [m["content"] for m in endpoint.requests[model][-1]["messages"] if m["role"] == "tool"]


# ------------------------------------------------------------------------------- servers that stop or garble


async def test_http_server_restarted_while_idle_gets_a_new_session_and_the_call_is_made(tmp_path):
    port = free_port()
    config = {"mcpServers": {"web": {"url": f"http://127.0.0.1:{port}/mcp"}}}
    with ExitStack() as servers:
        first = servers.enter_context(ExitStack())
        first.enter_context(tiny_over_http("H1", port))
        async with ToolHub(load_mcp_config(config), tmp_path) as hub:
            assert (await hub.call("echo", {"text": "one"})).text == "H1: one"
            first.close()  # the server goes away while the client is idle, and comes back knowing no session
            servers.enter_context(tiny_over_http("H2", port))
            again = await hub.call("echo", {"text": "two"})
            assert not again.is_error
            assert again.text == ("(the MCP server 'web' no longer knew this client's session (Session not found); "
                                  "a new session was opened)\nH2: two")
            assert (await hub.call("echo", {"text": "three"})).text == "H2: three"


async def test_a_server_that_dies_during_a_call_is_not_sent_it_twice_and_comes_back_at_the_next(tmp_path):
    calls_log = tmp_path / "calls.log"
    async with ToolHub([fault("faulty", "F", "--calls-log", str(calls_log))], tmp_path) as hub:
        crashed = await hub.call("crash", {})
        assert crashed.is_error and crashed.text == (
            "Error: the MCP server 'faulty' stopped responding (its connection closed during a call to crash; it may "
            "have crashed). It will be restarted at the next call to one of its tools")
        back = await hub.call("echo", {"text": "x"})
        assert back.text == ("(the MCP server 'faulty' had stopped and was restarted: its connection closed during a "
                             "call to crash; it may have crashed)\nF: x")
    assert calls_log.read_text().split() == ["crash", "echo"]  # the call that crashed it was never sent again


async def test_bytes_that_are_not_utf8_on_stdout_cost_no_timeout_and_are_named(tmp_path):
    async with ToolHub([fault("faulty", "F")], tmp_path, default_timeout=60) as hub:
        started = time.monotonic()
        garbled = await hub.call("garble", {"text": "a"})
        after = await hub.call("echo", {"text": "b"})
        elapsed = time.monotonic() - started
    assert elapsed < 5  # before, the SDK's reader died unnoticed and each of these calls waited the 60 s out
    assert garbled.text == ("(note: the MCP server 'faulty' misbehaved: it wrote bytes to stdout that are not UTF-8, "
                            "which is no JSON-RPC message; that line was skipped)\nF: garbled a")
    assert not garbled.is_error and after.text == "F: b"


# ----------------------------------------------------------------------------------- a server that won't start


async def test_a_server_that_does_not_start_is_named_and_the_others_serve(tmp_path):
    broken = ServerSpec("broken", command=sys.executable,
                        args=("-c", "import sys; sys.stderr.write('no API key configured\\n'); sys.exit(2)"))
    async with ToolHub([broken, fault("faulty", "F")], tmp_path) as hub:
        assert list(hub.failed) == ["broken"]
        assert "no API key configured" in hub.failed["broken"]
        assert {tool.server for tool in hub.tools} == {"faulty"}
        assert (await hub.call("echo", {"text": "on"})).text == "F: on"


def broken_and_fault_config(tmp_path: Path) -> Path:
    config = {"mcpServers": {
        "broken": {"command": sys.executable, "args": ["-c", "import sys; sys.stderr.write('bad config\\n'); exit(2)"]},
        **fault_config()["mcpServers"]}}
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config))
    return path


def test_cli_run_says_which_server_did_not_start_and_goes_on(tmp_path):
    scripts = {"caller": lambda step, _: [calls(("echo", '{"text": "hi"}')), answer("done")][step]}
    with ScriptedEndpoint(scripts) as endpoint:
        run = subprocess.run(
            [sys.executable, "-m", "mcpft", "run", "--task", "say hi", "--base-url", endpoint.url, "--model", "caller",
             "--mcp-config", str(broken_and_fault_config(tmp_path)), "--auto-approve", "--json"],
            capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "MCPFT_HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stderr.splitlines() if "'broken'" in line)
    assert line.startswith("mcpft: MCP server 'broken' did not start and is left out: ") and "bad config" in run.stderr
    summary = json.loads(run.stdout)
    assert summary["answer"] == "done" and summary["tool_errors"] == 0
    assert list(summary["mcp_failed"]) == ["broken"]
    assert told(endpoint, "caller") == ["F: hi"]


def test_the_app_session_reports_the_server_that_did_not_start(tmp_path):
    from mcpft.ui.endpoint_tab import mcp_status_text

    config = json.loads(broken_and_fault_config(tmp_path).read_text())
    with AgentSession(config, tmp_path / "tools") as session:
        assert list(session.failed_servers) == ["broken"]
        assert {tool.server for tool in session.tools} == {"faulty"}
        status = mcp_status_text(session)
    assert status.startswith("**Connected: 1 of 2 MCP servers** (`faulty`).") and "`broken` did not start" in status
    assert "bad config" in status


# ------------------------------------------------------------------------------------- results the SDK rejected


def test_an_unknown_content_type_keeps_the_valid_parts_and_a_placeholder(store, tmp_path):
    scripts = {"viewer": lambda step, _: [calls(("hologram", "{}")), answer("I saw it.")][step]}
    with ScriptedEndpoint(scripts) as endpoint:
        trace_id, result = run_turn(store, endpoint.url, "viewer", fault_config(), tmp_path)
    assert (result.stop_reason, result.tool_errors) == ("answer", 0)
    [stored] = [m for m in store.get(trace_id).messages if m["role"] == "tool"]
    assert re.fullmatch(r"a valid part\n\[unsupported content type 'hologram'\]\n\[image: image-\d+\.png\]",
                        stored["content"]), stored["content"]
    assert stored["mcp_result"]["content"] == [{"type": "text"}, {"type": "hologram", "unsupported": True},
                                               {"type": "image", "mime_type": "image/png"}]
    assert told(endpoint, "viewer") == [stored["content"]]


# ------------------------------------------------------------------------------- list changes, progress, timeouts


async def test_tools_list_changed_is_followed_before_the_next_step(tmp_path):
    async with ToolHub([fault("faulty", "F")], tmp_path) as hub:
        version = hub.tools_version
        assert "secret_door" not in {tool.name for tool in hub.tools}
        assert (await hub.call("unlock", {})).text == "a door opened"
        with anyio.fail_after(5):
            assert await hub.wait_tools_changed(version) > version
        assert "secret_door" in {tool["function"]["name"] for tool in hub.openai_tools()}
        assert (await hub.call("secret_door", {})).text == "you found it"


async def test_progress_keeps_a_long_call_alive_past_its_timeout_and_is_reported(tmp_path):
    heard: list[ToolProgress] = []
    async with ToolHub(load_mcp_config(fault_config(callTimeout=0.5)), tmp_path, on_progress=heard.append) as hub:
        started = time.monotonic()
        done = await hub.call("slow", {"steps": 4, "pause": 0.3}, timeout=60)  # the server's callTimeout wins
        assert time.monotonic() - started > 1  # twice the call timeout: progress kept it alive
        assert re.fullmatch(r"done after 4 steps \(progress token \d+\)", done.text), done.text
        assert heard == [ToolProgress("slow", "faulty", step, 4, f"step {step}") for step in (1, 2, 3, 4)]

        own: list[ToolProgress] = []

        async def collect(progress: ToolProgress) -> None:  # a call's own callback, async this time
            own.append(progress)

        started = time.monotonic()
        stalled = await hub.call("stall", {}, on_progress=collect)
        assert time.monotonic() - started < 5
        assert stalled.is_error and stalled.text == (
            "Error: stall did not answer within 0.5 s since its last progress report; the call was cancelled")
        assert own == [ToolProgress("stall", "faulty", 0, None, None)] and len(heard) == 4
        assert (await hub.call("echo", {"text": "still here"})).text == "F: still here"


async def test_init_timeout_is_a_setting_of_the_server(tmp_path):
    silent = {"mcpServers": {"silent": {"command": sys.executable, "args": ["-c", "import sys; sys.stdin.read()"],
                                        "initTimeout": 0.5}}}
    started = time.monotonic()
    with pytest.raises(MCPServerError, match="'silent' did not start: no answer in time"):
        async with ToolHub(load_mcp_config(silent), tmp_path, connect_timeout=60):
            pass
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("value", [0, -1, "10", True])
def test_timeouts_must_be_positive_numbers_of_seconds(value):
    with pytest.raises(MCPConfigError, match=r"server 'faulty'.*\"callTimeout\" must be a number of seconds"):
        load_mcp_config(fault_config(callTimeout=value))


def test_timeouts_survive_a_round_trip_through_the_config():
    specs = load_mcp_config(fault_config(initTimeout=5, callTimeout=120.5))
    assert (specs["faulty"].init_timeout, specs["faulty"].call_timeout) == (5.0, 120.5)
    assert load_mcp_config({"mcpServers": {n: s.to_config() for n, s in specs.items()}}) == specs


# ------------------------------------------------------------------------------------------------------ secrets


def test_secrets_of_a_servers_config_never_reach_the_store_the_files_or_the_logs(store, tmp_path):
    token = f"tok-{uuid.uuid4().hex}"
    tool_dir = tmp_path / "tool-files"
    scripts = {"leaker": lambda step, _: [calls(("leak", "{}")), answer("ok")][step]}
    with ScriptedEndpoint(scripts) as endpoint:
        trace_id, result = run_turn(store, endpoint.url, "leaker", fault_config(env={"FAULT_TOKEN": token}), tool_dir)
    assert result.stop_reason == "answer"
    [stored] = [m for m in store.get(trace_id).messages if m["role"] == "tool"]
    file_name = re.fullmatch(r"my token is \[redacted:env FAULT_TOKEN\]\n\[resource: (resource-\d+\.txt)\]",
                             stored["content"])[1]
    assert stored["structured_content"] == {"token": "[redacted:env FAULT_TOKEN]", "note": "kept"}
    assert (tool_dir / file_name).read_text() == "config: token=[redacted:env FAULT_TOKEN]\n"
    assert "starting with token [redacted:env FAULT_TOKEN]" in (tool_dir / "logs" / "faulty.stderr.log").read_text()
    assert told(endpoint, "leaker") == [stored["content"]]
    assert token not in json.dumps(endpoint.requests)
    leaking = [path for path in tmp_path.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]
    assert leaking == []  # not in the store (its WAL included), a tool file, or a log
