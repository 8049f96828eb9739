"""A cut answer is never stored as good: a stream that closes or breaks off mid-answer (`cut_off`), a reply that
ends with finish_reason "length" (`length`) and an answer the user stops (`stopped`) are each stored as far as they
came, flagged, and left out of exports and training unless flagged traces are asked for.

The endpoint is a small Starlette app on 127.0.0.1 that streams OpenAI chunks and then misbehaves as its model name
says; the agent loop, the MCP tool server, the store, the CLI and the app's session are the real ones."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from mcpft.agent.endpoint import Endpoint
from mcpft.agent.loop import Agent, endpoint_generate
from mcpft.agent.mcp import ToolHub, load_mcp_config
from mcpft.agent.session import AgentSession, Conversation
from mcpft.cli import main
from mcpft.dataset import rows_from_traces
from mcpft.recording import open_trace, sink_for
from mcpft.selection import store_rows
from mcpft.serve import serve_in_thread

TINY_SERVER = Path(__file__).parent / "tiny_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(TINY_SERVER), "one"]}}}
# What every reply streams first: reasoning in <think> tags, then the start of an answer.
PIECES = ["<think>Looking it up.", "</think>", "The answer ", "is forty"]
ECHO_CALL = {"index": 0, "id": "call_echo1", "type": "function",
             "function": {"name": "echo", "arguments": json.dumps({"text": "hi"})}}


def chunk(model: str, delta: dict, finish_reason: str | None = None) -> str:
    payload = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(payload)}\n\n"


async def chat(request):
    model = (await request.json())["model"]

    async def events():
        yield chunk(model, {"role": "assistant", "content": ""})
        for piece in PIECES:
            yield chunk(model, {"content": piece})
        if model == "whole":
            yield chunk(model, {"content": "-two."}) + chunk(model, {}, "stop") + "data: [DONE]\n\n"
        elif model == "length":
            yield chunk(model, {}, "length") + "data: [DONE]\n\n"
        elif model == "closing":  # a whole call, then the stream ends: no finish_reason, no [DONE]
            yield chunk(model, {"tool_calls": [ECHO_CALL]})
        elif model == "breaking":  # uvicorn aborts the connection in the middle of the body
            raise ConnectionAbortedError("the server fell over mid-answer")
        elif model == "hanging":  # until the client goes away
            await asyncio.Event().wait()

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def url():
    base_url, stop = serve_in_thread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]))
    yield base_url
    stop()


async def run_agents(store, url: str, models: list[str], tool_dir: Path, stop_on: str | None = None) -> dict:
    """Each model answers "hello" through the real agent loop into its own trace: {model: (trace id, result)}.
    `stop_on`: the user presses stop once the streamed content holds this text."""
    done = {}
    async with ToolHub(load_mcp_config(MCP_CONFIG), tool_dir) as hub:
        for model in models:
            trace_id = open_trace(store, model=model, base_url=url, tools=hub.openai_tools())
            shown = []

            def on_delta(kind, text):
                shown.append(text if kind == "content" else "")
                if stop_on and stop_on in "".join(shown):
                    agent.stop()

            agent = Agent(endpoint_generate(Endpoint(url, model)), hub, sink=sink_for(store, trace_id),
                          on_delta=on_delta)
            done[model] = (trace_id, await agent.send("hello"))
    return done


def flag_codes(trace) -> list[str]:
    return [flag["code"] for flag in trace.flags]


def test_a_stream_closed_without_finish_reason_is_stored_cut_off_and_its_call_never_runs(store, url, tmp_path):
    [(trace_id, result)] = asyncio.run(run_agents(store, url, ["closing"], tmp_path)).values()
    assert (result.stop_reason, result.tool_calls) == ("error", 0)  # the call it streamed is not run
    assert result.error.startswith("cut_off: the stream ended without a finish_reason")
    trace = store.get(trace_id)
    assert [m["role"] for m in trace.messages] == ["user", "assistant"]
    cut = trace.messages[-1]
    assert cut["content"].endswith("The answer is forty")
    assert [c["function"]["name"] for c in cut["tool_calls"]] == ["echo"]
    assert cut["flags"] == [result.error]
    assert flag_codes(trace) == ["cut_off", "unanswered_call"]


def test_a_stream_that_breaks_off_keeps_the_partial_answer(store, url, tmp_path):
    [(trace_id, result)] = asyncio.run(run_agents(store, url, ["breaking"], tmp_path)).values()
    assert result.stop_reason == "error" and result.error.startswith("cut_off: the stream broke off mid-answer:")
    assert url in result.error  # says which endpoint
    cut = store.get(trace_id).messages[-1]
    assert (cut["content"], cut["reasoning_content"], cut["flags"]) == (
        "The answer is forty", "Looking it up.", [result.error])
    assert flag_codes(store.get(trace_id)) == ["cut_off"]


def test_an_answer_that_reached_max_tokens_is_flagged_length(store, url, tmp_path):
    [(trace_id, result)] = asyncio.run(run_agents(store, url, ["length"], tmp_path)).values()
    assert (result.stop_reason, result.answer) == ("answer", "The answer is forty")  # the user sees what came
    cut = store.get(trace_id).messages[-1]
    assert cut["flags"] == ['length: the answer reached the max_tokens limit (finish_reason "length")']
    assert flag_codes(store.get(trace_id)) == ["length"]


def test_an_answer_the_user_stops_is_stored_as_far_as_it_came(store, url, tmp_path):
    started = time.monotonic()
    [(trace_id, result)] = asyncio.run(run_agents(store, url, ["hanging"], tmp_path, stop_on="forty")).values()
    assert result.stop_reason == "stopped" and time.monotonic() - started < 60
    trace = store.get(trace_id)
    assert trace.messages[-1] == {"role": "assistant", "content": "The answer is forty",
                                  "reasoning_content": "Looking it up.",
                                  "flags": ["stopped: the user stopped the answer before it ended"]}
    assert flag_codes(trace) == ["stopped"]


def test_cut_answers_are_left_out_of_exports_and_training_by_default(store, url, tmp_path, capsys):
    runs = asyncio.run(run_agents(store, url, ["whole", "length", "closing"], tmp_path / "tools"))
    trace_ids = {model: trace_id for model, (trace_id, _) in runs.items()}
    assert runs["whole"][1].answer == "The answer is forty-two." and store.get(trace_ids["whole"]).flags == []

    assert main(["export", "--out", str(tmp_path / "rows.jsonl"), "--db", str(store.path)]) == 0
    exported = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {row["trace_id"] for row in exported} == {trace_ids["whole"]}
    training, _ = store_rows(store, None, include_flagged=False)  # what the app's Train tab and `mcpft train` take
    assert {row["trace_id"] for row in training} == {trace_ids["whole"]}
    # Asked for explicitly, flagged traces come along: it is the flags that kept them out.
    everything = rows_from_traces(store.traces(), include_flagged=True)
    assert {row["trace_id"] for row in everything} == set(trace_ids.values())
    capsys.readouterr()


def test_stop_in_the_app_session_stores_the_partial_answer(store, url, tmp_path):
    with AgentSession(MCP_CONFIG, tmp_path / "tools", store=store, owner="alice") as session:
        session.new_conversation(Conversation(endpoint=Endpoint(url, "hanging")))
        session.send("hello")
        view = session.view()
        deadline = time.monotonic() + 30
        while "forty" not in view.streaming["content"]:
            assert time.monotonic() < deadline, f"no streamed answer; last view: {view}"
            view = session.wait(view.version, timeout=deadline - time.monotonic())
        session.stop()
        while view.running or view.result is None:
            assert time.monotonic() < deadline, f"the turn did not stop; last view: {view}"
            view = session.wait(view.version, timeout=deadline - time.monotonic())
    assert view.result.stop_reason == "stopped"
    stored = store.get(view.trace_id)
    assert stored.messages == view.messages and stored.messages[-1]["content"] == "The answer is forty"
    assert flag_codes(stored) == ["stopped"]
