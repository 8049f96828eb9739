"""Hermes-style model text: `<think>` reasoning, `<tool_call>` JSON blocks, and the content around them.

`parse_assistant_text` turns raw generated text into content, reasoning and OpenAI `tool_calls`; it never raises on
bad model output: a block it cannot read stays in the text where it was (the content, or the reasoning when it was
written inside `<think>`) and is described in `flags`. `format_tool_calls` and
`format_assistant_text` write the same text back, exactly as `templates/hermes.jinja` renders an assistant turn.
`ThinkStreamSplitter` separates reasoning from content while text is still streaming.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_SNIPPET = 60  # characters of offending text quoted in a flag
# What an unreadable block seems to hold: its "name" string, and where its arguments begin.
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY = re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_DECODER = json.JSONDecoder()


class _MalformedCall(ValueError):
    """A `<tool_call>` block that does not hold a usable call; the message says why."""


@dataclass
class ParsedAssistant:
    content: str
    reasoning: str
    tool_calls: list[dict] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def to_message(self) -> dict:
        """The assistant message in mcpft's format (see docs/architecture.md): optional keys only when non-empty."""
        message = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.flags:
            message["flags"] = list(self.flags)
        return message


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id, `call_` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def make_tool_call(name: str, arguments: dict) -> dict:
    """An OpenAI tool call with a new id; `arguments` is stored as its JSON text."""
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def parse_assistant_text(text: str, think_opened: bool = False) -> ParsedAssistant:
    """Split generated text into content, reasoning and tool calls.

    `think_opened`: the prompt already opened `<think>` (so the text starts inside the reasoning). A `</think>` with no
    `<think>` before it is read the same way. `<tool_call>` blocks count wherever they are, also inside the reasoning.
    """
    reasoning, content, flags = split_think(text, think_opened)
    content_first_index = 1 + reasoning.count(CALL_OPEN)  # every `<tool_call>` starts one block
    reasoning, reasoning_calls, reasoning_flags = _extract_calls(reasoning, first_index=1)
    content, content_calls, content_flags = _extract_calls(content, first_index=content_first_index)
    return ParsedAssistant(content=content.strip(), reasoning=reasoning.strip(),
                           tool_calls=reasoning_calls + content_calls,
                           flags=flags + reasoning_flags + content_flags)


def split_think(text: str, think_opened: bool = False) -> tuple[str, str, list[str]]:
    """(reasoning, content, flags) of the text; tool call blocks are still in both parts."""
    open_at, close_at = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if think_opened and text.lstrip().startswith(THINK_OPEN):
        think_opened = False  # the model opened it again itself
    if think_opened or (close_at != -1 and (open_at == -1 or close_at < open_at)):
        if close_at == -1:
            return text, "", ["unterminated reasoning: the text ended before </think>"]
        return text[:close_at], text[close_at + len(THINK_CLOSE):], []
    if open_at == -1:
        return "", text, []
    body_at = open_at + len(THINK_OPEN)
    close_at = text.find(THINK_CLOSE, body_at)
    if close_at == -1:
        return text[body_at:], text[:open_at], ["unterminated reasoning: the text ended before </think>"]
    return text[body_at:close_at], text[:open_at] + text[close_at + len(THINK_CLOSE):], []


def _extract_calls(segment: str, first_index: int) -> tuple[str, list[dict], list[str]]:
    """(text without the readable blocks, calls, flags); unreadable blocks stay in the text where they were."""
    kept, calls, flags = [], [], []
    index = first_index
    for piece, body in _pieces(segment):
        if body is None:
            kept.append(piece)
            continue
        try:
            block_calls, trailing = _parse_call_body(body)
        except _MalformedCall as error:
            kept.append(piece)
            flags.append(f"malformed tool call {index}: {error}")
        else:
            calls.extend(block_calls)
            if trailing:
                flags.append(f"tool call {index}: ignored text after the JSON: {_quote(trailing)}")
        index += 1
    return "".join(kept), calls, flags


