"""Run the scripted teacher on every demo task of both splits through the real browser; print the success rate.

    .venv/bin/python bench/teacher_all.py [--split train|heldout] [--template NAME] [-v]

The same path as `mcpft demo collect`: the teacher served by the embedded endpoint, the real agent loop offered the
demo's 9 browser tools, one Playwright MCP browser (offline Chromium: only 127.0.0.1 resolves) reset between tasks,
and every answer checked by its task's checker. Nothing is stored.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcpft.demo.tasks import SPLITS, load_tasks, task_by_id  # noqa: E402
from mcpft.demo.world import COLLECT_MAX_STEPS, evaluate_tasks, teacher_endpoint  # noqa: E402


def show(outcome) -> None:
    print(f"{'ok  ' if outcome.success else 'FAIL'} {outcome.task_id} ({outcome.steps} steps) {outcome.answer}",
          flush=True)


async def run(splits: list[str], template: str | None, verbose: bool) -> int:
    task_ids = [task.id for split in splits for task in load_tasks(split) if template in (None, task.template)]
    started = time.monotonic()
    async with teacher_endpoint() as endpoint:
        report = await evaluate_tasks(endpoint, None, settings=None, max_steps=COLLECT_MAX_STEPS, task_ids=task_ids,
                                      on_task=show if verbose else None)
    outcomes: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for outcome in report.tasks:
        outcomes[(task_by_id(outcome.task_id).split, outcome.template)].append(outcome.success)
    for (split, name), oks in sorted(outcomes.items()):
        print(f"{split:8} {name:26} {sum(oks):3}/{len(oks)}")
    for split in splits:
        oks = [ok for (s, _), results in outcomes.items() if s == split for ok in results]
        if oks:
            print(f"{split}: {sum(oks)}/{len(oks)} = {sum(oks) / len(oks):.1%}")
    totals = report.totals()
    print(f"all: {totals['successes']}/{totals['tasks']} = {totals['success_rate'] or 0:.1%} "
          f"in {time.monotonic() - started:.0f} s")
    failures = [t for t in report.tasks if not t.success]
    for failure in failures:
        print(f"FAILED {failure.task_id}: {failure.reason} | answer: {failure.answer!r}")
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
