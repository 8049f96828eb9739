"""The demo in one click, in a real browser: the Evaluate tab's button runs the whole payoff (the real teacher in the
real browser, training a tiny model, the held-out task with both models), shows each stage as it goes, then the
verdict in words, bars and the task side by side; a reloaded page shows the last run again."""

import re

import pytest
from playwright.sync_api import expect

from mcpft.config import load_settings
from mcpft.ui import make_context
from tests.test_app import chromium_page, open_tab, screenshot, served

WAIT_MS = 240_000


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    settings = {**load_settings(), "demo": {"train_traces": 2, "heldout_tasks": 1, "epochs": 1,
                                            "agent_max_steps": 2, "max_new_tokens": 8}}
    ctx = make_context(data_dir=tmp_path_factory.mktemp("home"), model=str(tiny_model_dir), settings=settings,
                       mcp_config={"mcpServers": {}})
    with served(ctx) as url:
        yield ctx, url


def test_the_demo_button_runs_collect_train_compare_and_says_the_result(app):
    ctx, url = app
    with chromium_page(url, timeout_ms=WAIT_MS) as page:
        open_tab(page, "Evaluate")
        expect(page.locator("#demo-status")).to_contain_text("No demo run yet.")  # the page knows its visitor
        page.locator("#demo-run").click()
        status = page.locator("#demo-status")
        expect(status).to_contain_text("Collect teacher traces in the browser")
        expect(status).to_contain_text(re.compile(r"\d+ s so far"))
        expect(status).to_contain_text(re.compile(r"Train the small model on them: (preparing…|\d+ of \d+…|done)"))
        expect(status).to_contain_text("Done in", timeout=WAIT_MS)
        result = page.locator("#demo-result")
        expect(result).to_contain_text(re.compile(r"Fine-tuned passed [01] of 1 held-out tasks \(base .+: [01] of 1\)"))
        expect(result).to_contain_text("That is a small sample")
        expect(page.locator("#demo-bars")).to_contain_text("Held-out tasks passed")
        tasks = page.locator("#demo-tasks")
        expect(tasks).to_contain_text("Go to the Acme Outfitters shop at the demo site")  # the first held-out task
        expect(tasks).to_contain_text("Expected: The fifth product")
        expect(tasks.locator("td")).to_have_count(3)
        sentence = result.inner_text()
        screenshot(page, "evaluate-demo")

        page.reload()  # a new page load finds the visitor's last run again
        open_tab(page, "Evaluate")
        expect(page.locator("#demo-result")).to_contain_text(sentence.splitlines()[0])
        expect(page.locator("#demo-tasks")).to_contain_text("Expected: The fifth product")
    (run,) = (ctx.data_dir / "payoff").glob("*/*/payoff.json")
    assert (run.parent / "adapter" / "adapter_config.json").is_file()
