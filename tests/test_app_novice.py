"""The app as someone who does not program meets it (issue 14), in a real browser: the model chosen beside Send, a
demo task that picks the teacher, Stop that ends a turn waiting for approval, a status line that tells the truth,
curation that is safe, the MCP servers as a list, and a first page that says what to do.

The app runs in-process with the tiny model and scripted models (tests.scripted) in the embedded endpoint, the tiny
MCP server, a real store; Chromium drives it through Playwright. The tests share one page, in order.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect

from mcpft.agent.loop import NOT_RUN
from mcpft.demo.world import TEACHER, TeacherBackend
from mcpft.serve import Generation, GenerationRequest
from tests.scripted import ScriptedBackend
from tests.test_app import TINY_SERVER, chromium_page, open_tab, tiny_app
from tests.test_app_leave import EndlessBackend

GIVE_UP = "Sorry, I could not finish this task."


class SayingBackend:
    """A model that answers every request with one fixed text."""

    def __init__(self, text: str):
        self.text = text

    def start(self, request: GenerationRequest) -> Generation:
        return Generation(chunks=iter([self.text]))


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    backends = {"scripted": ScriptedBackend(calls=1), "looper": ScriptedBackend(calls=99),
                "quitter": SayingBackend(GIVE_UP), "endless": EndlessBackend(), TEACHER: TeacherBackend()}
    with tiny_app(tmp_path_factory.mktemp("home"), tiny_model_dir, backends) as app:
        yield app


@pytest.fixture(scope="module")
def page(app):
    _, url = app
    with chromium_page(url) as page:
        # The page knows its visitor once the servers connect at start: a Send before that would be refused.
        expect(page.locator("#tools-table")).to_contain_text("echo")
        yield page


def traces_of(ctx, user_message: str):
    """The traces with this user message (a conversation goes on while the model stays the same)."""
    return [t for t in ctx.store.traces() if any(m["role"] == "user" and m["content"] == user_message
                                                   for m in t.messages)]


def choose(page, dropdown: str, value: str):
    """Type a value into a Gradio dropdown (custom values allowed) and commit it."""
    field = page.locator(f"{dropdown} input")
    field.fill(value)
    option = page.get_by_role("option", name=value, exact=True)
    if option.count():  # a listed model: click it (Enter would take the first match, "scripted-teacher" too)
        option.click()
    else:
        field.press("Enter")
    expect(field).to_have_value(value)


def choose_model(page, model: str):
    """The model beside Send; the conversation takes the Endpoint tab's model field, which follows it."""
    choose(page, "#agent-model", model)
    expect(page.locator("#endpoint-model input")).to_have_value(model)


def send(page, text: str, model: str | None = None):
    if model:
        choose_model(page, model)
    page.locator("#agent-input textarea").fill(text)
    page.locator("#agent-send").click()


# -- Agent --------------------------------------------------------------------------------------------------------


def test_the_model_is_chosen_beside_send_and_a_call_title_names_its_arguments(app, page):
    ctx, _ = app
    open_tab(page, "Agent")
    expect(page.locator("#agent-model input")).to_have_value(str(ctx.embedded.status.models[0]))
    send(page, "hello", model="scripted")
    expect(page.locator("#approvals")).to_contain_text("echo")
    # The collapsed title says the tool and its key argument, not only the tool's name.
    expect(page.locator("#agent-chat")).to_contain_text('Tool call: echo · "hello"')
    page.locator("#run-approved").click()
    expect(page.locator("#agent-chat")).to_contain_text("The tool said: one: hello")
    expect(page.locator("#agent-status")).to_contain_text("Answered: 2 step(s), 1 tool call(s), 0 rejected")
    (trace,) = traces_of(ctx, "hello")
    assert trace.model == "scripted"
    expect(page.locator("#endpoint-model input")).to_have_value("scripted")  # one model field, shown twice


def test_picking_a_demo_task_picks_the_teacher(page):
    open_tab(page, "Agent")
    page.locator("#demo-task input").click()
    page.get_by_role("option").first.click()
    expect(page.locator("#agent-input textarea")).not_to_have_value("")
    expect(page.locator("#agent-model input")).to_have_value(TEACHER)
    expect(page.locator("#task-note")).to_contain_text(f"Model set to {TEACHER}")
    expect(page.locator("#endpoint-model input")).to_have_value(TEACHER)


