"""A training row as the model sees it: text, token ids and the mask of trained tokens.

The mask does not rely on `{% generation %}` markers, so it works with any ChatML template (ours, Qwen3's): the
rendered text's assistant blocks (`<|im_start|>assistant\\n` ... `<|im_end|>`) are matched in order to the row's
assistant messages, and the blocks of messages with `train` not false are trained from just after the header through
`<|im_end|>`. Characters become tokens the way transformers' `return_assistant_tokens_mask` does it (`char_to_token`
on a span's first and last character), so with our Hermes template the mask equals the one TRL trains on.
Nothing is ever cut: `over_length` says when a row is longer than `max_length`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
_BATCH = 256  # rows tokenized per call: the Rust tokenizer parallelises within a batch


class RenderError(ValueError):
    """A row that cannot be rendered with this tokenizer; the message names the row and the problem."""


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    train_mask: list[int]  # 1 = the token is trained
    n_tokens: int
    over_length: bool


def render(tokenizer, row: dict, max_length: int | None = None) -> Rendered:
    """Render one training row (see docs/architecture.md) with the tokenizer's chat template."""
    return render_many(tokenizer, [row], max_length)[0]


def render_many(tokenizer, rows: list[dict], max_length: int | None = None) -> list[Rendered]:
    """Render rows in batches (templates one by one, tokenization a batch at a time)."""
    if not getattr(tokenizer, "is_fast", False):
        raise RenderError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed")
    rendered = []
    for first in range(0, len(rows), _BATCH):
        batch = rows[first:first + _BATCH]
        texts, spans = zip(*(render_text(tokenizer, row, where=_where(row, first + i)) for i, row in enumerate(batch)))
        encoded = tokenizer(list(texts), add_special_tokens=False)
        for i, (text, row_spans) in enumerate(zip(texts, spans)):
            input_ids = encoded["input_ids"][i]
            mask = _token_mask(encoded.encodings[i], len(input_ids), row_spans)
            rendered.append(Rendered(text=text, input_ids=input_ids, train_mask=mask, n_tokens=len(input_ids),
                                     over_length=max_length is not None and len(input_ids) > max_length))
    return rendered


def render_text(tokenizer, row: dict, where: str = "row") -> tuple[str, list[tuple[int, int]]]:
    """The row's text and the character spans of its trained assistant messages."""
    if not isinstance(row, dict):
        raise RenderError(f"{where}: expected a row object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RenderError(f"{where}: 'messages' must be a non-empty list")
    text = tokenizer.apply_chat_template(messages, tools=row_tools(row, where), tokenize=False)
    blocks = assistant_blocks(text)
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if len(blocks) != len(assistants):
        raise RenderError(
            f"{where}: the rendered text has {len(blocks)} assistant blocks ({ASSISTANT_HEADER!r} ... {END_OF_TURN!r}) "
            f"for {len(assistants)} assistant messages; the chat template is not ChatML, or a message's text "
            f"contains {ASSISTANT_HEADER!r}")
    return text, [span for span, message in zip(blocks, assistants) if message.get("train") is not False]


def row_tools(row: dict, where: str = "row") -> list[dict] | None:
    """The row's tools as a list (rows store them as a JSON string), or None when it has none."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as error:
            raise RenderError(f"{where}: 'tools' is not valid JSON ({error.msg} at character {error.pos})") from None
    if tools is not None and not isinstance(tools, list):
        raise RenderError(f"{where}: 'tools' must be a list of tool objects, got {type(tools).__name__}")
    return tools or None


def assistant_blocks(text: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn's body: after its header, through its `<|im_end|>` (or the end)."""
    spans, position = [], 0
    while (header_at := text.find(ASSISTANT_HEADER, position)) != -1:
        start = header_at + len(ASSISTANT_HEADER)
        end_at = text.find(END_OF_TURN, start)
        end = len(text) if end_at == -1 else end_at + len(END_OF_TURN)
        spans.append((start, end))
        position = end
    return spans


def _token_mask(encoding, n_tokens: int, spans: list[tuple[int, int]]) -> list[int]:
    """Tokens from the one holding a span's first character to the one holding its last, for every span."""
    mask = [0] * n_tokens
    for start, end in spans:
        first = _first_token(encoding, range(start, end))
        last = _first_token(encoding, range(end - 1, start - 1, -1))
        if first is None:
            continue  # the span holds no token (an empty span)
        mask[first:last + 1] = [1] * (last + 1 - first)
    return mask


def _first_token(encoding, characters: range) -> int | None:
    """The token of the first character in `characters` that belongs to a token (normalizers may drop some)."""
    for char in characters:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _where(row: dict, index: int) -> str:
    return f"row {row.get('id')!r}" if isinstance(row, dict) and row.get("id") is not None else f"row {index}"
