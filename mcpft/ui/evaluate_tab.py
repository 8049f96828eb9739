"""Evaluate tab: step scores of the base model and a fine-tuned run on the held-out traces (flagged ones excluded),
before/after metrics and chart, the side-by-side table, and a live chat sending one prompt to both models."""

from __future__ import annotations

import json
import queue
import threading

import gradio as gr

from mcpft.agent.endpoint import CompletionSettings, Endpoint
from mcpft.agent.mcp import MCPConfigError, MCPServerError
from mcpft.agent.session import AgentSession, Conversation, EmbeddedEndpoint, wait_any
from mcpft.dataset import rows_from_traces
from mcpft.evaluate import (
    RATE_WORDS, RATES, EvaluationError, compare, comparison_sentence, evaluate_rows, local_generator, steps_from_rows)
from mcpft.models import ModelError
from mcpft.train import read_run_record, update_run_record
from mcpft.ui import demo_panel
from mcpft.ui.agent_tab import chat_messages
from mcpft.ui.charts import CSS, Attempt, bars_html, side_by_side_html
from mcpft.ui.endpoint_tab import close_session, parse_mcp_json
from mcpft.ui.owner import owner_slug, require_owner
from mcpft.selection import HELDOUT_TAG
from mcpft.ui.state import SESSION_TTL_S, AppContext, Shared
from mcpft.ui.train_tab import list_runs, owned_run

METRIC_COLUMNS = ["metric", "base", "fine-tuned", "change"]
PURPOSE = ("**Evaluate** shows whether training paid off: the base and the fine-tuned model on tasks or steps "
           "neither trained on, side by side.")
NOTHING_YET = "<p>Each held-out step shows here once both models are scored.</p>"
POLL_S = 30.0
ANSWER_CHARS = 600


def heldout_rows(ctx: AppContext, owner: str, tag: str) -> list[dict]:
    """Rows of the owner's included, unflagged traces tagged `tag`."""
    tag = (tag or "").strip()
    if not tag:
        raise gr.Error("Name the tag that marks the held-out traces (tag them in the Curate tab).")
    return rows_from_traces(ctx.store.traces(owner=owner, tags=[tag]), by_turn=True, include_flagged=False)


def heldout_text(ctx: AppContext, owner: str, tag: str) -> str:
    if not owner or not (tag or "").strip():
        return ""
    traces = ctx.store.traces(owner=owner, tags=[tag.strip()])
    rows = rows_from_traces(traces, by_turn=True, include_flagged=False)
    try:
        steps = len(steps_from_rows(rows)) if rows else 0
    except EvaluationError:
        steps = 0
    flagged = sum(bool(t.flags) for t in traces)
    return (f"Held-out set: **{len(traces)} trace(s)** tagged `{tag.strip()}` ({flagged} flagged, left out) → "
            f"{len(rows)} row(s), **{steps} step(s)** to score. The Train tab never trains on them.")


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def metrics_rows(comparison: dict) -> list[list]:
    totals = comparison["totals"]
    return [[RATE_WORDS[name], _percent(totals["base"][name]), _percent(totals["tuned"][name]),
             "–" if totals["delta"][name] is None else f"{100 * totals['delta'][name]:+.1f} pts"] for name in RATES]


def measures(comparison: dict) -> list[tuple[str, float | None, float | None]]:
    totals = comparison["totals"]
    return [(RATE_WORDS[name], totals["base"][name], totals["tuned"][name]) for name in RATES]


def _answer(side: dict) -> str:
    text = side["output"] or ""
    return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS - 1] + "…"


def _expected(reference: dict) -> str:
    calls = [f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
             for call in reference.get("tool_calls") or []]
    return "call " + ", ".join(calls) if calls else f"answer: {reference.get('content') or '(no text)'}"


def _attempt(side: dict) -> Attempt:
    passed = side["verdict"] == "pass"
    return Attempt(passed, _answer(side), "" if passed else "; ".join([side["verdict"], *side["reasons"]]))


def side_html(comparison: dict) -> str:
    return side_by_side_html("Held-out step", [(step["prompt"], _expected(step["reference"]), _attempt(step["base"]),
                                                _attempt(step["tuned"])) for step in comparison["steps"]])


def comparison_outputs(comparison: dict | None) -> tuple:
    if not comparison:
        return [], "", NOTHING_YET
    return metrics_rows(comparison), bars_html(measures(comparison)), side_html(comparison)


