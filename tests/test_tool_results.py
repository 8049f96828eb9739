"""What a tool result becomes: the model is sent exactly the truncated `content` (never `structured_content`, never our
metadata); the trace keeps the structured part bounded, with a marker when cut, and what the MCP result was
(`mcp_result`: isError, content types, MIME types, URIs, annotations); rows for training carry neither.

Real parts: tests/result_mcp_server.py as a subprocess through the tool hub, the agent loop, a scripted endpoint over
HTTP on 127.0.0.1 (tests/scripted_endpoint.py) that keeps the request bodies, and the SQLite store."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from mcpft.agent.endpoint import Endpoint
from mcpft.agent.loop import Agent, endpoint_generate
from mcpft.agent.mcp import ToolHub, load_mcp_config
from mcpft.dataset import rows_from_traces
from mcpft.recording import open_trace, sink_for
from mcpft.trace import is_error_result
from tests.result_mcp_server import LOG_LINE, ROW_CHARS
from tests.scripted_endpoint import ScriptedEndpoint, answer, calls

RESULT_SERVER = Path(__file__).parent / "result_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"results": {"command": sys.executable, "args": [str(RESULT_SERVER)]}}}
TRUNCATE = 1000
OPENAI_TOOL_MESSAGE_KEYS = {"role", "tool_call_id", "name", "content"}
SCRIPTS = {
    # A small report (kept whole) and then a 55 KB one (cut), then an answer.
    "reporter": lambda step, _: [calls(("report", '{"rows": 1}')), calls(("report", '{"rows": 110}')),
                                 answer("The report has 110 rows.")][step],
    # Two calls at once: a lookup that fails in every kind of content block, and a log line that only reads like one.
    "looker": lambda step, _: [calls(("lookup", '{"key": "k42"}'), ("read_log", "{}")),
                               answer("There is no record k42, and the disk is nearly full.")][step],
}


def run_turn(store, url: str, model: str, tool_dir: Path):
    """One turn of `model` through the real loop and hub (results truncated to TRUNCATE): (trace id, result)."""
    async def main():
        async with ToolHub(load_mcp_config(MCP_CONFIG), tool_dir, max_chars=TRUNCATE) as hub:
            trace_id = open_trace(store, model=model, base_url=url, tools=hub.openai_tools(),
                                  settings={"truncate": TRUNCATE})
            agent = Agent(endpoint_generate(Endpoint(url, model)), hub, sink=sink_for(store, trace_id))
            return trace_id, await agent.send("go")

    return asyncio.run(main())


def sent_tool_messages(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "tool"]


def test_the_model_gets_only_the_truncated_text_and_the_trace_keeps_a_bounded_structured_part(store, tmp_path):
    with ScriptedEndpoint(SCRIPTS) as endpoint:
        trace_id, result = run_turn(store, endpoint.url, "reporter", tmp_path)
    assert (result.stop_reason, result.answer) == ("answer", "The report has 110 rows.")
    trace = store.get(trace_id)
    small, big = [m for m in trace.messages if m["role"] == "tool"]

    # What the model was told: the OpenAI fields only, its content exactly the stored (truncated) text.
    last_request = endpoint.requests["reporter"][-1]
    assert sent_tool_messages(last_request) == [
        {"role": "tool", "tool_call_id": m["tool_call_id"], "name": "report", "content": m["content"]}
        for m in (small, big)]
    assert big["content"].endswith(f"\n[Content truncated to {TRUNCATE} characters]")
    assert len(big["content"]) < TRUNCATE + 50
    assert len(json.dumps(last_request)) < 10_000  # the 55 KB result never went out
    assert all("structured_content" not in json.dumps(body) for body in endpoint.requests["reporter"])

    # What the trace keeps: the small structured part whole, the big one cut to the same bound, visibly.
    assert small["structured_content"] == {"title": "inventory", "rows": ["row 0000 " + "x" * (ROW_CHARS - 9)]}
    cut = big["structured_content"]
    whole_json = json.dumps({"title": "inventory",
                             "rows": [f"row {i:04d} " + "x" * (ROW_CHARS - 9) for i in range(110)]})
    assert len(whole_json) > 55_000
    assert cut == {"mcpft_truncated": f"[structured content truncated to the first {TRUNCATE} of its "
                                      f"{len(whole_json)} characters of JSON]",
                   "json_start": whole_json[:TRUNCATE]}
    assert big["mcp_result"] == {"is_error": False, "source": "server", "content": [{"type": "text"}]}
    assert trace.flags == []

    # Training rows carry the text the model saw and nothing of the record beside it.
    rows = rows_from_traces([trace])
    row_tools = [m for m in rows[0]["messages"] if m["role"] == "tool"]
    assert [set(m) for m in row_tools] == [OPENAI_TOOL_MESSAGE_KEYS] * 2
    assert [m["content"] for m in row_tools] == [small["content"], big["content"]]


def test_what_the_mcp_result_was_is_stored_and_errors_come_from_is_error_not_the_text(store, tmp_path):
    with ScriptedEndpoint(SCRIPTS) as endpoint:
        trace_id, result = run_turn(store, endpoint.url, "looker", tmp_path)
    assert result.stop_reason == "answer"
    assert result.tool_errors == 1  # the lookup; the log line only reads like an error
    trace = store.get(trace_id)
    lookup, log = [m for m in trace.messages if m["role"] == "tool"]

    assert lookup["mcp_result"] == {"is_error": True, "source": "server", "content": [
        {"type": "text", "annotations": {"audience": ["assistant"], "priority": 0.9, "lastModified": "2025-01-02"}},
        {"type": "resource_link", "mime_type": "application/json", "uri": "file:///records/k42.json",
         "name": "k42.json"},
        {"type": "resource", "mime_type": "text/plain", "uri": "memo://lookup/log"},
        {"type": "image", "mime_type": "image/png"}]}
    assert log["content"] == LOG_LINE and log["mcp_result"] == {"is_error": False, "source": "server",
                                                                "content": [{"type": "text"}]}
    assert [is_error_result(m) for m in (lookup, log)] == [True, False]

    # The model was told the error in text (the image as a file placeholder), and nothing of the metadata.
    told = sent_tool_messages(endpoint.requests["looker"][-1])
    assert told == [{"role": "tool", "tool_call_id": m["tool_call_id"], "name": m["name"], "content": m["content"]}
                    for m in (lookup, log)]
    assert told[0]["content"].startswith("Error: no record 'k42'\n[resource link: k42.json file:///records/k42.json]"
                                         "\nlookup k42: not found\n[image: image-")
    assert not any(word in json.dumps(endpoint.requests["looker"]) for word in ("mcp_result", "is_error", "audience"))
    assert trace.flags == []

    rows = rows_from_traces([trace])
    assert not any("mcp_result" in m or "structured_content" in m for row in rows for m in row["messages"])
