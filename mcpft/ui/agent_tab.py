"""Agent tab: chat with the agent, approve or reject each tool call, watch thinking, calls and results stream in.
Every step is in the store the moment it happens (the session records through `recording.sink_for`)."""

from __future__ import annotations

import dataclasses
import json
import time

import gradio as gr

from mcpft.agent.endpoint import CompletionSettings
from mcpft.agent.loop import NOT_RUN, REJECTED, call_title, describe_call
from mcpft.agent.session import AgentSession, Conversation, SessionError, SessionView
from mcpft.demo.world import DEMO_TAG, DEMO_TOOLS, TEACHER, demo_task_in
from mcpft.serve import DEFAULT_MAX_TOKENS
from mcpft.trace import validate
from mcpft.ui.endpoint_tab import endpoint_from_fields, page_session, wait_for_embedded
from mcpft.ui.owner import require_owner
from mcpft.ui.state import AppContext, Shared

WAIT_SLICE_S = 30.0  # how long one wait for a change lasts before the stream checks again
STOP_WAIT_S = 30.0  # how long Stop waits for the turn to end before it shows the chat as it is
PURPOSE = ("**Agent** collects traces: chat with a model that uses the browser's tools, approve each tool call, "
           "and every run is saved for curation.")


def fenced(text: str, language: str = "") -> str:
    """`text` as a Markdown code block whose fence no backtick run inside it can close."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _thought(title: str, content: str, status: str = "done", **extra) -> dict:
    return {"role": "assistant", "content": content, "metadata": {"title": title, "status": status, **extra}}


def _call_message(call: dict, pending: bool) -> dict:
    arguments = call["function"]["arguments"]
    try:
        arguments = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except ValueError:
        pass  # shown as the model wrote it
    title = f"Tool call: {call_title(call)}" + (" — waiting for your approval" if pending else "")
    return _thought(title, fenced(arguments, "json"), "pending" if pending else "done", id=call["id"])


def _result_message(message: dict) -> dict:
    name = message.get("name") or "tool"
    if message["content"] == REJECTED:
        return _thought(f"Rejected: {name}", message["content"])
    if message["content"] == NOT_RUN:
        return _thought(f"Not run: {name}", message["content"])
    return _thought(f"Result of {name}", fenced(message["content"]))


def chat_messages(view: SessionView) -> list[dict]:
    """The session as Chatbot messages: thinking, calls and results as collapsible thoughts."""
    pending = {call["id"] for call in view.pending}
    shown = []
    for message in view.messages:
        role = message["role"]
        if role == "system":
            shown.append(_thought("System prompt", message["content"]))
        elif role == "user":
            shown.append({"role": "user", "content": message["content"]})
        elif role == "tool":
            shown.append(_result_message(message))
        else:
            if message.get("reasoning_content"):
                shown.append(_thought("Thinking", message["reasoning_content"]))
            if message["content"].strip():
                shown.append({"role": "assistant", "content": message["content"]})
            shown += [_call_message(call, call["id"] in pending) for call in message.get("tool_calls", [])]
            shown += [{"role": "assistant", "content": f"Warning: {flag}"} for flag in message.get("flags", [])]
    if view.streaming.get("reasoning"):
        shown.append(_thought("Thinking…", view.streaming["reasoning"], "pending"))
    if view.streaming.get("content"):
        shown.append({"role": "assistant", "content": view.streaming["content"]})
    return shown


def status_text(view: SessionView) -> str:
    if view.conversation is None or (view.trace_id is None and not view.running):
        return "New conversation: the first message opens its trace."
    endpoint = view.conversation.endpoint
    parts = [f"Trace `{view.trace_id}`" if view.trace_id else "Starting…",
             f"model `{endpoint.model}` at `{endpoint.base_url}`"]
    if view.pending:
        parts.append(f"**{len(view.pending)} tool call(s) wait for your approval**")
    elif view.running:
        parts.append(f"working… ({view.tool_progress})" if view.tool_progress else "working…")
    elif view.result is not None:
        parts.append(outcome_text(view))
    if view.error:
        parts.append(f"**error**: {view.error}")
    return " · ".join(parts)


def outcome_text(view: SessionView) -> str:
    """How the last turn ended, in words: an answer only when it is one (not a give-up), the step limit, a stop."""
    r = view.result
    counts = f"{r.steps} step(s), {r.tool_calls} tool call(s), {r.rejected} rejected"
    if r.stop_reason == "step_limit":
        return (f"**Step limit reached**: {counts}, and no final answer (raise “Max steps per message” in the "
                "settings below to allow more)")
    if r.stop_reason == "stopped":
        not_run = f"; {r.not_run} tool call(s) recorded as not run" if r.not_run else ""
        return f"**Stopped by you**: {counts}{not_run}; the trace is kept, flagged, and never trained on"
    if r.stop_reason == "error":
        return f"**Ended by an error**: {counts} — {r.error}"
    problem = answer_problem(view.messages)
    if problem:
        return f"**{problem}**: {counts}; the trace is flagged and left out of training"
    return f"Answered: {counts}"


# What a flag on the final answer means for the status line (the data core's codes, mcpft.trace.validate).
ANSWER_PROBLEMS = {"gave_up": "The model gave up", "no_answer": "No real answer", "repetition": "The answer repeats "
                   "itself", "empty_assistant": "Empty answer", "length": "The answer was cut at the token limit"}


def answer_problem(messages: list[dict]) -> str:
    """The plain-words problem of the conversation's final answer, "" when the data core flags none."""
    last = len(messages) - 1
    codes = [flag["code"] for flag in validate(messages, []) if flag["index"] == last]
    return next((ANSWER_PROBLEMS[code] for code in codes if code in ANSWER_PROBLEMS), "")


