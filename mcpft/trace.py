"""The trace: one conversation in OpenAI chat format, normalised on the way in, validated into flags.

Normalising never loses information: the caller keeps the original JSON beside the normalised trace. Validation
never fixes anything: it returns flags, and flagged traces are left out of datasets unless asked for.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from mcpft.hermes import THINK_OPEN, split_think

ROLES = ("system", "user", "assistant", "tool")
# A key (settings, headers, URL query parameter) names a credential when one of its words is one of these...
SECRET_WORDS = frozenset({"key", "keys", "auth", "sig", "signature", "cookie", "bearer"})
# ...ends with "token" (`hf_token`, `accessToken`, but not `max_tokens` or `tokenizer`), or contains one of these.
SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "authorization", "credential", "apikey")
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S*", re.IGNORECASE)
# An assistant answer cut short, kept for the record and never trained on: the connection closed mid-answer, the
# answer reached max_tokens, or the user stopped it. Its message flag reads "<code>: <what happened>".
CUT_SHORT = ("cut_off", "length", "stopped")
# The agent loop's flag on the model's reply at the last allowed step that still called tools: the turn ended at the
# step limit without an answer (often a model looping on one tool).
STEP_LIMIT = "step_limit"
# The codes a message flag may start with; any other message flag (a parser's or endpoint's) is `malformed_output`.
MESSAGE_FLAG_CODES = (*CUT_SHORT, STEP_LIMIT)
# A reply that degenerated into repeating itself: a stretch of at least REPETITION_MIN_CHARS characters that is one
# chunk of 1 to REPETITION_MAX_CHUNK characters back to back, at least 4 times ("the the the ...", a sentence over
# and over, thousands of one character). A markdown rule of 80 "=" or a table is far from it.
REPETITION_MIN_CHARS = 500
REPETITION_MAX_CHUNK = 200
# A final answer that gives up, kept narrow on purpose: a short one (at most GAVE_UP_MAX_CHARS) that opens with an
# apology or "unfortunately" and says in that same sentence that the model cannot, could not or is unable to
# ("Sorry, I can't help with that.", "I'm sorry: I could not finish this task."), or one that says "I give up".
# An answer that reports a real negative result ("The page lists no flight on that day.") is not flagged.
GAVE_UP_MAX_CHARS = 300
GAVE_UP = re.compile(
    r"^\W*(?:(?:i['’]?m|i\s+am)\s+(?:so\s+|very\s+|really\s+|truly\s+)?sorry|sorry|(?:my\s+)?apologies"
    r"|i\s+apologi[sz]e|unfortunately)\b[^.!?\n]{0,120}?"
    r"\b(?:can(?:no|['’])?t|can\s+not|could(?:n['’]?t|\s+not)|unable|not\s+able|won['’]?t\s+be\s+able)\b"
    r"|\bi\s+give\s+up\b", re.IGNORECASE)


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
    # An empty name is what a model sent in a malformed call: kept as it came, and flagged `malformed_call`.
    if not isinstance(name, str):
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
        else:
            message.update(_think_split(message["content"]))
        calls = raw.get("tool_calls") or []
        _expect(calls, list, f"{where}.tool_calls", "a list")
        if calls:
            message["tool_calls"] = [_normalize_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
        if raw.get("flags"):
            flags = _expect(raw["flags"], list, f"{where}.flags", "a list of strings")
            message["flags"] = [_expect(f, str, f"{where}.flags[{i}]", "a string") for i, f in enumerate(flags)]
    elif role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise TraceError(f"{where}.tool_call_id", "missing field")
        message["tool_call_id"] = call_id
        if raw.get("name"):
            message["name"] = _expect(raw["name"], str, f"{where}.name", "a string")
        # An MCP tool's structured result, kept for the record; `content` holds its text, which is what is trained.
        if raw.get("structured_content") is not None:
            message["structured_content"] = _expect(raw["structured_content"], dict, f"{where}.structured_content",
                                                    "a JSON object")
        # What the MCP result was (isError, content types, MIME types, URIs, annotations): metadata, never trained.
        if raw.get("mcp_result") is not None:
            message["mcp_result"] = _expect(raw["mcp_result"], dict, f"{where}.mcp_result", "a JSON object")
    _check_unicode(message, where)
    return message


def _think_split(content: str) -> dict:
    """A content that opens with a closed `<think>` block (servers that send the reasoning inline, as Qwen3's raw
    text does) as reasoning and content, so that the reasoning is in one place: dropped from earlier turns, and by
    `--no-reasoning`, rather than trained as an answer. Other content stays as it came."""
    if not content.lstrip().startswith(THINK_OPEN):
        return {}
    reasoning, rest, flags = split_think(content)
    if flags:  # never closed: kept as it came
        return {}
    return {"content": rest.strip(), **({"reasoning_content": reasoning.strip()} if reasoning.strip() else {})}


def _check_unicode(message: dict, where: str) -> None:
    """JSON may escape a lone surrogate ("\\ud800") that no UTF-8 file or SQLite text can hold: name where it is."""
    for key, value in message.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise TraceError(f"{where}.{key}", f"text that is not valid Unicode (a lone surrogate at character "
                                               f"{error.start})") from None


def normalize_tool(raw, where: str) -> dict:
    """An OpenAI function tool; a bare `{name, description, parameters|input_schema}` is wrapped."""
    raw = _expect(raw, dict, where, "a tool object")
    function = raw.get("function", raw)
    function = _expect(function, dict, f"{where}.function", "an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}.function.name", "missing tool name")
    parameters = function.get("parameters", function.get("input_schema", function.get("inputSchema", {})))
    parameters = _expect(parameters or {}, dict, f"{where}.function.parameters", "a JSON schema object")
    tool = {"name": name, "description": function.get("description") or "", "parameters": parameters}
    return {"type": "function", "function": tool}


def parse_created(value, where: str = "created") -> str:
    """ISO 8601 from an ISO string, the Trelis recorder's `YYYYmmdd_HHMMSS`, or a unix time (`where`: the field)."""
    if value in (None, ""):
        return now_iso()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            moment = datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):  # beyond year 9999, or NaN
            raise TraceError(where, f"unix time {value!r} is out of range") from None
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
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
    raise TraceError(where, f"unreadable time {value!r}")


