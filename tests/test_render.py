"""Chat templates and rendering: the Trelis traces through both templates, and our trained-token mask against TRL's;
shared pieces tokenized once give exactly the whole text's ids and mask; stored message JSON is json.dumps's text."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mcpft.render
from mcpft.chat_template import ensure_tool_template, hermes_template, qwen3_template, renders_tools
from mcpft.dataset import unroll
from mcpft.hermes import format_assistant_text, parse_assistant_text
from mcpft.render import _BATCH, PieceEncoder, RenderError, assistant_blocks, render, render_many, render_text
from mcpft.store import message_bodies
from mcpft.trace import normalize_trace

# SmolLM2-135M-Instruct's own template (plain ChatML): it drops tools, tool calls and tool roles.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

MULTI_TURN_ROW = {
    "id": "multi-turn-1",
    "tools": json.dumps([{"type": "function", "function": {
        "name": "browser_navigate", "description": "Navigate to a URL",
        "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}}]),
    "messages": [
        {"role": "system", "content": "You are a browser agent."},
        {"role": "user", "content": "Open example.com"},
        {"role": "assistant", "content": "", "train": False, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "browser_navigate", "arguments": '{"url": "https://example.com"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "- Page Title: Example Domain"},
        {"role": "assistant", "content": "Opened.", "train": False},
        {"role": "user", "content": "What is the title?"},
        {"role": "assistant", "content": "Example Domain", "reasoning_content": "The snapshot shows it.",
         "train": True},
    ],
}


@pytest.fixture(scope="module")
def hermes_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def qwen3_tokenizer(tiny_qwen3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_dir)


def _trelis_row(path, untrained_steps: int = 0) -> dict:
    """A training row of a whole Trelis trace: arguments as JSON text, the first `untrained_steps` not trained."""
    trace = json.loads(path.read_text())
    messages, step = [], 0
    for message in trace["messages"]:
        message = dict(message)
        if message["role"] == "assistant":
            message["train"] = step >= untrained_steps
            step += 1
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _json_text(call["function"]["arguments"])}}
                for call in message.get("tool_calls") or []] or None
        messages.append({k: v for k, v in message.items() if v is not None})
    return {"id": path.stem, "messages": messages, "tools": json.dumps(trace["tools"])}


def _json_text(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


@pytest.fixture(scope="module")
def trelis_rows(trelis_dir) -> list[dict]:
    rows = [_trelis_row(path) for path in sorted(trelis_dir.glob("*.json"))]
    assert len(rows) == 3
    return rows


def _trl_masks(tokenizer, model_dir, rows, tmp_path) -> list[tuple[list[int], list[int]]]:
    """(input_ids, trained-token mask) per row as TRL's SFTTrainer prepares them with assistant_only_loss."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None, report_to="none",
                       use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                         args=config, train_dataset=datasets.Dataset.from_list(rows))
    return [(ex["input_ids"], [int(label != -100) for label in ex["labels"]]) for ex in trainer.train_dataset]


# ---------------------------------------------------------------------------------------------------------------
# Templates


