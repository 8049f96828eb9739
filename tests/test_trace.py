"""The trace format: normalisation on the way in, validation flags (never fixes)."""

import json

import pytest

from mcpft.trace import TraceError, normalize_message, normalize_trace, validate

TOOLS = [{"type": "function", "function": {"name": "browser_navigate", "description": "", "parameters": {}}}]


def call(call_id, name="browser_navigate", arguments='{"url": "https://a.test"}'):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def codes(messages):
    return [(f["code"], f["index"]) for f in validate([normalize_message(m) for m in messages], TOOLS)]


def test_arguments_object_becomes_canonical_json_string():
    m = normalize_message({"role": "assistant", "content": None,
                           "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {"b": 1, "a": "é"}}}]})
    assert m["tool_calls"][0]["function"]["arguments"] == '{"a": "é", "b": 1}'
    assert m["tool_calls"][0]["type"] == "function"
    assert m["content"] == ""


def test_reasoning_is_accepted_as_reasoning_content():
    m = normalize_message({"role": "assistant", "content": "x", "reasoning": "because"})
    assert m == {"role": "assistant", "content": "x", "reasoning_content": "because"}


def test_content_parts_are_joined():
    m = normalize_message({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
    assert m["content"] == "a\nb"


@pytest.mark.parametrize("raw, where", [
    ({"role": "robot", "content": "x"}, "messages[0].role"),
    ({"role": "user"}, "messages[0].content"),
    ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, "messages[0].tool_calls[0].id"),
    ({"role": "assistant", "tool_calls": [{"id": "a", "function": {}}]}, "messages[0].tool_calls[0].function.name"),
    ({"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": 3}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "user", "content": 5}, "messages[0].content"),
])
def test_bad_messages_name_the_field(raw, where):
    with pytest.raises(TraceError) as e:
        normalize_trace({"messages": [raw]})
    assert e.value.where == where
    assert str(e.value).startswith(where)


def test_trace_level_errors():
    with pytest.raises(TraceError, match="^messages: missing field"):
        normalize_trace({"model": "m"})
    with pytest.raises(TraceError, match="^trace: expected a JSON object"):
        normalize_trace([1, 2])
    with pytest.raises(TraceError, match="^messages: empty"):
        normalize_trace({"messages": []})


def test_trelis_timestamp_and_secret_settings():
    t = normalize_trace({"timestamp": "20250529_113358", "messages": [{"role": "user", "content": "hi"}],
                         "settings": {"temperature": 0.6, "api_key": "sk-secret", "HF_TOKEN": "hf_x"}})
    assert t.created == "2025-05-29T11:33:58Z"
    assert t.settings == {"temperature": 0.6}
    assert "secret" not in json.dumps(t.to_dict())


def test_a_clean_conversation_has_no_flags():
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call("a")]},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"},
                  {"role": "assistant", "content": "done"}]) == []


def test_flags():
    # An assistant message that lost its tool_calls while the result that answered it remains.
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "content": "\n\n"},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"}, {"role": "assistant", "content": "x"}]) \
        == [("empty_assistant", 1), ("orphan_tool_result", 2)]
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call("a"), call("b")]},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"}, {"role": "assistant", "content": "x"}]) \
        == [("unanswered_call", 1)]
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call("a", arguments="{oops")]},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"}, {"role": "assistant", "content": "x"}]) \
        == [("invalid_arguments", 1)]
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call("a", name="rm_rf")]},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"}, {"role": "assistant", "content": "x"}]) \
        == [("unknown_tool", 1)]
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call("a")]},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"}]) == [("no_final_assistant", 2)]
    assert codes([{"role": "user", "content": "go"}, {"role": "assistant", "content": "x", "flags": ["bad call"]}]) \
        == [("malformed_output", 1)]


def test_trelis_traces_normalise_and_validate_clean(trelis_dir):
    for path in sorted(trelis_dir.glob("*.json")):
        raw = json.loads(path.read_text())
        trace = normalize_trace(raw)
        assert validate(trace.messages, trace.tools) == [], path.name
        assert len(trace.tools) == 25
        for m in trace.messages:
            for c in m.get("tool_calls", []):
                assert isinstance(json.loads(c["function"]["arguments"]), dict)
