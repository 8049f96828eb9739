"""Runs that did not succeed are stored as they happened and flagged, so they never train unless asked for: a model
looping on one tool until the step limit (`step_limit`), a reply that repeats itself (`repetition`), a final answer
with no word in it (`no_answer`) or one that gives up (`gave_up`); and a native tool call the model malformed (no
name, arguments that are no JSON object, a Hermes block that cannot be read) is stored, flagged, answered with what
was wrong, and the run goes on.

Real parts: tests/result_mcp_server.py as a subprocess through the tool hub, the agent loop, the CLI, a scripted
endpoint over HTTP on 127.0.0.1 (tests/scripted_endpoint.py) that keeps the request bodies, and the SQLite store."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from mcpft.agent.endpoint import Endpoint
from mcpft.agent.loop import Agent, AgentConfig, endpoint_generate
from mcpft.agent.mcp import ToolHub, load_mcp_config
from mcpft.cli import main
from mcpft.dataset import rows_from_traces
from mcpft.recording import open_trace, sink_for
from mcpft.selection import store_rows
from mcpft.trace import validate
from tests.scripted_endpoint import ScriptedEndpoint, answer, calls

RESULT_SERVER = Path(__file__).parent / "result_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"results": {"command": sys.executable, "args": [str(RESULT_SERVER)]}}}
TOOL_NAMES = "report, lookup, read_log, fail, echo"
ECHO = ("echo", '{"text": "hi"}')


def echo_then(final: dict):
    """A script that calls echo once, then gives `final`."""
    return lambda step, _: calls(ECHO) if step == 0 else final


def loop_on_fail(step, messages):
    """Calls `fail` for ever, unless the user says to stop."""
    last_user = [m for m in messages if m["role"] == "user"][-1]["content"]
    return answer("I stopped.") if last_user == "stop" else calls(("fail", '{"reason": "again"}'))


def malformed_then_answer(step, _):
    """Three calls at once (no name; list arguments; a good one), then an answer."""
    if step == 0:
        return calls(("", '{"text": "hi"}'), ("echo", "[1, 2]"), ("echo", '{"text": "ok"}'))
    return answer("Done.")


BROKEN_CALL = '<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}\n</tool_call>'  # one } short


def garbled_then_answer(step, messages):
    """A good call and an unreadable one as Hermes text (the server parses nothing), then what it was told."""
    if step == 0:
        return answer(f'Let me look.\n<tool_call>\n{{"name": "echo", "arguments": {{"text": "ok"}}}}\n</tool_call>'
                      f"\n{BROKEN_CALL}")
    return answer("Told: " + messages[-1]["content"][:40])


SCRIPTS = {
    "looper": loop_on_fail,
    "parrot": echo_then(answer("ha" * 2000)),
    "ruminant": echo_then(answer("42.", reasoning="Wait, let me check the page again. " * 40)),
    "mute": echo_then(answer("...")),
    "quitter": echo_then(answer("I'm sorry, but I couldn't finish this task.")),
    "honest": echo_then(answer("The page lists no flight on that day.")),
    "malformer": malformed_then_answer,
    "garbler": garbled_then_answer,
}


def run_turns(store, url: str, model: str, texts: list[str], tool_dir: Path, max_steps: int = 20, approve=None):
    """The user's `texts` to `model`, one turn each, through the real loop and hub: (trace id, results)."""
    async def main():
        async with ToolHub(load_mcp_config(MCP_CONFIG), tool_dir) as hub:
            trace_id = open_trace(store, model=model, base_url=url, tools=hub.openai_tools())
            agent = Agent(endpoint_generate(Endpoint(url, model)), hub, sink=sink_for(store, trace_id),
                          approve=approve, config=AgentConfig(max_steps=max_steps))
            return trace_id, [await agent.send(text) for text in texts]

    return asyncio.run(main())


def codes(trace) -> list[tuple[str, int]]:
    return [(flag["code"], flag["index"]) for flag in trace.flags]


