"""A training row as the model sees it: text, token ids and the mask of trained tokens.

The mask does not rely on `{% generation %}` markers, so it works with any ChatML template (ours, Qwen3's): the
rendered text's assistant blocks (`<|im_start|>assistant\\n` ... `<|im_end|>`) are matched in order to the row's
assistant messages, and the blocks of messages with `train` not false are trained from just after the header through
`<|im_end|>`. Characters become tokens the way transformers' `return_assistant_tokens_mask` does it (`char_to_token`
on a span's first and last character), so with our Hermes template the mask equals the one TRL trains on.
Nothing is ever cut: `over_length` says when a row is longer than `max_length`.

Speed: the rows of one trace repeat its prefix and its tool results, and a tokenizer splits its special tokens out
before anything else, so the text between two ChatML markers tokenizes the same alone as in the whole row. Each
distinct piece is tokenized once per `render_many` call and the pieces' ids are joined; offsets are computed only for
the pieces a trained span starts or ends inside. Tokenizers where that does not hold exactly (a marker that strips
whitespace, a pre-tokenizer that treats the text's start specially) are detected and tokenized whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import islice

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
_BATCH = 256  # rows tokenized per call: the Rust tokenizer parallelises within a batch
# Pieces kept tokenized (about three batches of rows): rows come trace by trace, so a piece rarely comes back after a
# batch (the system and tools turn does, and is tokenized again after each eviction). Bounds the cache to tens of MB.
_CACHED_PIECES = 4096
# A ChatML conversation that exercises the markers' neighbourhoods (whitespace on both sides, text right against
# them): a tokenizer whose pieces between markers tokenize differently alone fails to reproduce it piece by piece.
_PROBE = ("<|im_start|>system\nYou are a helper.<|im_end|>\n<|im_start|>user\n  Hi there \n<|im_end|>\n"
          "<|im_start|>assistant\n<think>\nok\n</think>\n\nDone<|im_end|>\n<|im_start|>assistant\n")


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
    """Render rows in batches (templates one by one, tokenization a batch at a time, shared pieces once)."""
    if not getattr(tokenizer, "is_fast", False):
        raise RenderError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed")
    encoder = PieceEncoder.for_tokenizer(tokenizer) or WholeTextEncoder(tokenizer)
    tools_by_json = {}  # the rows of a trace share their tools' JSON text: parsed once
    rendered = []
    for first in range(0, len(rows), _BATCH):
        texts, spans = _render_texts(tokenizer, rows[first:first + _BATCH], first, tools_by_json)
        rendered += _rendered(texts, encoder.encode(texts, spans), max_length)
    return rendered


def _render_texts(tokenizer, rows: list[dict], first: int, tools_by_json: dict):
    """The rows' texts and trained spans (`first`: the index of the first row, for error messages)."""
    return zip(*(render_text(tokenizer, row, _where(row, first + i), tools_by_json) for i, row in enumerate(rows)))


def _rendered(texts, encoded, max_length: int | None) -> list[Rendered]:
    return [Rendered(text=text, input_ids=input_ids, train_mask=mask, n_tokens=len(input_ids),
                     over_length=max_length is not None and len(input_ids) > max_length)
            for text, (input_ids, mask) in zip(texts, encoded)]


def render_text(tokenizer, row: dict, where: str = "row",
                tools_by_json: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The row's text and the character spans of its trained assistant messages (`tools_by_json`: parsed tools by
    their JSON text, shared by calls that render many rows)."""
    if not isinstance(row, dict):
        raise RenderError(f"{where}: expected a row object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RenderError(f"{where}: 'messages' must be a non-empty list")
    tools_json = row.get("tools")
    if tools_by_json is not None and isinstance(tools_json, str):
        if tools_json not in tools_by_json:
            tools_by_json[tools_json] = row_tools(row, where)
        tools = tools_by_json[tools_json]
    else:
        tools = row_tools(row, where)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
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


class WholeTextEncoder:
    """Tokenizes each row's whole text; the mask from the offsets (`char_to_token`)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def encode(self, texts, spans) -> list[tuple[list[int], list[int]]]:
        encoded = self._tokenizer(list(texts), add_special_tokens=False)
        return [(ids, _token_mask(encoding, len(ids), row_spans))
                for ids, encoding, row_spans in zip(encoded["input_ids"], encoded.encodings, spans)]


