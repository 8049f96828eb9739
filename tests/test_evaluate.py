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
    EndpointGenerator, EvaluationError, LocalGenerator, answer_matches, answer_problem, build_report, compare,
    compare_markdown, comparison_sentence, evaluate_rows, local_generator, missing_numbers, report_markdown, score_step, steps_from_rows,
    token_f1,
)
from mcpft.hermes import make_tool_call, parse_assistant_text
from mcpft.train import TrainConfig, train
from tests.test_models import tiny_variant
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


def test_every_number_of_the_reference_must_be_in_the_answer():
    assert token_f1("The price is $249.00", "The price is $129.00") == pytest.approx(0.8)  # the text rule passes
    assert answer_problem("The price is $249.00", "The price is $129.00") == (
        "the answer lacks the reference's number(s) 129.00")
    assert answer_matches("The price is 129", "The price is $129.00")  # values: 129 == 129.00
    assert answer_matches("The total is 1299 dollars", "The total is $1,299.00")  # thousands comma dropped
    assert not answer_matches("The total is $1,299.00", "The total is $1,299.50")
    assert missing_numbers("3 or 7.50, not 1,2", "3, 7.5, 12 and 1,234") == ["12", "1,234"]
    assert missing_numbers("no numbers", "none either") == []
    answer = {"role": "assistant", "content": "The cheapest option costs $129.00 and arrives on 2025-03-14."}
    result = scored(answer, "The cheapest option costs $129.00 and arrives on 2025-03-15.")
    assert (result["irrelevance"], result["answer_match"], result["passed"]) == (True, False, False)
    assert result["reasons"] == ["the answer lacks the reference's number(s) 14"]


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


@pytest.mark.parametrize("row, problem", [
    ({"id": "r1", "messages": "x"}, "row 2 (id 'r1'): 'messages' must be a non-empty list of message objects, got "
                                    "str 'x'"),
    ("text", "row 2: expected a row object, got str 'text'"),
    ({"messages": [{"content": "hi"}]}, "row 2: messages[0] must be an object with a role in system, user, "
                                        "assistant, tool, got dict {'content': 'hi'}"),
    ({"messages": [{"role": "assistant", "tool_calls": ["get_weather"]}]},
     "row 2: messages[0].tool_calls must be a list of call objects, got list ['get_weather']"),
])
def test_rows_that_are_not_training_rows_are_named(row, problem):
    with pytest.raises(EvaluationError) as raised:
        steps_from_rows(weather_rows() + [row])
    assert str(raised.value) == f"held-out rows: {problem}"


def test_prompts_beyond_the_context_are_counted_not_cut(tiny_model_dir):
    from mcpft.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), tiny_model_dir)
    model.config.max_position_embeddings = 300  # a small-context model: the weather prompts need 250-330 tokens
    report = evaluate_rows(weather_rows(), LocalGenerator(model, tokenizer, "tiny", max_new_tokens=8))
    first, second = report["steps"]
    assert first["prompt_tokens"] + 8 <= 300 and not first["too_long"] and "output" in first
    assert second["too_long"] and "output" not in second and "exceeds the context of 300" in second["reasons"][0]
    assert report["totals"]["too_long"] == 1 and report["totals"]["scored"] == 1


def test_running_out_of_memory_while_generating_says_what_to_lower(tiny_model_dir, tmp_path):
    """A real allocation failure: the KV cache (allocated whole before generating) for 2**42 new tokens."""
    from mcpft.models import OutOfMemory, load_model

    folder = tiny_variant(tiny_model_dir, tmp_path / "static", config={"max_position_embeddings": 2**44},
                          generation={"cache_implementation": "static"})
    model, tokenizer = load_model(str(folder), tmp_path)
    with pytest.raises(OutOfMemory) as raised:
        evaluate_rows(weather_rows(), LocalGenerator(model, tokenizer, "static", max_new_tokens=2**42))
    assert str(raised.value).startswith("the RAM ran out while generating step ")
    assert str(raised.value).endswith(f" prompt tokens). Lower max_new_tokens (now {2**42}), leave the longest held-out "
                                      "rows out, or evaluate a smaller model.")


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
    assert comparison_sentence(comparison) == (
        "Fine-tuned passed 2 of 2 held-out steps (base 0 of 2); valid tool calls in 1 of 1 call steps (base 0 of 1). "
        "That is a small sample (2 steps, under 20): one step more or less moves a rate by several points.")
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


def _eval_verb(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers(dest="verb", required=True), common_options())
    args = parser.parse_args(["eval", *argv])
    args.handler(args)


def test_eval_verb_names_a_broken_line_or_row_before_loading_a_model(tmp_path):
    from mcpft.cli.common import CliError

    broken = tmp_path / "heldout.jsonl"
    broken.write_text('{"id": "a", "messages": []}\n{"id": "b", "messages": "x"}\n')
    with pytest.raises(CliError, match=r"heldout.jsonl: row 1 \(id 'a'\): 'messages' must be a non-empty list"):
        _eval_verb(["--data", str(broken), "--model", str(tmp_path / "no-model")])
    broken.write_text('{"id": "a", "messages": []}\n\n{"id": "b", "messages": "x"\n')
    with pytest.raises(CliError, match=r"heldout.jsonl: line 3 is not valid JSON \(Expecting ',' delimiter"):
        _eval_verb(["--data", str(broken), "--model", str(tmp_path / "no-model")])


def test_endpoint_prompts_beyond_the_context_are_counted_never_cut(tiny_model_dir, tmp_path, capsys):
    """A model with a 300-token context, served: the weather prompts need about 277 and 320 tokens."""
    from mcpft.serve import create_app, load_backends, serve_in_thread

    folder = tiny_variant(tiny_model_dir, tmp_path / "small-context", config={"max_position_embeddings": 300})
    rows = weather_rows()
    data = export_rows(rows, tmp_path / "heldout.jsonl")
    base_url, stop = serve_in_thread(create_app(load_backends(str(folder), None, tmp_path)))
    try:
        # Without a tokenizer: the server refuses the second prompt (400, vLLM's wording), and that counts.
        remote = evaluate_rows(rows, EndpointGenerator(base_url, "small-context", max_new_tokens=40))
        # With one (--tokenizer): prompt + 40 new tokens is counted here against the context, for both steps.
        _eval_verb(["--data", str(data), "--base-url", base_url, "--model", "small-context", "--tokenizer",
                    str(folder), "--max-new-tokens", "40", "--json"])
    finally:
        stop()
    first, second = remote["steps"]
    assert not first["too_long"] and first["prompt_tokens"] is None and "output" in first
    assert second["too_long"] and "output" not in second
    assert "This model's maximum context length is 300 tokens. However, your request has" in second["reasons"][0]
    assert remote["totals"]["too_long"] == 1 and remote["totals"]["scored"] == 1
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert (totals["too_long"], totals["scored"]) == (2, 0)