def test_stop_while_a_call_waits_for_approval_ends_the_turn(app, page):
    ctx, _ = app
    send(page, "wait for me", model="scripted")
    expect(page.locator("#approvals")).to_contain_text("echo")
    page.locator("#agent-stop").click()
    status = page.locator("#agent-status")
    expect(status).to_contain_text("Stopped by you")
    expect(status).to_contain_text("1 tool call(s) recorded as not run")
    expect(page.locator("#approvals:visible")).to_have_count(0)
    expect(page.locator("#agent-chat")).to_contain_text("Not run: echo")
    (trace,) = traces_of(ctx, "wait for me")
    assert trace.messages[-1]["role"] == "tool" and trace.messages[-1]["content"] == NOT_RUN
    assert "unanswered_call" not in {flag["code"] for flag in trace.flags}


def test_stop_keeps_the_text_streamed_so_far(page):
    send(page, "think about it", model="endless")
    chat = page.locator("#agent-chat")
    expect(chat).to_contain_text("still thinking")
    page.locator("#agent-stop").click()
    expect(page.locator("#agent-status")).to_contain_text("Stopped by you")
    expect(chat).to_contain_text("still thinking")


def test_the_status_line_says_the_step_limit_was_reached(page):
    # The last test's Stop may still be updating the tab: a setting typed while outputs land can be re-rendered away.
    expect(page.locator("#agent-status [data-testid=status-tracker]")).to_have_class(re.compile(r"\bhide\b"))
    page.get_by_text("Settings (apply from the next new conversation)").click()
    # Just after the accordion opens, Gradio sets its fields' first values once more: a value typed that early is
    # lost. Choosing the model first (round trips to the server) lets that pass.
    choose_model(page, "looper")
    steps = page.locator("#agent-max-steps input")
    steps.fill("2")
    page.locator("#auto-approve input").check()
    expect(steps).to_have_value("2")
    send(page, "loop forever")
    expect(page.locator("#agent-status")).to_contain_text("Step limit reached: 2 step(s)")
    page.locator("#auto-approve input").uncheck()


def test_the_status_line_says_the_model_gave_up(page):
    send(page, "do the impossible", model="quitter")
    expect(page.locator("#agent-status")).to_contain_text("The model gave up")


# -- Curate -------------------------------------------------------------------------------------------------------


def trace_row(page, text: str):
    """The visible row of the traces table holding `text` (the grid's rows, not its hidden sizing copy)."""
    return page.locator("#traces-table").get_by_role("row").filter(has_text=text)


def export(page) -> list[dict]:
    page.locator("#export-button").click()
    with page.expect_download() as download:
        page.locator("#export-file a").first.click()
    return [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]


def test_an_export_with_nothing_to_export_names_the_checkboxes(app, page):
    open_tab(page, "Curate")
    expect(trace_row(page, "do the impossible")).to_be_visible()  # every trace so far is flagged
    page.get_by_text("Import, export, push").click()
    page.locator("#export-button").click()
    toast = page.get_by_text("Nothing to export")
    expect(toast).to_contain_text("tick “Include flagged traces”")
    expect(toast).not_to_contain_text("--include-flagged")


def test_flags_read_as_plain_words_and_can_be_hidden(app, page, tmp_path):
    ctx, _ = app
    from mcpft.ingest import import_paths

    owner = ctx.store.traces()[0].owner
    source = tmp_path / "clean.jsonl"
    source.write_text("".join(json.dumps({"model": "m", "tools": [], "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": f"answer to {question}"}]}) + "\n"
        for question in ("clean question", "held question")))
    import_paths(ctx.store, [source], owner=owner)
    page.get_by_role("button", name="Refresh").click()
    expect(trace_row(page, "clean question")).to_be_visible()  # the refresh landed: it cannot overwrite the filter
    expect(trace_row(page, "do the impossible")).to_contain_text("the model gave up")
    expect(trace_row(page, "loop forever")).to_contain_text("hit the step limit")
    page.locator("#hide-flagged input").check()
    expect(trace_row(page, "do the impossible")).to_have_count(0)
    expect(trace_row(page, "clean question")).to_be_visible()
    expect(page.locator("#curate-note")).to_contain_text("flagged trace(s) hidden")


def test_the_editable_columns_come_first_and_one_click_does_one_thing(app, page):
    ctx, _ = app
    headers = page.locator("#traces-table").get_by_role("columnheader")
    for position, name in enumerate(("included", "rating", "tags")):
        expect(headers.nth(position)).to_contain_text(name)
    row = trace_row(page, "clean question")
    (clean,) = traces_of(ctx, "clean question")
    row.locator("input[type=checkbox]").click()  # one click unticks it, and opens nothing
    expect(page.locator("#curate-note")).to_contain_text(f"{clean.id}: excluded")
    assert ctx.store.get(clean.id).included is False
    expect(page.locator("#trace-header")).not_to_contain_text(clean.id)
    row.get_by_role("gridcell").nth(3).click()  # a click elsewhere in the row opens the trace
    expect(page.locator("#trace-header")).to_contain_text("excluded")
    row.locator("input[type=checkbox]").click()
    expect(page.locator("#trace-header")).not_to_contain_text("excluded")  # the header follows the table
    assert ctx.store.get(clean.id).included is True