def unreadable_calls(content: str) -> tuple[str, list[dict], list[str]]:
    """The `<tool_call>` blocks `parse_assistant_text` left in its `content` because it could not read them, taken out
    as calls for an agent to answer, never to run: (content without them, calls, why each could not be read). A
    call holds what its block seems to hold (its "name" string, else ""; the text after "arguments": less a last
    closing brace, else the whole body), so that the model's history, rendered, shows the call as it wrote it.
    A readable block stays in the text (a server's, beside the calls it parsed itself)."""
    kept, calls, problems = [], [], []
    for piece, body in _pieces(content):
        problem = None if body is None else _why_unreadable(body)
        if problem is None:
            kept.append(piece)
        else:
            problems.append(f"it could not be read: {problem}")
            calls.append(_unreadable_call(body.strip()))
    return "".join(kept).strip(), calls, problems


def _why_unreadable(body: str) -> str | None:
    try:
        _parse_call_body(body)
    except _MalformedCall as error:
        return str(error)
    return None


def _pieces(segment: str) -> list[tuple[str, str | None]]:
    """The segment in order as (text, None) and (a `<tool_call>` block with its tags, its body) pieces."""
    pieces, position = [], 0
    while (start := segment.find(CALL_OPEN, position)) != -1:
        body_at = start + len(CALL_OPEN)
        body_end, block_end = _block_end(segment, body_at)
        pieces += [(segment[position:start], None), (segment[start:block_end], segment[body_at:body_end])]
        position = block_end
    return pieces + [(segment[position:], None)]


def _unreadable_call(body: str) -> dict:
    found = _NAME.search(body)
    name = found.group(1) if found else ""
    try:
        name = json.loads(f'"{name}"')  # the JSON escapes it may hold
    except json.JSONDecodeError:
        pass
    arguments_at = _ARGUMENTS_KEY.search(body)
    arguments = body[arguments_at.end():].rstrip() if arguments_at else body
    if arguments_at and arguments.endswith("}"):  # the block's own brace, which templates write after the arguments
        arguments = arguments[:-1].rstrip()
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _block_end(segment: str, body_at: int) -> tuple[int, int]:
    """(end of the block's body, end of the block): at `</tool_call>`, else at the next `<tool_call>` or the end."""
    close_at = segment.find(CALL_CLOSE, body_at)
    next_open = segment.find(CALL_OPEN, body_at)
    if close_at != -1 and (next_open == -1 or close_at < next_open):
        return close_at, close_at + len(CALL_CLOSE)
    end = next_open if next_open != -1 else len(segment)
    return end, end


def _parse_call_body(body: str) -> tuple[list[dict], str]:
    """The calls in one block (a JSON object, or a list of them) and any non-space text after the JSON."""
    stripped = body.strip()
    if not stripped:
        raise _MalformedCall("empty block")
    try:
        value, end = _DECODER.raw_decode(stripped)
    except json.JSONDecodeError as error:
        raise _MalformedCall(f"invalid JSON ({error.msg} at character {error.pos}) in {_quote(stripped)}") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _MalformedCall("an empty list holds no call")
    return [_call_from_json(item) for item in items], stripped[end:].strip()


def _call_from_json(item) -> dict:
    if not isinstance(item, dict):
        raise _MalformedCall(f"expected an object with \"name\" and \"arguments\", got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _MalformedCall(f"missing \"name\" in {_quote(json.dumps(item, ensure_ascii=False))}")
    arguments = item.get("arguments", item.get("parameters"))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise _MalformedCall(f"\"arguments\" of {name} is a string that is not JSON ({error.msg})") from None
    if not isinstance(arguments, dict):
        raise _MalformedCall(f"\"arguments\" of {name} must be an object, got {type(arguments).__name__}")
    return make_tool_call(name.strip(), arguments)


def _quote(text: str) -> str:
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…")


# ---------------------------------------------------------------------------------------------------------------
# Formatting (the inverse, matching templates/hermes.jinja)


