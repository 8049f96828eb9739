"""A scripted OpenAI-compatible endpoint over HTTP on 127.0.0.1, for agent tests that must see what the model was told.

Each model name has a script: `script(step, messages) -> reply`, where `step` counts the assistant messages since the
last user message (0 for the first reply of a turn) and `messages` are the request's messages. A reply is
`answer(text, reasoning)` or `calls((name, arguments JSON text), ...)`, streamed as the OpenAI SDK expects (native
tool calls, reasoning in `reasoning_content`). Every request body is kept, per model, in `requests`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from mcpft.serve import serve_in_thread

Script = Callable[[int, list[dict]], dict]


def answer(text: str, reasoning: str = "") -> dict:
    return {"content": text, "reasoning": reasoning}


def calls(*name_and_arguments: tuple[str, str]) -> dict:
    """Native tool calls, exactly as given: a name may be empty, arguments any text."""
    return {"tool_calls": [{"index": i, "id": f"call_{i}_{name or 'nameless'}", "type": "function",
                            "function": {"name": name, "arguments": arguments}}
                           for i, (name, arguments) in enumerate(name_and_arguments)]}


def step_of(messages: list[dict]) -> int:
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return sum(m["role"] == "assistant" for m in messages[last_user:])


def _chunk(model: str, delta: dict, finish_reason: str | None = None) -> str:
    payload = {"id": "scripted", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(payload)}\n\n"


def _events(model: str, reply: dict) -> list[str]:
    events = [_chunk(model, {"role": "assistant", "content": ""})]
    if reply.get("reasoning"):
        events.append(_chunk(model, {"reasoning_content": reply["reasoning"]}))
    if reply.get("tool_calls"):
        events.append(_chunk(model, {"tool_calls": reply["tool_calls"]}))
        finish = "tool_calls"
    else:
        text = reply["content"]
        events += [_chunk(model, {"content": text[i:i + 64]}) for i in range(0, len(text), 64)]
        finish = "stop"
    return events + [_chunk(model, {}, finish), "data: [DONE]\n\n"]


class ScriptedEndpoint:
    """`with ScriptedEndpoint({"model": script}) as endpoint:` serves them at `endpoint.url`."""

    def __init__(self, scripts: dict[str, Script]):
        self.scripts = scripts
        self.requests: dict[str, list[dict]] = defaultdict(list)
        self.url = ""
        self._stop = None

    async def _chat(self, request):
        body = await request.json()
        self.requests[body["model"]].append(body)
        reply = self.scripts[body["model"]](step_of(body["messages"]), body["messages"])
        return StreamingResponse(iter(_events(body["model"], reply)), media_type="text/event-stream")

    def __enter__(self) -> ScriptedEndpoint:
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        self.url, self._stop = serve_in_thread(app)
        return self

    def __exit__(self, *exc) -> None:
        self._stop()
