"""OpenAI-compatible endpoints: presets, the SDK client, a connection probe, and one streamed completion.

Servers differ in two ways that matter to the agent: whether they parse tool calls themselves (vLLM with
`--enable-auto-tool-choice`, OpenAI, our embedded server) or hand back Hermes `<tool_call>` text, and where they put
reasoning (`reasoning_content`, `reasoning`, `<think>` in the content, or nowhere). `probe` finds both out; `complete`
copes with either by parsing on the client side when the server returned text, and reports where a reply's reasoning
was so that a conversation can send its history back the same way (`learn_reasoning_form`).
The API key lives only in `Endpoint.api_key` (or the environment): it is never part of a record, repr or report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urlparse

import openai
from openai.pagination import AsyncPage
from openai.types.chat import ChatCompletion

from mcpft.hermes import (
    THINK_CLOSE, THINK_OPEN, ParsedAssistant, ThinkStreamSplitter, new_call_id, parse_assistant_text)
from mcpft.trace import cut_short_flag

REASONING_FIELDS = ("reasoning_content", "reasoning")  # where servers put reasoning in a message / delta
REASONING_FORMS = (*REASONING_FIELDS, "think_tags")  # ... or in the content, inside <think>
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
NO_KEY = "EMPTY"  # what local servers without --api-key accept; the SDK refuses an empty key


@dataclass(frozen=True)
class Preset:
    base_url: str
    key_env: str | None  # the environment variable holding its API key, if it needs one


PRESETS = {
    "vllm": Preset("http://localhost:8000/v1", None),
    "openai": Preset("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "hf": Preset("https://router.huggingface.co/v1", "HF_TOKEN"),
    "embedded": Preset("http://127.0.0.1:{port}/v1", None),
}


@dataclass
class Endpoint:
    """Where an agent's model runs. `api_key` None: taken from the environment variable of the matching preset."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    def to_record(self) -> dict:
        """What a trace may store about the endpoint (never the key)."""
        return {"base_url": self.base_url, "model": self.model}

    def resolved_api_key(self) -> str:
        """The caller's key, else the preset's environment variable for this host, else a placeholder."""
        if self.api_key:
            return self.api_key
        host = urlparse(self.base_url).hostname or ""
        for preset in PRESETS.values():
            if preset.key_env and urlparse(preset.base_url).hostname == host and os.environ.get(preset.key_env):
                return os.environ[preset.key_env]
        return NO_KEY


def endpoint_from_preset(name: str, model: str, api_key: str | None = None, port: int | None = None) -> Endpoint:
    """An endpoint at a preset's address (`embedded` needs the port the embedded server listens on)."""
    if name not in PRESETS:
        raise ValueError(f"endpoint preset {name!r}: expected one of {', '.join(PRESETS)}")
    base_url = PRESETS[name].base_url
    if "{port}" in base_url:
        if port is None:
            raise ValueError(f"endpoint preset {name!r} needs a port")
        base_url = base_url.format(port=port)
    return Endpoint(base_url=base_url, model=model, api_key=api_key)


def max_tokens_key(endpoint: Endpoint) -> str:
    """OpenAI's own API refuses `max_tokens` for its newer models; everyone else (vLLM, routers) takes it."""
    return "max_completion_tokens" if urlparse(endpoint.base_url).hostname == "api.openai.com" else "max_tokens"


def client(endpoint: Endpoint, timeout: float = 600.0, max_retries: int = 1) -> openai.AsyncOpenAI:
    """The OpenAI SDK's async client for the endpoint."""
    return openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.resolved_api_key(), timeout=timeout,
                              max_retries=max_retries)


class NotOpenAIReply(Exception):
    """The server answered with something other than the OpenAI JSON asked for."""


