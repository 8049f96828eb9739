"""Step scores: the scorer on hand-built cases (exact numbers), steps from rows, too-long prompts, the in-process and
endpoint runners (the embedded `mcpft serve` app), compare, Markdown and the `eval` verb."""

from __future__ import annotations

import argparse
import json

import pytest

from mcpft.cli import train as cli_train
from mcpft.cli.common import common_options
from mcpft.dataset import export_rows
from mcpft.evaluate import (
    EndpointGenerator, EvaluationError, LocalGenerator, answer_matches, build_report, compare, compare_markdown,
    evaluate_rows, local_generator, report_markdown, score_step, steps_from_rows, token_f1,
)
from mcpft.hermes import make_tool_call, parse_assistant_text
from mcpft.train import TrainConfig, train
from tests.test_train import MEMORISE, WEATHER_TOOL, weather_rows

TOOLS = [WEATHER_TOOL, {"type": "function", "function": {
    "name": "search", "description": "Search.", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "default": 10}, "exact": {"type": "boolean"}},
        "required": ["query"]}}}]


def call_message(*calls: tuple[str, dict]) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [make_tool_call(n, a) for n, a in calls]}


def hermes(*calls: tuple[str, dict], content: str = "") -> str:
    blocks = [f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in calls]
    return "\n".join([content, *blocks]).strip()


def scored(reference: dict, text: str) -> dict:
    return score_step(reference, parse_assistant_text(text), TOOLS)


# -- the scorer ----------------------------------------------------------------------------------------------------

PARIS = call_message(("get_weather", {"city": "Paris"}))


def test_right_call_with_normalised_string_passes():
    assert scored(PARIS, hermes(("get_weather", {"city": "  PARIS "}))) == {
        "kind": "call", "valid_call": True, "tool_name": True, "arguments": True, "passed": True, "reasons": []}


def test_wrong_name():
    result = scored(PARIS, hermes(("search", {"query": "Paris"})))
    assert (result["valid_call"], result["tool_name"], result["arguments"]) == (True, False, False)
    assert result["reasons"] == ["called search, expected get_weather"]


def test_argument_of_the_wrong_type():
    reference = call_message(("search", {"query": "x", "limit": 3, "exact": True}))
    result = scored(reference, hermes(("search", {"query": "x", "limit": "3", "exact": 1})))
    assert (result["tool_name"], result["arguments"]) == (True, False)
    assert result["reasons"] == ["search: limit: expected number 3, got string '3'",
                                 "search: exact: expected boolean True, got number 1"]


def test_numbers_compare_as_numbers_and_defaults_may_be_left_out():
    reference = call_message(("search", {"query": "x", "limit": 10}))
    assert scored(reference, hermes(("search", {"query": "X", "limit": 10.0})))["arguments"]
    assert scored(reference, hermes(("search", {"query": "x"})))["arguments"]  # 10 is the schema's default
    missing = call_message(("search", {"query": "x", "limit": 5}))
    assert scored(missing, hermes(("search", {"query": "x"})))["reasons"] == ["search: missing argument limit"]
    assert scored(PARIS, hermes(("get_weather", {"city": "Paris", "unit": "C"})))["reasons"] == [
        "get_weather: unexpected argument unit"]


def test_parallel_calls_match_in_any_order():
    reference = call_message(("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"}))
    assert scored(reference, hermes(("get_weather", {"city": "Lyon"}), ("get_weather", {"city": "Paris"})))["passed"]
    wrong = scored(reference, hermes(("get_weather", {"city": "Lyon"}), ("get_weather", {"city": "Nice"})))
    assert (wrong["tool_name"], wrong["arguments"]) == (True, False)
    assert wrong["reasons"] == ["get_weather: city: expected 'Paris', got 'Nice'"]
    short = scored(reference, hermes(("get_weather", {"city": "Lyon"})))
    assert (short["valid_call"], short["tool_name"]) == (True, False)


def test_malformed_or_missing_call_is_not_valid():
    result = scored(PARIS, '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>')
    assert (result["valid_call"], result["tool_name"], result["arguments"]) == (False, False, False)
    assert result["reasons"][0].startswith("malformed tool call 1: invalid JSON")
    assert scored(PARIS, "The weather is fine.")["reasons"] == ["no tool call, expected get_weather"]


def test_irrelevance_and_final_answers():
    answer = {"role": "assistant", "content": "The page title is Trelis Research."}
    assert scored(answer, "Trelis Research is the page title") == {
        "kind": "answer", "irrelevance": True, "answer_match": True, "passed": True, "reasons": []}
    called = scored(answer, hermes(("search", {"query": "title"})))
    assert (called["irrelevance"], called["passed"]) == (False, False)
    assert called["reasons"] == ["called search, expected no call", "the answer does not match"]
    assert scored(answer, "I could not find it.")["reasons"] == ["the answer does not match"]


def test_answer_match_rules():
    assert answer_matches("Sure: TRELIS research!", "Trelis Research")  # normalised containment
    assert not answer_matches("Trelis Researchers", "Trelis Research Lab")  # whole words; F1 0.4
    assert token_f1("the title is trelis research", "trelis research title") == pytest.approx(0.75)
    assert answer_matches("the title is trelis research", "trelis research title")  # F1 0.75 >= 0.5
    assert not answer_matches("Paris", "It is sunny in Lyon")
    assert answer_matches("", "") and not answer_matches("something", "")


