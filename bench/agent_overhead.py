"""The agent's own time per step, excluding model and tool time: store appends (each a committed transaction with
re-validation), history conversion, parsing, approval plumbing. Goal: <= 10 ms median.

    .venv/bin/python bench/agent_overhead.py --steps 40 --result-chars 16000

A scripted model behind the real embedded endpoint calls a real MCP server's `big` tool (results of realistic size),
so every part of a step is real; the model's and the tool's own time are measured and subtracted per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcpft.agent.endpoint import Endpoint  # noqa: E402
from mcpft.agent.loop import Agent, AgentConfig, endpoint_generate  # noqa: E402
from mcpft.agent.mcp import ToolHub, load_mcp_config  # noqa: E402
from mcpft.recording import open_trace, sink_for  # noqa: E402
from mcpft.serve import Generation, create_app, serve_in_thread  # noqa: E402
from mcpft.store import Store  # noqa: E402


class BigToolCaller:
    """Calls `big` forever (the step limit ends the run)."""

    def __init__(self, chars: int):
        self.call = json.dumps({"name": "big", "arguments": {"n": chars}})

    def start(self, request):
        return Generation(chunks=iter([f"<think>Next page.</think>\n<tool_call>{self.call}</tool_call>"]))


class TimedTools:
    """The hub, with each call's own time recorded (per step, so the loop's share can be isolated)."""

    def __init__(self, hub):
        self.hub, self.seconds = hub, []

    def openai_tools(self):
        return self.hub.openai_tools()

    async def call(self, name, arguments, timeout=None):
        t0 = time.perf_counter()
        result = await self.hub.call(name, arguments, timeout=timeout)
        self.seconds.append(time.perf_counter() - t0)
        return result


async def run(steps: int, chars: int, work: Path):
    url, stop = serve_in_thread(create_app({"bench": BigToolCaller(chars)}))
    config = {"mcpServers": {"tiny": {"command": sys.executable, "args": [str(REPO / "tests" / "tiny_mcp_server.py"), "b"]}}}
    store = Store(work / "bench.db")
    model_seconds, marks = [], []
    generate = endpoint_generate(Endpoint(url, "bench"))

    async def timed_generate(messages, tools, on_delta):
        t0 = time.perf_counter()
        try:
            return await generate(messages, tools, on_delta)
        finally:
            model_seconds.append(time.perf_counter() - t0)

    try:
        async with ToolHub(load_mcp_config(config), work, max_chars=chars + 100) as hub:
            tools = TimedTools(hub)
            trace_id = open_trace(store, model="bench", base_url=url, tools=hub.openai_tools())
            sink = sink_for(store, trace_id)

            def marking_sink(message):
                sink(message)
                if message["role"] == "tool":
                    marks.append(time.perf_counter())

            agent = Agent(timed_generate, tools, sink=marking_sink, config=AgentConfig(max_steps=steps))
            start = time.perf_counter()
            await agent.send("read every page")
    finally:
        stop()
    edges = [start, *marks]
    per_step = [(b - a) - m - t for a, b, m, t in zip(edges, edges[1:], model_seconds, tools.seconds)]
    return per_step, model_seconds, tools.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--result-chars", type=int, default=16000)
    args = parser.parse_args()
    per_step, model, tools = asyncio.run(run(args.steps, args.result_chars, Path(tempfile.mkdtemp())))
    ms = [s * 1000 for s in per_step]
    print(f"steps: {len(ms)}, tool result: {args.result_chars} characters")
    print(f"agent's own time per step: median {statistics.median(ms):.2f} ms, p90 "
          f"{sorted(ms)[int(len(ms) * 0.9) - 1]:.2f} ms, max {max(ms):.2f} ms")
    print(f"(excluded) model round trip median {statistics.median(model) * 1000:.1f} ms, "
          f"tool call median {statistics.median(tools) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
