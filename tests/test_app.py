"""The Gradio app in a real browser: the app runs in-process (tiny model + the scripted model in the embedded endpoint,
a real MCP server subprocess, a real store) and Chromium drives it through Playwright.

The tests share one page, in order, as one visitor would: the agent runs make the traces that curation edits, training
trains on and evaluation scores. Set MCPFT_SCREENSHOTS=DIR to keep a screenshot of each tab there.
"""

import json
import os
import re
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from mcpft.agent.loop import REJECTED
from mcpft.train import CPU_MAX_LENGTH
from mcpft.ui import launch, make_context
from tests.scripted import ScriptedBackend

TINY_SERVER = Path(__file__).parent / "tiny_mcp_server.py"
MCP_CONFIG = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(TINY_SERVER), "one"]}}}
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000
SCREENSHOTS = os.environ.get("MCPFT_SCREENSHOTS")
expect.set_options(timeout=WAIT_MS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(ctx):
    """The app of `ctx` on a free port (the model already started, or not needed): its URL; closed after."""
    if not Path(CHROMIUM).exists():
        ctx.close()
        pytest.skip(f"no Chromium at {CHROMIUM} (make test installs Debian's chromium)")
    demo, url = launch(ctx, port=free_port(), start_model=False)
    try:
        yield url
    finally:
        demo.close()
        ctx.close()


@contextmanager
def chromium_page(url: str, timeout_ms: int = WAIT_MS):
    """A page of a headless Chromium at `url`, as a visitor opens it."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            yield page
        finally:
            browser.close()


@contextmanager
def tiny_app(home: Path, model_dir: Path, backends: dict):
    """The app on the tiny model with `backends` beside it and the tiny MCP server: (its context, its URL)."""
    ctx = make_context(data_dir=home, model=str(model_dir), extra_backends=backends, mcp_config=MCP_CONFIG)
    ctx.embedded.start(str(model_dir))
    with served(ctx) as url:
        yield ctx, url


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    with tiny_app(tmp_path_factory.mktemp("home"), tiny_model_dir, {"scripted": ScriptedBackend(calls=1)}) as app:
        yield app


@pytest.fixture(scope="module")
def page(app):
    _, url = app
    with chromium_page(url) as page:
        expect(page.locator("#embedded-status")).to_contain_text("ready")
        yield page


def open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()


def screenshot(page, name: str):
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def visitor_traces(ctx):
    """The traces this page's visitor owns (the only visitor of this app)."""
    owners = {t.owner for t in ctx.store.traces()}
    assert len(owners) == 1 and next(iter(owners)).startswith("browser:"), owners
    return ctx.store.traces()


def sideways_overflow(page, selector: str) -> list[str]:
    """The elements inside `selector` wider than their box that scroll sideways (a column out of sight)."""
    return page.locator(selector).evaluate("""root => [root, ...root.querySelectorAll('*')]
        .filter(el => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX) && el.scrollWidth > el.clientWidth + 1)
        .map(el => `${el.tagName}.${el.className}: ${el.scrollWidth} > ${el.clientWidth}`)""")


def send(page, text: str):
    page.locator("#agent-input textarea").fill(text)
    page.locator("#agent-send").click()


def test_all_five_tabs_render(page):
    for name, element in (("Endpoint", "#base-url"), ("Agent", "#agent-chat"), ("Curate", "#traces-table"),
                          ("Train", "#loss-plot"), ("Evaluate", "#side-by-side")):
        open_tab(page, name)
        expect(page.locator(element).first).to_be_visible()
    open_tab(page, "Endpoint")
    model = page.locator("#endpoint-model input")
    model.fill("scripted")
    model.press("Enter")
    expect(page.locator("#tools-table")).to_be_visible()
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#tools-table")).to_contain_text("echo")
    screenshot(page, "endpoint")


def test_approving_a_call_shows_its_result_then_the_answer(app, page):
    ctx, _ = app
    open_tab(page, "Agent")
    send(page, "hello")
    approval = page.locator("#approvals")
    expect(approval).to_contain_text('echo({"text": "hello"})')
    expect(approval.locator("input[type=checkbox]")).to_be_checked()
    screenshot(page, "agent-approval")
    page.locator("#run-approved").click()
    chat = page.locator("#agent-chat")
    expect(chat).to_contain_text("The tool said: one: hello")
    expect(chat.get_by_text("Result of echo")).to_be_visible()
    expect(page.locator("#agent-status")).to_contain_text("Answered: 2 step(s), 1 tool call(s), 0 rejected")
    screenshot(page, "agent")
    (trace,) = visitor_traces(ctx)
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "tool", "assistant"]
    assert trace.messages[2]["content"] == "one: hello" and trace.model == "scripted"