def test_totals_count_exactly():
    records = [
        {**scored(PARIS, hermes(("get_weather", {"city": "Paris"}))), "trace_id": "a"},  # pass
        {**scored(PARIS, hermes(("search", {"query": "Paris"}))), "trace_id": "a"},  # valid, wrong name
        {**scored(PARIS, hermes(("get_weather", {"city": 1}))), "trace_id": "a"},  # valid, right name, wrong type
        {**scored(PARIS, "no call"), "trace_id": "b"},  # not valid
        {**scored({"role": "assistant", "content": "Done."}, "Done."), "trace_id": "b"},  # pass
        {**scored({"role": "assistant", "content": "Done."}, hermes(("search", {"query": "q"}))), "trace_id": "b"},
        {"kind": "call", "too_long": True, "passed": False, "reasons": [], "trace_id": "b"},
    ]
    report = build_report(records)
    assert report["totals"] == {
        "steps": 7, "scored": 6, "too_long": 1, "call_steps": 4, "answer_steps": 2,
        "valid_call_rate": 0.75, "tool_name_accuracy": 0.5, "argument_accuracy": 0.25,
        "irrelevance_accuracy": 0.5, "answer_accuracy": 0.5, "pass_rate": 2 / 6}
    assert report["traces"]["a"]["argument_accuracy"] == pytest.approx(1 / 3)
    assert report["traces"]["b"]["irrelevance_accuracy"] == 0.5 and report["traces"]["b"]["too_long"] == 1


# -- steps, runners ------------------------------------------------------------------------------------------------


def test_steps_are_the_trained_assistant_messages():
    rows = weather_rows(second_turn=True)
    steps = steps_from_rows(rows)
    assert [(s.row_id.split("-")[-1], s.index) for s in steps] == [("0", 2), ("0", 4), ("1", 6)]
    last = steps[-1]
    assert [m["role"] for m in last.prefix] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert all("train" not in m for m in last.prefix) and last.tools == [WEATHER_TOOL]
    with pytest.raises(EvaluationError, match="no trained assistant message"):
        steps_from_rows([{"id": "x", "messages": [{"role": "user", "content": "hi"}], "tools": "[]"}])


def test_prompts_beyond_the_context_are_counted_not_cut(tiny_model_dir):
    from mcpft.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), tiny_model_dir)
    model.config.max_position_embeddings = 300  # a small-context model: the weather prompts need 250-330 tokens
    report = evaluate_rows(weather_rows(), LocalGenerator(model, tokenizer, "tiny", max_new_tokens=8))
    first, second = report["steps"]
    assert first["prompt_tokens"] + 8 <= 300 and not first["too_long"] and "output" in first
    assert second["too_long"] and "output" not in second and "exceeds the context of 300" in second["reasons"][0]
    assert report["totals"]["too_long"] == 1 and report["totals"]["scored"] == 1


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tmp_path_factory):
    """An adapter that reproduces the weather row (see tests/test_train.py)."""
    out = tmp_path_factory.mktemp("eval") / "weather-adapter"
    train(TrainConfig(**MEMORISE), weather_rows(), out, base_model=str(tiny_model_dir))
    return out


def test_endpoint_and_in_process_agree(tiny_model_dir, memorised):
    """The adapter served by the embedded endpoint (`mcpft.serve`) scores as it does in process: a perfect row."""
    from mcpft.serve import create_app, load_backends, serve_in_thread

    rows = weather_rows()
    local = evaluate_rows(rows, local_generator(str(tiny_model_dir), adapter=memorised, max_new_tokens=40))
    base_url, stop = serve_in_thread(create_app(load_backends(str(tiny_model_dir), memorised, tiny_model_dir)))
    try:
        remote = evaluate_rows(rows, EndpointGenerator(base_url, memorised.name, max_new_tokens=40))
    finally:
        stop()
    assert local["totals"]["pass_rate"] == remote["totals"]["pass_rate"] == 1.0
    assert [s["output"]["tool_calls"] for s in remote["steps"]] == [
        [{"name": "get_weather", "arguments": {"city": "Paris"}}], []]
    assert [s["output"]["text"] for s in remote["steps"]] == [s["output"]["text"] for s in local["steps"]]


def test_compare_puts_base_beside_tuned(tiny_model_dir, memorised):
    rows = weather_rows()
    base = evaluate_rows(rows, local_generator(str(tiny_model_dir), max_new_tokens=8))
    tuned = evaluate_rows(rows, local_generator(str(tiny_model_dir), adapter=memorised, max_new_tokens=40))
    comparison = compare(base, tuned)
    assert comparison["changes"] == {"fixed": 2}
    assert comparison["totals"]["delta"]["pass_rate"] == 1.0
    first = comparison["steps"][0]
    assert first["prompt"] == "Weather in Paris?" and first["tuned"]["verdict"] == "pass"
    assert first["base"]["verdict"] == "fail" and first["base"]["reasons"]
    assert "| pass_rate | 0.0% | 100.0% |" in compare_markdown(comparison)
    assert "| pass_rate | 100.0% |" in report_markdown(tuned)
    with pytest.raises(EvaluationError, match="different steps"):
        compare(base, {**tuned, "steps": tuned["steps"][:1]})


def test_eval_verb_writes_json_and_markdown(tiny_model_dir, memorised, tmp_path, capsys):
    data = export_rows(weather_rows(), tmp_path / "heldout.jsonl")
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers(dest="verb", required=True), common_options())
    args = parser.parse_args(["eval", "--data", str(data), "--model", str(tiny_model_dir), "--adapter",
                              str(memorised), "--max-new-tokens", "40", "--json", "--markdown",
                              str(tmp_path / "r.md"), "--report", str(tmp_path / "r.json")])
    args.handler(args)
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "weather-adapter" and summary["totals"]["argument_accuracy"] == 1.0
    assert "| argument_accuracy | 100.0% |" in (tmp_path / "r.md").read_text()
    assert len(json.loads((tmp_path / "r.json").read_text())["steps"]) == 2
