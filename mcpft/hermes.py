"""Hermes-style model text: `<think>` reasoning, `<tool_call>` JSON blocks, and the content around them.

`parse_assistant_text` turns raw generated text into content, reasoning and OpenAI `tool_calls`; it never raises on
bad model output: a block it cannot read stays in the text where it was (the content, or the reasoning when it was
written inside `<think>`) and is described in `flags`. `format_tool_calls` and
`format_assistant_text` write the same text back, exactly as `templates/hermes.jinja` renders an assistant turn.
`ThinkStreamSplitter` separates reasoning from content while text is still streaming.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_SNIPPET = 60  # characters of offending text quoted in a flag
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
    reasoning, content, flags = _split_think(text, think_opened)
    content_first_index = 1 + reasoning.count(CALL_OPEN)  # every `<tool_call>` starts one block
    reasoning, reasoning_calls, reasoning_flags = _extract_calls(reasoning, first_index=1)
    content, content_calls, content_flags = _extract_calls(content, first_index=content_first_index)
    return ParsedAssistant(content=content.strip(), reasoning=reasoning.strip(),
                           tool_calls=reasoning_calls + content_calls,
                           flags=flags + reasoning_flags + content_flags)


def _split_think(text: str, think_opened: bool) -> tuple[str, str, list[str]]:
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
    position, index = 0, first_index
    while (start := segment.find(CALL_OPEN, position)) != -1:
        kept.append(segment[position:start])
        body_at = start + len(CALL_OPEN)
        body_end, block_end = _block_end(segment, body_at)
        try:
            block_calls, trailing = _parse_call_body(segment[body_at:body_end])
        except _MalformedCall as error:
            kept.append(segment[start:block_end])
            flags.append(f"malformed tool call {index}: {error}; kept as text")
        else:
            calls.extend(block_calls)
            if trailing:
                flags.append(f"tool call {index}: ignored text after the JSON: {_quote(trailing)}")
        position, index = block_end, index + 1
    kept.append(segment[position:])
    return "".join(kept), calls, flags


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


class ThinkStreamSplitter:
    """Separates streamed text into ("reasoning", text) and ("content", text) pieces as deltas arrive.

    `<tool_call>` blocks are held back from both streams (the caller parses the whole text at the end), as are the
    tags themselves; whitespace at the start of a section is dropped. A tag split across deltas is waited for.
    """

    _TAGS = {
        "content": (THINK_OPEN, THINK_CLOSE, CALL_OPEN),
        "reasoning": (THINK_CLOSE, CALL_OPEN),
        "tool_call": (CALL_CLOSE, CALL_OPEN),
    }

    def __init__(self, think_opened: bool = False):
        self._mode = "reasoning" if think_opened else "content"
        self._outer = self._mode  # the section a tool call block returns to
        self._buffer = ""
        self._at_section_start = True

    def feed(self, delta: str) -> list[tuple[str, str]]:
        """The pieces this delta completes, in order; same-kind neighbours are merged."""
        self._buffer += delta
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        """Whatever was held back waiting for a possible tag (call once, when the stream ends)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        while True:
            found = [(at, tag) for tag in self._TAGS[self._mode] if (at := self._buffer.find(tag)) != -1]
            if not found:
                keep = 0 if final else self._partial_tag_length()
                self._emit(pieces, self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                return pieces
            at, tag = min(found)
            self._emit(pieces, self._buffer[:at])
            self._buffer = self._buffer[at + len(tag):]
            self._switch(tag)

    def _switch(self, tag: str) -> None:
        if tag == CALL_OPEN:
            if self._mode != "tool_call":
                self._outer = self._mode
            self._mode = "tool_call"
        elif tag == CALL_CLOSE:
            self._mode = self._outer
        elif tag == THINK_OPEN:
            self._mode = self._outer = "reasoning"
        elif tag == THINK_CLOSE:  # also a bare `</think>` in content: the tag is dropped
            self._mode = self._outer = "content"
        self._at_section_start = True

    def _partial_tag_length(self) -> int:
        """Length of the longest buffer suffix that could be the start of a tag this mode watches for."""
        longest = 0
        for tag in self._TAGS[self._mode]:
            for size in range(min(len(tag) - 1, len(self._buffer)), longest, -1):
                if self._buffer.endswith(tag[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, pieces: list[tuple[str, str]], text: str) -> None:
        if self._mode == "tool_call":
            return
        if self._at_section_start:
            text = text.lstrip()
        if not text:
            return
        self._at_section_start = False
        if pieces and pieces[-1][0] == self._mode:
            pieces[-1] = (self._mode, pieces[-1][1] + text)
        else:
            pieces.append((self._mode, text))
