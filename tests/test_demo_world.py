"""The demo world through the real agent: teacher traces collected into the store, task success measured for any
endpoint. Real site, real Playwright MCP + Chromium, real embedded endpoint, real store."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import tempfile

import pytest

from mcpft.agent.endpoint import Endpoint, EndpointError
from mcpft.cli import main
from mcpft.demo.snapshot import tabs
from mcpft.demo.tasks import load_tasks, task_by_id, training_facts
from mcpft.demo.world import (DEMO_TAG, DEMO_TOOLS, TEACHER, TeacherBackend, check_endpoint, collect, demo_task_in,
                              evaluate_tasks, pick_tasks, running_world, teacher_endpoint)
from mcpft.serve import Generation, GenerationRequest, create_app, serve_in_thread
from tests.scripted import ScriptedBackend


def one_task_per_template() -> list[str]:
    chosen: dict[str, str] = {}
    for task in load_tasks():
        chosen.setdefault(task.template, task.id)
    return list(chosen.values())


def dead_url() -> str:
    """An address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_pick_tasks_covers_templates_first():
    picked = pick_tasks("train", 11)
    assert len({t.template for t in picked}) == 11
    split_size = len(load_tasks("train"))
    assert pick_tasks("train", 300)[split_size].id == pick_tasks("train", 300)[0].id  # round again after all


def test_pick_tasks_gives_a_template_its_share_spread_among_the_others():
    picked = pick_tasks("train", 97, {"compare_weight": 0.2})
    places = [i for i, task in enumerate(picked) if task.template == "compare_weight"]
    assert len(picked) == 97 and len(places) == 20  # at least a fifth of 97
    assert max(b - a for a, b in zip(places, places[1:])) <= 5  # spread, not bunched at one end
    compare_tasks = [t.id for t in load_tasks("train") if t.template == "compare_weight"]
    assert {picked[i].id for i in places} == set(compare_tasks)  # its tasks in turn
    assert len({t.template for t in picked}) == 11  # the other templates still taken in turn
    assert [t.id for t in pick_tasks("train", 5, {"contact_form": 0.2})][0].startswith("contact_form")
    with pytest.raises(ValueError, match="shares add up to 1.1: they must leave room"):
        pick_tasks("train", 10, {"contact_form": 0.6, "product_spec": 0.5})


def test_collect_stores_clean_teacher_traces(store, tmp_path):
    report = asyncio.run(collect(store, 4, "train", browser_dir=tmp_path / "browser"))
    assert report.totals()["successes"] == 4
    traces = store.traces(tags=[DEMO_TAG, "train"])
    assert len(traces) == 4
    for trace in traces:
        assert trace.flags == [] and trace.included and trace.model == TEACHER
        assert sorted(t["function"]["name"] for t in trace.tools) == sorted(DEMO_TOOLS)
        tool_results = [m["content"] for m in trace.messages if m["role"] == "tool"]
        assert tool_results and all("Page URL: http://127.0.0.1:" in r for r in tool_results)
        assert "```yaml" in tool_results[-1]  # the snapshot the model saw is in the trace, not a file link
        assert all(m.get("reasoning_content") for m in trace.messages if m["role"] == "assistant")
    # No two traces share the site's address: a model must learn to read it from the prompt, not to recall it.
    sites = {re.search(r"http://127\.0\.0\.1:\d+", t.messages[0]["content"]).group() for t in traces}
    assert len(sites) == 4
    # Each trace ran in a world of its own: its answer holds there and not in the demo's own world.
    moved = 0
    for number, (task, outcome) in enumerate(zip(pick_tasks("train", 4), report.tasks), start=1):
        varied = task_by_id(task.id, training_facts(number))
        if varied.expected != task.expected:
            assert varied.check(outcome.answer).ok and not task.check(outcome.answer).ok, outcome.answer
            moved += 1
    assert moved >= 3


def test_reset_leaves_one_blank_tab_without_history(tmp_path):
    async def browse_then_reset():
        async with running_world(tmp_path) as world:
            await world.reset()
            base = world.site.base_url
            await world.hub.call("browser_navigate", {"url": base + "/products"})
            await world.hub.call("browser_navigate", {"url": base + "/docs"})
            await world.hub.call("browser_tabs", {"action": "new", "url": base + "/about"})
            world.site.record_submission({"name": "Ada"})
            await world.reset()
            listed = await world.hub.call("browser_tabs", {"action": "list"})
            back = await world.hub.call("browser_navigate_back", {})
            return base, world.site.base_url, listed.text, back.text, world.site.submissions

    before, after, listed, back, submissions = asyncio.run(browse_then_reset())
    assert [(tab.url, tab.current) for tab in tabs(listed)] == [("about:blank", True)]
    assert "Page URL: about:blank" in back and "/products" not in back  # no way back to the last task's pages
    assert submissions == []
    assert after != before  # each task gets the site on its own port


