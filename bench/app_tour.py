"""The app as a person meets it, timed and photographed: the real default app (packaged SmolLM2 on CPU, the scripted
teacher beside it, the Playwright browser) driven by Chromium through Python `playwright`.

    MCPFT_HOME=/tmp/mcpft-tour .venv/bin/python bench/app_tour.py --traces traces.jsonl --heldout heldout.jsonl \
        --screenshots docs/screenshots

1. time to the first page: from this process's start (imports included, model preparation excluded) until the five
   tabs are visible (goal <= 15 s on CPU);
2. Endpoint: the embedded endpoint ready, the browser's MCP tools listed;
3. Agent: a held-out demo task picked from the list, run by `scripted-teacher` in the real browser, each tool call
   approved through its checkbox;
4. Curate: the teacher traces in `--traces` / `--heldout` imported through the page (tagged `demo` / `heldout`),
   the agent's trace opened, its unroll preview;
5. Train: a short LoRA run on SmolLM2; while it trains, another tab's answer time (goal <= 1 s);
6. Evaluate: baseline vs fine-tuned on the held-out traces, the side-by-side table.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: they are part of a cold start

import argparse  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from mcpft.ui import launch, make_context  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TEACHER = "scripted-teacher"
TABS = ("Endpoint", "Agent", "Curate", "Train", "Evaluate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Tour:
    def __init__(self, page, shots: Path | None):
        self.page, self.shots = page, shots
        self.prompt = ""  # the agent's task, once sent

    def tab(self, name: str):
        self.page.get_by_role("tab", name=name).click()

    def shot(self, name: str):
        if self.shots:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.shots / f"{name}.png"))

    def endpoint(self):
        self.tab("Endpoint")
        expect(self.page.locator("#embedded-status")).to_contain_text("ready", timeout=900_000)
        model = self.page.locator("#endpoint-model input")
        model.fill(TEACHER)
        model.press("Enter")
        self.page.get_by_role("button", name="Connect", exact=True).click()
        expect(self.page.locator("#tools-table")).to_contain_text("browser_navigate", timeout=120_000)
        self.shot("endpoint")

    def agent(self, task_label: str) -> int:
        """Run one demo task, approving each call; returns how many calls were approved."""
        self.tab("Agent")
        picker = self.page.locator("#demo-task input")
        picker.click()
        picker.fill(task_label)
        self.page.get_by_role("option", name=task_label, exact=True).click()
        prompt = self.page.locator("#agent-input textarea")
        expect(prompt).not_to_have_value("")
        self.prompt = prompt.input_value()
        self.page.locator("#agent-send").click()
        status, approved = self.page.locator("#agent-status"), 0
        while True:
            expect(status).to_contain_text(re.compile("wait for your approval|Answered|error|Step limit|gave up"),
                                           timeout=120_000)
            if "wait for your approval" not in status.inner_text():
                break
            if approved == 0:
                self.shot("agent-approval")
            self.page.locator("#run-approved").click()
            approved += 1
            expect(status).not_to_contain_text("wait for your approval")
        self.shot("agent")
        return approved

    def curate(self, traces: Path, heldout: Path):
        self.tab("Curate")
        self.page.get_by_text("Import, export, push").click()
        for path, tag in ((traces, "demo"), (heldout, "heldout")):
            self.page.locator("#import-files input[type=file]").set_input_files(str(path))
            self.page.get_by_label("Tag the imported traces with (comma-separated)").fill(tag)
            self.page.locator("#import-button").click()
            expect(self.page.locator("#import-report")).to_contain_text("Imported", timeout=60_000)
            self.page.locator("#import-files button[aria-label='Clear']").first.click()
        self.trace_row(self.prompt[:40]).get_by_role("gridcell").nth(3).click()
        trained = self.page.locator("#unroll-preview .token.highlighted")
        expect(trained.first).to_be_visible(timeout=120_000)
        self.page.locator("#traces-table").scroll_into_view_if_needed()
        self.shot("curate")
        trained.last.scroll_into_view_if_needed()  # the last trained span: the answer, after the tool results
        self.shot("curate-preview")

    def trace_row(self, text: str):
        return self.page.locator("#traces-table").get_by_role("row").filter(has_text=text).first

    def train(self, max_steps: int) -> list[float]:
        """Start training, time another tab while it runs, then wait for the end."""
        self.tab("Train")
        self.page.locator("#max-steps input").fill(str(max_steps))
        self.page.get_by_label("Gradient accumulation steps").fill("1")  # one row a step: a short tour
        self.page.locator("#train-start").click()
        expect(self.page.locator("#train-progress-text")).to_contain_text(re.compile(r"step \d+/\d+|finished"),
                                                                          timeout=600_000)
        answers = [self.curate_answer_s() for _ in range(5)]
        self.tab("Train")
        expect(self.page.locator("#train-progress-text")).to_contain_text("finished", timeout=1_800_000)
        expect(self.page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
        self.page.locator("#loss-plot").scroll_into_view_if_needed()
        self.shot("train")
        return answers

    def curate_answer_s(self) -> float:
        """Open the Curate tab and pick a trace: seconds until its messages are shown."""
        self.tab("Curate")
        messages = self.page.locator("#messages-table")
        rows = self.page.locator("#traces-table").get_by_role("row").filter(has_text=TEACHER)
        before = messages.inner_text()
        for i in range(rows.count()):
            started = time.perf_counter()
            rows.nth(i).get_by_role("gridcell").nth(3).click()
            try:
                expect(messages).not_to_have_text(before, timeout=30_000)
            except AssertionError:
                continue  # this row was already shown: try the next
            return time.perf_counter() - started
        raise RuntimeError("no trace row changed the message view")

    def evaluate(self, max_new_tokens: int):
        self.tab("Evaluate")
        expect(self.page.locator("#heldout-note")).to_contain_text("trace(s)")
        self.page.locator("#eval-max-new input").fill(str(max_new_tokens))
        self.page.locator("#eval-start").click()
        expect(self.page.locator("#eval-metrics")).to_contain_text("Steps passed", timeout=1_800_000)
        self.page.locator("#eval-metrics").scroll_into_view_if_needed()
        self.shot("evaluate")
        self.page.locator("#side-by-side").scroll_into_view_if_needed()
        self.shot("evaluate-side-by-side")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, required=True, help="teacher traces to train on (an export)")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out teacher traces (an export)")
    parser.add_argument("--task", default="heldout: product_spec-ember-camp-stove-material")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--eval-max-new-tokens", type=int, default=96)
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args()

    ctx = make_context()
    demo, url = launch(ctx, port=free_port())
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            for name in TABS:
                expect(page.get_by_role("tab", name=name)).to_be_visible()
            first_page_s = time.perf_counter() - STARTED
            print(f"first page: {first_page_s:.1f} s after the process started (model loading in the background)")
            tour = Tour(page, args.screenshots)
            tour.shot("start")  # the first page: the four-step guide above the tabs
            try:
                run_tour(tour, args)
            except Exception:
                tour.shot("failed")  # what the page showed when a step gave up
                raise
            browser.close()
    finally:
        demo.close()
        ctx.close()


def run_tour(tour: Tour, args):
    loaded = time.perf_counter()
    tour.endpoint()
    print(f"embedded endpoint ready and the browser's tools listed: {time.perf_counter() - loaded:.1f} s "
          "later")
    approved = tour.agent(args.task)
    print(f"agent: {args.task} answered after {approved} approved tool call(s)")
    tour.curate(args.traces, args.heldout)
    answers = tour.train(args.train_steps)
    print(f"while training: the Curate tab showed a trace in median {statistics.median(answers):.2f} s, "
          f"max {max(answers):.2f} s over {len(answers)} picks")
    tour.evaluate(args.eval_max_new_tokens)
    print("evaluate: metrics and side-by-side shown")


if __name__ == "__main__":
    main()
