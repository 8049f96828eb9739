"""The trace: one conversation in OpenAI chat format, normalised on the way in, validated into flags.

Normalising never loses information: the caller keeps the original JSON beside the normalised trace. Validation
never fixes anything: it returns flags, and flagged traces are left out of datasets unless asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

ROLES = ("system", "user", "assistant", "tool")
# Settings keys that may hold credentials: never stored in a trace.
SECRET_KEY_PATTERN = re.compile(r"(api[_-]?key|token|secret|password|authorization)", re.IGNORECASE)


class TraceError(ValueError):
    """Input that cannot be a trace; `where` names the offending field, e.g. `messages[3].tool_calls[0].id`."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass
class Trace:
    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    model: str = ""
    created: str = ""
    base_url: str = ""
    settings: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    rating: int | None = None
    notes: str = ""
    source: str = ""
    owner: str = ""
    included: bool = True
    # False: the system prompt stays in the record but is dropped from training rows (steer with it, don't train it).
    train_system: bool = True
    id: str = ""
    flags: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_json(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


def _expect(value, kind, where: str, what: str):
    if not isinstance(value, kind):
        raise TraceError(where, f"expected {what}, got {type(value).__name__}")
    return value


def _content_text(content, where: str) -> str:
    """`null` becomes ""; a list of OpenAI content parts becomes its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            part = _expect(part, dict, f"{where}[{i}]", "a content part object")
            if part.get("type") == "text":
                texts.append(_expect(part.get("text"), str, f"{where}[{i}].text", "a string"))
        return "\n".join(texts)
    raise TraceError(where, f"expected a string, null or a list of content parts, got {type(content).__name__}")


def _normalize_tool_call(raw, where: str) -> dict:
    raw = _expect(raw, dict, where, "a tool call object")
    call_id = raw.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise TraceError(f"{where}.id", "missing tool call id")
    function = _expect(raw.get("function"), dict, f"{where}.function", "an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}.function.name", "missing tool name")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, dict):
        arguments = canonical_json(arguments)
    elif arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        raise TraceError(f"{where}.function.arguments", f"expected a JSON string or object, got {type(arguments).__name__}")
    return {"id": call_id, "type": raw.get("type") or "function", "function": {"name": name, "arguments": arguments}}


def normalize_message(raw, where: str = "message") -> dict:
    """One message in our canonical shape (see docs/architecture.md), or a TraceError naming the field."""
    raw = _expect(raw, dict, where, "a message object")
    role = raw.get("role")
    if role not in ROLES:
        raise TraceError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if role != "assistant" and "content" not in raw:
        raise TraceError(f"{where}.content", "missing field")
    message = {"role": role, "content": _content_text(raw.get("content"), f"{where}.content")}
    if role == "assistant":
        reasoning = raw.get("reasoning_content", raw.get("reasoning"))
        if reasoning:
            message["reasoning_content"] = _expect(reasoning, str, f"{where}.reasoning_content", "a string")
        calls = raw.get("tool_calls") or []
        _expect(calls, list, f"{where}.tool_calls", "a list")
        if calls:
            message["tool_calls"] = [_normalize_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
        if raw.get("flags"):
            message["flags"] = [str(f) for f in raw["flags"]]
    elif role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise TraceError(f"{where}.tool_call_id", "missing field")
        message["tool_call_id"] = call_id
        if raw.get("name"):
            message["name"] = _expect(raw["name"], str, f"{where}.name", "a string")
    return message


def normalize_tool(raw, where: str) -> dict:
    """An OpenAI function tool; a bare `{name, description, parameters|input_schema}` is wrapped."""
    raw = _expect(raw, dict, where, "a tool object")
    function = raw.get("function", raw)
    function = _expect(function, dict, f"{where}.function", "an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}.function.name", "missing tool name")
    parameters = function.get("parameters", function.get("input_schema", function.get("inputSchema", {})))
    tool = {"name": name, "description": function.get("description") or "", "parameters": parameters or {}}
    return {"type": "function", "function": tool}


def parse_created(value) -> str:
    """ISO 8601 from an ISO string, the Trelis recorder's `YYYYmmdd_HHMMSS`, or a unix time."""
    if value in (None, ""):
        return now_iso()
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    if isinstance(value, str):
        for fmt in ("%Y%m%d_%H%M%S",):
            try:
                return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
            except ValueError:
                pass
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
            return value
        except ValueError:
            pass
    raise TraceError("created", f"unreadable time {value!r}")


def scrub_secrets(settings: dict) -> dict:
    """Settings minus anything that looks like a credential."""
    return {k: v for k, v in settings.items() if not SECRET_KEY_PATTERN.search(str(k))}


def normalize_trace(raw, source: str = "") -> Trace:
    """A Trace from the Trelis recorder format (`timestamp, model, messages, tools`) or our own export."""
    raw = _expect(raw, dict, "trace", "a JSON object")
    if "messages" not in raw:
        raise TraceError("messages", "missing field")
    messages = _expect(raw["messages"], list, "messages", "a list")
    if not messages:
        raise TraceError("messages", "empty conversation")
    tools = raw.get("tools") or []
    if isinstance(tools, str):  # exported rows carry tools as a JSON string (one Arrow schema for all tool sets)
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise TraceError("tools", f"not valid JSON: {e}") from None
    tools = _expect(tools, list, "tools", "a list")
    rating = raw.get("rating")
    if rating is not None and not isinstance(rating, int):
        raise TraceError("rating", "expected an integer or null")
    tags = _expect(raw.get("tags") or [], list, "tags", "a list")
    return Trace(
        messages=[normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
        tools=[normalize_tool(t, f"tools[{i}]") for i, t in enumerate(tools)],
        model=str(raw.get("model") or ""),
        created=parse_created(raw.get("created", raw.get("timestamp"))),
        base_url=str(raw.get("base_url") or ""),
        settings=scrub_secrets(_expect(raw.get("settings") or {}, dict, "settings", "an object")),
        tags=[str(t) for t in tags],
        rating=rating,
        notes=str(raw.get("notes") or ""),
        source=str(raw.get("source") or source),
        owner=str(raw.get("owner") or ""),
        included=bool(raw.get("included", True)),
        train_system=bool(raw.get("train_system", True)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Validation: flags, never fixes


def _flag(code: str, index: int | None, message: str) -> dict:
    return {"code": code, "index": index, "message": message}


def validate(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Everything that makes a conversation unfit to train on, as `{code, index, message}` flags."""
    flags: list[dict] = []
    tool_names = {t["function"]["name"] for t in tools}
    open_calls: dict[str, int] = {}  # call id -> index of the assistant message that made it
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            flags += _assistant_flags(i, m, tool_names)
            for call in m.get("tool_calls", []):
                open_calls[call["id"]] = i
        elif m["role"] == "tool":
            if open_calls.pop(m["tool_call_id"], None) is None:
                flags.append(_flag("orphan_tool_result", i, f"tool result answers call id {m['tool_call_id']!r}, "
                                   "which no earlier assistant message made (did an assistant message lose its "
                                   "tool_calls?)"))
    for call_id, i in open_calls.items():
        flags.append(_flag("unanswered_call", i, f"tool call {call_id!r} never gets a result"))
    if messages and messages[-1]["role"] != "assistant":
        flags.append(_flag("no_final_assistant", len(messages) - 1,
                           f"conversation ends with a {messages[-1]['role']} message, not an assistant answer"))
    return flags


def _assistant_flags(i: int, message: dict, tool_names: set[str]) -> list[dict]:
    flags = []
    calls = message.get("tool_calls", [])
    if not calls and not message["content"].strip():
        flags.append(_flag("empty_assistant", i, "assistant turn has neither content nor tool calls"))
    for call in calls:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        if name not in tool_names:
            flags.append(_flag("unknown_tool", i, f"call to {name!r}, which is not in the trace's tools"))
        try:
            if not isinstance(json.loads(arguments), dict):
                raise ValueError
        except ValueError:
            flags.append(_flag("invalid_arguments", i, f"arguments of {name!r} are not a JSON object: {arguments[:80]!r}"))
    for problem in message.get("flags", []):
        flags.append(_flag("malformed_output", i, problem))
    return flags