@pytest.mark.parametrize("which", ["hermes", "qwen3"])
def test_templates_render_the_trelis_traces(which, trelis_rows, hermes_tokenizer, qwen3_tokenizer):
    tokenizer = {"hermes": hermes_tokenizer, "qwen3": qwen3_tokenizer}[which]
    for row in trelis_rows:
        tools, messages = json.loads(row["tools"]), row["messages"]
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        assert text.startswith("<|im_start|>system\n") and "<tools>" in text
        assert all(json.dumps(tool, ensure_ascii=False) in text for tool in tools)
        tool_messages = [m for m in messages if m["role"] == "tool"]
        assert text.count("<tool_response>") == len(tool_messages)
        assert all(m["content"] in text for m in tool_messages)

        assistants = [m for m in messages if m["role"] == "assistant"]
        bodies = [text[start:end] for start, end in assistant_blocks(text)]
        assert len(bodies) == len(assistants)
        for message, body in zip(assistants, bodies):
            assert body.endswith("<|im_end|>")
            parsed = parse_assistant_text(body.removesuffix("<|im_end|>"))
            assert parsed.flags == []
            assert parsed.reasoning == message["reasoning_content"].strip()
            assert parsed.content == message["content"].strip()
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
                (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
            if which == "hermes":  # our template writes exactly what the formatter writes
                assert body == format_assistant_text(message["content"], message["reasoning_content"],
                                                     message.get("tool_calls")) + "<|im_end|>"


def test_hermes_template_layout(hermes_tokenizer):
    row = MULTI_TURN_ROW
    text = hermes_tokenizer.apply_chat_template(row["messages"], tools=json.loads(row["tools"]), tokenize=False,
                                                add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a browser agent.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "browser_navigate", "arguments": '
            '{"url": "https://example.com"}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n- Page Title: Example Domain\n</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>assistant\n<think>\nThe snapshot shows it.\n</think>\n\nExample Domain"
                         "<|im_end|>\n<|im_start|>assistant\n")
    no_tools = hermes_tokenizer.apply_chat_template(row["messages"][1:2], tokenize=False)
    assert no_tools == "<|im_start|>user\nOpen example.com<|im_end|>\n"


def test_trl_accepts_our_template_for_assistant_only_loss(hermes_tokenizer):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
    from trl.chat_template_utils import supports_tool_calling

    assert has_generation_markers(hermes_tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(hermes_tokenizer)
    assert supports_tool_calling(hermes_tokenizer)


def test_qwen3_template_is_qwen3s_original():
    from trl.chat_template_utils import qwen3_chat_template

    assert qwen3_template() == qwen3_chat_template  # TRL keeps Qwen3's template byte for byte to recognise it
    assert "{% generation %}" not in qwen3_template() and "generation %}" in hermes_template()


@pytest.mark.parametrize("template, replaced", [
    (SMOLLM2_TEMPLATE, True),
    (None, True),
    ("{{ raise_exception('no tools here') }}", True),
    ("qwen3", False),
    ("hermes", False),
])
def test_ensure_tool_template(template, replaced, hermes_tokenizer):
    tokenizer = hermes_tokenizer.__class__.from_pretrained(hermes_tokenizer.name_or_path)
    tokenizer.chat_template = {"qwen3": qwen3_template(), "hermes": hermes_template()}.get(template, template)
    before = tokenizer.chat_template
    assert ensure_tool_template(tokenizer) is replaced
    assert renders_tools(tokenizer)
    assert tokenizer.chat_template == (hermes_template() if replaced else before)


# ---------------------------------------------------------------------------------------------------------------
# The trained-token mask


def test_train_mask_equals_trls(trelis_dir, trelis_rows, hermes_tokenizer, tiny_model_dir, tmp_path):
    first_path = sorted(trelis_dir.glob("*.json"))[0]
    rows = trelis_rows + [_trelis_row(first_path, untrained_steps=1), MULTI_TURN_ROW]
    ours = render_many(hermes_tokenizer, rows)
    theirs = _trl_masks(hermes_tokenizer, tiny_model_dir, rows, tmp_path)
    assert len(theirs) == len(rows)
    for row, mine, (input_ids, mask) in zip(rows, ours, theirs):
        assert mine.input_ids == input_ids, row["id"]
        assert mine.train_mask == mask, row["id"]
    # The row with its first step untrained really trains less than the whole trace.
    assert 0 < sum(ours[3].train_mask) < sum(ours[0].train_mask)


def test_masked_tokens_are_the_trained_assistant_turns(hermes_tokenizer):
    rendered = render(hermes_tokenizer, MULTI_TURN_ROW)
    trained = hermes_tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.train_mask) if m])
    assert trained == "<think>\nThe snapshot shows it.\n</think>\n\nExample Domain<|im_end|>"
    assert rendered.n_tokens == len(rendered.input_ids) == len(rendered.train_mask)
    assert rendered.text.count("Opened.") == 1 and not rendered.over_length


def test_qwen3_mask_matches_trls_training_template(trelis_rows, qwen3_tokenizer, tiny_qwen3_dir, tmp_path):
    """TRL swaps Qwen3's template for its training variant, which renders these rows (one query, reasoning on every
    step) identically and also trains the newline after each `<|im_end|>`; it ignores `train: false`, so rows with
    untrained steps must reach TRL pre-tokenized (input_ids + our mask) for Qwen3-template models."""
    ours = render_many(qwen3_tokenizer, trelis_rows)
    theirs = _trl_masks(qwen3_tokenizer, tiny_qwen3_dir, trelis_rows, tmp_path)
    newline = qwen3_tokenizer.convert_tokens_to_ids(qwen3_tokenizer.tokenize("\n"))
    end_of_turn = qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for mine, (input_ids, mask) in zip(ours, theirs):
        assert mine.input_ids == input_ids
        expected = list(mine.train_mask)
        for i in range(1, len(input_ids)):
            if mine.train_mask[i - 1] and input_ids[i - 1] == end_of_turn and [input_ids[i]] == newline:
                expected[i] = 1
        assert mask == expected