def _arguments_text(call: dict, where: str) -> str:
    """The call's arguments as JSON object text: a JSON string as given (the template emits it verbatim)."""
    arguments = call.get("arguments", {})
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}.arguments: not JSON ({error.msg})") from None
        if isinstance(parsed, dict):
            return arguments
    raise ValueError(f"{where}.arguments: expected a JSON object or its text, got {arguments!r:.80}")


def format_tool_calls(tool_calls: list[dict]) -> str:
    """Hermes text of OpenAI (or flat `{name, arguments}`) tool calls: one `<tool_call>` block per call."""
    blocks = []
    for i, tool_call in enumerate(tool_calls):
        call = tool_call.get("function") or tool_call
        name = call.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool_calls[{i}].name: missing tool name")
        arguments = _arguments_text(call, f"tool_calls[{i}]")
        blocks.append(f'{CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n'
                      f"{CALL_CLOSE}")
    return "\n".join(blocks)


def format_assistant_text(content: str = "", reasoning: str = "", tool_calls: list[dict] | None = None) -> str:
    """An assistant turn's text as our template renders it (without `<|im_end|>`): think block, content, calls."""
    parts = []
    reasoning = (reasoning or "").strip("\n")
    if reasoning:
        parts.append(f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n")
    content = (content or "").strip("\n")
    parts.append(content)
    if tool_calls:
        parts.append(("\n" if content else "") + format_tool_calls(tool_calls))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


class _SectionStream:
    """One section (the reasoning or the content) streamed exactly as `parse_assistant_text` returns it: readable
    `<tool_call>` blocks left out, unreadable ones kept as text where they were, the whole section stripped (so
    leading whitespace is dropped and trailing whitespace is held until text follows it)."""

    def __init__(self):
        self._buffer = ""  # text not decided yet: an open `<tool_call>` block, or what may begin one
        self._in_block = False
        self._started = False  # some text was passed on: later whitespace is inside the section
        self._spaces = ""  # trailing whitespace, passed on only when more text follows

    def feed(self, text: str, final: bool = False) -> str:
        """The section's text this piece decides (`final`: the section ends here, nothing is held back)."""
        self._buffer += text
        out = []
        while self._buffer:
            if self._in_block:
                block_end = self._block_end(final)
                if block_end is None:
                    break
                block, self._buffer, self._in_block = self._buffer[:block_end], self._buffer[block_end:], False
                out.append("" if _readable_block(block) else block)
                continue
            start = self._buffer.find(CALL_OPEN)
            if start == -1:
                keep = 0 if final else _partial_tag_length(self._buffer, (CALL_OPEN,))
                out.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            out.append(self._buffer[:start])
            self._buffer, self._in_block = self._buffer[start:], True
        visible = self._visible("".join(out))
        if final:
            self._spaces = ""  # the section is stripped at its end
        return visible

    def _block_end(self, final: bool) -> int | None:
        """Where the block at the start of the buffer ends (as `_block_end` decides), None while undecided."""
        body_at = len(CALL_OPEN)
        close_at, next_open = self._buffer.find(CALL_CLOSE, body_at), self._buffer.find(CALL_OPEN, body_at)
        if close_at != -1 and (next_open == -1 or close_at < next_open):
            return close_at + len(CALL_CLOSE)
        if next_open != -1:
            return next_open
        return len(self._buffer) if final else None

    def _visible(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._spaces + text
        kept = text.rstrip()
        self._spaces = text[len(kept):]
        return kept


def _readable_block(block: str) -> bool:
    """Whether a `<tool_call>` block (its tags included) holds calls that `parse_assistant_text` takes out."""
    return _why_unreadable(block[len(CALL_OPEN):].removesuffix(CALL_CLOSE)) is None


def _partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could be the start of one of `tags`."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


class ThinkStreamSplitter:
    """Separates streamed text into ("reasoning", text) and ("content", text) pieces as deltas arrive.

    What it streams is what `parse_assistant_text` returns for the whole text: the same `<think>` split (only the
    first `<think>` ... `</think>` counts, later tags are text; a prompt-opened `<think>` is dropped when the model
    writes it again), readable `<tool_call>` blocks held back from both streams (the caller takes the calls from
    the whole text at the end), unreadable ones passed on as text once they end, each section stripped. A tag split
    across deltas is waited for.

    The one thing a stream cannot know in time: without `think_opened`, text before a bare `</think>` is reasoning,
    but it was passed on as content before the `</think>` came (anything of it still held back goes to reasoning).
    """

    _WATCH = {"before": (THINK_OPEN, THINK_CLOSE), "reasoning": (THINK_CLOSE,), "after": ()}

    def __init__(self, think_opened: bool = False):
        # "opening": the prompt opened <think>, unless the text starts with one; "before": content until a think
        # tag; "reasoning": until `</think>`; "after": content to the end, every tag there is text.
        self._state = "opening" if think_opened else "before"
        self._buffer = ""  # raw text that may be the start of a think tag
        self._sections = {"reasoning": _SectionStream(), "content": _SectionStream()}

    def feed(self, delta: str) -> list[tuple[str, str]]:
        """The pieces this delta completes, in order; same-kind neighbours are merged."""
        self._buffer += delta
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        """Whatever was held back (call once, when the stream ends)."""
        pieces = self._drain(final=True)
        for kind in ("reasoning", "content"):
            _append(pieces, kind, self._sections[kind].feed("", final=True))
        return pieces

    def _drain(self, final: bool) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        if self._state == "opening" and not self._leave_opening(final):
            return pieces
        while True:
            tags = self._WATCH[self._state]
            found = [(at, tag) for tag in tags if (at := self._buffer.find(tag)) != -1]
            if not found:
                keep = 0 if final else _partial_tag_length(self._buffer, tags)
                self._route(pieces, self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                return pieces
            at, tag = min(found)
            self._route(pieces, self._buffer[:at])
            self._buffer = self._buffer[at + len(tag):]
            self._on_tag(tag, pieces)

    def _leave_opening(self, final: bool) -> bool:
        """Decide whether the prompt's `<think>` holds (False: not known yet, wait for more text)."""
        text = self._buffer.lstrip()
        if text.startswith(THINK_OPEN):  # the model opened it again itself: that tag is no text
            self._buffer, self._state = text[len(THINK_OPEN):], "reasoning"
            return True
        if THINK_OPEN.startswith(text) and not final:
            return False
        self._state = "reasoning"
        return True

    def _on_tag(self, tag: str, pieces: list[tuple[str, str]]) -> None:
        if self._state == "before" and tag == THINK_OPEN:
            self._state = "reasoning"
            return
        if self._state == "before":  # a bare `</think>`: what came before it was reasoning
            self._sections = {"reasoning": self._sections["content"], "content": _SectionStream()}
        _append(pieces, "reasoning", self._sections["reasoning"].feed("", final=True))
        self._state = "after"

    def _route(self, pieces: list[tuple[str, str]], text: str) -> None:
        kind = "reasoning" if self._state == "reasoning" else "content"
        _append(pieces, kind, self._sections[kind].feed(text))


def _append(pieces: list[tuple[str, str]], kind: str, text: str) -> None:
    if not text:
        return
    if pieces and pieces[-1][0] == kind:
        pieces[-1] = (kind, pieces[-1][1] + text)
    else:
        pieces.append((kind, text))


# ---------------------------------------------------------------------------------------------------------------
# Where a Hermes reply is complete


def tool_calls_end(text: str) -> int | None:
    """Where a reply that made Hermes tool calls is complete: just after its last `</tool_call>`, once anything but
    whitespace or another `<tool_call>` follows it. None while the reply may still go on (no call closed yet, or
    only whitespace or the start of another call after it). Text inside reasoning does not count."""
    answer_from = text.rfind(THINK_CLOSE)
    end = text.rfind(CALL_CLOSE)
    if end == -1 or end < answer_from or text.rfind(THINK_OPEN) > answer_from:  # none, or still reasoning
        return None
    end += len(CALL_CLOSE)
    rest = text[end:].lstrip()
    if not rest or CALL_OPEN.startswith(rest) or rest.startswith(CALL_OPEN):
        return None
    return end