def test_rejecting_a_call_records_the_rejection(app, page):
    ctx, _ = app
    page.locator("#agent-new").click()
    expect(page.locator("#agent-status")).to_contain_text("New conversation")
    send(page, "please do not")
    expect(page.locator("#approvals")).to_contain_text("echo")
    page.locator("#reject-all").click()
    expect(page.locator("#agent-chat")).to_contain_text(f"The tool said: {REJECTED}")
    rejected = [t for t in visitor_traces(ctx) if t.messages[0]["content"] == "please do not"]
    assert len(rejected) == 1 and rejected[0].messages[2]["content"] == REJECTED


def table_row(page, table: str, text: str):
    """The visible row of a Gradio Dataframe holding `text` (the grid's rows, not its hidden sizing copy)."""
    return page.locator(table).get_by_role("row").filter(has_text=text)


def trace_row(page, text: str):
    return table_row(page, "#traces-table", text)


def test_curate_edits_persist_to_the_store(app, page):
    ctx, _ = app
    open_tab(page, "Curate")
    row = trace_row(page, "please do not")
    expect(row).to_be_visible()
    tags_cell = row.get_by_role("gridcell").nth(2)
    tags_cell.dblclick()
    editor = tags_cell.get_by_label("Edit cell")
    editor.fill("heldout")
    editor.press("Enter")
    expect(page.locator("#curate-note")).to_contain_text("tags heldout")
    (heldout,) = [t for t in visitor_traces(ctx) if t.messages[0]["content"] == "please do not"]
    assert heldout.tags == ["heldout"]

    trace_row(page, "hello").get_by_role("gridcell").nth(3).click()
    expect(page.locator("#messages-table")).to_contain_text("The tool said: one: hello")
    assert sideways_overflow(page, "#messages-table") == [], "the messages table scrolls sideways"
    table_row(page, "#messages-table", "The tool said").get_by_role("gridcell").nth(2).click()
    value = page.locator("#message-value textarea")
    expect(value).to_have_value("The tool said: one: hello")
    value.fill("The echo tool answered: one: hello")
    page.locator("#save-edit").click()
    expect(page.locator("#messages-table")).to_contain_text("The echo tool answered")
    (edited,) = [t for t in visitor_traces(ctx) if t.messages[0]["content"] == "hello"]
    assert edited.messages[-1]["content"] == "The echo tool answered: one: hello"
    assert [h["op"] for h in ctx.store.history(edited.id)] == ["edit messages[3].content"]


def test_trace_table_opens_no_empty_cell_menu(page):
    """The traces table has a fixed size: its body cells have nothing for Gradio's cell menu (no empty box)."""
    open_tab(page, "Curate")
    tags_cell = trace_row(page, "hello").get_by_role("gridcell").nth(2)
    tags_cell.click(button="right")
    expect(page.get_by_role("menu")).to_be_hidden()
    tags_cell.click()
    expect(tags_cell.get_by_label("Open cell menu")).to_be_hidden()


def test_unroll_preview_highlights_the_trained_spans(page):
    preview = page.locator("#unroll-preview")
    trained, untrained = preview.locator(".token.highlighted"), preview.locator(".token:not(.highlighted)")
    expect(trained.filter(has_text="The echo tool answered: one: hello<|im_end|>")).to_be_visible()
    expect(trained.filter(has_text='{"name": "echo", "arguments": {"text": "hello"}}')).to_be_visible()
    expect(untrained.filter(has_text="one: hello").first).to_be_visible()  # the tool result is context, not trained
    expect(trained.filter(has_text="<tool_response>")).to_have_count(0)
    expect(page.locator("#token-summary")).to_contain_text(f"of max {CPU_MAX_LENGTH}")
    screenshot(page, "curate")


def test_train_says_what_will_train_before_it_starts(page):
    open_tab(page, "Train")
    page.locator("#train-plan-button").click()
    plan = page.locator("#train-plan")
    expect(plan).to_contain_text(re.compile(r"\d+ of \d+ row\(s\) will train"), timeout=60_000)
    expect(plan).to_contain_text("Estimated time on this CPU")
    expect(plan).to_contain_text("reference 2-core CPU")  # no run here yet
    page.locator("#max-length input").fill("16")  # no row fits: each is named with its length
    page.locator("#train-plan-button").click()
    expect(plan).to_contain_text(re.compile(r"Nothing would train: all \d+ row\(s\) were left out: .*longer than "
                                            r"max_length 16 \(\d+ tokens\)"), timeout=60_000)
    page.locator("#max-length input").fill("0")
    page.locator("#lora-layers input").fill("9")  # the app's tiny model has 2 decoder layers
    page.locator("#train-plan-button").click()
    expect(plan).to_contain_text(re.compile(r"Nothing would train: lora_layers 9: .* has only 2 decoder layers"),
                                 timeout=60_000)
    page.locator("#lora-layers input").fill("0")