def compare_endpoint(ctx: AppContext, base: str | None, adapter: str) -> EmbeddedEndpoint:
    """The server for the live side-by-side chat: the run's base model and its adapter (one set of weights)."""
    with ctx.compare_lock:
        server = ctx.compare_endpoint
        if server is None:
            server = ctx.compare_endpoint = EmbeddedEndpoint(ctx.data_dir)
        status = server.status
        if status.state != "ready" or (status.model_spec, status.adapter) != (base, adapter):
            try:
                server.start(base, adapter)
            except (ModelError, OSError, ValueError) as error:
                raise gr.Error(f"cannot serve the run for the chat: {error}") from None
        return server


def build(ctx: AppContext, shared: Shared) -> None:
    # Rendered with the page: an update that lands while Gradio mounts a lazily rendered tab can be lost (it sets the
    # new children's first values again a frame later), and the last run's figures arrive by such an update.
    with gr.Tab("Evaluate", id="evaluate", render_children=True) as tab:
        gr.Markdown(PURPOSE, elem_id="evaluate-purpose")
        demo_panel.build(ctx, shared, tab)
        gr.Markdown("### Step scores of your own traces\n"
                    "Scores every step of the held-out traces as the Berkeley Function-Calling Leaderboard does "
                    "(tool name, arguments, no call where none is due, the answer), first with the base model, then "
                    "with the fine-tuned one.")
        with gr.Row():
            run = gr.Dropdown([], label="Fine-tuned run", scale=4, elem_id="eval-run")
            heldout_tag = gr.Textbox(HELDOUT_TAG, label="Held-out traces are tagged", scale=2)
            max_new_tokens = gr.Number(256, label="Max new tokens per step (scores and chat)", precision=0,
                                       minimum=1, scale=1, elem_id="eval-max-new")
        heldout_note = gr.Markdown(elem_id="heldout-note")
        with gr.Row():
            run_button = gr.Button("Run baseline and fine-tuned", variant="primary", elem_id="eval-start")
            stop_button = gr.Button("Stop", variant="stop")
        status = gr.Markdown(elem_id="eval-status")
        with gr.Row():
            metrics = gr.Dataframe(headers=METRIC_COLUMNS, value=[], interactive=False, label="Metrics",
                                   elem_id="eval-metrics")
            bars = gr.HTML(elem_id="eval-bars", css_template=CSS)
        side_by_side = gr.HTML(NOTHING_YET, elem_id="side-by-side", css_template=CSS, max_height=600)
        gr.Markdown("### Live side-by-side chat\nOne prompt to both models through the agent (tool calls "
                    "auto-approved; recorded as traces tagged `side-by-side`, excluded from training).")
        with gr.Row():
            prompt = gr.Textbox(show_label=False, placeholder="A task for both models…", scale=6,
                                elem_id="compare-prompt")
            chat_button = gr.Button("Send to both", scale=1, elem_id="compare-send")
        with gr.Row():
            base_chat = gr.Chatbot(label="Base", height=420, elem_id="compare-base")
            tuned_chat = gr.Chatbot(label="Fine-tuned", height=420, elem_id="compare-tuned")
        chat_sessions = gr.State(None, time_to_live=SESSION_TTL_S,
                                 delete_callback=lambda pair: [close_session(s) for s in pair or ()])

    stops: dict[str, threading.Event] = {}

    def evaluate(owner, run_dir, tag, max_new):
        require_owner(owner)
        folder = owned_run(ctx, owner, run_dir)
        base = read_run_record(folder).get("base_model")
        rows = heldout_rows(ctx, owner, tag)
        if not rows:
            raise gr.Error(f"No held-out rows: tag some included, unflagged traces {tag!r} in the Curate tab.")
        stop_event = stops[owner] = threading.Event()
        reports = {}
        try:
            for side, adapter in (("base", None), ("fine-tuned", folder)):
                yield f"Loading the {side} model…", gr.update(), gr.update(), gr.update()
                events: queue.Queue = queue.Queue()
                worker = threading.Thread(target=_score, args=(events, ctx, rows, base, adapter, int(max_new or 256),
                                                               stop_event), daemon=True)
                worker.start()
                while True:
                    try:
                        event = events.get(timeout=POLL_S)
                    except queue.Empty:
                        continue
                    if isinstance(event, Exception):
                        raise gr.Error(f"The {side} evaluation failed: {event}")
                    if isinstance(event, dict):
                        reports[side] = event
                        break
                    yield f"Scoring the {side} model: step {event[0]}/{event[1]}", gr.update(), gr.update(), gr.update()
            if stop_event.is_set():
                yield "Stopped: nothing compared.", gr.update(), gr.update(), gr.update()
                return
            comparison = compare(reports["base"], reports["fine-tuned"])
            update_run_record(folder, baseline=reports["base"], after=reports["fine-tuned"], comparison=comparison)
            yield comparison_sentence(comparison), *comparison_outputs(comparison)
        finally:
            stops.pop(owner, None)

    def stop(owner):
        stop_event = stops.get(require_owner(owner))
        if stop_event is not None:
            stop_event.set()

    def show_run(owner, run_dir, tag):
        text = heldout_text(ctx, owner, tag)
        if not run_dir or not owner:
            return (text, *comparison_outputs(None))
        comparison = read_run_record(owned_run(ctx, owner, run_dir)).get("comparison")
        return (text, *comparison_outputs(comparison))

    def refresh(owner, run_dir, tag):
        choices = list_runs(ctx, owner) if owner else []
        chosen = run_dir if run_dir in [folder for _, folder in choices] else (choices[0][1] if choices else None)
        return (gr.update(choices=choices, value=chosen), *show_run(owner, chosen, tag))

    def chat(owner, run_dir, text, mcp_json, pair, truncate, max_new):
        require_owner(owner)
        if not (text or "").strip():
            raise gr.Error("Type a prompt first.")
        folder = owned_run(ctx, owner, run_dir)
        base = read_run_record(folder).get("base_model")
        yield gr.update(), gr.update(), pair, "Loading the base model and the adapter…"
        server = compare_endpoint(ctx, base, str(folder))
        pair = _chat_pair(ctx, owner, mcp_json, pair)
        url, (base_name, tuned_name) = server.status.base_url, server.status.models[:2]
        for session, name in zip(pair, (base_name, tuned_name)):
            session.new_conversation(Conversation(
                endpoint=Endpoint(url, name), completion=CompletionSettings(max_tokens=int(max_new or 256)),
                max_steps=int(ctx.settings.get("max_steps", 20)), truncate=int(truncate or 16000),
                tags=("side-by-side",), included=False))
            session.auto_approve = True
            session.send(text)
        views = [session.view() for session in pair]
        yield chat_messages(views[0]), chat_messages(views[1]), pair, "Both models are working…"
        while any(view.running for view in views):
            latest = wait_any(list(pair), [view.version for view in views], timeout=POLL_S)
            if [v.version for v in latest] != [v.version for v in views]:
                yield chat_messages(latest[0]), chat_messages(latest[1]), pair, "Both models are working…"
            views = latest
        yield chat_messages(views[0]), chat_messages(views[1]), pair, "Done."

    owner = shared.owner
    gr.on([tab.select, owner.change], refresh, [owner, run, heldout_tag],
          [run, heldout_note, metrics, bars, side_by_side], show_progress="hidden")
    run.input(show_run, [owner, run, heldout_tag], [heldout_note, metrics, bars, side_by_side])
    heldout_tag.submit(show_run, [owner, run, heldout_tag], [heldout_note, metrics, bars, side_by_side])
    run_button.click(evaluate, [owner, run, heldout_tag, max_new_tokens], [status, metrics, bars, side_by_side],
                     concurrency_limit=1, concurrency_id="evaluate")
    stop_button.click(stop, [owner], None)
    gr.on([chat_button.click, prompt.submit], chat,
          [owner, run, prompt, shared.mcp_json, chat_sessions, shared.truncate, max_new_tokens],
          [base_chat, tuned_chat, chat_sessions, status])


