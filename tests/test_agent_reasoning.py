"""The agent adapts to where an endpoint puts reasoning: history goes back in the form the replies came in (or the
form a probe found), through `endpoint_generate` (the CLI's and the demo's path) and `AgentSession` (the app's).

The endpoint is a small OpenAI-compatible server on 127.0.0.1 that reasons in one of four forms: vLLM's
`reasoning_content`, the newer `reasoning` field, `<think>` in the content, or only `</think>` (the chat template
opened `<think>` in the prompt); it calls `echo` once, then answers, and keeps every request it got.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mcpft.agent.endpoint import CompletionSettings, Endpoint, complete, probe
from mcpft.agent.loop import endpoint_generate
from mcpft.agent.session import AgentSession, Conversation
from mcpft.serve import serve_in_thread

TINY_SERVER = Path(__file__).parent / "tiny_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(TINY_SERVER), "one"]}}}
ECHO = {"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
USER = {"role": "user", "content": "Weather in Paris?"}
FORMS = ("reasoning_content", "reasoning", "think_tags", "think_opened")


def reasoning_app(form: str, requests: list) -> Starlette:
    """Reasons in `form`, calls echo(Paris) until it has a tool result, then answers; stream or not."""
    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]})

    async def chat(request):
        body = await request.json()
        requests.append(body)
        answered = body["messages"][-1]["role"] == "tool"
        thought, content = ("Sunny it is.", "Sunny in Paris.") if answered else ("Look it up.", "")
        call = None if answered or not body.get("tools") else {"name": "echo", "arguments": '{"text": "Paris"}'}
        fields = reply_fields(form, thought, content, call)
        if not body.get("stream"):
            return JSONResponse(payload(message={"role": "assistant", **fields}, finish_reason="stop"))
        return StreamingResponse(events(fields), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


def reply_fields(form: str, thought: str, content: str, call: dict | None) -> dict:
    """The reply's message fields: reasoning in a field with native tool calls, or all in Hermes text."""
    if form in ("reasoning_content", "reasoning"):
        calls = [{"index": 0, "id": "call_1", "type": "function", "function": call}] if call else None
        return {form: thought, "content": content, "tool_calls": calls}
    hermes = f"<tool_call>\n{json.dumps({'name': call['name'], 'arguments': json.loads(call['arguments'])})}\n" \
             "</tool_call>" if call else content
    opened = "" if form == "think_opened" else "<think>"
    return {"content": f"{opened}{thought}</think>\n\n{hermes}"}


def payload(**choice) -> dict:
    return {"id": "c1", "object": "chat.completion" + (".chunk" if "delta" in choice else ""), "created": 0,
            "model": "m", "choices": [{"index": 0, "finish_reason": None} | choice]}


async def events(fields: dict):
    """The reply as a stream: the reasoning field first, then the content in small pieces, then the calls."""
    deltas = [{key: fields[key]} for key in ("reasoning_content", "reasoning") if key in fields]
    text = fields.get("content") or ""
    deltas += [{"content": text[i:i + 5]} for i in range(0, len(text), 5)]
    if fields.get("tool_calls"):
        deltas.append({"tool_calls": fields["tool_calls"]})
    for delta in deltas:
        yield f"data: {json.dumps(payload(delta=delta))}\n\n"
    yield f"data: {json.dumps(payload(delta={}, finish_reason='stop'))}\n\ndata: [DONE]\n\n"


@pytest.fixture
def served():
    stops = []

    def serve(form: str) -> tuple[str, list]:
        requests: list = []
        base_url, stop = serve_in_thread(reasoning_app(form, requests))
        stops.append(stop)
        return base_url, requests

    yield serve
    for stop in stops:
        stop()


def history_reasoning(message: dict) -> dict:
    """Where a sent-back assistant message carries its reasoning: {field or "content": value}."""
    return {key: message[key] for key in ("reasoning_content", "reasoning", "content") if message.get(key)}