def approval_updates(view: SessionView) -> tuple:
    """The approval box: one checkbox per pending call (name and arguments; checked = approve)."""
    if not view.pending:
        return gr.update(visible=False), gr.update(choices=[], value=[])
    choices = [(describe_call(call), call["id"]) for call in view.pending]
    return gr.update(visible=True), gr.update(choices=choices, value=[call["id"] for call in view.pending])


def render(view: SessionView) -> tuple:
    return (chat_messages(view), *approval_updates(view), status_text(view))


def stream(session: AgentSession):
    """Yield the chat as it changes until the turn ends or a tool call waits for approval.

    A page that goes away mid-turn (closed, reloaded) stops the turn: Gradio then drops this generator, and a turn
    nobody watches would run on, calling the model and tools, until the step limit.
    """
    view = session.view()
    try:
        yield render(view)
        while view.running and not view.pending:
            latest = session.wait(view.version, timeout=WAIT_SLICE_S)
            if latest.version != view.version:
                yield render(latest)
            view = latest
    except GeneratorExit:
        session.stop()
        raise


def settled(session: AgentSession, timeout: float) -> SessionView:
    """The view once the turn has ended, or as it is after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    view = session.view()
    while view.running and (left := deadline - time.monotonic()) > 0:
        view = session.wait(view.version, timeout=left)
    return view


DEMO_TOOLS_NOTE = (f"A demo task offers the model only the demo's browser tools ({', '.join(DEMO_TOOLS)}), with "
                   "compact pages, as `demo collect` records it.")


def other_setup(view: SessionView, conversation: Conversation) -> bool:
    """Whether the fields now name another model or server, or the message needs another tool set or tags (another
    demo task), than the conversation's (its trace recorded one of each)."""
    current = view.conversation
    return current is None or _setup(current) != _setup(conversation)


def _setup(conversation: Conversation) -> tuple:
    return (conversation.endpoint.base_url, conversation.endpoint.model, conversation.tool_names,
            conversation.compact_pages, conversation.tags)


def for_message(conversation: Conversation, text: str) -> Conversation:
    """A demo task runs as `demo collect` records it and `demo payoff` tests it: the demo's browser tools only,
    pages compacted, the trace tagged `demo`, its split (`train` or `heldout`: Train leaves held-out traces out and
    Evaluate scores them) and its template. So what the app records of a demo task trains a model for what
    evaluation asks."""
    task = demo_task_in(text)
    if task is None:
        return conversation
    tags = tuple(dict.fromkeys([*conversation.tags, DEMO_TAG, task.split, task.template]))
    return dataclasses.replace(conversation, tool_names=DEMO_TOOLS, compact_pages=True, tags=tags)


