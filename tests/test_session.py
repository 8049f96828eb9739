"""AgentSession driven from plain threads, as the app does: the real embedded endpoint (scripted model), a real MCP
server subprocess, a real store."""

import sys
import time
from pathlib import Path

import pytest

from mcpft.agent.endpoint import CompletionSettings, Endpoint
from mcpft.agent.loop import REJECTED
from mcpft.agent.session import AgentSession, Conversation, EmbeddedEndpoint, SessionError
from tests.scripted import ScriptedBackend

TINY_SERVER = Path(__file__).parent / "tiny_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(TINY_SERVER), "one"]}}}
SECRET = "sk-test-never-stored-0123456789"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_dir):
    server = EmbeddedEndpoint(tmp_path_factory.mktemp("data"),
                              extra_backends={"scripted": ScriptedBackend(calls=1), "hanging":
                                              ScriptedBackend(calls=1, tool="hang")})
    server.start(str(tiny_model_dir))
    yield server
    server.stop()


@pytest.fixture
def session(store, tmp_path):
    with AgentSession(MCP_CONFIG, tmp_path / "tools", store=store, owner="alice") as running:
        yield running


def until(session, predicate, timeout=30.0):
    """The first view satisfying `predicate`, waiting on the session's changes (bounded)."""
    deadline = time.monotonic() + timeout
    view = session.view()
    while not predicate(view):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; last view: running={view.running} pending={view.pending} error={view.error}"
        view = session.wait(view.version, timeout=left)
    return view


def conversation(embedded, model="scripted", **kwargs):
    endpoint = Endpoint(embedded.status.base_url, model, api_key=SECRET)
    return Conversation(endpoint=endpoint, completion=CompletionSettings(max_tokens=64), **kwargs)


def test_embedded_endpoint_serves_the_model_and_extra_backends(embedded, tiny_model_dir):
    status = embedded.status
    assert status.state == "ready" and status.base_url.startswith("http://127.0.0.1:")
    assert status.models == [tiny_model_dir.name, "scripted", "hanging"]


def test_approval_runs_the_call_and_every_step_is_stored(session, embedded, store):
    session.new_conversation(conversation(embedded, system_prompt="Use the tools.", train_system=False,
                                          tags=("ui",)))
    session.send("hello")
    streamed = until(session, lambda v: v.streaming["reasoning"] or v.pending)
    waiting = until(session, lambda v: v.pending)
    assert [c["function"]["name"] for c in waiting.pending] == ["echo"] and waiting.running
    assert streamed.streaming["reasoning"] or streamed.pending
    session.decide([True])
    done = until(session, lambda v: not v.running)
    assert done.result.stop_reason == "answer" and done.result.answer == "The tool said: one: hello"
    assert [m["role"] for m in done.messages] == ["system", "user", "assistant", "tool", "assistant"]
    trace = store.get(done.trace_id)
    assert trace.messages == done.messages and trace.owner == "alice" and trace.tags == ["ui"]
    assert trace.train_system is False and trace.model == "scripted" and trace.flags == []
    assert SECRET.encode() not in Path(store.path).read_bytes()


def test_rejection_is_recorded_and_the_call_never_runs(session, embedded, store):
    session.new_conversation(conversation(embedded))
    session.send("hi")
    until(session, lambda v: v.pending)
    session.decide([False])
    done = until(session, lambda v: not v.running)
    assert done.result.rejected == 1
    assert store.get(done.trace_id).messages[2]["content"] == REJECTED


def test_auto_approve_never_asks_and_a_second_turn_continues_the_trace(session, embedded, store):
    session.auto_approve = True
    session.new_conversation(conversation(embedded, included=False))
    seen_pending = []
    session.send("one")
    done = until(session, lambda v: seen_pending.append(bool(v.pending)) or not v.running)
    session.send("two")
    done = until(session, lambda v: not v.running and v.version > done.version)
    assert not any(seen_pending) and done.result.answer == "The tool said: one: two"
    trace = store.get(done.trace_id)
    assert [m["role"] for m in trace.messages].count("user") == 2 and trace.included is False


def test_stop_while_waiting_for_approval(session, embedded, store):
    session.new_conversation(conversation(embedded))
    session.send("wait")
    until(session, lambda v: v.pending)
    session.stop()
    done = until(session, lambda v: not v.running)
    assert done.result.stop_reason == "stopped" and done.pending == [] and done.result.not_run == 1
    assert done.messages[-1]["role"] == "tool" and "unanswered_call" not in {
        flag["code"] for flag in store.get(done.trace_id).flags}
    with pytest.raises(SessionError, match="no tool call is waiting"):
        session.decide([True])


def test_bad_requests_are_refused_with_a_reason(session, embedded):
    with pytest.raises(SessionError, match="new_conversation"):
        session.send("no settings yet")
    session.new_conversation(conversation(embedded))
    with pytest.raises(SessionError, match="empty"):
        session.send("  ")
    session.send("hello")
    until(session, lambda v: v.pending)
    with pytest.raises(SessionError, match="1 pending"):
        session.decide([True, False])
    with pytest.raises(SessionError, match="still running"):
        session.send("again")
    session.new_conversation(conversation(embedded))  # stops the waiting turn first
    assert not session.view().running and session.view().messages == []


def test_a_long_calls_progress_shows_in_the_view_while_it_runs(store, tmp_path, tiny_model_dir):
    """A server's progress notifications reach what the app shows (the Agent tab's status line reads them)."""
    from tests.test_mcp_faults import fault_config

    server = EmbeddedEndpoint(tmp_path / "data", extra_backends={"staller": ScriptedBackend(calls=1, tool="stall")})
    server.start(str(tiny_model_dir))
    try:
        with AgentSession(fault_config(callTimeout=60), tmp_path / "tools", store=store, owner="alice") as session:
            session.connect()
            session.auto_approve = True
            session.new_conversation(Conversation(endpoint=Endpoint(server.status.base_url, "staller"),
                                                  completion=CompletionSettings(max_tokens=64)))
            session.send("take your time")
            view = until(session, lambda v: bool(v.tool_progress))
            assert view.running and view.tool_progress == "stall: 0"
            session.stop()
            assert until(session, lambda v: not v.running).tool_progress == ""
    finally:
        server.stop()
