"""The agent loop: user message -> model -> tool calls -> approval -> execute -> results -> model ... -> answer.

UI-agnostic and async. It knows nothing of the store: every message goes to a `sink` the moment it exists (the
recorder wires that to the store), tokens and thinking go to a stream callback, and approval is a hook the caller
answers per call. A stop request is honoured at any point, also in the middle of a generation or a tool call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from mcpft.agent.endpoint import CompletionSettings, Endpoint, EndpointError, complete, learn_reasoning_form
from mcpft.hermes import ParsedAssistant

REJECTED = "User rejected tool call."  # what the model is told, as in the Trelis workshop's agent
STOP_REASONS = ("answer", "step_limit", "stopped", "error")


class Generate(Protocol):
    """One model step: the conversation so far and the tools -> the parsed assistant output (streaming to `on_delta`)."""

    def __call__(self, messages: list[dict], tools: list[dict],
                 on_delta: Callable[[str, str], None] | None) -> Awaitable[ParsedAssistant]: ...


class Tools(Protocol):
    """What the loop needs of the MCP tool hub."""

    def openai_tools(self) -> list[dict]: ...

    async def call(self, name: str, arguments, timeout: float | None = None): ...


# approve(pending tool calls) -> one decision per call (True = run it). None means auto-approve.
Approve = Callable[[list[dict]], Awaitable[list[bool]]]


def endpoint_generate(endpoint: Endpoint, settings: CompletionSettings | None = None) -> Generate:
    """Model steps of one conversation through an OpenAI-compatible endpoint. History goes back with reasoning in
    the form the server's template reads: `settings.reasoning_field` when given (e.g. from a probe), else the form of
    the first reply that carried reasoning."""
    settings = dataclasses.replace(settings or CompletionSettings())  # what it learns stays in this conversation

    async def generate(messages, tools, on_delta):
        reply = await complete(endpoint, messages, tools, on_delta, settings)
        learn_reasoning_form(settings, reply)
        return reply

    return generate


@dataclass
class AgentConfig:
    max_steps: int = 20  # model calls per user message
    tool_timeout: float = 60.0  # seconds per tool call


@dataclass
class TurnResult:
    answer: str
    stop_reason: str  # one of STOP_REASONS
    steps: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    rejected: int = 0
    error: str = ""
    seconds: dict = field(default_factory=lambda: {"model": 0.0, "tools": 0.0, "total": 0.0})

    def to_dict(self) -> dict:
        return dict(vars(self))


class Stopped(Exception):
    pass


class Agent:
    def __init__(self, generate: Generate, tools: Tools, *, sink: Callable[[dict], None] | None = None,
                 approve: Approve | None = None, on_delta: Callable[[str, str], None] | None = None,
                 system_prompt: str = "", config: AgentConfig | None = None):
        self.generate = generate
        self.tools = tools
        self.sink = sink or (lambda message: None)
        self.approve = approve
        self.on_delta = on_delta
        self.config = config or AgentConfig()
        self.messages: list[dict] = []
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        if system_prompt:
            self._record({"role": "system", "content": system_prompt})

    def stop(self):
        """Ask the running turn to stop; safe to call from any thread."""
        self._stop_requested = True
        if self._event_loop and self._stop_event:
            self._event_loop.call_soon_threadsafe(self._stop_event.set)

    def _record(self, message: dict):
        self.messages.append(message)
        self.sink(message)

    async def _unless_stopped(self, awaitable):
        """Run `awaitable`, cancelling it if a stop is requested meanwhile."""
        task = asyncio.ensure_future(awaitable)
        stop_wait = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if not task.done():
            task.cancel()
            raise Stopped
        return task.result()

    async def send(self, text: str) -> TurnResult:
        """One user message, run until a final answer, the step limit, a stop request or an endpoint failure."""
        self._event_loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._stop_requested = False
        result = TurnResult(answer="", stop_reason="step_limit")
        started = time.perf_counter()
        self._record({"role": "user", "content": text})
        try:
            await self._run(result)
        except Stopped:
            result.stop_reason = "stopped"
        result.seconds["total"] = time.perf_counter() - started
        return result

    async def _run(self, result: TurnResult):
        for _ in range(self.config.max_steps):
            if self._stop_requested:
                raise Stopped
            reply = await self._model_step(result)
            if reply is None:
                return
            self._record(reply)
            calls = reply.get("tool_calls", [])
            if not calls:
                result.answer, result.stop_reason = reply["content"], "answer"
                return
            decisions = await self._unless_stopped(self._decide(calls))
            for call, approved in zip(calls, decisions):
                await self._run_call(call, approved, result)

    async def _model_step(self, result: TurnResult) -> dict | None:
        result.steps += 1
        t0 = time.perf_counter()
        try:
            parsed = await self._unless_stopped(self.generate(self.messages, self.tools.openai_tools(), self.on_delta))
        except EndpointError as e:
            # Recorded as a flagged empty turn: faithful to what happened, never trained on.
            self._record({"role": "assistant", "content": "", "flags": [f"endpoint error: {e}"]})
            result.stop_reason, result.error = "error", str(e)
            return None
        finally:
            result.seconds["model"] += time.perf_counter() - t0
        return parsed.to_message()

    async def _decide(self, calls: list[dict]) -> list[bool]:
        if self.approve is None:
            return [True] * len(calls)
        decisions = list(await self.approve(calls))
        if len(decisions) != len(calls):
            raise ValueError(f"approval answered {len(decisions)} decisions for {len(calls)} tool calls")
        return decisions

    async def _run_call(self, call: dict, approved: bool, result: TurnResult):
        name = call["function"]["name"]
        result.tool_calls += 1
        if not approved:
            result.rejected += 1
            self._record({"role": "tool", "tool_call_id": call["id"], "name": name, "content": REJECTED})
            return
        t0 = time.perf_counter()
        try:
            outcome = await self._unless_stopped(
                self.tools.call(name, call["function"]["arguments"], timeout=self.config.tool_timeout))
        finally:
            result.seconds["tools"] += time.perf_counter() - t0
        result.tool_errors += int(outcome.is_error)
        message = {"role": "tool", "tool_call_id": call["id"], "name": name, "content": outcome.text}
        if outcome.structured is not None:  # MCP structuredContent, kept beside the text the model saw
            message["structured_content"] = outcome.structured
        self._record(message)


def describe_call(call: dict) -> str:
    """`name(arguments)` for an approval prompt."""
    arguments = call["function"]["arguments"]
    try:
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        pass
    return f"{call['function']['name']}({arguments})"