def describe_error(error: Exception, endpoint: Endpoint, timeout: float | None = None) -> str:
    """One line saying what went wrong talking to the endpoint (no traceback, no key)."""
    where = endpoint.base_url
    if isinstance(error, openai.APITimeoutError):
        return f"no reply from {where} within {timeout:g} s" if timeout else f"no reply from {where} in time"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        return f"cannot connect to {where}: {cause or error.message}"
    if isinstance(error, openai.APIStatusError):
        hint = " (check the API key)" if error.status_code in (401, 403) else ""
        return f"{where} answered HTTP {error.status_code}: {_status_message(error)}{hint}"
    # Anything else came from reading what the server sent (the SDK fails in various ways on non-OpenAI replies).
    detail = str(error) if isinstance(error, NotOpenAIReply) else f"{type(error).__name__}: {error}"
    return f"{where} sent a reply that is not a valid OpenAI response ({detail})"


def _status_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return error.message


# ---------------------------------------------------------------------------------------------------------------
# Probe

PROBE_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
PROBE_TOOL_PROMPT = "What is the weather in Paris right now? Call the get_weather tool to find out."
PROBE_CHAT_PROMPT = "Reply with one short sentence: what is 2 + 2?"


@dataclass
class ProbeReport:
    """What a probe found out. `tool_calls`: "native" (the server parses them), "hermes_text" (`<tool_call>` text
    in the content), "none" (the model called nothing), None (not tested). `reasoning_field`: "reasoning_content",
    "reasoning", "think_tags", "none", or None (not tested); `think_opened`: the `<think>` was opened by the prompt."""

    base_url: str
    model: str
    reachable: bool = False
    models: list[str] = field(default_factory=list)
    model_listed: bool | None = None
    reply: str | None = None
    tool_calls: str | None = None
    reasoning_field: str | None = None
    think_opened: bool = False
    latencies_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reachable and not self.errors

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}

    def summary(self) -> str:
        lines = [f"{self.base_url} model {self.model}: {'ok' if self.ok else 'PROBLEM'}"]
        if self.models:
            listed = "" if self.model_listed else f" ({self.model} is not among them)"
            lines.append(f"  models: {', '.join(self.models)}{listed}")
        if self.tool_calls:
            lines.append(f"  tool calls: {self.tool_calls}")
        if self.reasoning_field:
            opened = " (<think> opened by the prompt)" if self.think_opened else ""
            lines.append(f"  reasoning: {self.reasoning_field}{opened}")
        lines += [f"  {step}: {seconds:.2f} s" for step, seconds in self.latencies_s.items()]
        lines += [f"  error in {step}: {message}" for step, message in self.errors.items()]
        return "\n".join(lines)


async def probe(endpoint: Endpoint, timeout: float = 60.0, max_tokens: int = 512, deep: bool = True) -> ProbeReport:
    """List models, ask one short question, then one that must call a tool; errors land in the report.

    `deep=False` is the quick check (a model on a CPU answers it in a second or two): the listing and a one-token
    completion, with tool calls and reasoning left untested.
    """
    report = ProbeReport(base_url=endpoint.base_url, model=endpoint.model)
    async with client(endpoint, timeout=timeout, max_retries=0) as api:
        listing = await _timed(report, "models", api.models.list(), endpoint, timeout, AsyncPage)
        if not report.reachable:
            return report
        if listing is not None:  # a server without /v1/models can still chat: go on in that case
            report.models = [model.id for model in listing.data]
            report.model_listed = endpoint.model in report.models
            if not report.model_listed:
                report.errors["models"] = f"model {endpoint.model!r} is not served there"
                return report
        limit = {max_tokens_key(endpoint): max_tokens if deep else 1}
        chat = await _timed(report, "chat", api.chat.completions.create(
            model=endpoint.model, messages=[{"role": "user", "content": PROBE_CHAT_PROMPT}], temperature=0, **limit),
            endpoint, timeout, ChatCompletion)
        tools = None if not deep else await _timed(report, "tools", api.chat.completions.create(
            model=endpoint.model, messages=[{"role": "user", "content": PROBE_TOOL_PROMPT}], tools=[PROBE_TOOL],
            tool_choice="auto", temperature=0, **limit), endpoint, timeout, ChatCompletion)
    messages = [reply.choices[0].message for reply in (chat, tools) if reply is not None and reply.choices]
    if chat is not None and chat.choices:
        report.reply = chat.choices[0].message.content
    if tools is not None and tools.choices:
        report.tool_calls = _tool_call_style(tools.choices[0].message)
    if messages and deep:
        report.reasoning_field = next((style for m in messages if (style := _reasoning_style(m)) != "none"), "none")
        report.think_opened = any(prompt_opened_think(m.content or "") for m in messages)
    return report


