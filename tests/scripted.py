"""A deterministic scripted model for agent-loop tests, served through the real embedded endpoint (mcpft.serve).

It calls `echo` with the user's text until it has `calls` tool results for the current turn, then answers with the
last result; it always thinks first, in Hermes form, so the server-side parsing is exercised too.
"""

from __future__ import annotations

import json

from mcpft.serve import Generation, GenerationRequest


class ScriptedBackend:
    def __init__(self, calls: int = 1, tool: str = "echo"):
        self.calls, self.tool = calls, tool

    def start(self, request: GenerationRequest) -> Generation:
        messages = request.messages
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        results = [m["content"] for m in messages[last_user:] if m["role"] == "tool"]
        if len(results) < self.calls:
            call = {"name": self.tool, "arguments": {"text": messages[last_user]["content"]}}
            text = f"<think>I should call {self.tool}.</think>\n\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
        else:
            text = f"<think>I have what I need.</think>\n\nThe tool said: {results[-1] if results else 'nothing'}"
        return Generation(chunks=iter([text[i:i + 7] for i in range(0, len(text), 7)]))
