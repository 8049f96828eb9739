"""Agent tab: chat with the agent, approve or reject each tool call, watch thinking, calls and results stream in.
Every step is in the store the moment it happens (the session records through `recording.sink_for`)."""

from __future__ import annotations

import json

import gradio as gr

from mcpft.agent.endpoint import CompletionSettings
from mcpft.agent.loop import REJECTED, describe_call
from mcpft.agent.session import AgentSession, Conversation, SessionError, SessionView
from mcpft.serve import DEFAULT_MAX_TOKENS
from mcpft.ui.endpoint_tab import connect_session, endpoint_from_fields, wait_for_embedded
from mcpft.ui.owner import require_owner
from mcpft.ui.state import AppContext, Shared

WAIT_SLICE_S = 30.0  # how long one wait for a change lasts before the stream checks again


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
    title = f"Tool call: {call['function']['name']}" + (" — waiting for your approval" if pending else "")
    return _thought(title, fenced(arguments, "json"), "pending" if pending else "done", id=call["id"])


def _result_message(message: dict) -> dict:
    name = message.get("name") or "tool"
    if message["content"] == REJECTED:
        return _thought(f"Rejected: {name}", message["content"])
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
        parts.append("working…")
    elif view.result is not None:
        r = view.result
        parts.append(f"{r.stop_reason}: {r.steps} step(s), {r.tool_calls} tool call(s), {r.rejected} rejected"
                     + (f" — {r.error}" if r.error else ""))
    if view.error:
        parts.append(f"**error**: {view.error}")
    return " · ".join(parts)


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


def demo_task_choices(base_url: str) -> list[tuple[str, str]]:
    """(task id, prompt) of the demo tasks: the held-out ones first, as those are what evaluation asks."""
    from mcpft.demo import load_tasks

    return [(f"{task.split}: {task.id}", task.prompt_for(base_url)) for split in ("heldout", "train")
            for task in load_tasks(split)]


def build(ctx: AppContext, shared: Shared) -> None:
    settings = ctx.settings
    with gr.Tab("Agent", id="agent"):
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
        with gr.Row():
            message = gr.Textbox(placeholder="Message the agent…", show_label=False, scale=6, elem_id="agent-input")
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
                                      minimum=1)
                max_tokens = gr.Number(DEFAULT_MAX_TOKENS, label="Max new tokens per step (a call or a short "
                                       "answer; raise it for long reasoning)", precision=0, minimum=16)

    stream_outputs = [chatbot, approval_box, approvals, status]

    def conversation_from(preset, base_url, model, api_key, system, exclude, truncate, steps, tokens):
        return Conversation(endpoint=endpoint_from_fields(ctx, preset, base_url, model, api_key),
                            system_prompt=(system or "").strip(), train_system=not exclude,
                            completion=CompletionSettings(max_tokens=int(tokens) if tokens else None),
                            max_steps=int(steps or 20), truncate=int(truncate or 16000))

    def send(text, session, owner, preset, base_url, model, api_key, mcp_json, system, exclude, truncate, steps,
             tokens, auto):
        require_owner(owner)
        if not (text or "").strip():
            raise gr.Error("Type a message first.")
        if preset == "embedded" and ctx.embedded.status.state == "loading":
            yield gr.update(), gr.update(), gr.update(), "Waiting for the embedded model to load…", session, text
            wait_for_embedded(ctx, preset)
        if session is None or not session.connected:
            yield gr.update(), gr.update(), gr.update(), "Starting the MCP servers…", session, text
        session = connect_session(ctx, session, owner, mcp_json)
        view = session.view()
        if view.running:
            raise gr.Error("The agent is still working on the last message: wait, or press Stop.")
        if view.trace_id is None:
            session.new_conversation(conversation_from(preset, base_url, model, api_key, system, exclude, truncate,
                                                       steps, tokens))
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
        if session is None:
            return
        session.stop()
        yield from stream(session)

    def new_conversation(session):
        if session is not None:
            session.new_conversation(None)
        return [], gr.update(visible=False), gr.update(choices=[], value=[]), \
            "New conversation: the first message opens its trace."

    def set_auto(session, auto):
        if session is not None:
            session.auto_approve = bool(auto)

    if ctx.demo_site is not None:
        demo_task.input(lambda prompt: prompt, [demo_task], [message])
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