async def _timed(report: ProbeReport, step: str, call, endpoint: Endpoint, timeout: float, expected: type):
    started = time.perf_counter()
    try:
        result = await call
        if not isinstance(result, expected):  # the SDK hands back plain text when the reply is not JSON
            raise NotOpenAIReply(f"expected JSON, got {str(result)[:80]!r}")
    except Exception as error:  # every failure becomes a line of the report
        report.reachable = report.reachable or not isinstance(error, openai.APIConnectionError)  # it answered
        report.errors[step] = describe_error(error, endpoint, timeout)
        return None
    report.reachable = True
    report.latencies_s[step] = round(time.perf_counter() - started, 3)
    return result


def _tool_call_style(message) -> str:
    if message.tool_calls:
        return "native"
    return "hermes_text" if "<tool_call>" in (message.content or "") else "none"


def _reasoning_style(message) -> str:
    extra = message.model_extra or {}
    for name in REASONING_FIELDS:
        if extra.get(name):
            return name
    return "think_tags" if THINK_CLOSE in (message.content or "") else "none"


def assistant_message_for_history(message: dict, reasoning_field: str | None) -> dict:
    """An assistant message (mcpft format) as the server expects it back: reasoning under the field its template
    reads (None, not known yet: vLLM's `reasoning_content`), inside `<think>` for "think_tags", dropped for "none";
    our keys removed."""
    out = {key: value for key, value in message.items() if key not in ("flags", "train", "reasoning_content")}
    reasoning = message.get("reasoning_content")
    reasoning_field = reasoning_field or "reasoning_content"
    if reasoning and reasoning_field in REASONING_FIELDS:
        out[reasoning_field] = reasoning
    elif reasoning and reasoning_field == "think_tags":
        out["content"] = f"<think>\n{reasoning}\n</think>\n\n{message.get('content') or ''}"
    return out


# What goes back to the endpoint of a message other than an assistant's: the OpenAI fields only. A tool message's
# `structured_content` and `mcp_result` are ours, for the record: the model sees exactly the (truncated) `content`.
REQUEST_KEYS = {"system": ("role", "content"), "user": ("role", "content"),
                "tool": ("role", "tool_call_id", "name", "content")}


def message_for_request(message: dict, reasoning_field: str | None) -> dict:
    """A message (mcpft format) as it goes out in a request: see assistant_message_for_history and REQUEST_KEYS."""
    if message.get("role") == "assistant":
        return assistant_message_for_history(message, reasoning_field)
    keys = REQUEST_KEYS.get(message.get("role"))
    return message if keys is None else {key: message[key] for key in keys if key in message}


# ---------------------------------------------------------------------------------------------------------------
# One completion


@dataclass
class CompletionSettings:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    tool_choice: str | None = None  # "auto" / "none"; None: the server's default
    timeout: float = 600.0
    think_opened: bool = False  # for servers returning raw text after a prompt that opened <think>
    # Where past reasoning goes back: one of REASONING_FORMS or "none"; None until a reply (or a probe) shows it.
    reasoning_field: str | None = None
    extra_body: dict | None = None  # e.g. {"chat_template_kwargs": {"enable_thinking": False}} for vLLM

    def adapted_to(self, report: ProbeReport | None) -> CompletionSettings:
        """These settings with reasoning sent back as the connection test saw the server reply; a probe that saw
        no reasoning presets nothing, so the conversation's replies can still show it."""
        if report is None or report.reasoning_field not in REASONING_FORMS:
            return self
        return replace(self, reasoning_field=report.reasoning_field, think_opened=report.think_opened)