def test_a_model_looping_on_a_failing_tool_until_the_step_limit_is_flagged(store, tmp_path):
    with ScriptedEndpoint(SCRIPTS) as endpoint:
        trace_id, (looped, stopped) = run_turns(store, endpoint.url, "looper", ["go", "stop"], tmp_path, max_steps=4)
    assert (looped.stop_reason, looped.steps, looped.tool_calls, looped.tool_errors) == ("step_limit", 4, 4, 4)
    assert (stopped.stop_reason, stopped.answer) == ("answer", "I stopped.")
    trace = store.get(trace_id)
    assert [m["role"] for m in trace.messages] == ["user"] + ["assistant", "tool"] * 4 + ["user", "assistant"]
    last_step = trace.messages[7]
    assert last_step["flags"] == [
        "step_limit: the model still called tools at step 4 of 4, the last allowed, so the turn has no final answer; "
        "its last 4 steps all called 'fail', and 3 of the 3 results so far were errors"]
    assert [m.get("flags") for m in trace.messages[1:7:2]] == [None] * 3
    # The second turn ends with an answer, so only the step limit's flag tells that the first one never did.
    assert codes(trace) == [("step_limit", 7)]
    # The model was told every failure, and never saw the flag.
    told = [m for m in endpoint.requests["looper"][3]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in told] == ["Error executing tool fail: cannot do it: again"] * 3
    assert "step_limit" not in json.dumps(endpoint.requests["looper"])


def test_degenerate_answers_are_flagged_shown_and_left_out_of_datasets(store, tmp_path, capsys):
    models = ["parrot", "ruminant", "mute", "quitter", "honest"]
    with ScriptedEndpoint(SCRIPTS) as endpoint:
        runs = {model: run_turns(store, endpoint.url, model, ["go"], tmp_path / model) for model in models}
    trace_ids = {model: trace_id for model, (trace_id, _) in runs.items()}
    assert all(results[0].stop_reason == "answer" for _, results in runs.values())
    flags = {model: store.get(trace_id).flags for model, trace_id in trace_ids.items()}
    assert {model: [(f["code"], f["index"]) for f in found] for model, found in flags.items()} == {
        "parrot": [("repetition", 3)], "ruminant": [("repetition", 3)], "mute": [("no_answer", 3)],
        "quitter": [("gave_up", 3)], "honest": []}
    assert flags["parrot"][0]["message"] == "content repeats 'ha' (2 characters) over 4000 characters from character 0"
    assert flags["ruminant"][0]["message"].startswith("reasoning_content repeats 'Wait, let me check the page again. '")
    assert store.get(trace_ids["parrot"]).messages[-1]["content"] == "ha" * 2000  # stored as it came

    # Curation shows them...
    assert main(["traces", "validate", "--db", str(store.path)]) == 0
    shown = capsys.readouterr().out
    for model in ("parrot", "mute", "quitter"):
        code = flags[model][0]["code"]
        assert f"{trace_ids[model][:8]}: {code} at message 3: " in shown
    # ...and datasets leave them out unless flagged traces are asked for.
    out = tmp_path / "rows.jsonl"
    assert main(["export", "--out", str(out), "--db", str(store.path)]) == 0
    assert {json.loads(line)["trace_id"] for line in out.read_text().splitlines()} == {trace_ids["honest"]}
    training, _ = store_rows(store, None, include_flagged=False)
    assert {row["trace_id"] for row in training} == {trace_ids["honest"]}
    assert {row["trace_id"] for row in rows_from_traces(store.traces(), include_flagged=True)} == set(
        trace_ids.values())
    capsys.readouterr()


def answer_codes(content: str, reasoning: str = "") -> list[str]:
    answer = {"role": "assistant", "content": content}
    if reasoning:
        answer["reasoning_content"] = reasoning
    return [flag["code"] for flag in validate([{"role": "user", "content": "go"}, answer], [])]


def test_the_answer_detectors_stay_narrow():
    assert answer_codes("abc" * 166 + "ab") == ["repetition"]  # one chunk over 500 characters
    assert answer_codes("abc" * 166 + "a") == []  # 499
    assert answer_codes("42", reasoning="hm " * 200) == ["repetition"]
    assert answer_codes("Totals\n" + "=" * 80 + "\n| a | 1 |\n| b | 2 |") == []
    assert answer_codes("—") == ["no_answer"] and answer_codes("") == ["empty_assistant"] and answer_codes("42") == []
    assert answer_codes("Apologies — I cannot open that page.") == ["gave_up"]
    assert answer_codes("The price is $5. I give up on the shipping cost.") == ["gave_up"]
    for fine in ("Sorry for the wait! The price is $5.", "Unfortunately the shop is closed on Sundays.",
                 "I cannot find a flight on that day: the timetable lists none.",  # a result, no apology
                 "Sorry, I couldn't open the PDF, so here is what the page says: " + "the kettle holds 1.7 l. " * 12):
        assert answer_codes(fine) == [], fine