def test_untrained_step_is_masked_out_with_qwen3(trelis_dir, qwen3_tokenizer):
    path = sorted(trelis_dir.glob("*.json"))[0]
    full, partial = render_many(qwen3_tokenizer, [_trelis_row(path), _trelis_row(path, untrained_steps=1)])
    assert full.input_ids == partial.input_ids
    first_start, first_end = assistant_blocks(full.text)[0]
    first_block = qwen3_tokenizer.decode([t for t, a, b in zip(full.input_ids, full.train_mask, partial.train_mask)
                                          if a and not b])
    assert first_block == full.text[first_start:first_end]


def test_over_length_is_flagged_never_cut(hermes_tokenizer):
    n_tokens = render(hermes_tokenizer, MULTI_TURN_ROW).n_tokens
    fits = render(hermes_tokenizer, MULTI_TURN_ROW, max_length=n_tokens)
    over = render(hermes_tokenizer, MULTI_TURN_ROW, max_length=n_tokens - 1)
    assert not fits.over_length and over.over_length
    assert over.n_tokens == len(over.input_ids) == n_tokens


def test_render_many_matches_render(trelis_rows, hermes_tokenizer):
    rows = trelis_rows + [MULTI_TURN_ROW]
    assert render_many(hermes_tokenizer, rows, max_length=4096) == [render(hermes_tokenizer, r, 4096) for r in rows]


@pytest.mark.parametrize("change, problem", [
    ({"tools": "[{oops"}, "row 'multi-turn-1': 'tools' is not valid JSON"),
    ({"tools": '{"a": 1}'}, "row 'multi-turn-1': 'tools' must be a list"),
    ({"messages": []}, "row 'multi-turn-1': 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "say <|im_start|>assistant\nhi"},
                   {"role": "assistant", "content": "hi"}]}, "2 assistant blocks"),
])
def test_bad_rows_are_named(change, problem, hermes_tokenizer):
    with pytest.raises(RenderError, match=re.escape(problem)):
        render(hermes_tokenizer, {**MULTI_TURN_ROW, **change})


# ---------------------------------------------------------------------------------------------------------------
# Pieces between ChatML markers, tokenized once per render_many call


