"""Endpoint tab: where the agent's model runs (presets, URL, model, key, connection test), the embedded endpoint,
and the MCP servers (editable `mcpServers` JSON, Connect, their tools)."""

from __future__ import annotations

import asyncio
import json
import threading
import weakref

import gradio as gr

from mcpft.agent.endpoint import PRESETS, Endpoint, probe
from mcpft.agent.mcp import MCPConfigError, MCPServerError
from mcpft.agent.session import AgentSession
from mcpft.models import model_name
from mcpft.ui import mcp_servers
from mcpft.ui.owner import owner_slug, require_owner
from mcpft.ui.state import SESSION_TTL_S, AppContext, Shared, mcp_config_text

PRESET_CHOICES = [("Embedded (in this app)", "embedded"), ("Local vLLM", "vllm"), ("OpenAI", "openai"),
                  ("Hugging Face router", "hf")]
EMBEDDED_WAIT_S = 900  # the packaged model's first conversion takes a while on a small CPU
BROWSER_INSTALL_WAIT_S = 660  # npm's own limit (mcpft.agent.node_install) and a little
TOOL_COLUMNS = ["server", "tool", "description"]


def endpoint_from_fields(ctx: AppContext, preset: str, base_url: str, model: str, api_key: str) -> Endpoint:
    """The endpoint the fields describe; the embedded preset follows the embedded server wherever it listens."""
    if preset == "embedded":
        status = ctx.embedded.status
        if status.state != "ready":
            raise gr.Error(f"The embedded endpoint is {status.state}{': ' + status.error if status.error else ''}. "
                           "Start it in the Endpoint tab, or pick another preset.")
        chosen = model if model in status.models else status.models[0]
        return Endpoint(status.base_url, chosen)
    if not (base_url or "").startswith(("http://", "https://")):
        raise gr.Error(f"Base URL {base_url!r} must start with http:// or https:// (e.g. {PRESETS['vllm'].base_url}).")
    if not model:
        raise gr.Error("Pick a model: “Test connection” lists the models the endpoint serves.")
    return Endpoint(base_url.strip(), model.strip(), api_key=api_key or None)


def wait_for_embedded(ctx: AppContext, preset: str) -> None:
    """Block until a loading embedded endpoint is ready (or failed); other presets return at once."""
    if preset == "embedded" and ctx.embedded.status.state == "loading":
        ctx.embedded.wait_ready(timeout=EMBEDDED_WAIT_S)


def parse_mcp_json(text: str) -> dict:
    try:
        return json.loads(text or "")
    except json.JSONDecodeError as error:
        raise gr.Error(f"The MCP servers JSON is invalid at line {error.lineno}, column {error.colno}: "
                       f"{error.msg}") from None


# The session each open page connected (Gradio's session hash -> session), so that a message sent while the page's
# start-up connection is still under way waits for it and uses it, instead of starting the servers twice.
_PAGE_SESSIONS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_PAGE_LOCKS: dict[str, threading.Lock] = {}
_PAGE_LOCKS_GUARD = threading.Lock()


def page_session(ctx: AppContext, session: AgentSession | None, owner: str, mcp_json: str,
                 page: str | None) -> AgentSession:
    """`connect_session`, one at a time per page, reusing the session the page connected at start."""
    if not page:
        return connect_session(ctx, session, owner, mcp_json)
    with _PAGE_LOCKS_GUARD:
        lock = _PAGE_LOCKS.setdefault(page, threading.Lock())
    with lock:
        session = session if session is not None else _PAGE_SESSIONS.get(page)
        session = connect_session(ctx, session, owner, mcp_json)
        _PAGE_SESSIONS[page] = session
        return session


def connect_session(ctx: AppContext, session: AgentSession | None, owner: str, mcp_json: str) -> AgentSession:
    """The visitor's agent session on this MCP config: the running one if its config is unchanged, else a new one."""
    require_owner(owner)
    config = parse_mcp_json(mcp_json)
    wait_for_browser_install(ctx, config)
    if session is not None and session.connected and session.config == config:
        return session
    if session is not None:
        session.close()
    try:
        fresh = AgentSession(config, ctx.data_dir / "tool-files" / owner_slug(owner), store=ctx.store, owner=owner)
        fresh.connect()
    except (MCPConfigError, MCPServerError) as error:
        raise gr.Error(str(error)) from None
    return fresh