def demo_task_choices(base_url: str) -> list[tuple[str, str]]:
    """(task id, prompt) of the demo tasks: the held-out ones first, as those are what evaluation asks."""
    from mcpft.demo import load_tasks

    return [(f"{task.split}: {task.id}", task.prompt_for(base_url)) for split in ("heldout", "train")
            for task in load_tasks(split)]


def build(ctx: AppContext, shared: Shared) -> None:
    settings = ctx.settings
    with gr.Tab("Agent", id="agent"):
        gr.Markdown(PURPOSE, elem_id="agent-purpose")
        chatbot = gr.Chatbot(label="Agent", height=560, elem_id="agent-chat", buttons=["copy"],
                             placeholder="Ask the agent to do something in the browser. Each tool call waits for "
                                         "your approval unless auto-approve is on.")
        with gr.Group(visible=False, elem_id="approval-box") as approval_box:
            approvals = gr.CheckboxGroup([], label="The model wants to run these tools (checked = approve)",
                                         elem_id="approvals")
            with gr.Row():
                run_button = gr.Button("Run approved", variant="primary", elem_id="run-approved")
                reject_button = gr.Button("Reject all", variant="stop", elem_id="reject-all")
        if ctx.demo_site is not None:
            demo_task = gr.Dropdown(demo_task_choices(ctx.demo_site.base_url), value=None, elem_id="demo-task",
                                    label=f"Or pick a task on the local demo site ({ctx.demo_site.base_url}); "
                                          "the scripted-teacher model solves them")
        task_note = gr.Markdown(elem_id="task-note")
        with gr.Row(equal_height=True):
            message = gr.Textbox(placeholder="Message the agent…", show_label=False, scale=6, elem_id="agent-input")
            agent_model = gr.Dropdown([], label="Model", allow_custom_value=True, scale=2, elem_id="agent-model",
                                      info="a change starts a new conversation")
            send_button = gr.Button("Send", variant="primary", scale=1, elem_id="agent-send")
        with gr.Row():
            auto_approve = gr.Checkbox(False, label="Auto-approve tool calls", elem_id="auto-approve")
            stop_button = gr.Button("Stop", variant="stop", size="sm", elem_id="agent-stop")
            new_button = gr.Button("New conversation", size="sm", elem_id="agent-new")
        status = gr.Markdown("New conversation: the first message opens its trace.", elem_id="agent-status")
        with gr.Accordion("Settings (apply from the next new conversation)", open=False):
            system_prompt = gr.Textbox(label="System prompt", lines=4)
            exclude_system = gr.Checkbox(False, label="Exclude the system prompt from training (it stays in the "
                                                      "trace; rows are trained without it)")
            with gr.Row():
                shared.truncate = gr.Number(settings.get("truncate", 16000), label="Truncate tool results to "
                                            "(characters the model sees)", precision=0, minimum=100)
                max_steps = gr.Number(settings.get("max_steps", 20), label="Max steps per message", precision=0,
                                      minimum=1, elem_id="agent-max-steps")
                max_tokens = gr.Number(DEFAULT_MAX_TOKENS, label="Max new tokens per step (a call or a short "
                                       "answer; raise it for long reasoning)", precision=0, minimum=16)

    stream_outputs = [chatbot, approval_box, approvals, status]

    def conversation_from(preset, base_url, model, api_key, system, exclude, truncate, steps, tokens):
        return Conversation(endpoint=endpoint_from_fields(ctx, preset, base_url, model, api_key),
                            system_prompt=(system or "").strip(), train_system=not exclude,
                            completion=CompletionSettings(max_tokens=int(tokens) if tokens else None),
                            max_steps=int(steps or 20), truncate=int(truncate or 16000))

    def send(text, session, owner, preset, base_url, model, api_key, mcp_json, system, exclude, truncate, steps,
             tokens, auto, request: gr.Request):
        require_owner(owner)
        if not (text or "").strip():
            raise gr.Error("Type a message first.")
        if preset == "embedded" and ctx.embedded.status.state == "loading":
            yield gr.update(), gr.update(), gr.update(), "Waiting for the embedded model to load…", session, text
            wait_for_embedded(ctx, preset)
        if session is None or not session.connected:
            yield gr.update(), gr.update(), gr.update(), "Starting the MCP servers…", session, text
        session = page_session(ctx, session, owner, mcp_json, request.session_hash)
        view = session.view()
        if view.running:
            raise gr.Error("The agent is still working on the last message: wait, or press Stop.")
        conversation = conversation_from(preset, base_url, model, api_key, system, exclude, truncate, steps, tokens)
        conversation = for_message(conversation, text)
        if view.trace_id is None or other_setup(view, conversation):  # a trace records one model and tool set
            session.new_conversation(conversation)
        session.auto_approve = bool(auto)
        try:
            session.send(text)
        except SessionError as error:
            raise gr.Error(str(error)) from None
        for update in stream(session):
            yield (*update, session, "")

    def decide(session, approved_ids, approve_checked):
        if session is None or not session.view().pending:
            raise gr.Error("No tool call is waiting for approval.")
        pending = session.view().pending
        decisions = [approve_checked and call["id"] in (approved_ids or []) for call in pending]
        try:
            session.decide(decisions)
        except SessionError as error:
            raise gr.Error(str(error)) from None
        yield from stream(session)

    def run_approved(session, approved_ids):
        yield from decide(session, approved_ids, True)

    def reject_all(session, approved_ids):
        yield from decide(session, approved_ids, False)

    def stop(session):
        """Stop the turn and show how it ended (calls that waited for approval are recorded as not run); the
        stream that was showing the turn may already be gone (it ends while calls wait), so this one shows it."""
        if session is None:
            return
        session.stop()
        yield render(settled(session, STOP_WAIT_S))

    def new_conversation(session):
        if session is not None:
            session.new_conversation(None)
        return [], gr.update(visible=False), gr.update(choices=[], value=[]), \
            "New conversation: the first message opens its trace."

    def set_auto(session, auto):
        if session is not None:
            session.auto_approve = bool(auto)

    def pick_task(prompt, preset, model):
        """The task into the message box, and the teacher as the model when it is served (it solves them)."""
        served = ctx.embedded.status.models if preset == "embedded" else []
        if TEACHER in served:
            return (prompt, gr.update(choices=served, value=TEACHER), TEACHER,
                    f"Model set to `{TEACHER}`: it answers the demo tasks (a script, not a model that learns). "
                    "Pick another model next to Send to try yours on the task. " + DEMO_TOOLS_NOTE)
        return (prompt, gr.update(), gr.update(),
                f"The chosen model `{model or '?'}` may fail this task: the `{TEACHER}` model of the Embedded "
                "endpoint (Endpoint tab) is the one that solves the demo tasks. " + DEMO_TOOLS_NOTE)

    def model_choices(preset, model):
        """The Agent's model list follows the Endpoint tab's model field (the one the conversation uses)."""
        served = ctx.embedded.status.models if preset == "embedded" else []
        return gr.update(choices=list(dict.fromkeys([*served, *([model] if model else [])])), value=model)

    if ctx.demo_site is not None:
        demo_task.input(pick_task, [demo_task, shared.preset, shared.model],
                        [message, agent_model, shared.model, task_note])
    shared.model.change(model_choices, [shared.preset, shared.model], [agent_model], show_progress="hidden")
    agent_model.input(lambda chosen: chosen, [agent_model], [shared.model], show_progress="hidden")
    send_inputs = [message, shared.session, shared.owner, shared.preset, shared.base_url, shared.model, shared.api_key,
                   shared.mcp_json, system_prompt, exclude_system, shared.truncate, max_steps, max_tokens,
                   auto_approve]
    send_outputs = [*stream_outputs, shared.session, message]
    gr.on([send_button.click, message.submit], send, send_inputs, send_outputs)
    run_button.click(run_approved, [shared.session, approvals], stream_outputs)
    reject_button.click(reject_all, [shared.session, approvals], stream_outputs)
    stop_button.click(stop, [shared.session], stream_outputs)
    new_button.click(new_conversation, [shared.session], stream_outputs)
    auto_approve.change(set_auto, [shared.session, auto_approve], None)