def test_eval_scores_the_teacher_and_a_model_that_misbehaves(tmp_path, monkeypatch):
    async def teacher():
        async with teacher_endpoint() as endpoint:  # collect's path: the demo's tools, no completion limits
            return await evaluate_tasks(endpoint, None, browser_dir=tmp_path / "a", settings=None, max_steps=20,
                                        task_ids=one_task_per_template())

    report = asyncio.run(teacher())
    totals = report.totals()
    assert [t.reason for t in report.tasks if not t.success] == []
    assert (totals["tasks"], totals["success_rate"], totals["unneeded_calls"], totals["endpoint_errors"]) == \
        (len(one_task_per_template()), 1.0, 0, 0)

    # Without a browser folder given, the browser's profile goes in a scratch folder that is gone after.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    scratch_during = []
    url, stop = serve_in_thread(create_app({"always-calls": ScriptedBackend(calls=1, tool="browser_snapshot")}))
    try:
        report = asyncio.run(evaluate_tasks(
            Endpoint(url, "always-calls"), "heldout", task_ids=["no_tool_arithmetic-7", "price_by_position-5"],
            on_task=lambda outcome: scratch_during.append(list((tmp_path / "scratch").glob("mcpft-demo-eval-*")))))
    finally:
        stop()
    assert [len(folders) for folders in scratch_during] == [1, 1]
    assert not list((tmp_path / "scratch").glob("mcpft-demo-eval-*"))
    by_id = {t.task_id: t for t in report.tasks}
    assert report.totals()["success_rate"] == 0.0
    assert by_id["no_tool_arithmetic-7"].unneeded_calls == 1
    assert by_id["price_by_position-5"].unneeded_calls == 0 and not by_id["price_by_position-5"].success
    assert by_id["price_by_position-5"].reason.startswith("expected the price $")  # the checker's reason


class Guesser:
    """A model that answers every task with its right answer, never opening a page."""

    def start(self, request: GenerationRequest) -> Generation:
        prompt = next(m["content"] for m in request.messages if m["role"] == "user")
        return Generation(chunks=iter([demo_task_in(prompt).expected]))


def test_eval_fails_a_right_answer_given_without_reading_the_site(tmp_path):
    guessed = ["compare_weight-trailblazer-backpack-ember-camp-stove", "no_tool_definition-api"]
    assert all(task_by_id(task_id).check(task_by_id(task_id).expected) for task_id in guessed)
    url, stop = serve_in_thread(create_app({"guesser": Guesser()}))
    try:
        report = asyncio.run(evaluate_tasks(Endpoint(url, "guesser"), "heldout", browser_dir=tmp_path,
                                            task_ids=guessed))
    finally:
        stop()
    compare, definition = report.tasks
    assert (compare.tool_calls, compare.success) == (0, False)
    assert compare.reason == "answered without reading the site (no tool call worked): a guess"
    assert definition.success  # a task about no site needs no call


def test_eval_marks_the_tasks_an_endpoint_fails_mid_run(tmp_path):
    url, stop = serve_in_thread(create_app({TEACHER: TeacherBackend()}))
    try:
        report = asyncio.run(evaluate_tasks(Endpoint(url, TEACHER), "train", browser_dir=tmp_path,
                                            task_ids=["no_tool_arithmetic-1", "no_tool_arithmetic-2"],
                                            on_task=lambda outcome: stop()))  # the endpoint dies after one task
    finally:
        stop()
    first, second = report.tasks
    assert first.success and not first.endpoint_error
    assert second.endpoint_error and not second.success
    assert second.reason.startswith(f"endpoint error: cannot connect to {url}")
    totals = report.totals()
    counted = (totals["tasks"], totals["endpoint_errors"], totals["scored_tasks"], totals["success_rate"])
    assert counted == (2, 1, 1, 1.0)  # the failed task is not scored as a wrong answer


def test_check_endpoint_names_a_model_the_endpoint_does_not_serve():
    async def check():
        async with teacher_endpoint() as endpoint:
            await check_endpoint(Endpoint(endpoint.base_url, "nope"))

    with pytest.raises(EndpointError, match=r"does not serve the model 'nope' \(it serves: scripted-teacher\)"):
        asyncio.run(check())


def test_cli_demo_eval_refuses_an_endpoint_that_does_not_answer(capsys):
    url = dead_url()
    assert main(["demo", "eval", "--base-url", url, "--model", "m"]) == 2
    assert f"the endpoint cannot be evaluated: cannot connect to {url}" in capsys.readouterr().err


def test_eval_refuses_a_limit_below_one():
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        asyncio.run(evaluate_tasks(Endpoint(dead_url(), "m"), limit=0))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", TEACHER, "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["eval", "--model", TEACHER, "--limit", "-1"], "argument --limit: must be at least 1, got -1"),
    (["eval", "--model", TEACHER, "--max-steps", "two"], "argument --max-steps: expected a whole number, got 'two'"),
    (["collect", "--n", "0"], "argument --n: must be at least 1, got 0"),
])
def test_cli_demo_refuses_counts_below_one(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(["demo", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--base-url", "http://127.0.0.1:1/v1", "--model", "m"], "--adapter cannot be used with --base-url"),
    (["--model", TEACHER], f"--adapter cannot be used with --model {TEACHER}"),
])
def test_cli_demo_eval_refuses_an_adapter_it_would_ignore(capsys, argv, message):
    assert main(["demo", "eval", *argv, "--adapter", "runs/demo/adapter"]) == 2
    assert message in capsys.readouterr().err


def test_cli_demo_eval_json_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mcpft", "demo", "eval", "--model", TEACHER, "--limit", "1",
                           "--json", "--db", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MCPFT_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["totals"]) >= {"success_rate", "tasks", "tool_errors", "unneeded_calls"}
    assert report["totals"]["success_rate"] == 1.0 and report["tasks"][0]["task_id"]