def _whole_text(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Reference: the whole text tokenized, each span trained from its first character's token to its last's."""
    encoding = tokenizer(text, add_special_tokens=False)
    mask = [0] * len(encoding["input_ids"])
    for start, end in spans:
        tokens = [t for t in (encoding.char_to_token(c) for c in range(start, end)) if t is not None]
        if tokens:
            mask[tokens[0]:tokens[-1] + 1] = [1] * (tokens[-1] + 1 - tokens[0])
    return encoding["input_ids"], mask


def _reference(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [_whole_text(tokenizer, *render_text(tokenizer, row)) for row in rows]


@pytest.fixture(scope="module")
def three_turn_rows(trelis_dir) -> list[dict]:
    """The three Trelis conversations as one three-turn trace, unrolled: rows that repeat each other's prefixes."""
    traces = [normalize_trace(json.loads(path.read_text())) for path in sorted(trelis_dir.glob("*.json"))]
    trace = traces[0]
    trace.id, trace.messages = "three-turns", [m for t in traces for m in t.messages]
    return unroll(trace) + unroll(trace, by_turn=False)


@pytest.mark.parametrize("which", ["hermes", "qwen3"])
def test_unrolled_rows_render_as_their_whole_texts(which, three_turn_rows, hermes_tokenizer, qwen3_tokenizer):
    tokenizer = {"hermes": hermes_tokenizer, "qwen3": qwen3_tokenizer}[which]
    assert PieceEncoder.for_tokenizer(tokenizer) is not None  # the piece path is the one under test
    rows = three_turn_rows + [MULTI_TURN_ROW]
    rendered = render_many(tokenizer, rows)
    assert [(r.input_ids, r.train_mask) for r in rendered] == _reference(tokenizer, rows)
    assert len(three_turn_rows) == 4 and all(0 < sum(r.train_mask) < r.n_tokens for r in rendered)


def test_many_batches_match_one_row_at_a_time(hermes_tokenizer, monkeypatch):
    monkeypatch.setattr(mcpft.render, "_CACHED_PIECES", 4)  # the second batch starts by forgetting pieces
    rows = [{**MULTI_TURN_ROW, "id": f"r{i}", "messages": [
        *MULTI_TURN_ROW["messages"][:5], {"role": "user", "content": f"What is the title of page {i}?"},
        MULTI_TURN_ROW["messages"][6]]} for i in range(_BATCH + 3)]
    assert render_many(hermes_tokenizer, rows, max_length=200) == [render(hermes_tokenizer, r, 200) for r in rows]
    assert render_many(hermes_tokenizer, []) == []
    with pytest.raises(RenderError, match="row 'late'"):  # a bad row in a later batch is named too
        render_many(hermes_tokenizer, rows + [{**MULTI_TURN_ROW, "id": "late", "messages": []}])


# Text around, inside and against the markers and the added tokens; spans anywhere (also inside a marker, or empty
# of tokens). One encoder for every example, so pieces seen whole before are later cut by a span, and the reverse.
_FRAGMENTS = ["<|im_start|>", "<|im_end|>", "assistant\n", "<tool_call>", "</think>", "<|im_", "|>", "\n", "\n\n",
              " ", "   ", "\t", "a", "Hello", " world", "{\"x\": 1}", "é", "😀", "\r\n", "[ref=e12]"]


@st.composite
def text_and_spans(draw):
    text = "".join(draw(st.lists(st.sampled_from(_FRAGMENTS), max_size=25)))
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=6)))
    return text, [(start, end) for start, end in zip(cuts[::2], cuts[1::2])]


@pytest.fixture(scope="module")
def piece_encoder(hermes_tokenizer):
    return PieceEncoder.for_tokenizer(hermes_tokenizer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(text_and_spans(), min_size=1, max_size=4))
def test_pieces_give_the_whole_texts_ids_and_mask(cases, hermes_tokenizer, piece_encoder):
    texts, spans = zip(*cases)
    assert piece_encoder.encode(texts, spans) == [_whole_text(hermes_tokenizer, *case) for case in cases]


def _edited_tokenizer(tiny_model_dir, tmp_path, edit):
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(folder)


def _end_of_turn_strips_whitespace(data):
    for token in data["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token["rstrip"] = True


def _prefix_on_the_first_piece_only(data):
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Metaspace", "replacement": "_", "prepend_scheme": "first", "split": False}, data["pre_tokenizer"]]}


@pytest.mark.parametrize("edit", [_end_of_turn_strips_whitespace, _prefix_on_the_first_piece_only])
def test_tokenizers_whose_pieces_interact_render_whole_texts(edit, tiny_model_dir, trelis_rows, tmp_path):
    tokenizer = _edited_tokenizer(tiny_model_dir, tmp_path, edit)
    assert PieceEncoder.for_tokenizer(tokenizer) is None
    rows = trelis_rows + [MULTI_TURN_ROW]
    assert [(r.input_ids, r.train_mask) for r in render_many(tokenizer, rows)] == _reference(tokenizer, rows)


# ---------------------------------------------------------------------------------------------------------------
# Stored message JSON (mcpft.store.message_bodies, made faster here): json.dumps's exact text, so content hashes of
# traces stored before stay valid.

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.dictionaries(st.text(max_size=12), _json_values, max_size=6), max_size=4))
@example(messages=[{"role": "tool", "content": "lone \ud800 surrogate", "quote": "\"\\\x00\x1f\x7f\u2028\ufeff"}])
@example(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
    "name": "browser_navigate", "arguments": '{"url": "https://example.com"}'}}], "flags": ["malformed"]}])
@example(messages=[{"nan": float("nan"), "big": 10**30, "tuple": (1, "a"), "keys": {1: "int key"}}])
def test_message_bodies_are_json_dumps_text(messages):
    assert message_bodies(messages) == [json.dumps(m, ensure_ascii=False) for m in messages]
