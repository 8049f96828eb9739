"""A running agent for thread-based UIs (Gradio): the MCP `ToolHub` and the `Agent` live on a background asyncio loop,
and any thread can send a message, answer pending approvals, stop the turn, or wait for the next change.

Every change (a streamed delta, a recorded message, a pending approval, the end of a turn) bumps a version number and
wakes the waiters, so a UI streams by calling `wait(last_version)` in a loop. Messages go to the store the moment
they exist (`recording.sink_for`); the session keeps its own copy for display.

`EmbeddedEndpoint` is the in-process OpenAI-compatible server (mcpft.serve) a UI starts, stops and reports on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mcpft.agent.compact import ToolView
from mcpft.agent.endpoint import CompletionSettings, Endpoint
from mcpft.agent.loop import Agent, AgentConfig, TurnResult, endpoint_generate
from mcpft.agent.mcp import DEFAULT_MAX_CHARS, HubTool, ToolHub, ToolProgress, load_mcp_config
from mcpft.recording import open_trace, sink_for
from mcpft.store import Store

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    """How the next conversation runs; fixed once its first message is sent (the trace records it)."""

    endpoint: Endpoint
    system_prompt: str = ""
    train_system: bool = True  # False: the system prompt is kept in the trace but left out of training
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    max_steps: int = 20
    truncate: int = DEFAULT_MAX_CHARS  # characters of a tool result the model sees
    tags: tuple[str, ...] = ()
    included: bool = True  # False: recorded, but excluded from training from the start (e.g. comparison chats)
    tool_names: tuple[str, ...] | None = None  # offer only these tools (None: all the servers'), e.g. the demo's
    compact_pages: bool = False  # browser pages compacted for a small model (mcpft.agent.compact)


@dataclass
class SessionView:
    """A consistent copy of what a UI shows."""

    version: int
    messages: list[dict]  # the conversation as recorded (system, user, assistant, tool)
    streaming: dict[str, str]  # {"reasoning", "content"} of the assistant message being generated
    pending: list[dict]  # tool calls waiting for a decision; empty when none
    running: bool  # a turn is in progress
    trace_id: str | None
    conversation: Conversation | None
    result: TurnResult | None  # the last finished turn
    error: str  # why the last turn could not run at all ("" when it ran)
    tool_progress: str = ""  # the latest progress report of the tool call running now ("" when none)


class SessionError(RuntimeError):
    """A request the session cannot honour in its current state; the message says why."""


class AgentSession:
    """MCP tools and one conversation at a time, run on a private event loop thread."""

    def __init__(self, mcp_config: Mapping | str | Path, tool_dir: str | Path, *, store: Store | None = None,
                 owner: str = "", source: str = "app", connect_timeout: float = 60.0,
                 condition: threading.Condition | None = None):
        self.config = mcp_config
        self.specs = load_mcp_config(mcp_config)  # a config error surfaces here, before any thread starts
        self.tool_dir = Path(tool_dir)
        self.store, self.owner, self.source = store, owner, source
        self.connect_timeout = connect_timeout
        self.auto_approve = False  # read at every approval, so it can be switched mid-turn
        self._cond = condition or threading.Condition()  # shared by sessions that one `wait_any` watches together
        self._version = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hub: ToolHub | None = None
        self._closing: asyncio.Event | None = None
        self._hub_task: asyncio.Future | None = None
        self._reset_conversation(None)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def connect(self) -> list[HubTool]:
        """Start the MCP servers (blocking); raises MCPServerError naming the server that failed."""
        if self._hub is not None:
            return self.tools
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcpft-agent-session", daemon=True)
        self._thread.start()
        ready = asyncio.run_coroutine_threadsafe(self._start_hub(), self._loop)
        try:
            self._hub = ready.result()
        except BaseException:
            self._stop_loop()
            raise
        return self.tools

    async def _start_hub(self) -> ToolHub:
        """Enter the hub in a task of its own that holds it open until `close` (anyio needs one task for both)."""
        self._closing = asyncio.Event()
        opened: asyncio.Future = asyncio.get_running_loop().create_future()

        async def hold():
            try:
                async with ToolHub(self.specs, self.tool_dir, connect_timeout=self.connect_timeout,
                                   on_progress=self._on_tool_progress) as hub:
                    opened.set_result(hub)
                    await self._closing.wait()
            except BaseException as error:
                if not opened.done():
                    opened.set_exception(error)
                else:
                    raise

        self._hub_task = asyncio.ensure_future(hold())
        return await opened

    def close(self) -> None:
        """Stop the turn, close the MCP servers and the loop thread. Safe to call twice."""
        if self._loop is None:
            return
        self.stop()
        with self._cond:
            self._cond.wait_for(lambda: not self._running, timeout=30)
        if self._hub is not None:
            asyncio.run_coroutine_threadsafe(self._close_hub(), self._loop).result(timeout=60)
            self._hub = None
        self._stop_loop()

    async def _close_hub(self) -> None:
        self._closing.set()
        await asyncio.wait({self._hub_task}, timeout=30)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> AgentSession:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._hub is not None

    @property
    def tools(self) -> list[HubTool]:
        return self._hub.tools if self._hub else []

    @property
    def failed_servers(self) -> dict[str, str]:
        """Servers of the config that did not start (or could not be restarted): name -> why."""
        return dict(self._hub.failed) if self._hub else {}

    # -- the conversation --------------------------------------------------------------------------------------

    def _reset_conversation(self, conversation: Conversation | None) -> None:
        with self._cond:
            self._conversation = conversation
            self._agent: Agent | None = None
            self._trace_id: str | None = None
            self._messages: list[dict] = []
            self._streaming, self._tool_progress = {"reasoning": "", "content": ""}, ""
            self._pending: list[dict] = []
            self._decision: asyncio.Future | None = None
            self._running = False
            self._result: TurnResult | None = None
            self._error = ""
            self._bump()

    def new_conversation(self, conversation: Conversation | None) -> None:
        """Start afresh with these settings (a running turn is stopped first); its trace opens at the first send.
        None clears the conversation; settings must then be given again before the next send."""
        if self.view().running:
            self.stop()
            with self._cond:
                if not self._cond.wait_for(lambda: not self._running, timeout=60):
                    raise SessionError("the running turn did not stop within 60 s")
        self._reset_conversation(conversation)

    def send(self, text: str) -> None:
        """Start a turn with this user message; returns at once (watch it with `wait`)."""
        if not text.strip():
            raise SessionError("the message is empty")
        if self._hub is None:
            raise SessionError("the MCP servers are not connected: connect first")
        with self._cond:
            if self._conversation is None:
                raise SessionError("no conversation settings: call new_conversation first")
            if self._running:
                raise SessionError("a turn is still running: wait for it, or stop it")
            self._running, self._error, self._result = True, "", None
            self._bump()
        asyncio.run_coroutine_threadsafe(self._turn(text), self._loop)

    async def _turn(self, text: str) -> None:
        try:
            if self._agent is None:
                self._agent = self._make_agent()
            result = await self._agent.send(text)
            with self._cond:
                self._result = result
        except Exception as error:  # the UI shows it; the store has every message recorded before it
            log.exception("agent turn failed")
            with self._cond:
                self._error = f"{type(error).__name__}: {error}"
        finally:
            with self._cond:  # a stop cancels the approval wait without awaiting it: clear what it left
                self._running, self._pending, self._decision = False, [], None
                self._streaming, self._tool_progress = {"reasoning": "", "content": ""}, ""
                self._bump()

    def _make_agent(self) -> Agent:
        conversation = self._conversation
        self._hub.max_chars = conversation.truncate
        tools = self._hub if conversation.tool_names is None and not conversation.compact_pages else \
            ToolView(self._hub, conversation.tool_names, compact=conversation.compact_pages)
        record = self._recorder(conversation, tools)
        return Agent(endpoint_generate(conversation.endpoint, conversation.completion), tools, sink=record,
                     approve=self._approve, on_delta=self._on_delta, system_prompt=conversation.system_prompt,
                     config=AgentConfig(max_steps=conversation.max_steps))

    def _recorder(self, conversation: Conversation, tools):
        """The agent's sink: the store (a new trace; never the API key) and the session's own copy."""
        store_sink = None
        if self.store is not None:
            settings = {"truncate": conversation.truncate, "max_steps": conversation.max_steps,
                        "temperature": conversation.completion.temperature,
                        "max_tokens": conversation.completion.max_tokens}
            trace_id = open_trace(self.store, model=conversation.endpoint.model,
                                  base_url=conversation.endpoint.base_url, tools=tools.openai_tools(),
                                  settings=settings, train_system=conversation.train_system,
                                  tags=list(conversation.tags), owner=self.owner, source=self.source)
            if not conversation.included:
                self.store.update(trace_id, "exclude", included=False)
            store_sink = sink_for(self.store, trace_id)
            with self._cond:
                self._trace_id = trace_id

        def record(message: dict) -> None:
            if store_sink is not None:
                store_sink(message)
            with self._cond:
                self._messages.append(message)
                self._streaming, self._tool_progress = {"reasoning": "", "content": ""}, ""
                self._bump()

        return record

    def _on_tool_progress(self, progress: ToolProgress) -> None:
        with self._cond:
            self._tool_progress = progress.text()
            self._bump()

    def _on_delta(self, kind: str, text: str) -> None:
        with self._cond:
            self._streaming[kind] = self._streaming.get(kind, "") + text
            self._bump()

    async def _approve(self, calls: list[dict]) -> list[bool]:
        if self.auto_approve:
            return [True] * len(calls)
        decision = asyncio.get_running_loop().create_future()
        with self._cond:
            self._pending, self._decision = list(calls), decision
            self._bump()
        try:
            return await decision
        finally:
            with self._cond:
                self._pending, self._decision = [], None
                self._bump()

    def decide(self, decisions: list[bool]) -> None:
        """Answer the pending tool calls, one decision each (True = run it, False = reject it)."""
        with self._cond:
            pending, decision = self._pending, self._decision
            if decision is None:
                raise SessionError("no tool call is waiting for approval")
            if len(decisions) != len(pending):
                raise SessionError(f"{len(decisions)} decision(s) for {len(pending)} pending tool call(s)")
            # Cleared here, not only when the loop takes the answer: a caller's next view must not show it pending.
            self._pending, self._decision = [], None
            self._bump()
        self._loop.call_soon_threadsafe(_resolve, decision, [bool(d) for d in decisions])

    def stop(self) -> None:
        """Ask the running turn to stop (also while it waits for approval); safe from any thread."""
        if self._agent is not None:
            self._agent.stop()

    # -- watching ----------------------------------------------------------------------------------------------

    def _bump(self) -> None:
        self._version += 1
        self._cond.notify_all()

    def view(self) -> SessionView:
        with self._cond:
            return SessionView(version=self._version, messages=list(self._messages), streaming=dict(self._streaming),
                               pending=list(self._pending), running=self._running, trace_id=self._trace_id,
                               conversation=self._conversation, result=self._result, error=self._error,
                               tool_progress=self._tool_progress)

    def wait(self, after_version: int, timeout: float | None = None) -> SessionView:
        """The view once its version is past `after_version`, or as it is when `timeout` seconds have passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._version > after_version, timeout=timeout)
            return self.view()