def test_malformed_native_calls_are_stored_flagged_and_told_and_the_run_goes_on(store, tmp_path):
    offered = []

    async def approve(pending):
        offered.append([(c["function"]["name"], c["function"]["arguments"]) for c in pending])
        return [True] * len(pending)

    with ScriptedEndpoint(SCRIPTS) as endpoint:
        trace_id, (result,) = run_turns(store, endpoint.url, "malformer", ["go"], tmp_path, approve=approve)
    assert (result.stop_reason, result.answer) == ("answer", "Done.")
    assert (result.tool_calls, result.malformed_calls, result.tool_errors) == (3, 2, 2)
    assert offered == [[("echo", '{"text": "ok"}')]]  # only the well-formed call was offered, and run

    trace = store.get(trace_id)
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "tool", "tool", "tool", "assistant"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in trace.messages[1]["tool_calls"]] == [
        ("", '{"text": "hi"}'), ("echo", "[1, 2]"), ("echo", '{"text": "ok"}')]  # as the model sent them
    nameless, listed, good = trace.messages[2:5]
    assert nameless == {"role": "tool", "tool_call_id": "call_0_nameless",
                        "content": "Error: tool call 1 was not run: it has no function name. Call one of these tools "
                                   f"by name, with a JSON object of arguments: {TOOL_NAMES}",
                        "mcp_result": {"is_error": True, "source": "mcpft", "content": []}}
    assert listed["content"] == ("Error: tool call 2 (echo) was not run: its arguments must be a JSON object, not "
                                 f"list: '[1, 2]'. Call one of these tools by name, with a JSON object of arguments: "
                                 f"{TOOL_NAMES}")
    assert (good["content"], good["mcp_result"]["is_error"]) == ("ok", False)
    assert codes(trace) == [("malformed_call", 1), ("invalid_arguments", 1), ("malformed_output", 1)]

    # The model saw its own calls as it made them, and what was wrong with each.
    second = endpoint.requests["malformer"][1]["messages"]
    assert [c["function"]["name"] for c in second[1]["tool_calls"]] == ["", "echo", "echo"]
    assert [m["content"] for m in second[2:5]] == [nameless["content"], listed["content"], "ok"]


def test_an_unreadable_hermes_call_is_answered_not_taken_for_the_answer(store, tmp_path):
    with ScriptedEndpoint(SCRIPTS) as endpoint:
        trace_id, (result,) = run_turns(store, endpoint.url, "garbler", ["go"], tmp_path)
    assert (result.stop_reason, result.steps) == ("answer", 2)
    assert result.answer == "Told: Error: tool call 2 (echo) was not run: i"  # not the broken text
    assert (result.tool_calls, result.malformed_calls, result.tool_errors) == (2, 1, 1)

    trace = store.get(trace_id)
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    step = trace.messages[1]
    assert step["content"] == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in step["tool_calls"]] == [
        ("echo", '{"text": "ok"}'), ("echo", '{"text": "hi"')]
    why = ("invalid JSON (Expecting ',' delimiter at character 44) in "
           "'{\"name\": \"echo\", \"arguments\": {\"text\": \"hi\"}'")
    assert step["flags"] == [f"malformed tool call 2: {why}"]
    assert trace.messages[2]["content"] == "ok"
    assert trace.messages[3]["content"] == (f"Error: tool call 2 (echo) was not run: it could not be read: {why}. "
                                            "Call one of these tools by name, with a JSON object of arguments: "
                                            f"{TOOL_NAMES}")
    assert codes(trace) == [("invalid_arguments", 1), ("malformed_output", 1)]  # never trains

    # The model was sent its call back as it wrote it, and told why it could not be read.
    second = endpoint.requests["garbler"][1]["messages"]
    assert second[1]["tool_calls"][1]["function"] == {"name": "echo", "arguments": '{"text": "hi"'}
    assert second[3]["content"] == trace.messages[3]["content"]


def test_a_nameless_call_no_longer_breaks_mcpft_run(store, tmp_path, capsys):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps(MCP_CONFIG))
    with ScriptedEndpoint(SCRIPTS) as endpoint:
        code = main(["run", "--task", "go", "--base-url", endpoint.url, "--model", "malformer", "--mcp-config",
                     str(config), "--auto-approve", "--json", "--db", str(store.path)])
    summary = json.loads(capsys.readouterr().out)
    assert (code, summary["stop_reason"], summary["answer"], summary["tool_errors"]) == (0, "answer", "Done.", 2)
    trace = store.get(summary["trace_id"])
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "tool", "tool", "tool", "assistant"]
    assert {flag["code"] for flag in trace.flags} == {"malformed_call", "invalid_arguments", "malformed_output"}