@dataclass
class Completion:
    """A finished assistant turn. `parsed_client_side`: the server returned Hermes/think text that we parsed."""

    content: str
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    latency_s: float = 0.0
    first_token_s: float | None = None
    parsed_client_side: bool = False
    reasoning_form: str | None = None  # where this reply's reasoning was (one of REASONING_FORMS), None: it had none
    think_opened: bool = False  # a `</think>` with no `<think>` before it: the prompt opened the reasoning

    def to_message(self) -> dict:
        """The assistant message in mcpft's format."""
        return ParsedAssistant(self.content, self.reasoning, self.tool_calls, self.flags).to_message()


def learn_reasoning_form(settings: CompletionSettings, reply: Completion) -> None:
    """The first reply that carries reasoning shows where this server puts it; the rest of the conversation sends
    its history back in that same form (a server's template reads only its own field)."""
    if settings.reasoning_field is None and reply.reasoning_form:
        settings.reasoning_field = reply.reasoning_form
        settings.think_opened = settings.think_opened or reply.think_opened


def prompt_opened_think(text: str) -> bool:
    """True when the text closes a `<think>` it never opened (the chat template opened it in the prompt)."""
    close_at = text.find(THINK_CLOSE)
    return close_at != -1 and THINK_OPEN not in text[:close_at]


StreamCallback = Callable[[str, str], None]  # (kind: "content" | "reasoning", text)


class EndpointError(Exception):
    """A completion that failed; the message says where and why (see describe_error)."""


async def complete(endpoint: Endpoint, messages: list[dict], tools: list[dict] | None = None,
                   stream_cb: StreamCallback | None = None,
                   settings: CompletionSettings | None = None) -> Completion:
    """Stream one assistant turn, passing content and reasoning to `stream_cb` as they come.

    `messages` are in mcpft's format and go out through `message_for_request` (OpenAI fields only). A reply
    cut short (the stream broke off or ended without a finish_reason, or finished with "length") comes back with a
    `cut_off` or `length` flag (mcpft.trace.CUT_SHORT); a failure before any output raises EndpointError.
    """
    settings = settings or CompletionSettings()
    messages = [message_for_request(m, settings.reasoning_field) for m in messages]
    stream_cb = stream_cb or (lambda kind, text: None)
    started = time.perf_counter()
    turn = _Turn(ThinkStreamSplitter(think_opened=settings.think_opened), stream_cb, started)
    try:
        async with client(endpoint, timeout=settings.timeout) as api:
            stream = await api.chat.completions.create(**_request(endpoint, messages, tools, settings))
            async for chunk in stream:
                turn.add(chunk)
    except (openai.OpenAIError, json.JSONDecodeError) as error:
        if not turn.has_output():
            raise EndpointError(describe_error(error, endpoint, settings.timeout)) from error
        turn.broken_by = describe_error(error, endpoint, settings.timeout)  # the partial answer is kept, flagged
    if turn.chunks == 0:
        raise EndpointError(f"{endpoint.base_url} sent no completion chunks: not an OpenAI-compatible stream")
    result = turn.result(settings.think_opened)
    result.latency_s = round(time.perf_counter() - started, 3)
    return result


def _request(endpoint: Endpoint, messages: list[dict], tools: list[dict] | None,
             settings: CompletionSettings) -> dict:
    request = {"model": endpoint.model, "messages": messages, "stream": True,
               "stream_options": {"include_usage": True}}
    optional = {"tools": tools or None, "tool_choice": settings.tool_choice if tools else None,
                "temperature": settings.temperature, "top_p": settings.top_p,
                max_tokens_key(endpoint): settings.max_tokens,
                "stop": settings.stop or None, "extra_body": settings.extra_body}
    return request | {key: value for key, value in optional.items() if value is not None}


