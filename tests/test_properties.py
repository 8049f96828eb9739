"""Property tests over generated conversations: import, validate and unroll keep their promises for any shape."""

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcpft.dataset import unroll
from mcpft.ingest import import_paths
from mcpft.store import Store
from mcpft.trace import normalize_trace, validate

TOOL_NAMES = ["nav", "click", "type"]
TOOLS = [{"type": "function", "function": {"name": n, "description": "", "parameters": {}}} for n in TOOL_NAMES]
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
answer_text = text.filter(lambda s: re.search(r"\w", s))  # an answer with no word in it is flagged no_answer
arguments = st.dictionaries(st.sampled_from(["url", "ref", "text"]), text, max_size=3)


@st.composite
def step(draw, call_counter):
    """One assistant step: a final answer, or calls (object or string arguments) each answered by a tool result."""
    reasoning = draw(st.one_of(st.none(), text))
    if draw(st.booleans()):
        message = {"role": "assistant", "content": draw(answer_text)}
        if reasoning:
            message["reasoning"] = reasoning  # the other spelling, accepted on import
        return [message]
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        call_counter.append(1)
        args = draw(arguments)
        calls.append({"id": f"call{len(call_counter)}", "type": "function", "function": {
            "name": draw(st.sampled_from(TOOL_NAMES)),
            "arguments": args if draw(st.booleans()) else json.dumps(args)}})
    message = {"role": "assistant", "content": draw(st.sampled_from([None, "", "\n\n"])), "tool_calls": calls}
    if reasoning:
        message["reasoning_content"] = reasoning
    results = [{"role": "tool", "tool_call_id": c["id"], "content": draw(text)} for c in calls]
    return [message, *results]


@st.composite
def conversation(draw):
    counter = []
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(text)})
        for _ in range(draw(st.integers(0, 2))):
            messages += draw(step(counter))
        messages.append({"role": "assistant", "content": "final"})
    return {"model": "gen", "messages": messages, "tools": TOOLS}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation())
def test_well_formed_conversations_import_clean_and_round_trip(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("gen")
    (folder / "c.json").write_text(json.dumps(raw))
    with Store(folder / "db.sqlite") as store:
        report = import_paths(store, [folder / "c.json"])
        assert (len(report.imported), report.flagged, report.rejected) == (1, [], [])
        stored = store.get(report.imported[0])
        assert stored.messages == normalize_trace(raw).messages
        assert len(stored.messages) == len(raw["messages"])
        assert store.original(stored.id) == raw


@settings(max_examples=100, deadline=None)
@given(conversation(), st.data())
def test_dropping_a_tool_result_or_the_calls_is_always_flagged(raw, data):
    trace = normalize_trace(raw)
    tool_indices = [i for i, m in enumerate(trace.messages) if m["role"] == "tool"]
    assert validate(trace.messages, trace.tools) == []
    if not tool_indices:
        return
    i = data.draw(st.sampled_from(tool_indices))
    without_result = trace.messages[:i] + trace.messages[i + 1:]
    assert "unanswered_call" in {f["code"] for f in validate(without_result, trace.tools)}
    caller = max(j for j in range(i) if trace.messages[j].get("tool_calls"))
    lost_calls = [dict(m) for m in trace.messages]
    del lost_calls[caller]["tool_calls"]
    assert "orphan_tool_result" in {f["code"] for f in validate(lost_calls, trace.tools)}


def strip_row_keys(message):
    return {k: v for k, v in message.items() if k not in ("train", "reasoning_content")}


@settings(max_examples=100, deadline=None)
@given(conversation())
def test_unroll_rows_are_prefixes_that_train_exactly_their_turn(raw):
    trace = normalize_trace(raw)
    trace.id = "g"
    rows = unroll(trace)
    users = [i for i, m in enumerate(trace.messages) if m["role"] == "user"]
    assert len(rows) == len(users)  # every generated turn ends with an answer
    for k, row in enumerate(rows):
        n = len(row["messages"])
        assert [strip_row_keys(m) for m in row["messages"]] == [strip_row_keys(m) for m in trace.messages[:n]]
        assert row["messages"][-1]["role"] == "assistant"
        for j, m in enumerate(row["messages"]):
            if m["role"] == "assistant":
                assert m["train"] == (j > users[k])
                assert ("reasoning_content" in m) == (j > users[k] and "reasoning_content" in trace.messages[j])
    (whole,) = unroll(trace, by_turn=False)
    assert all(m["train"] for m in whole["messages"] if m["role"] == "assistant")


curation = st.fixed_dictionaries({
    "tags": st.lists(text, max_size=3, unique=True), "rating": st.one_of(st.none(), st.integers(1, 5)), "notes": text,
    "settings": st.dictionaries(st.sampled_from(["temperature", "top_p", "max_tokens", "extra"]),
                                st.one_of(st.integers(), text, st.lists(st.integers(), max_size=2)), max_size=3),
    "base_url": st.sampled_from(["", "http://127.0.0.1:8000/v1", "https://api.example.com/v1?deployment=a"]),
})


@settings(max_examples=100, deadline=None)
@given(conversation(), curation)
def test_a_one_row_export_reads_back_as_the_same_curated_trace(raw, curated):
    """A --no-unroll row, through its JSON line, normalises back to the trace it came from, curation included."""
    trace = normalize_trace({**raw, **curated})
    (row,) = unroll(trace, by_turn=False)
    again = normalize_trace(json.loads(json.dumps(row)))
    assert again.to_dict() == {**trace.to_dict(), "source": again.source}