async def two_steps(base_url: str, settings: CompletionSettings | None = None):
    """A call, its result, and the answer through one conversation's `endpoint_generate`; the answer's deltas."""
    generate = endpoint_generate(Endpoint(base_url, "m"), settings)
    first = (await generate([USER], [ECHO], None)).to_message()
    tool = {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "one: Paris"}
    deltas: list = []
    final = await generate([USER, first, tool], [ECHO], lambda kind, text: deltas.append((kind, text)))
    return first, final.to_message(), deltas


@pytest.mark.parametrize("form, sent_back", [
    ("reasoning_content", {"reasoning_content": "Look it up."}),
    ("reasoning", {"reasoning": "Look it up."}),
    ("think_tags", {"content": "<think>\nLook it up.\n</think>\n\n"}),
    ("think_opened", {"content": "<think>\nLook it up.\n</think>\n\n"}),
])
def test_history_goes_back_in_the_form_the_replies_came_in(served, form, sent_back):
    base_url, requests = served(form)
    settings = CompletionSettings(max_tokens=64)
    first, final, deltas = asyncio.run(two_steps(base_url, settings))
    assert first["reasoning_content"] == "Look it up." and first["tool_calls"][0]["function"]["name"] == "echo"
    assert final == {"role": "assistant", "content": "Sunny in Paris.", "reasoning_content": "Sunny it is."}
    assert history_reasoning(requests[-1]["messages"][1]) == sent_back
    # Learning stays in the conversation: the caller's settings (shared by a demo's runs) are untouched.
    assert settings.reasoning_field is None and settings.think_opened is False
    # A prompt-opened <think> was learned too: the next reply's thought streams as reasoning, not as content.
    assert "".join(text for kind, text in deltas if kind == "reasoning").strip() == "Sunny it is."


@pytest.mark.parametrize("form, think_opened", [("reasoning", False), ("think_opened", True)])
def test_a_probe_presets_the_form_before_any_reply(served, form, think_opened):
    base_url, requests = served(form)
    report = asyncio.run(probe(Endpoint(base_url, "m"), timeout=10))
    assert report.ok, report.summary()
    expected = "think_tags" if form == "think_opened" else form
    assert (report.reasoning_field, report.think_opened) == (expected, think_opened)
    settings = CompletionSettings().adapted_to(report)
    assert (settings.reasoning_field, settings.think_opened) == (expected, think_opened)
    earlier = {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet them."}  # e.g. a resumed chat
    asyncio.run(complete(Endpoint(base_url, "m"), [USER, earlier, USER], settings=settings))
    expected_sent = {"reasoning": "Greet them.", "content": "Hello."} if form == "reasoning" else \
        {"content": "<think>\nGreet them.\n</think>\n\nHello."}
    assert history_reasoning(requests[-1]["messages"][1]) == expected_sent


def test_a_probe_that_saw_no_reasoning_presets_nothing(served):
    base_url, _ = served("reasoning")
    report = asyncio.run(probe(Endpoint(base_url, "m"), timeout=10))
    report.reasoning_field = "none"  # as a server whose model did not think during the probe reports
    assert CompletionSettings().adapted_to(report).reasoning_field is None  # the replies can still teach it


def test_the_app_session_learns_the_form_from_its_replies(served, store, tmp_path):
    base_url, requests = served("reasoning")
    with AgentSession(MCP_CONFIG, tmp_path / "tools", store=store) as session:
        session.auto_approve = True
        session.new_conversation(Conversation(endpoint=Endpoint(base_url, "m")))
        session.send("Weather in Paris?")
        view = session.view()
        deadline = time.monotonic() + 60
        while view.running or view.result is None:
            assert time.monotonic() < deadline, f"the turn did not finish: {view.error}"
            view = session.wait(view.version, timeout=deadline - time.monotonic())
    assert view.result.answer == "Sunny in Paris." and view.messages[2]["content"] == "one: Paris"
    assert history_reasoning(requests[-1]["messages"][1]) == {"reasoning": "Look it up."}
