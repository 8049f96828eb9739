"""The trace format: normalisation on the way in, validation flags (never fixes)."""

import json

import pytest

from mcpft.trace import (
    CUT_SHORT, TraceError, cut_short, cut_short_flag, is_secret_key, normalize_message, normalize_trace, scrub_url,
    validate)

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


def test_inline_think_becomes_reasoning_content():
    m = normalize_message({"role": "assistant", "content": "\n<think>\nfind the page\n</think>\n\nIt costs $5."})
    assert m == {"role": "assistant", "content": "It costs $5.", "reasoning_content": "find the page"}
    empty = normalize_message({"role": "assistant", "content": "<think>\n\n</think>\n\nDone."})
    assert empty == {"role": "assistant", "content": "Done."}


@pytest.mark.parametrize("content", [
    "Write <think> tags around your notes.",  # a tag inside the answer is text
    "<think>never closed",  # unterminated: kept as it came, the validation can say so
])
def test_content_without_a_leading_closed_think_block_is_kept(content):
    m = normalize_message({"role": "assistant", "content": content})
    assert m == {"role": "assistant", "content": content}


def test_reasoning_field_wins_over_inline_think():
    m = normalize_message({"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "r"})
    assert m == {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "r"}


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
    ({"role": "assistant", "content": "x", "flags": 5}, "messages[0].flags"),
    ({"role": "assistant", "content": "x", "flags": ["ok", {"no": 1}]}, "messages[0].flags[1]"),
    ({"role": "tool", "tool_call_id": "a", "content": "x", "structured_content": [1]}, "messages[0].structured_content"),
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


@pytest.mark.parametrize("field, value", [("timestamp", 1e20), ("created", float("nan")), ("timestamp", -1e300)])
def test_out_of_range_times_name_their_field(field, value):
    with pytest.raises(TraceError) as e:
        normalize_trace({field: value, "messages": [{"role": "user", "content": "hi"}]})
    assert (e.value.where, e.value.problem) == (field, f"unix time {value!r} is out of range")


def test_trelis_timestamp_and_secret_settings():
    t = normalize_trace({"timestamp": "20250529_113358", "messages": [{"role": "user", "content": "hi"}],
                         "settings": {"temperature": 0.6, "api_key": "sk-secret", "HF_TOKEN": "hf_x"}})
    assert t.created == "2025-05-29T11:33:58Z"
    assert t.settings == {"temperature": 0.6}
    assert "secret" not in json.dumps(t.to_dict())


# What an OpenAI-SDK style recorder may write: credentials at every depth, in several spellings, and in URLs.
NESTED_SECRETS = {
    "temperature": 0.6, "max_tokens": 2048, "max_completion_tokens": 512, "tokenizer": "Qwen/Qwen3-8B",
    "apiKey": "sk-live-1",
    "client": {"timeout": 30, "api_key": "sk-live-2", "default_headers": {
        "Authorization": "Bearer sk-live-3", "X-Api-Key": "sk-live-4", "User-Agent": "recorder/1.0"}},
    "extra_body": {"chat_template_kwargs": {"enable_thinking": True}},
    "mcp_servers": [{"name": "playwright", "env": {"GITHUB_TOKEN": "ghp-live-5", "DISPLAY": ":0"},
                     "url": "https://bot:pa55w0rd-live-6@mcp.example.com/sse?access_token=live-7&region=eu"}],
    "proxy": {"password": "live-8", "host": "proxy.local"},
}


def test_secrets_are_scrubbed_at_every_depth_and_from_urls():
    t = normalize_trace({"messages": [{"role": "user", "content": "hi"}], "settings": NESTED_SECRETS,
                         "base_url": "https://user:live-9@api.example.com/v1?api_key=live-10&key=live-11&deployment=a"})
    assert "live" not in json.dumps(t.to_dict())
    assert t.base_url == "https://api.example.com/v1?deployment=a"
    assert t.settings == {
        "temperature": 0.6, "max_tokens": 2048, "max_completion_tokens": 512, "tokenizer": "Qwen/Qwen3-8B",
        "client": {"timeout": 30, "default_headers": {"User-Agent": "recorder/1.0"}},
        "extra_body": {"chat_template_kwargs": {"enable_thinking": True}},
        "mcp_servers": [{"name": "playwright", "env": {"DISPLAY": ":0"},
                         "url": "https://mcp.example.com/sse?region=eu"}],
        "proxy": {"host": "proxy.local"},
    }


@pytest.mark.parametrize("key, secret", [
    ("api_key", True), ("apiKey", True), ("APIKey", True), ("x-api-key", True), ("OPENAI_API_KEY", True),
    ("HF_TOKEN", True), ("HFToken", True), ("access_token", True), ("Authorization", True), ("client_secret", True),
    ("db_password", True), ("Cookie", True), ("key", True),
    ("max_tokens", False), ("tokenizer", False), ("keyword", False), ("author", False), ("temperature", False),
])
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_scrub_url_keeps_urls_without_credentials_as_they_are():
    assert scrub_url("http://127.0.0.1:8000/v1?x=a%20b") == "http://127.0.0.1:8000/v1?x=a%20b"
    assert scrub_url("http://u:p@[::1/v1?key=k") == "http://[::1/v1"  # unparseable: credentials still go


def test_tool_messages_keep_structured_content():
    structured = {"title": "Trelis", "links": [{"href": "/a"}], "count": 2}
    m = normalize_message({"role": "tool", "tool_call_id": "a", "content": "Trelis (2 links)",
                           "structured_content": structured})
    assert m == {"role": "tool", "tool_call_id": "a", "content": "Trelis (2 links)", "structured_content": structured}
    assert "structured_content" not in normalize_message({"role": "tool", "tool_call_id": "a", "content": "x",
                                                          "structured_content": None})


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


def test_an_answer_cut_short_is_flagged_with_its_own_code():
    for code in CUT_SHORT:
        flag = cut_short_flag(code, "what happened")
        answer = {"role": "assistant", "content": "The answer is", "flags": [flag]}
        assert codes([{"role": "user", "content": "go"}, answer]) == [(code, 1)]
        assert cut_short(normalize_message(answer)) == (code, flag)
    assert cut_short({"role": "assistant", "content": "x", "flags": ["malformed tool call 1: bad; kept as text"]}) \
        is None
    assert cut_short({"role": "assistant", "content": "x"}) is None
    with pytest.raises(ValueError, match="unknown cut-short code 'late'"):
        cut_short_flag("late", "x")


def test_trelis_traces_normalise_and_validate_clean(trelis_dir):
    for path in sorted(trelis_dir.glob("*.json")):
        raw = json.loads(path.read_text())
        trace = normalize_trace(raw)
        assert validate(trace.messages, trace.tools) == [], path.name
        assert len(trace.tools) == 25
        for m in trace.messages:
            for c in m.get("tool_calls", []):
                assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_a_lone_surrogate_is_named_not_stored():
    with pytest.raises(TraceError, match=r"messages\[1\]\.content: text that is not valid Unicode"):
        normalize_trace(json.loads('{"messages": [{"role": "user", "content": "hi"}, '
                                   '{"role": "assistant", "content": "ab\\ud800"}]}'))