def test_training_draws_the_loss_plot(app, page):
    ctx, _ = app
    open_tab(page, "Train")
    expect(page.locator("#train-device")).to_contain_text("trl+peft")
    page.locator("#max-steps input").fill("2")
    page.locator("#train-start").click()
    expect(page.locator("#train-progress-text")).to_contain_text("finished: 2/2 steps", timeout=180_000)
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    expect(page.locator("#train-result")).to_contain_text("Adapter:")
    screenshot(page, "train")
    runs = list((ctx.data_dir / "runs").glob("*/*/adapter_config.json"))
    assert len(runs) == 1
    log = page.locator("#train-log textarea").input_value()
    page.reload()  # the run lives in the app, not in the page: a reloaded page shows it again
    expect(page.locator("#embedded-status")).to_contain_text("ready")
    open_tab(page, "Train")
    expect(page.locator("#train-progress-text")).to_contain_text("finished: 2/2 steps")
    expect(page.locator("#train-log textarea")).to_have_value(log)
    expect(page.locator("#train-result")).to_contain_text("Adapter:")
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    page.locator("#train-plan-button").click()  # the next run is priced from this one's measured speed
    expect(page.locator("#train-plan")).to_contain_text("from this machine's last run", timeout=60_000)


def test_evaluate_shows_the_side_by_side_table(page):
    open_tab(page, "Evaluate")
    expect(page.locator("#heldout-note")).to_contain_text("1 trace(s)")
    page.locator("#eval-max-new input").fill("4")
    page.locator("#eval-start").click()
    table = page.locator("#side-by-side")
    expect(table).to_contain_text("please do not", timeout=180_000)
    expect(page.locator("#eval-metrics")).to_contain_text("Steps passed")
    expect(page.locator("#eval-bars")).to_contain_text("Right arguments")
    expect(table).to_contain_text("Expected: ")
    for cell in table.locator("tbody tr").first.locator("td").all()[1:]:  # each model's verdict, then its answer
        verdict, answer = cell.inner_text().split("\n", 1)
        assert re.match(r"[✓✗] (passed|failed)", verdict) and answer.strip(), cell.inner_text()
    status = page.locator("#eval-status")  # the verdict in words, counts first, and the sample called small
    expect(status).to_contain_text(re.compile(r"Fine-tuned passed \d+ of \d+ held-out steps \(base \d+ of \d+\)"))
    expect(status).to_contain_text("That is a small sample")
    screenshot(page, "evaluate")


def test_live_side_by_side_chat_answers_with_both_models(app, page):
    page.locator("#compare-prompt textarea").fill("compare me")
    page.locator("#compare-send").click()
    expect(page.locator("#eval-status")).to_contain_text("Done.", timeout=180_000)
    for chat in ("#compare-base", "#compare-tuned"):
        expect(page.locator(chat)).to_contain_text("compare me")
    ctx, _ = app
    chats = [t for t in visitor_traces(ctx) if "side-by-side" in t.tags]
    assert len(chats) == 2 and not any(t.included for t in chats)
    assert {t.model for t in chats} == {ctx.embedded.status.models[0], next(
        (ctx.data_dir / "runs").glob("*/*")).name}


def test_import_and_export_through_the_page(app, page, tmp_path):
    trace = {"model": "imported-model", "tools": [], "messages": [
        {"role": "user", "content": "imported question"}, {"role": "assistant", "content": "imported answer"}]}
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(trace) + "\n")
    open_tab(page, "Curate")
    page.get_by_text("Import, export, push").click()
    page.locator("#import-files input[type=file]").set_input_files(str(source))
    page.locator("#import-button").click()
    expect(page.locator("#import-report")).to_contain_text("Imported 1 trace(s)")
    expect(trace_row(page, "imported question")).to_be_visible()
    page.locator("#export-button").click()
    with page.expect_download() as download:
        page.locator("#export-file a").first.click()
    exported = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert "imported answer" in {m["content"] for row in exported for m in row["messages"]}


def test_another_visitor_sees_none_of_these_traces(app, page):
    ctx, url = app
    stranger = page.context.browser.new_page()
    try:
        stranger.goto(url)
        open_tab(stranger, "Curate")
        expect(stranger.locator("#traces-table")).to_contain_text("first user message")
        expect(stranger.locator("#curate-note")).to_be_attached()
        expect(table_row(stranger, "#traces-table", "hello")).to_have_count(0)
        assert len({t.owner for t in ctx.store.traces()}) == 1  # the stranger made none and sees none
    finally:
        stranger.close()