def _created_field(raw: dict) -> tuple:
    """(value, field name) of the creation time: ours is `created`, the Trelis recorder's `timestamp`."""
    key = "created" if "created" in raw else "timestamp"
    return raw.get(key), key


def _key_words(key: str) -> list[str]:
    """`X-Api-Key` -> x, api, key; `HFToken` -> hf, token; `openai_api_key` -> openai, api, key."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", key))
    return re.split(r"[^a-z0-9]+", spaced.lower())


def is_secret_key(key) -> bool:
    """Whether a key names a credential: api_key, apiKey, X-Api-Key, HF_TOKEN, Authorization, password, ..."""
    return any(word in SECRET_WORDS or word.endswith("token") or any(part in word for part in SECRET_PARTS)
               for word in _key_words(str(key)))


def scrub_url(url: str) -> str:
    """`url` without credentials: no `user:password@`, no query parameter that names one (`api_key`, `key`, ...)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable (a broken IPv6 host): keep only what cannot hold a credential
        return re.sub(r"//[^/]*@", "//", re.split(r"[?#]", url, maxsplit=1)[0])
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(p for p in parts.query.split("&") if not is_secret_key(unquote_plus(p.partition("=")[0])))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scrub_secrets(value):
    """`value` (settings, at any depth) minus credentials: keys that name one are dropped, URLs lose theirs."""
    if isinstance(value, dict):
        return {k: scrub_secrets(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str) and URL.fullmatch(value):
        return scrub_url(value)
    return value


def _json_field(raw: dict, key: str, kind, what: str):
    """A field that exported rows carry as a JSON string (one Arrow schema whatever its shape), or as itself."""
    value = raw.get(key)
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except ValueError as e:
            raise TraceError(key, f"not valid JSON: {e}") from None
    return _expect(value or kind(), kind, key, what)


def normalize_trace(raw, source: str = "") -> Trace:
    """A Trace from the Trelis recorder format (`timestamp, model, messages, tools`) or our own export."""
    raw = _expect(raw, dict, "trace", "a JSON object")
    if "messages" not in raw:
        raise TraceError("messages", "missing field")
    messages = _expect(raw["messages"], list, "messages", "a list")
    if not messages:
        raise TraceError("messages", "empty conversation")
    tools = _json_field(raw, "tools", list, "a list")
    rating = raw.get("rating")
    if rating is not None and not isinstance(rating, int):
        raise TraceError("rating", "expected an integer or null")
    tags = _expect(raw.get("tags") or [], list, "tags", "a list")
    return Trace(
        messages=[normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
        tools=[normalize_tool(t, f"tools[{i}]") for i, t in enumerate(tools)],
        model=str(raw.get("model") or ""),
        created=parse_created(*_created_field(raw)),
        base_url=scrub_url(str(raw.get("base_url") or "")),
        settings=scrub_secrets(_json_field(raw, "settings", dict, "an object")),
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


# Each flag code in a few plain words, for people who curate without reading the code names (the Curate tab).
FLAG_WORDS = {
    "orphan_tool_result": "a tool result without its call", "unanswered_call": "a tool call without a result",
    "no_final_assistant": "no final answer", "empty_assistant": "an empty reply", "no_answer": "no real answer",
    "gave_up": "the model gave up", "repetition": "repeats itself", "step_limit": "hit the step limit",
    "cut_off": "answer broken off", "length": "answer cut at the token limit", "stopped": "stopped by the user",
    "unknown_tool": "a call to an unknown tool", "invalid_arguments": "bad tool arguments",
    "malformed_call": "a tool call without a name", "malformed_output": "garbled model output",
}


def flag_words(code: str) -> str:
    """A flag code in plain words; a code without words of its own reads as its name with spaces."""
    return FLAG_WORDS.get(code, code.replace("_", " "))


def _flag(code: str, index: int | None, message: str) -> dict:
    return {"code": code, "index": index, "message": message}


def cut_short_flag(code: str, detail: str) -> str:
    """The message flag of an answer cut short; `code` is one of CUT_SHORT."""
    if code not in CUT_SHORT:
        raise ValueError(f"unknown cut-short code {code!r} (expected one of {', '.join(CUT_SHORT)})")
    return f"{code}: {detail}"


def step_limit_flag(detail: str) -> str:
    """The message flag of the reply that reached the step limit still calling tools."""
    return f"{STEP_LIMIT}: {detail}"


def is_error_result(message: dict) -> bool:
    """Whether a tool message reports an error, as its MCP result said (`isError`, or a call mcpft could not make);
    never guessed from an `Error:` at the start of its text."""
    return bool(message.get("mcp_result", {}).get("is_error"))


def cut_short(message: dict) -> tuple[str, str] | None:
    """(CUT_SHORT code, flag) of a message that was cut short, None for a whole one."""
    flags = message.get("flags", [])
    return next(((code, flag) for flag in flags if (code := _message_flag_code(flag)) in CUT_SHORT), None)


def _message_flag_code(flag: str) -> str:
    """A message flag's code: its MESSAGE_FLAG_CODES prefix, else `malformed_output` (what the parser or endpoint
    flagged)."""
    code = flag.partition(":")[0]
    return code if code in MESSAGE_FLAG_CODES else "malformed_output"


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
    elif not calls:
        flags += _answer_flags(i, message["content"].strip())
    flags += _repetition_flags(i, message)
    for call in calls:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        if not name.strip():
            flags.append(_flag("malformed_call", i, f"tool call {call['id']!r} has no function name"))
        elif name not in tool_names:
            flags.append(_flag("unknown_tool", i, f"call to {name!r}, which is not in the trace's tools"))
        try:
            if not isinstance(json.loads(arguments), dict):
                raise ValueError
        except ValueError:
            flags.append(_flag("invalid_arguments", i, f"arguments of {name!r} are not a JSON object: {arguments[:80]!r}"))
    for problem in message.get("flags", []):
        flags.append(_flag(_message_flag_code(problem), i, problem))
    return flags


def _answer_flags(i: int, answer: str) -> list[dict]:
    """Flags of a final answer (no tool calls) that is no answer: no word in it (`no_answer`; an empty one is
    `empty_assistant`), or a short apology for not doing the task (`gave_up`, see GAVE_UP)."""
    if not re.search(r"\w", answer):
        return [_flag("no_answer", i, f"the final answer has no word in it: {answer[:80]!r}")]
    if len(answer) <= GAVE_UP_MAX_CHARS and GAVE_UP.search(answer):
        return [_flag("gave_up", i, f"the final answer gives up: {answer[:120]!r}")]
    return []


def _repetition_flags(i: int, message: dict) -> list[dict]:
    """A `repetition` flag per part of the message (content, reasoning) that repeats one chunk over and over."""
    flags = []
    for key in ("content", "reasoning_content"):
        if run := repeated_run(message.get(key, "")):
            start, chunk, length = run
            flags.append(_flag("repetition", i, f"{key} repeats {chunk[:40]!r} ({len(chunk)} characters) over "
                                                f"{length} characters from character {start}"))
    return flags


@functools.lru_cache(maxsize=256)  # the store re-validates a whole trace at every message appended to it
def repeated_run(text: str) -> tuple[int, str, int] | None:
    """(start, repeated chunk, length) of a stretch that repeats one chunk (see REPETITION_MIN_CHARS), the shortest
    such chunk; None when the text has none."""
    n = len(text)
    if n < REPETITION_MIN_CHARS:  # most messages: nothing to scan
        return None
    # Every character as 4 bytes of one big integer: XOR with itself shifted by `period` characters is zero exactly
    # where a character equals the one `period` later, so each period is one pass in C, not a Python loop.
    data = text.encode("utf-32-le", errors="surrogatepass")
    whole = int.from_bytes(data, "little")
    for period in range(1, min(REPETITION_MAX_CHUNK, n // 4) + 1):
        equal_needed = max(REPETITION_MIN_CHARS, 4 * period) - period  # a run of k equal pairs spans k + period
        same = (whole ^ (whole >> (32 * period))).to_bytes(len(data), "little")[: 4 * (n - period)]
        zeros = b"\0" * (4 * equal_needed)
        at = same.find(zeros)
        while at != -1 and at % 4:  # zeros that begin inside a character's 4 bytes: look again from its end
            at = same.find(zeros, at + 4 - at % 4)
        if at != -1:
            start = end = at // 4
            while end < n - period and text[end] == text[end + period]:
                end += 1
            return start, text[start:start + period], end - start + period
    return None