class PieceEncoder:
    """Tokenizes each distinct piece between ChatML markers once and joins the pieces' ids per row.

    Gives the ids and mask of `WholeTextEncoder` exactly (`for_tokenizer` checks that it can). A piece outside every
    trained span, or inside one short of its end, needs no offsets; only the pieces a span starts or ends in (in
    practice the trained assistant turns, short next to tool results) are tokenized with offsets."""

    def __init__(self, backend, marker_ids: dict[str, int]):
        self._backend = backend
        self._marker_ids = marker_ids
        self._split = re.compile("(" + "|".join(map(re.escape, marker_ids)) + ")").split
        self._ids: dict[str, list[int]] = {}  # piece text -> its token ids
        self._encodings: dict = {}  # piece text -> its Encoding (offsets), for pieces a span starts or ends inside

    @classmethod
    def for_tokenizer(cls, tokenizer) -> PieceEncoder | None:
        """An encoder for this tokenizer, or None when its pieces between markers do not tokenize independently."""
        marker_ids = _independent_markers(tokenizer)
        if marker_ids is None:
            return None
        encoder = cls(tokenizer.backend_tokenizer, marker_ids)
        probe_spans = [assistant_blocks(_PROBE)]
        same = encoder.encode([_PROBE], probe_spans) == WholeTextEncoder(tokenizer).encode([_PROBE], probe_spans)
        return encoder if same else None

    def encode(self, texts, spans) -> list[tuple[list[int], list[int]]]:
        if len(self._ids) > _CACHED_PIECES:  # forget the older half (a piece with offsets has its ids too)
            for piece in list(islice(self._ids, len(self._ids) - _CACHED_PIECES // 2)):
                del self._ids[piece]
                self._encodings.pop(piece, None)
        rows = [self._pieces(text) for text in texts]
        self._tokenize_new(rows, spans)
        return [self._assemble(pieces, row_spans) for pieces, row_spans in zip(rows, spans)]

    def _pieces(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, text) of every piece: the markers and the non-empty text between them, in order."""
        pieces, position = [], 0
        for piece in self._split(text):
            if piece:
                pieces.append((position, position + len(piece), piece))
                position += len(piece)
        return pieces

    def _tokenize_new(self, rows, spans):
        """Tokenize, in two batches, the pieces not seen before: with offsets those a span starts or ends in."""
        plain, with_offsets = {}, {}
        for pieces, row_spans in zip(rows, spans):
            for start, end, piece in pieces:
                if piece in self._marker_ids:
                    continue
                if any(_needs_offsets(start, end, s, e) for s, e in row_spans):
                    if piece not in self._encodings:
                        with_offsets[piece] = None
                elif piece not in self._ids:
                    plain[piece] = None
        if with_offsets:
            encodings = self._backend.encode_batch(list(with_offsets), add_special_tokens=False)
            for piece, encoding in zip(with_offsets, encodings):
                self._encodings[piece] = encoding
                self._ids[piece] = encoding.ids
        plain = [piece for piece in plain if piece not in self._ids]
        if plain:
            for piece, encoding in zip(plain, self._backend.encode_batch_fast(plain, add_special_tokens=False)):
                self._ids[piece] = encoding.ids

    def _assemble(self, pieces, row_spans) -> tuple[list[int], list[int]]:
        input_ids, placed = [], []  # placed: (start, end, text, index of its first token, number of tokens)
        for start, end, piece in pieces:
            ids = [self._marker_ids[piece]] if piece in self._marker_ids else self._ids[piece]
            placed.append((start, end, piece, len(input_ids), len(ids)))
            input_ids += ids
        mask = [0] * len(input_ids)
        for s, e in row_spans:
            inside = [p for p in placed if p[0] < e and s < p[1] and p[4]]  # overlapping pieces that have tokens
            first = self._edge_token(inside, s, e, first=True)
            if first is None:
                continue  # the span holds no token (an empty span)
            last = self._edge_token(reversed(inside), s, e, first=False)
            mask[first:last + 1] = [1] * (last + 1 - first)
        return input_ids, mask

    def _edge_token(self, inside, s: int, e: int, first: bool) -> int | None:
        """The row-level index of the span's first (or, walking the pieces backwards, last) token."""
        for start, end, piece, base, count in inside:
            if piece in self._marker_ids:
                return base
            if s <= start and end <= e and (first or end < e):
                # The first character of a piece wholly in the span is in its first token. The last character is
                # in its last token only when a multi-token character there (é in byte tokens) is not the span's
                # last one: char_to_token gives a character's first token.
                return base if first else base + count - 1
            local = range(max(s, start) - start, min(e, end) - start)
            token = _first_token(self._encodings[piece], local if first else reversed(local))
            if token is not None:
                return base + token
        return None


def _needs_offsets(start: int, end: int, s: int, e: int) -> bool:
    """Whether the span [s, e) starts inside the piece [start, end), or ends inside it or at its end."""
    return start < s < end or start < e <= end


def _independent_markers(tokenizer) -> dict[str, int] | None:
    """The ChatML markers' ids when both are added tokens matched as they are (no stripping, no word boundary, not
    normalised) that no other added token overlaps; else None."""
    added = {token.content: (token_id, token) for token_id, token in tokenizer.added_tokens_decoder.items()}
    marker_ids = {}
    for marker in CHATML_MARKERS:
        if marker not in added:
            return None
        token_id, token = added[marker]
        if token.lstrip or token.rstrip or token.single_word or token.normalized:
            return None
        marker_ids[marker] = token_id
    if any(_overlaps(other, marker) for other in added if other not in marker_ids for marker in marker_ids):
        return None
    return marker_ids


def _overlaps(other: str, marker: str) -> bool:
    """Whether a match of `other` could cover part of `marker` (so splitting at the marker could change it)."""
    return marker in other or any(
        other.endswith(marker[:k]) or other.startswith(marker[-k:]) for k in range(1, len(marker)))


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


def _first_token(encoding, characters) -> int | None:
    """The token of the first character in `characters` that belongs to a token (normalizers may drop some)."""
    for char in characters:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _where(row: dict, index: int) -> str:
    return f"row {row.get('id')!r}" if isinstance(row, dict) and row.get("id") is not None else f"row {index}"
