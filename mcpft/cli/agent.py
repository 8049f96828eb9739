"""Agent verbs: `agent` (interactive, y/n approval per call), `run` (one task), `serve` (the embedded endpoint)."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from mcpft.cli.common import CliError, emit, open_store
from mcpft.config import data_dir, load_settings


def register(verbs, parent):
    settings = load_settings()
    for verb, helptext, handler in (("agent", "chat with the agent in the terminal, approving each tool call", cmd_agent),
                                    ("run", "run one task non-interactively", cmd_run)):
        p = verbs.add_parser(verb, parents=[parent], help=helptext)
        if verb == "run":
            p.add_argument("--task", required=True, help="the user message")
        p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: the embedded one, started here)")
        p.add_argument("--model", help="model name at the endpoint, or the model the embedded endpoint serves")
        p.add_argument("--api-key", help="default: OPENAI_API_KEY / HF_TOKEN for those hosts; never stored")
        p.add_argument("--mcp-config", help='{"mcpServers": {...}} JSON file (default: the Playwright browser)')
        p.add_argument("--system-prompt-file", type=Path)
        p.add_argument("--exclude-system-prompt", action="store_true",
                       help="keep the system prompt in the trace but out of training")
        p.add_argument("--truncate", type=int, default=settings.get("truncate", 16000),
                       help="characters of a tool result the model sees")
        p.add_argument("--max-steps", type=int, default=settings.get("max_steps", 20))
        p.add_argument("--temperature", type=float)
        p.add_argument("--auto-approve", action="store_true")
        p.add_argument("--headed", action="store_true",
                       help="show the default browser's window (needs a display: DISPLAY or WAYLAND_DISPLAY)")
        p.add_argument("--tag", action="append", default=[])
        p.set_defaults(handler=handler)

    p = verbs.add_parser("serve", parents=[parent], help="serve a model as an OpenAI-compatible endpoint")
    p.add_argument("--model", help="folder or Hub id (default: the packaged SmolLM2)")
    p.add_argument("--adapter", help="a LoRA adapter folder, served as a second model beside the base")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8008)
    p.set_defaults(handler=cmd_serve)


@asynccontextmanager
async def agent_session(args, approve):
    """The endpoint (embedded when no --base-url), the MCP tools, an open trace and the agent, wired together."""
    from mcpft.agent.endpoint import CompletionSettings, Endpoint
    from mcpft.agent.loop import Agent, AgentConfig, endpoint_generate
    from mcpft.recording import open_trace, sink_for

    if args.base_url and not args.model:
        raise CliError("--model is required with --base-url")
    system_prompt = read_system_prompt(args.system_prompt_file)
    specs = mcp_specs(args)  # every setup mistake is reported before a model loads or a server starts
    async with AsyncExitStack() as stack:
        store = stack.enter_context(open_store(args))
        if args.base_url:
            endpoint = Endpoint(args.base_url, args.model, api_key=args.api_key)
        else:
            endpoint, stop_server = start_embedded(args.model)
            stack.callback(stop_server)
        hub = await open_hub(stack, specs, Path(store.path).parent / "tool-files", args.truncate)
        settings = {"truncate": args.truncate, "max_steps": args.max_steps, "temperature": args.temperature}
        if hub.failed:  # the trace records which tools were missing, and why
            settings["mcp_failed"] = dict(hub.failed)
        trace_id = open_trace(store, model=endpoint.model, base_url=endpoint.base_url, tools=hub.openai_tools(),
                              settings=settings, train_system=not args.exclude_system_prompt, tags=args.tag,
                              source="cli")
        # endpoint_generate learns from the replies where this server puts reasoning, and sends history back so.
        agent = Agent(endpoint_generate(endpoint, CompletionSettings(temperature=args.temperature)), hub,
                      sink=sink_for(store, trace_id), approve=approve, on_delta=print_delta,
                      system_prompt=system_prompt, config=AgentConfig(max_steps=args.max_steps))
        yield agent, trace_id


def read_system_prompt(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"--system-prompt-file {path}: cannot read it ({e.strerror})") from None


def mcp_specs(args) -> dict:
    """The servers of --mcp-config, or the Playwright browser (visible with --headed)."""
    from mcpft.agent.mcp import MCPConfigError, load_mcp_config

    if args.headed and args.mcp_config:
        raise CliError("--headed applies to the default browser only; with --mcp-config, set the browser's "
                       "headless option in that config")
    try:
        return load_mcp_config(args.mcp_config or default_browser_config(headless=not args.headed))
    except MCPConfigError as e:
        raise CliError(str(e)) from None


async def open_hub(stack: AsyncExitStack, specs: dict, folder: Path, max_chars: int):
    """The MCP servers started (tool output files under `folder`), closed with `stack`. A server that does not
    start is named on stderr and left out; only when none starts is that an error."""
    from mcpft.agent.mcp import MCPServerError, ToolHub

    try:
        hub = await stack.enter_async_context(ToolHub(specs, folder, max_chars=max_chars, on_progress=print_progress))
    except MCPServerError as e:
        raise CliError(str(e)) from None
    for name, reason in hub.failed.items():
        print(f"mcpft: MCP server {name!r} did not start and is left out: {reason}", file=sys.stderr)
    return hub


def default_browser_config(headless: bool) -> dict:
    from mcpft.agent.browser import BrowserSetupError, default_mcp_config

    try:
        return default_mcp_config(data_dir(), headless=headless)
    except BrowserSetupError as e:
        raise CliError(str(e)) from None


def start_embedded(model: str | None):
    """Serve `model` (default: the packaged SmolLM2) on 127.0.0.1 in this process, for a run with no endpoint."""
    from mcpft.agent.endpoint import Endpoint
    from mcpft.models import ModelError, model_name
    from mcpft.serve import create_app, load_backends, serve_in_thread

    try:
        backends = load_backends(model, None, data_dir())
    except ModelError as e:
        raise CliError(str(e)) from None
    base_url, stop = serve_in_thread(create_app(backends))
    return Endpoint(base_url, model_name(model)), stop


def print_delta(kind: str, text: str):
    """Thinking dimmed, answer plain, both on stderr (stdout belongs to --json)."""
    sys.stderr.write(f"\x1b[2m{text}\x1b[0m" if kind == "reasoning" and sys.stderr.isatty() else text)
    sys.stderr.flush()


def print_progress(progress) -> None:
    """A long tool call's progress notifications, on stderr."""
    print(f"\n[{progress.text()}]", file=sys.stderr)