def _score(events: queue.Queue, ctx: AppContext, rows: list[dict], base: str | None, adapter, max_new: int,
           stop_event: threading.Event) -> None:
    """Score `rows` with the base model (or it plus `adapter`), reporting each step; the report or error last."""
    try:
        generator = local_generator(base, adapter=adapter, data_dir=ctx.data_dir, max_new_tokens=max_new)
        events.put(evaluate_rows(rows, generator, on_step=lambda done, total, record: events.put((done, total)),
                                 stop_event=stop_event))
    except Exception as error:  # reported in the tab
        events.put(error)


def _chat_pair(ctx: AppContext, owner: str, mcp_json: str, pair):
    """Two agent sessions sharing one condition (watched together), on the visitor's MCP config."""
    config = parse_mcp_json(mcp_json)
    if pair and all(s.connected for s in pair) and pair[0].config == config:
        return pair
    for session in pair or ():
        session.close()
    condition = threading.Condition()
    folder = ctx.data_dir / "tool-files" / owner_slug(owner)
    try:
        fresh = tuple(AgentSession(config, folder / side, store=ctx.store, owner=owner, source="app-side-by-side",
                                   condition=condition) for side in ("base", "tuned"))
    except MCPConfigError as error:
        raise gr.Error(str(error)) from None
    try:
        for session in fresh:
            session.connect()
    except (MCPConfigError, MCPServerError) as error:
        for session in fresh:
            session.close()
        raise gr.Error(str(error)) from None
    return fresh