def wait_for_browser_install(ctx: AppContext, config: dict) -> None:
    """A config that runs the browser the app is installing waits for that install; a failed one says why."""
    install = ctx.browser_install
    if install is None or str(install.cli) not in json.dumps(config):
        return
    status = install.wait(timeout=BROWSER_INSTALL_WAIT_S)
    if status.state != "ready":
        raise gr.Error(status.message.replace("**", ""), duration=None)


def browser_install_text(ctx: AppContext) -> str:
    """The app's own install of the browser's npm package, as a status line ("" when there is none)."""
    install = ctx.browser_install
    if install is None:
        return ""
    status = install.status
    if status.state == "installing":
        return f"**Browser: installing…** ({status.seconds:.0f} s) {status.message}"
    if status.state == "ready":
        return f"**Browser: ready** (installed in {status.seconds:.0f} s). {status.message}"
    return f"**Browser: unavailable.** {status.message}"


def close_session(session: AgentSession | None) -> None:
    """Gradio's state cleanup runs on its event loop: close the session (MCP servers, a browser) off that loop."""
    if session is not None:
        threading.Thread(target=session.close, name="mcpft-close-session", daemon=True).start()


def mcp_status_text(session: AgentSession | None) -> str:
    """Which MCP servers are connected, and why any is not (a server that did not start leaves the others working)."""
    if session is None or not session.connected:
        return ""
    failed = session.failed_servers
    running = [name for name in session.specs if name not in failed]
    lines = [f"**Connected: {len(running)} of {len(session.specs)} MCP servers** "
             f"({', '.join(f'`{name}`' for name in running) or 'none'})."]
    lines += [f"- `{name}` did not start: " + "; ".join(line.strip() for line in reason.splitlines() if line.strip())
              for name, reason in failed.items()]
    return "\n".join(lines)


def tool_rows(session: AgentSession | None) -> list[list[str]]:
    if session is None:
        return []
    return [[tool.server, tool.name, (tool.description or "").strip().splitlines()[0] if tool.description else ""]
            for tool in session.tools]


def embedded_status_text(ctx: AppContext) -> str:
    status = ctx.embedded.status
    name = model_name(status.model_spec) if status.model_spec or status.state != "stopped" else ""
    if status.state == "ready":
        served = ", ".join(f"`{m}`" for m in status.models)
        return f"**Embedded endpoint: ready** at `{status.base_url}`, serving {served}"
    if status.state == "loading":
        return (f"**Embedded endpoint: loading `{name}`…** (the first start converts the packaged model once: "
                "a few minutes)")
    if status.state == "failed":
        return f"**Embedded endpoint: failed** to load `{name}`: {status.error}"
    return "**Embedded endpoint: stopped**"


def probe_text(report) -> str:
    tool_calls = {"native": "parsed by the server (`tool_calls`)",
                  "hermes_text": "returned as Hermes `<tool_call>` text: mcpft parses it client-side",
                  "none": "the model called no tool on the test prompt", None: "not tested"}[report.tool_calls]
    reasoning = {"reasoning_content": "parsed by the server (`reasoning_content`)",
                 "reasoning": "parsed by the server (`reasoning`)",
                 "think_tags": "`<think>` tags in the content: mcpft splits them client-side",
                 "none": "none seen", None: "not tested"}[report.reasoning_field]
    lines = [f"### {'Connected' if report.ok else 'Problem'}: `{report.base_url}`", "",
             f"- models: {', '.join(f'`{m}`' for m in report.models) or '(no /v1/models listing)'}",
             f"- tool calls: {tool_calls}", f"- reasoning: {reasoning}"]
    lines += [f"- latency of {step}: {seconds:.2f} s" for step, seconds in report.latencies_s.items()]
    lines += [f"- **error in {step}**: {message}" for step, message in report.errors.items()]
    return "\n".join(lines)