def wait_any(sessions: list[AgentSession], after_versions: list[int],
             timeout: float | None = None) -> list[SessionView]:
    """The sessions' views once any of them changed past its version (or at `timeout`); they must share one
    condition (the `condition` argument), as a side-by-side chat's do."""
    condition = sessions[0]._cond
    if any(session._cond is not condition for session in sessions):
        raise ValueError("wait_any needs sessions made with one shared `condition`")
    with condition:
        condition.wait_for(lambda: any(s._version > v for s, v in zip(sessions, after_versions)), timeout=timeout)
        return [session.view() for session in sessions]


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # a stop may have cancelled it meanwhile
        future.set_result(value)


# ---------------------------------------------------------------------------------------------------------------
# The embedded endpoint


@dataclass
class EndpointStatus:
    state: str  # "stopped" | "loading" | "ready" | "failed"
    model_spec: str | None = None
    base_url: str = ""
    models: list[str] = field(default_factory=list)
    error: str = ""
    adapter: str | None = None


class EmbeddedEndpoint:
    """mcpft.serve in this process: a model (and optional adapter) plus any extra backends, on 127.0.0.1."""

    def __init__(self, data_dir: Path, extra_backends: Mapping | None = None):
        self.data_dir = Path(data_dir)
        self.extra_backends = dict(extra_backends or {})
        self._lock = threading.Lock()
        self._status = EndpointStatus("stopped")
        self._stop_server = None
        self._changed = threading.Condition()

    @property
    def status(self) -> EndpointStatus:
        with self._changed:
            return EndpointStatus(**vars(self._status))

    def _set(self, status: EndpointStatus) -> None:
        with self._changed:
            self._status = status
            self._changed.notify_all()

    def start(self, model_spec: str | None, adapter: str | Path | None = None) -> EndpointStatus:
        """Load the model (converting the packaged SmolLM2 on first use) and serve it; replaces a running server."""
        from mcpft.serve import create_app, load_backends, serve_in_thread

        with self._lock:
            self._stop_server_locked()
            self._set(EndpointStatus("loading", model_spec, adapter=_text(adapter)))
            try:
                backends = load_backends(model_spec, adapter, self.data_dir)
            except Exception as error:
                self._set(EndpointStatus("failed", model_spec, error=f"{type(error).__name__}: {error}",
                                         adapter=_text(adapter)))
                raise
            backends.update(self.extra_backends)
            base_url, self._stop_server = serve_in_thread(create_app(backends))
            self._set(EndpointStatus("ready", model_spec, base_url, list(backends), adapter=_text(adapter)))
        return self.status

    def start_in_background(self, model_spec: str | None, adapter: str | Path | None = None) -> threading.Thread:
        """`start` on a thread of its own (a failure is kept in `status`)."""
        def run():
            try:
                self.start(model_spec, adapter)
            except Exception:
                log.exception("the embedded endpoint did not start")

        self._set(EndpointStatus("loading", model_spec, adapter=_text(adapter)))
        thread = threading.Thread(target=run, name="mcpft-embedded-start", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        with self._lock:
            self._stop_server_locked()
            self._set(EndpointStatus("stopped"))

    def _stop_server_locked(self) -> None:
        if self._stop_server is not None:
            self._stop_server()
            self._stop_server = None

    def wait_ready(self, timeout: float | None = None) -> EndpointStatus:
        """The status once the server is no longer loading (ready, failed or stopped), or at `timeout`."""
        with self._changed:
            self._changed.wait_for(lambda: self._status.state != "loading", timeout=timeout)
            return EndpointStatus(**vars(self._status))


def _text(path: str | Path | None) -> str | None:
    return None if path is None else str(path)
