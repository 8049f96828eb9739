"""The demo world through the real agent: teacher traces collected into the store, task success measured for any
endpoint. Real site, real Playwright MCP + Chromium, real embedded endpoint, real store."""

import asyncio
import json
import subprocess
import sys

from mcpft.agent.endpoint import Endpoint
from mcpft.demo.world import DEMO_TAG, DEMO_TOOLS, TEACHER, collect, evaluate_tasks, pick_tasks, teacher_endpoint
from mcpft.serve import create_app, serve_in_thread
from tests.scripted import ScriptedBackend


def test_pick_tasks_covers_templates_first():
    picked = pick_tasks("train", 11)
    assert len({t.template for t in picked}) == 11
    assert pick_tasks("train", 200)[97].id == pick_tasks("train", 200)[0].id


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


def test_eval_scores_the_teacher_and_a_model_that_misbehaves(tmp_path):
    async def teacher():
        async with teacher_endpoint() as endpoint:
            return await evaluate_tasks(endpoint, "heldout", limit=2, browser_dir=tmp_path / "a")

    totals = asyncio.run(teacher()).totals()
    assert (totals["tasks"], totals["success_rate"], totals["unneeded_calls"]) == (2, 1.0, 0)

    url, stop = serve_in_thread(create_app({"always-calls": ScriptedBackend(calls=1, tool="browser_snapshot")}))
    try:
        report = asyncio.run(evaluate_tasks(Endpoint(url, "always-calls"), "heldout", browser_dir=tmp_path / "b",
                                            task_ids=["no_tool_arithmetic-7", "price_by_position-5"]))
    finally:
        stop()
    by_id = {t.task_id: t for t in report.tasks}
    assert report.totals()["success_rate"] == 0.0
    assert by_id["no_tool_arithmetic-7"].unneeded_calls == 1
    assert by_id["price_by_position-5"].unneeded_calls == 0 and not by_id["price_by_position-5"].success


def test_cli_demo_eval_json_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mcpft", "demo", "eval", "--model", TEACHER, "--limit", "1",
                           "--json", "--db", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MCPFT_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["totals"]) >= {"success_rate", "tasks", "tool_errors", "unneeded_calls"}
    assert report["totals"]["success_rate"] == 1.0 and report["tasks"][0]["task_id"]