def build(ctx: AppContext, shared: Shared) -> None:
    with gr.Tab("Endpoint", id="endpoint"):
        gr.Markdown("**Endpoint** sets where the agent's model runs and which tools (MCP servers) it may use; the "
                    "defaults work as they are.", elem_id="endpoint-purpose")
        gr.Markdown("The API key stays in this browser tab: it is sent with each request that needs it and never "
                    "stored or logged.")
        with gr.Row():
            shared.preset = gr.Radio(PRESET_CHOICES, value="embedded", label="Preset", scale=2)
            shared.base_url = gr.Textbox(label="Base URL", scale=3, elem_id="base-url")
        with gr.Row():
            shared.model = gr.Dropdown([], label="Model (from /v1/models)", allow_custom_value=True, scale=3,
                                       elem_id="endpoint-model")
            shared.api_key = gr.Textbox(label="API key", type="password", scale=2,
                                        placeholder="only for OpenAI / Hugging Face; kept in this tab only")
        with gr.Row():
            test_button = gr.Button("Test connection", scale=2)
            deep_test = gr.Checkbox(False, label="Also check tool calls and reasoning (a few seconds on a GPU, "
                                    "up to a minute on a CPU)", scale=3)
        probe_report = gr.Markdown(elem_id="probe-report")

        gr.Markdown("### Embedded endpoint")
        with gr.Row():
            known = [spec for spec in dict.fromkeys([ctx.default_model, *(
                (ctx.settings.get("base_model") or {}).values() if isinstance(ctx.settings.get("base_model"), dict)
                else [])]) if spec]
            embedded_model = gr.Dropdown(known, value=ctx.default_model, label="Model to serve (folder, Hub id, or "
                                         "smollm2 = the packaged SmolLM2)", allow_custom_value=True, scale=3)
            start_button = gr.Button("Start", scale=1)
            stop_button = gr.Button("Stop", scale=1, variant="stop")
        embedded_status = gr.Markdown(elem_id="embedded-status")
        status_timer = gr.Timer(2.0, active=False)  # on while the embedded model loads

        gr.Markdown("### MCP servers")
        if ctx.mcp_config_error:
            gr.Markdown(f"**The default browser is unavailable:** {ctx.mcp_config_error}")
        install_status = gr.Markdown(browser_install_text(ctx), elem_id="browser-install",
                                     visible=ctx.browser_install is not None)
        install_timer = gr.Timer(1.0, active=ctx.browser_install is not None)  # on while the app installs it
        servers_table = gr.Dataframe(headers=mcp_servers.SERVER_COLUMNS, label="Servers", interactive=False,
                                     wrap=True, elem_id="mcp-servers",
                                     value=mcp_servers.server_rows(ctx.mcp_config, None))
        with gr.Accordion("Add server", open=False, elem_id="add-server"):
            with gr.Row():
                server_kind = gr.Radio(mcp_servers.KINDS, value="preset", label="Kind", scale=2)
                server_name = gr.Textbox(label="Name (optional)", scale=1, elem_id="server-name")
            server_preset = gr.Dropdown(mcp_servers.preset_choices(), value=None, label="Well-known server (fetched "
                                        "with npx / uvx on first use: needs the internet once)",
                                        elem_id="server-preset")
            server_command = gr.Textbox(label="Command that starts it", visible=False, elem_id="server-command",
                                        placeholder="npx -y @modelcontextprotocol/server-memory")
            server_url = gr.Textbox(label="URL", visible=False, elem_id="server-url",
                                    placeholder="https://example.com/mcp")
            add_button = gr.Button("Add server", elem_id="add-server-button")
        with gr.Accordion("Advanced: the servers as JSON (mcpServers)", open=False, elem_id="mcp-advanced"):
            shared.mcp_json = gr.Code(mcp_config_text(ctx.mcp_config), language="json", label="mcpServers JSON",
                                      interactive=True, max_lines=20, elem_id="mcp-json")
            reset_button = gr.Button("Reset to default", size="sm", elem_id="mcp-reset")
        connect_button = gr.Button("Connect")
        mcp_status = gr.Markdown(elem_id="mcp-status")
        tools_table = gr.Dataframe(headers=TOOL_COLUMNS, value=[], label="Tools", interactive=False, wrap=True,
                                   elem_id="tools-table")
        shared.session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=close_session)

    def preset_changed(preset):
        if preset == "embedded":
            status = ctx.embedded.status
            return (gr.update(value=status.base_url, interactive=False),
                    gr.update(choices=status.models, value=status.models[0] if status.models else None))
        return gr.update(value=PRESETS[preset].base_url, interactive=True), gr.update(choices=[], value=None)

    def test_connection(preset, base_url, model, api_key, deep):
        """Say what the test does while it runs, then what it found; a scripted model (the teacher) is listed as
        fine and not asked a question, which it could only refuse."""
        if preset == "embedded" and ctx.embedded.status.state == "loading":
            yield "Waiting for the embedded model to load…", gr.update()
        wait_for_embedded(ctx, preset)
        endpoint = endpoint_from_fields(ctx, preset, base_url, model or "?", api_key)
        scripted = set(ctx.embedded.extra_backends) if preset == "embedded" else set()
        main_model = next((m for m in ctx.embedded.status.models if m not in scripted), None)
        if endpoint.model in scripted:
            models = ctx.embedded.status.models
            notes = mcp_servers.model_notes(models, main_model, scripted)
            yield "\n".join([f"### Connected: `{endpoint.base_url}` (in this app)", "", *notes]), gr.update()
            return
        yield (f"Testing `{endpoint.base_url}`: listing its models, then asking `{endpoint.model}` for "
               + ("a short answer and a tool call (up to a minute on a CPU)…" if deep else "one token…")), gr.update()
        report = asyncio.run(probe(endpoint, timeout=120, deep=deep))
        models = report.models or ([endpoint.model] if endpoint.model != "?" else [])
        value = endpoint.model if endpoint.model in models else (models[0] if models else None)
        notes = mcp_servers.model_notes(report.models, main_model, scripted)
        yield probe_text(report) + ("\n\nThe models:\n" + "\n".join(notes) if notes else ""), \
            gr.update(choices=models, value=value)

    def refresh_status(preset):
        """The embedded endpoint's status; once it is ready, the embedded preset's fields follow it (once: the
        timer stops, so a model the visitor picks afterwards stays picked)."""
        status = ctx.embedded.status
        updates = [embedded_status_text(ctx), gr.Timer(active=status.state == "loading")]
        if preset == "embedded" and status.state == "ready":
            return [*updates, *preset_changed(preset)]
        return [*updates, gr.update(), gr.update()]

    def start_embedded(spec):
        ctx.embedded.start_in_background(spec or None)
        return embedded_status_text(ctx), gr.Timer(active=True)

    def stop_embedded():
        ctx.embedded.stop()
        return embedded_status_text(ctx)

    def connect(session, owner, mcp_json, request: gr.Request):
        session = page_session(ctx, session, owner, mcp_json, request.session_hash)
        return session, tool_rows(session), mcp_status_text(session), servers_of(session, mcp_json)

    def servers_of(session, mcp_json, error=""):
        try:
            config = json.loads(mcp_json or "")
        except ValueError:
            return gr.update()
        return mcp_servers.server_rows(config, session, error)

    def connect_at_start(session, owner, mcp_json, request: gr.Request):
        """Connect the servers as the page opens, so the list and the tools show what the agent will have; a
        failure is shown in the list, never as an error at start."""
        if not owner:
            return session, gr.update(), gr.update(), gr.update()
        try:
            return connect(session, owner, mcp_json, request)
        except gr.Error as error:
            return session, [], gr.update(), servers_of(None, mcp_json, str(error.message))

    def add(mcp_json, kind, name, command, url, preset):
        try:
            config = mcp_servers.add_server(parse_mcp_json(mcp_json), kind, name, command, url, preset, ctx.data_dir)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        return mcp_config_text(config)

    def kind_changed(kind):
        return (gr.update(visible=kind == "preset"), gr.update(visible=kind == "command"),
                gr.update(visible=kind == "url"))

    shared.preset.change(preset_changed, [shared.preset], [shared.base_url, shared.model])
    test_button.click(test_connection, [shared.preset, shared.base_url, shared.model, shared.api_key, deep_test],
                      [probe_report, shared.model])
    status_outputs = [embedded_status, status_timer, shared.base_url, shared.model]
    gr.on([shared.demo.load, status_timer.tick], refresh_status, [shared.preset], status_outputs,
          show_progress="hidden")

    def refresh_install():
        installing = ctx.browser_install is not None and ctx.browser_install.status.state == "installing"
        return browser_install_text(ctx), gr.Timer(active=installing)

    gr.on([shared.demo.load, install_timer.tick], refresh_install, None, [install_status, install_timer],
          show_progress="hidden")
    start_button.click(start_embedded, [embedded_model], [embedded_status, status_timer])
    stop_button.click(stop_embedded, None, [embedded_status])
    connect_outputs = [shared.session, tools_table, mcp_status, servers_table]
    connect_button.click(connect, [shared.session, shared.owner, shared.mcp_json], connect_outputs)
    shared.owner.change(connect_at_start, [shared.session, shared.owner, shared.mcp_json], connect_outputs,
                        show_progress="hidden")
    server_kind.change(kind_changed, [server_kind], [server_preset, server_command, server_url])
    add_args = [shared.mcp_json, server_kind, server_name, server_command, server_url, server_preset]
    add_button.click(add, add_args, [shared.mcp_json]).success(
        connect, [shared.session, shared.owner, shared.mcp_json], connect_outputs)
    reset_button.click(lambda: mcp_config_text(ctx.mcp_config), None, [shared.mcp_json]).success(
        connect, [shared.session, shared.owner, shared.mcp_json], connect_outputs)
