"""The agent loop: user message -> model -> tool calls -> approval -> execute -> results -> model ... -> answer.

UI-agnostic and async. It knows nothing of the store: every message goes to a `sink` the moment it exists (the
recorder wires that to the store), tokens and thinking go to a stream callback, and approval is a hook the caller
answers per call. A stop request is honoured at any point, also in the middle of a generation or a tool call.
An answer cut short (the user stopped it, the connection closed mid-answer, max_tokens) is recorded as far as it
came, with its flag (mcpft.trace.CUT_SHORT), so that the record is faithful and the trace never trains; so is the
reply that reaches the step limit still calling tools (mcpft.trace.STEP_LIMIT). A tool call the model malformed (no
function name, arguments that are no JSON object, a Hermes `<tool_call>` block that cannot be read) is recorded as it
came, never run or offered for approval, and answered with a tool message that says what was wrong, so the model can
correct itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from mcpft.agent.endpoint import CompletionSettings, Endpoint, EndpointError, complete, learn_reasoning_form
from mcpft.agent.mcp import ToolResult, error_result
from mcpft.hermes import CALL_OPEN, ParsedAssistant, unreadable_calls
from mcpft.trace import cut_short, cut_short_flag, is_error_result, step_limit_flag

REJECTED = "User rejected tool call."  # what the model is told, as in the Trelis workshop's agent
# The answer recorded for a call the user stopped before it ran (or finished): the trace then answers every call, so
# it reads as what happened (stopped, no final answer) rather than as a call that lost its result.
NOT_RUN = "Not run: the user stopped the turn before this tool call ran."
# Arguments worth showing in a call's one-line title, in this order: what a person reads, not ids such as `ref`.
KEY_ARGUMENTS = ("element", "text", "url", "query", "name", "path", "title", "prompt", "key", "value")
STOP_REASONS = ("answer", "step_limit", "stopped", "error")


class Generate(Protocol):
    """One model step: the conversation so far and the tools -> the parsed assistant output (streaming to `on_delta`)."""

    def __call__(self, messages: list[dict], tools: list[dict],
                 on_delta: Callable[[str, str], None] | None) -> Awaitable[ParsedAssistant]: ...


class Tools(Protocol):
    """What the loop needs of the MCP tool hub."""

    def openai_tools(self) -> list[dict]: ...

    async def call(self, name: str, arguments, timeout: float | None = None) -> ToolResult: ...


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
    malformed_calls: int = 0  # calls the model malformed, answered with what was wrong instead of run
    not_run: int = 0  # calls left unrun (answered NOT_RUN) because the user stopped the turn
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
        for step in range(1, self.config.max_steps + 1):
            if self._stop_requested:
                raise Stopped
            reply = await self._model_step(result)
            if reply is None:
                return
            cut = cut_short(reply)
            cut_off = cut is not None and cut[0] == "cut_off"
            unreadable = take_unreadable_calls(reply) if cut is None else {}
            calls = reply.get("tool_calls", [])
            if calls and not cut_off and step == self.config.max_steps:  # flagged now: the store only appends
                reply.setdefault("flags", []).append(step_limit_flag(self._step_limit_detail(calls)))
            self._record(reply)
            if cut_off:  # the endpoint failed mid-answer: calls it may hold are not run
                result.stop_reason, result.error = "error", cut[1]
                return
            if not calls:
                result.answer, result.stop_reason = reply["content"], "answer"
                return
            await self._run_calls(calls, result, unreadable)

    async def _run_calls(self, calls: list[dict], result: TurnResult, unreadable: dict[str, str]):
        """Answer the malformed calls with what is wrong (`unreadable`: call id -> why its block could not be read);
        offer the others for approval and run the approved."""
        problems = [unreadable.get(call["id"]) or malformed_call(call) for call in calls]
        well_formed = [call for call, problem in zip(calls, problems) if problem is None]
        answered = 0
        try:
            decisions = iter(await self._unless_stopped(self._decide(well_formed)) if well_formed else [])
            for index, (call, problem) in enumerate(zip(calls, problems), 1):
                if problem is None:
                    await self._run_call(call, next(decisions), result)
                else:
                    self._answer_malformed(call, index, problem, result)
                answered += 1
        except Stopped:
            self._answer_not_run(calls[answered:], result)
            raise

    def _answer_not_run(self, calls: list[dict], result: TurnResult):
        """A stop while calls wait for approval or run: each one left is answered NOT_RUN, so none stays open."""
        for call in calls:
            result.not_run += 1
            self._record({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                          "content": NOT_RUN})

    def _answer_malformed(self, call: dict, index: int, problem: str, result: TurnResult):
        result.tool_calls += 1
        result.malformed_calls += 1
        result.tool_errors += 1
        tools = ", ".join(tool["function"]["name"] for tool in self.tools.openai_tools())
        name = call["function"]["name"]
        outcome = error_result(f"tool call {index}{f' ({name})' if name.strip() else ''} was not run: {problem}. "
                               f"Call one of these tools by name, with a JSON object of arguments: {tools}")
        self._record(tool_message(call, outcome))

    def _step_limit_detail(self, calls: list[dict]) -> str:
        """What the flag of the reply at the last allowed step says, with how the model looped if it did."""
        detail = (f"the model still called tools at step {self.config.max_steps} of {self.config.max_steps}, the "
                  "last allowed, so the turn has no final answer")
        loop = same_tool_steps(self.messages, calls)
        if loop:
            name, steps, results, errors = loop
            detail += (f"; its last {steps} steps all called {name!r}, and {errors} of the {results} results so far "
                       "were errors")
        return detail

    async def _model_step(self, result: TurnResult) -> dict | None:
        result.steps += 1
        t0 = time.perf_counter()
        streamed = _Streamed(self.on_delta)
        try:
            parsed = await self._unless_stopped(self.generate(self.messages, self.tools.openai_tools(), streamed))
        except Stopped:
            if streamed.text["reasoning"].strip() or streamed.text["content"].strip():
                self._record(streamed.stopped_message())
            raise
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
        self._record(tool_message(call, outcome))


def tool_message(call: dict, outcome: ToolResult) -> dict:
    """The tool message answering `call`: `content` is exactly what the model sees; beside it, for the record only,
    the MCP structuredContent (bounded) and what the result was (`mcp_result`: isError, content types, ...)."""
    message = {"role": "tool", "tool_call_id": call["id"]}
    if call["function"]["name"].strip():  # a call without a name is answered without one
        message["name"] = call["function"]["name"]
    message["content"] = outcome.text
    if outcome.structured is not None:
        message["structured_content"] = outcome.structured
    message["mcp_result"] = outcome.mcp_result()
    return message


def take_unreadable_calls(reply: dict) -> dict[str, str]:
    """A reply whose text still holds `<tool_call>` blocks tried to call a tool and wrote the call so that it could
    not be read. Each such block leaves the content for the reply's calls, so that it is answered with why (and the
    model can try again) instead of ending the turn as its answer: call id -> why it could not be read."""
    if CALL_OPEN not in reply["content"]:
        return {}
    reply["content"], calls, problems = unreadable_calls(reply["content"])
    if calls:
        reply["tool_calls"] = reply.get("tool_calls", []) + calls
    return {call["id"]: problem for call, problem in zip(calls, problems)}


def malformed_call(call: dict) -> str | None:
    """What makes a tool call unrunnable as the model sent it (no function name, arguments that are no JSON object),
    None for a well-formed one. An unknown name is not malformed: the tool hub answers it."""
    if not call["function"]["name"].strip():
        return "it has no function name"
    arguments = call["function"]["arguments"]
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError as error:
        return f"its arguments are not valid JSON ({error}): {arguments[:80]!r}"
    if not isinstance(parsed, dict):
        return f"its arguments must be a JSON object, not {type(parsed).__name__}: {arguments[:80]!r}"
    return None


def same_tool_steps(messages: list[dict], calls: list[dict]) -> tuple[str, int, int, int] | None:
    """(tool name, steps, results, errors) when the latest steps of this turn, up to `calls` (the newest, not yet
    recorded), all called one tool and nothing else: how many steps, and how many of their results were errors
    (MCP isError); None when the steps varied or there is only one."""
    names = {call["function"]["name"] for call in calls}
    if len(names) != 1:
        return None
    name, steps, results, errors = names.pop(), 1, 0, 0
    pending_results = pending_errors = 0  # tool messages seen (walking back) before the step that made them
    for message in reversed(messages):
        if message["role"] == "tool":
            pending_results, pending_errors = pending_results + 1, pending_errors + is_error_result(message)
        elif message["role"] != "assistant" or {c["function"]["name"] for c in message.get("tool_calls", [])} != {name}:
            break
        else:
            steps, results, errors = steps + 1, results + pending_results, errors + pending_errors
            pending_results = pending_errors = 0
    return (name, steps, results, errors) if steps > 1 else None


class _Streamed:
    """The stream callback of one model step: passes deltas on, and keeps what was shown so far, which is the
    answer as far as it came when the user stops it."""

    def __init__(self, on_delta: Callable[[str, str], None] | None):
        self.on_delta = on_delta
        self.text = {"reasoning": "", "content": ""}

    def __call__(self, kind: str, text: str) -> None:
        self.text[kind] = self.text.get(kind, "") + text
        if self.on_delta:
            self.on_delta(kind, text)

    def stopped_message(self) -> dict:
        flag = cut_short_flag("stopped", "the user stopped the answer before it ended")
        return ParsedAssistant(self.text["content"].strip(), self.text["reasoning"].strip(), flags=[flag]).to_message()


def describe_call(call: dict) -> str:
    """`name(arguments)` for an approval prompt."""
    arguments = call["function"]["arguments"]
    try:
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        pass
    return f"{call['function']['name']}({arguments})"


def call_title(call: dict, limit: int = 60) -> str:
    """A call in one line for a collapsed title: the tool and its key arguments, `browser_click · "Browse all"`."""
    name = call["function"]["name"] or "(no tool name)"
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict) or not arguments:
        return name
    strings = {key: value for key, value in arguments.items() if isinstance(value, str) and value.strip()}
    keys = [key for key in KEY_ARGUMENTS if key in strings] or list(strings)[:1]
    if keys:
        shown = ", ".join(json.dumps(_clip(" ".join(strings[key].split()), limit), ensure_ascii=False)
                          for key in keys[:2])
    else:  # no text argument (numbers, lists): the first one as key=value
        key, value = next(iter(arguments.items()))
        shown = f"{key}={_clip(json.dumps(value, ensure_ascii=False), limit)}"
    return f"{name} · {shown}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