async def ask_each(calls: list[dict]) -> list[bool]:
    from mcpft.agent.loop import describe_call

    decisions = []
    for call in calls:
        answer = await asyncio.to_thread(input, f"\nrun {describe_call(call)}? [y/N] ")
        decisions.append(answer.strip().lower() in ("y", "yes"))
    return decisions


def cmd_agent(args):
    async def chat():
        async with agent_session(args, None if args.auto_approve else ask_each) as (agent, trace_id):
            print(f"trace {trace_id}: type a message; an empty line or Ctrl-D quits", file=sys.stderr)
            try:
                await converse(agent)
            except EOFError:  # Ctrl-D at the prompt or at an approval: every step so far is stored
                print(file=sys.stderr)
            return trace_id

    trace_id = asyncio.run(chat())
    emit(args, {"trace_id": trace_id}, f"trace {trace_id}")


async def converse(agent):
    while text := (await asyncio.to_thread(input, "\n> ")).strip():
        result = await agent.send(text)
        print(f"\n[{result.stop_reason}: {result.steps} steps, {result.tool_calls} tool calls]", file=sys.stderr)


def cmd_run(args):
    if not args.auto_approve and not sys.stdin.isatty():
        raise CliError("no terminal to approve tool calls on: pass --auto-approve")

    async def one_task():
        async with agent_session(args, None if args.auto_approve else ask_each) as (agent, trace_id):
            return trace_id, await agent.send(args.task), dict(agent.tools.failed)

    trace_id, result, failed = asyncio.run(one_task())
    summary = {"trace_id": trace_id, "answer": result.answer, "stop_reason": result.stop_reason,
               "steps": result.steps, "tool_calls": result.tool_calls, "tool_errors": result.tool_errors,
               "rejected": result.rejected, "error": result.error, "mcp_failed": failed}
    emit(args, summary, f"\ntrace {trace_id}\n{result.answer or result.error or '(no answer: ' + result.stop_reason + ')'}")
    return 0 if result.stop_reason == "answer" else 1


def cmd_serve(args):
    from mcpft.models import ModelError
    from mcpft.serve import run_server

    try:
        run_server(args.model, args.adapter, host=args.host, port=args.port, data_dir=data_dir())
    except ModelError as e:
        raise CliError(str(e)) from None