class _Turn:
    """Accumulates a streamed reply: content, server-side reasoning, tool call deltas merged by index."""

    def __init__(self, splitter: ThinkStreamSplitter, stream_cb: StreamCallback, started: float):
        self.splitter, self.stream_cb, self.started = splitter, stream_cb, started
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.first_token_s: float | None = None
        self.reasoning_field: str | None = None  # the delta field the server's reasoning came in
        self.chunks = 0
        self.broken_by: str | None = None  # why the stream broke off mid-answer

    def has_output(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def add(self, chunk) -> None:
        self.chunks += 1
        if chunk.usage:
            self.usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            self.finish_reason = choice.finish_reason or self.finish_reason
            self._add_delta(choice.delta)

    def _add_delta(self, delta) -> None:
        extra = delta.model_extra or {}
        field_name = next((name for name in REASONING_FIELDS if extra.get(name)), None)
        reasoning = extra[field_name] if field_name else None
        if self.first_token_s is None and (reasoning or delta.content or delta.tool_calls):
            self.first_token_s = round(time.perf_counter() - self.started, 3)
        if reasoning:
            self.reasoning_field = field_name
            self.reasoning.append(reasoning)
            self.stream_cb("reasoning", reasoning)
        if delta.content:
            self.content.append(delta.content)
            for kind, text in self.splitter.feed(delta.content):  # shows <think> text as reasoning while it comes
                self.stream_cb(kind, text)
        for call in delta.tool_calls or []:
            merged = self.calls.setdefault(call.index, {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
            merged["id"] = call.id or merged["id"]
            if call.function:
                merged["function"]["name"] += call.function.name or ""
                merged["function"]["arguments"] += call.function.arguments or ""

    def result(self, think_opened: bool) -> Completion:
        completion = self._parsed(think_opened)
        if cut := self._cut_short():
            completion.flags.append(cut)
        return completion

    def _cut_short(self) -> str | None:
        """The flag of a reply that did not end as a whole answer, None when it did."""
        if self.broken_by:
            return cut_short_flag("cut_off", f"the stream broke off mid-answer: {self.broken_by}")
        if self.finish_reason is None:  # no finish chunk: the server closed the stream before the answer ended
            return cut_short_flag("cut_off", "the stream ended without a finish_reason (the connection closed "
                                             "mid-answer)")
        if self.finish_reason == "length":
            return cut_short_flag("length", "the answer reached the max_tokens limit (finish_reason \"length\")")
        return None

    def _parsed(self, think_opened: bool) -> Completion:
        for kind, text in self.splitter.finish():
            self.stream_cb(kind, text)
        content, reasoning = "".join(self.content), "".join(self.reasoning).strip()
        completion = Completion(content=content, reasoning=reasoning, finish_reason=self.finish_reason,
                                usage=self.usage, first_token_s=self.first_token_s,
                                reasoning_form=self.reasoning_field if reasoning else None)
        if self.calls:
            completion.tool_calls = [self.calls[i] for i in sorted(self.calls)]
            completion.flags = [flag for call in completion.tool_calls if (flag := _complete_call(call))]
            completion.content = content.strip()
            return completion
        parsed = parse_assistant_text(content, think_opened=think_opened and not reasoning)
        completion.parsed_client_side = bool(parsed.tool_calls or parsed.reasoning)
        completion.content, completion.tool_calls, completion.flags = parsed.content, parsed.tool_calls, parsed.flags
        completion.reasoning = "\n\n".join(part for part in (reasoning, parsed.reasoning) if part)
        if parsed.reasoning and not completion.reasoning_form:
            completion.reasoning_form, completion.think_opened = "think_tags", prompt_opened_think(content)
        return completion


def _complete_call(call: dict) -> str | None:
    """Give a server's call an id if it has none and `{}` for empty arguments; a flag if the arguments are not JSON."""
    call["id"] = call["id"] or new_call_id()
    function = call["function"]
    function["arguments"] = function["arguments"] or "{}"
    try:
        if isinstance(json.loads(function["arguments"]), dict):
            return None
    except json.JSONDecodeError:
        pass
    return f"tool call {function['name']}: arguments are not a JSON object: {function['arguments'][:60]!r}"
