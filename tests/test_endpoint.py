"""The endpoint client: presets and keys, the probe and `complete` against real HTTP servers on 127.0.0.1.

Faults come from small starlette apps that misbehave on purpose (500, invalid JSON, HTML, a reply that never
comes) and from a closed port. A "raw" app answers like vLLM without its tool and reasoning parsers (Hermes text in
the content), and our embedded server with a scripted backend answers like vLLM with them.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mcpft.agent.endpoint import (
    PRESETS, CompletionSettings, Endpoint, EndpointError, assistant_message_for_history, complete,
    endpoint_from_preset, probe)
from mcpft.serve import Generation, create_app, serve_in_thread

RAW_TEXT = ("<think>\nI should look up the weather.\n</think>\n\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
USER = [{"role": "user", "content": "Weather in Paris?"}]


def serving(app):
    """A context-managed base URL for `app`."""
    class Served:
        def __enter__(self):
            self.base_url, self.stop = serve_in_thread(app)
            return self.base_url

        def __exit__(self, *exc):
            self.stop()
    return Served()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def faulty_app(handler) -> Starlette:
    return Starlette(routes=[Route("/v1/models", handler), Route("/v1/chat/completions", handler, methods=["POST"])])


async def error_500(request):
    return JSONResponse({"error": {"message": "CUDA out of memory"}}, status_code=500)


async def invalid_json(request):
    return Response('{"object": "list", "data": [', media_type="application/json")


async def html_page(request):
    return Response("<html><body>Welcome to nginx!</body></html>", media_type="text/html")


async def never_answers(request):
    await request.body()
    await request.receive()  # returns only once the client hangs up
    return Response("too late")


def raw_text_app() -> Starlette:
    """Answers like vLLM started without tool and reasoning parsers: Hermes text in `content`, also streamed."""
    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "raw", "object": "model", "owned_by": "x"}]})

    def payload(**choice) -> dict:
        return {"id": "c1", "object": "chat.completion" + (".chunk" if "delta" in choice else ""), "created": 0,
                "model": "raw", "choices": [{"index": 0, "finish_reason": None} | choice]}

    async def chat(request):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(payload(message={"role": "assistant", "content": RAW_TEXT}, finish_reason="stop"))

        async def events():
            for i in range(0, len(RAW_TEXT), 7):
                yield f"data: {json.dumps(payload(delta={'content': RAW_TEXT[i:i + 7]}))}\n\n"
            yield f"data: {json.dumps(payload(delta={}, finish_reason='stop'))}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


class Scripted:
    def __init__(self, text: str):
        self.text = text

    def start(self, request) -> Generation:
        return Generation(chunks=iter([self.text[i:i + 4] for i in range(0, len(self.text), 4)]))


def test_key_is_never_recorded_or_shown(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    endpoint = endpoint_from_preset("hf", "Qwen/Qwen3-8B")
    assert endpoint.base_url == "https://router.huggingface.co/v1"
    assert endpoint.resolved_api_key() == "hf_secret_token"
    assert endpoint.to_record() == {"base_url": "https://router.huggingface.co/v1", "model": "Qwen/Qwen3-8B"}
    with_key = Endpoint("http://localhost:8000/v1", "m", api_key="sk-explicit")
    assert "sk-explicit" not in repr(with_key) and "sk-explicit" not in json.dumps(with_key.to_record())


def test_keys_come_from_the_matching_preset_only(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("HF_TOKEN", "hf_token")
    assert endpoint_from_preset("openai", "gpt-4o-mini").resolved_api_key() == "sk-openai"
    assert endpoint_from_preset("vllm", "m").resolved_api_key() == "EMPTY"  # no OpenAI key sent to other hosts
    assert Endpoint("https://example.org/v1", "m").resolved_api_key() == "EMPTY"
    assert endpoint_from_preset("embedded", "m", port=8123).base_url == "http://127.0.0.1:8123/v1"
    assert set(PRESETS) == {"vllm", "openai", "hf", "embedded"}
    with pytest.raises(ValueError, match="needs a port"):
        endpoint_from_preset("embedded", "m")
    with pytest.raises(ValueError, match="expected one of"):
        endpoint_from_preset("ollama", "m")


def test_probe_of_a_closed_port():
    report = asyncio.run(probe(Endpoint(f"http://127.0.0.1:{closed_port()}/v1", "m"), timeout=5))
    assert not report.ok and not report.reachable
    assert report.errors["models"].startswith(f"cannot connect to {report.base_url}")
    assert set(report.errors) == {"models"}  # nothing else is tried against a server that is not there


@pytest.mark.parametrize("handler, fragment", [
    (error_500, "answered HTTP 500: CUDA out of memory"),
    (invalid_json, "not a valid OpenAI response"),
    (html_page, "not a valid OpenAI response"),
])
def test_probe_reports_a_misbehaving_server(handler, fragment):
    with serving(faulty_app(handler)) as base_url:
        report = asyncio.run(probe(Endpoint(base_url, "m"), timeout=5))
    assert report.reachable and not report.ok
    assert set(report.errors) == {"models", "chat", "tools"}
    assert all(fragment in message for message in report.errors.values()), report.errors
    assert report.tool_calls is None and report.reasoning_field is None
    assert "error in chat" in report.summary()


def test_probe_and_complete_time_out_on_a_server_that_never_answers():
    with serving(faulty_app(never_answers)) as base_url:
        report = asyncio.run(probe(Endpoint(base_url, "m"), timeout=0.5))
        assert report.errors == {"models": f"no reply from {base_url} within 0.5 s"}
        with pytest.raises(EndpointError, match="no reply from .* within 0.5 s"):
            asyncio.run(complete(Endpoint(base_url, "m"), USER, settings=CompletionSettings(timeout=0.5)))


@pytest.mark.parametrize("handler, fragment", [
    (error_500, "answered HTTP 500: CUDA out of memory"),
    (html_page, "sent no completion chunks"),
])
def test_complete_raises_a_clear_error(handler, fragment):
    with serving(faulty_app(handler)) as base_url:
        with pytest.raises(EndpointError, match=fragment):
            asyncio.run(complete(Endpoint(base_url, "m"), USER))


def test_probe_recognises_a_server_that_returns_hermes_text():
    with serving(raw_text_app()) as base_url:
        report = asyncio.run(probe(Endpoint(base_url, "raw"), timeout=10))
    assert report.ok, report.summary()
    assert report.tool_calls == "hermes_text" and report.reasoning_field == "think_tags"


def test_probe_recognises_server_side_parsing():
    with serving(create_app({"teacher": Scripted(RAW_TEXT)})) as base_url:
        report = asyncio.run(probe(Endpoint(base_url, "teacher"), timeout=10))
        missing = asyncio.run(probe(Endpoint(base_url, "student"), timeout=10))
    assert report.ok and report.tool_calls == "native" and report.reasoning_field == "reasoning_content"
    assert not missing.ok and missing.errors["models"] == "model 'student' is not served there"


@pytest.mark.parametrize("app", [raw_text_app, lambda: create_app({"raw": Scripted(RAW_TEXT)})],
                         ids=["parsed-by-client", "parsed-by-server"])
def test_complete_gives_the_same_turn_either_way(app):
    pieces = []
    with serving(app()) as base_url:
        result = asyncio.run(complete(Endpoint(base_url, "raw"), USER,
                                      stream_cb=lambda kind, text: pieces.append((kind, text))))
    message = result.to_message()
    assert message["reasoning_content"] == "I should look up the weather."
    assert message["content"] == ""
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_")
    assert "".join(text for kind, text in pieces if kind == "reasoning").strip() == "I should look up the weather."
    assert not any(kind == "content" and "<tool_call>" in text for kind, text in pieces)
    assert result.latency_s > 0 and result.first_token_s is not None


def test_history_puts_reasoning_where_the_server_reads_it():
    message = {"role": "assistant", "content": "Done.", "reasoning_content": "Checked it.", "flags": ["x"],
               "train": True}
    assert assistant_message_for_history(message, "reasoning_content") == {
        "role": "assistant", "content": "Done.", "reasoning_content": "Checked it."}
    assert assistant_message_for_history(message, "reasoning") == {
        "role": "assistant", "content": "Done.", "reasoning": "Checked it."}
    assert assistant_message_for_history(message, "think_tags") == {
        "role": "assistant", "content": "<think>\nChecked it.\n</think>\n\nDone."}
    assert assistant_message_for_history(message, "none") == {"role": "assistant", "content": "Done."}
    assert assistant_message_for_history(message, None) == {  # not known yet: vLLM's field
        "role": "assistant", "content": "Done.", "reasoning_content": "Checked it."}


def test_complete_sends_past_reasoning_back_and_keeps_our_keys_home():
    class Recording(Scripted):
        requests: list = []

        def start(self, request) -> Generation:
            self.requests.append(request)
            return super().start(request)

    backend = Recording("The weather in Paris is sunny.")
    history = USER + [
        {"role": "assistant", "content": "", "reasoning_content": "Look it up.", "flags": ["checked"], "train": True,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with serving(create_app({"m": backend})) as base_url:
        result = asyncio.run(complete(Endpoint(base_url, "m"), history, settings=CompletionSettings(max_tokens=50)))
    sent = backend.requests[-1]
    assert sent.max_tokens == 50
    assert sent.messages[1]["reasoning_content"] == "Look it up."
    assert "flags" not in sent.messages[1] and "train" not in sent.messages[1]
    assert result.to_message() == {"role": "assistant", "content": "The weather in Paris is sunny."}
    assert result.finish_reason == "stop" and not result.parsed_client_side
