"""Run the scripted teacher on every demo task of both splits through the real browser; print the success rate.

    .venv/bin/python bench/teacher_all.py [--split train|heldout] [--template NAME] [-v]

Starts the demo site and Playwright MCP (offline Chromium: only 127.0.0.1 resolves) on this machine, closes the
browser between tasks so each starts clean, and checks every answer with its task's checker.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcpft.agent.browser import playwright_server  # noqa: E402
from mcpft.agent.mcp import ToolHub  # noqa: E402
from mcpft.demo.site import serve_site  # noqa: E402
from mcpft.demo.tasks import SPLITS, load_tasks  # noqa: E402
from mcpft.demo.teacher import TeacherError, run_episode  # noqa: E402


async def run(splits: list[str], template: str | None, verbose: bool) -> int:
    tasks = [task for split in splits for task in load_tasks(split) if template in (None, task.template)]
    outcomes: dict[tuple[str, str], list[bool]] = defaultdict(list)
    failures = []
    started = time.monotonic()
    with serve_site() as site, tempfile.TemporaryDirectory(prefix="mcpft-teacher-") as out:
        async with ToolHub([playwright_server(out, offline=True)], out) as hub:
            tools = hub.openai_tools()
            for task in tasks:
                site.clear_submissions()
                await hub.call("browser_close", {})  # a fresh browser (one tab) per task
                try:
                    episode = await run_episode(task, site.base_url, tools, hub.call)
                    answer = episode.answer or ""
                    result = task.check(answer, site)
                    ok, reason = result.ok, result.reason
                    turns = sum(1 for m in episode.messages if m["role"] == "assistant")
                except TeacherError as error:
                    ok, reason, answer, turns = False, f"teacher error: {error}", "", 0
                outcomes[(task.split, task.template)].append(ok)
                if not ok:
                    failures.append(f"{task.id}: {reason} | answer: {answer!r}")
                if verbose:
                    print(f"{'ok  ' if ok else 'FAIL'} {task.id} ({turns} turns) {answer}", flush=True)
    for (split, name), oks in sorted(outcomes.items()):
        print(f"{split:8} {name:26} {sum(oks):3}/{len(oks)}")
    for split in splits:
        oks = [ok for (s, _), results in outcomes.items() if s == split for ok in results]
        if oks:
            print(f"{split}: {sum(oks)}/{len(oks)} = {sum(oks) / len(oks):.1%}")
    total = [ok for results in outcomes.values() for ok in results]
    print(f"all: {sum(total)}/{len(total)} = {sum(total) / max(len(total), 1):.1%} "
          f"in {time.monotonic() - started:.0f} s")
    for failure in failures:
        print("FAILED", failure)
    return 0 if not failures else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=SPLITS, action="append", help="a split to run (default: both)")
    parser.add_argument("--template", help="only the tasks of this template")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every task's outcome")
    args = parser.parse_args()
    return anyio.run(run, args.split or list(SPLITS), args.template, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