def test_the_cell_menu_offers_only_what_works(page):
    trace_row(page, "clean question").get_by_role("gridcell").nth(2).click(button="right")
    for item in ("Add column", "Delete row", "Add row", "Delete column"):
        expect(page.get_by_role("menuitem", name=item)).to_have_count(0)
    page.keyboard.press("Escape")


def test_export_leaves_the_heldout_set_out_and_rows_keep_their_tags(app, page):
    ctx, _ = app
    (held,) = traces_of(ctx, "held question")
    from mcpft import curate

    curate.set_tags(ctx.store, held.id, ["heldout", "shop"])
    expect(page.locator("#export-heldout")).to_contain_text("Include the held-out traces (tagged heldout)")
    rows = export(page)
    assert {row["trace_id"] for row in rows} == {traces_of(ctx, "clean question")[0].id}
    assert all(row["tags"] == [] for row in rows)
    page.locator("#export-heldout input").check()
    rows = export(page)
    assert {tuple(row["tags"]) for row in rows if row["trace_id"] == held.id} == {("heldout", "shop")}


# -- Endpoint -----------------------------------------------------------------------------------------------------


def test_the_servers_are_a_list_and_their_tools_show_at_start(app, page):
    """A page just opened: the servers' list and the tools are there without pressing anything; the JSON waits
    behind "Advanced"."""
    _, url = app
    fresh = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        fresh.goto(url)
        servers = fresh.locator("#mcp-servers")
        expect(servers).to_contain_text("tiny")
        expect(servers).to_contain_text("connected")
        expect(servers).to_contain_text("echo")
        expect(fresh.locator("#tools-table")).to_contain_text("echo")
        expect(fresh.locator("#mcp-json")).to_be_hidden()
        expect(fresh.locator("body")).not_to_contain_text("console")
    finally:
        fresh.close()


def test_add_server_then_reset_to_default(page):
    open_tab(page, "Endpoint")
    page.get_by_role("button", name="Add server").first.click()  # the section's header, before its button
    page.get_by_label("A command on this machine").check()
    page.locator("#server-name textarea").fill("second")
    page.locator("#server-command textarea").fill(
        f"{sys.executable} {TINY_SERVER} two")
    page.locator("#add-server-button").click()
    servers = page.locator("#mcp-servers")
    expect(servers.get_by_role("row").filter(has_text="second")).to_contain_text("connected")
    expect(page.locator("#tools-table")).to_contain_text("second")
    page.get_by_text("Advanced: the servers as JSON").click()
    page.locator("#mcp-reset").click()
    expect(servers.get_by_role("row").filter(has_text="second")).to_have_count(0)
    expect(servers).to_contain_text("connected")


def test_testing_the_teacher_says_it_is_fine(page):
    open_tab(page, "Endpoint")
    choose(page, "#endpoint-model", TEACHER)
    page.get_by_role("button", name="Test connection").click()
    report = page.locator("#probe-report")
    expect(report).to_contain_text("Connected")
    expect(report).to_contain_text(f"{TEACHER}: fine. It answers the demo site's tasks only")
    expect(report).not_to_contain_text("Problem")
    expect(report).not_to_contain_text(re.compile(r"\b400\b"))  # an HTTP 400, not a port such as 40049


def test_a_connection_test_says_what_it_is_doing(page):
    with socket.socket() as silent:  # a server that accepts and never answers: the test is seen under way
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        page.get_by_label("Local vLLM").check()
        page.locator("#base-url textarea").fill(f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        choose(page, "#endpoint-model", "some-model")
        page.get_by_role("button", name="Test connection").click()
        expect(page.locator("#probe-report")).to_contain_text("listing its models, then asking `some-model`"
                                                              .replace("`", ""))
    page.get_by_label("Embedded (in this app)").check()


# -- First-run guide ----------------------------------------------------------------------------------------------


def test_the_first_page_says_what_to_do_and_each_step_opens_its_tab(page):
    guide = page.locator("#guide")
    for step in ("1. Collect", "2. Curate", "3. Train", "4. Compare"):
        expect(guide).to_contain_text(step)
    for button, shown in (("#guide-curate", "#curate-purpose"), ("#guide-train", "#train-purpose"),
                          ("#guide-evaluate", "#evaluate-purpose"), ("#guide-agent", "#agent-purpose")):
        page.locator(button).click()
        expect(page.locator(shown)).to_be_visible()
    expect(page.locator("#agent-purpose")).to_contain_text("collects traces")
    open_tab(page, "Endpoint")
    expect(page.locator("#endpoint-purpose")).to_be_visible()
