"""Running the demo world through the real agent: collect teacher traces into the store, and score any model on
the tasks (success, steps, tool errors, unneeded calls). The site, the embedded endpoint (with the scripted teacher
as a model) and the Playwright browser are started here and stopped after."""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import openai
from openai.pagination import AsyncPage

from mcpft.agent.browser import playwright_server
from mcpft.agent.endpoint import (CompletionSettings, Endpoint, EndpointError, NotOpenAIReply, client, complete,
                                  describe_error)
from mcpft.agent.compact import ToolView
from mcpft.agent.loop import Agent, AgentConfig, TurnResult, endpoint_generate
from mcpft.agent.mcp import ToolHub
from mcpft.demo.site import Site, serve_site
from mcpft.demo.snapshot import tabs
from mcpft.demo.data import FACTS, Facts
from mcpft.demo.tasks import Task, load_tasks, task_by_id, training_facts
from mcpft.demo.teacher import TeacherError, next_step, recognise
from mcpft.recording import open_trace, sink_for
from mcpft.serve import Generation, GenerationRequest, RequestError, create_app, serve_in_thread
from mcpft.store import Store

TEACHER = "scripted-teacher"
DEMO_TAG = "demo"
COLLECT_MAX_STEPS = 20  # model calls per teacher task (the teacher gives up by itself after 16 turns)
# A small model may ramble; a demo step needs far less than the endpoint's default.
EVAL_SETTINGS = CompletionSettings(temperature=0.0, max_tokens=384)
# The browser tools the demo tasks need: the teacher goes to pages by address, clicks, and fills the contact form in
# one call; a snapshot is how any model re-reads a page. Offering only these keeps every prompt ~5k tokens shorter
# than Playwright MCP's full list (~15k characters of schemas), which is what makes CPU training on demo traces
# practical: their schemas are still ~780 tokens of a ~2k-token row.
DEMO_TOOLS = ("browser_navigate", "browser_click", "browser_fill_form", "browser_snapshot")


def demo_task_in(text: str) -> Task | None:
    """The demo task whose prompt `text` is (with any site address), or None."""
    try:
        return recognise(text)[0]
    except TeacherError:
        return None


class TeacherBackend:
    """The scripted teacher as an embedded-endpoint model: it reads the conversation (real tool results included)
    and emits its next step as Hermes text, which the endpoint parses like any model's output. `facts` is the world
    of the task at hand (its prompt names that world's products); whoever runs the tasks sets it before each."""

    def __init__(self, facts: Facts = FACTS):
        self.facts = facts

    def start(self, request: GenerationRequest) -> Generation:
        try:
            text = next_step(request.messages, request.tools or [], self.facts)
        except TeacherError as e:
            raise RequestError(f"the scripted teacher cannot go on: {e}", param="messages") from None
        return Generation(chunks=iter([text]))


@dataclass
class World:
    """A running demo world: the site and the browser tools."""

    site: Site
    hub: ToolHub  # all the browser's tools (resetting uses browser_tabs)
    tools: ToolView  # what the model is offered: the demo tools, pages compacted

    async def reset(self, facts: Facts = FACTS):
        """Before each task: the site (showing the world of `facts`) on a new free port, and one new blank tab (no
        history to go back to) in place of all the tabs the last task left. A new port per task means no two traces
        share the site's address, so a model trained on them learns to take it from the prompt instead of recalling
        one that is wrong at evaluation time; and no form submission carries over. A new tab is cheaper than
        browser_close, which relaunches Chromium; the site sets no cookies or storage, so nothing else carries
        over."""
        self.site.stop()
        self.site = serve_site(facts=facts)
        self.tools.new_task()
        opened = await self._tabs("new")  # the new tab is the last one and the current one
        for _ in range(len(tabs(opened)) - 1):
            await self._tabs("close", index=0)

    async def _tabs(self, action: str, **arguments) -> str:
        result = await self.hub.call("browser_tabs", {"action": action, **arguments})
        if result.is_error:
            raise RuntimeError(f"resetting the browser between tasks failed: browser_tabs {action}: {result.text}")
        return result.text


@asynccontextmanager
async def running_world(browser_dir: Path | None, headless: bool = True):
    """The site and the browser; the browser's profile goes in `browser_dir`, or in a scratch folder removed after."""
    given_or_scratch = (nullcontext(browser_dir) if browser_dir is not None else
                        tempfile.TemporaryDirectory(prefix="mcpft-demo-eval-", ignore_cleanup_errors=True))
    with given_or_scratch as folder:
        folder = Path(folder)
        # The demo site is on 127.0.0.1: keep Chromium off every other host (no lookups of Google's either).
        spec = playwright_server(folder, headless=headless, offline=True)
        async with ToolHub([spec], folder / "files") as hub:
            world = World(serve_site(), hub, ToolView(hub, DEMO_TOOLS))
            try:
                yield world
            finally:
                world.site.stop()  # the one the last reset started


@asynccontextmanager
async def teacher_endpoint(teacher: TeacherBackend | None = None):
    base_url, stop = serve_in_thread(create_app({TEACHER: teacher or TeacherBackend()}))
    try:
        yield Endpoint(base_url, TEACHER)
    finally:
        stop()


async def check_endpoint(endpoint: Endpoint, timeout: float = 30.0) -> None:
    """Raise EndpointError unless the endpoint answers and serves the model, so that a dead endpoint is reported as
    such instead of scoring as a model that fails every task."""
    try:
        async with client(endpoint, timeout=timeout, max_retries=0) as api:
            listing = await api.models.list()
    except openai.NotFoundError:  # a server without /v1/models: one tiny completion shows the model answers
        await complete(endpoint, [{"role": "user", "content": "Say OK."}],
                       settings=CompletionSettings(max_tokens=1, timeout=timeout))
        return
    except openai.OpenAIError as error:
        raise EndpointError(describe_error(error, endpoint, timeout)) from None
    if not isinstance(listing, AsyncPage):  # the SDK hands back plain text when the reply is not JSON
        raise EndpointError(describe_error(NotOpenAIReply(f"expected JSON, got {str(listing)[:80]!r}"), endpoint))
    served = [model.id for model in listing.data]
    if endpoint.model not in served:
        raise EndpointError(f"{endpoint.base_url} does not serve the model {endpoint.model!r} "
                            f"(it serves: {', '.join(served) or 'none'})")


@dataclass
class TaskOutcome:
    task_id: str
    template: str
    needs_tools: bool
    success: bool
    reason: str
    answer: str
    stop_reason: str
    steps: int
    tool_calls: int
    tool_errors: int
    unneeded_calls: int  # tool calls made for a task that needs none
    seconds: float
    trace_id: str = ""
    endpoint_error: bool = False  # the endpoint failed (no answer to check): not the model's wrong answer


@dataclass
class DemoReport:
    split: str
    model: str
    base_url: str
    tasks: list[TaskOutcome] = field(default_factory=list)

    def totals(self) -> dict:
        """`success_rate` is over the tasks the endpoint served (`scored_tasks`); `endpoint_errors` counts the rest."""
        n = len(self.tasks)
        scored = n - sum(t.endpoint_error for t in self.tasks)
        no_tool = [t for t in self.tasks if not t.needs_tools]
        return {
            "tasks": n,
            "success_rate": sum(t.success for t in self.tasks) / scored if scored else None,
            "successes": sum(t.success for t in self.tasks),
            "scored_tasks": scored,
            "endpoint_errors": n - scored,
            "mean_steps": sum(t.steps for t in self.tasks) / n if n else None,
            "tool_calls": sum(t.tool_calls for t in self.tasks),
            "tool_errors": sum(t.tool_errors for t in self.tasks),
            "unneeded_calls": sum(t.unneeded_calls for t in self.tasks),
            "no_tool_tasks_without_calls": sum(t.tool_calls == 0 for t in no_tool),
            "no_tool_tasks": len(no_tool),
        }

    def to_dict(self) -> dict:
        return {"split": self.split, "model": self.model, "base_url": self.base_url, "totals": self.totals(),
                "tasks": [vars(t) for t in self.tasks]}


async def run_task(world: World, task: Task, endpoint: Endpoint, *, sink=None, settings=None,
                   max_steps: int = 20) -> tuple[TaskOutcome, list[dict]]:
    """One task through the real agent loop, auto-approved, then its checker, in the task's own world."""
    await world.reset(task.facts)
    agent = Agent(endpoint_generate(endpoint, settings), world.tools, sink=sink,
                  config=AgentConfig(max_steps=max_steps))
    started = time.perf_counter()
    result = await agent.send(task.prompt_for(world.site.base_url))
    read_site = result.tool_calls > result.tool_errors + result.rejected  # some call brought a page back
    check = task.check(result.answer, world.site, read_site) if result.stop_reason == "answer" else None
    outcome = TaskOutcome(
        task_id=task.id, template=task.template, needs_tools=task.needs_tools, success=bool(check),
        reason=check.reason if check is not None else _no_answer(result),  # a failed check is falsy
        answer=result.answer, stop_reason=result.stop_reason, steps=result.steps, tool_calls=result.tool_calls,
        tool_errors=result.tool_errors, unneeded_calls=0 if task.needs_tools else result.tool_calls,
        seconds=round(time.perf_counter() - started, 2), endpoint_error=result.stop_reason == "error")
    return outcome, agent.messages


def _no_answer(result: TurnResult) -> str:
    if result.stop_reason == "error":
        return f"endpoint error: {result.error}"
    return f"no answer ({result.stop_reason})"


def pick_tasks(split: str, n: int, shares: Mapping[str, float] | None = None) -> list[Task]:
    """`n` tasks of the split, templates taken in turn (so a small `n` still covers them all), going round again
    when `n` is larger than the split. `shares` gives a template a part of the `n` of its own (at least share·n of
    its tasks, in turn), spread evenly among the others. Deterministic."""
    by_template: dict[str, list[Task]] = {}
    for task in load_tasks(split):
        by_template.setdefault(task.template, []).append(task)
    own = []
    for template, share in check_shares(shares or {}, set(by_template)).items():
        tasks = by_template.pop(template)
        own += [tasks[i % len(tasks)] for i in range(math.ceil(share * n))]
    interleaved = [t for round_ in itertools.zip_longest(*by_template.values()) for t in round_ if t is not None]
    picked = [interleaved[i % len(interleaved)] for i in range(max(0, n - len(own)))]
    every = max(1, len(picked) // max(1, len(own)))
    for index, task in enumerate(own):
        picked.insert(index * (every + 1), task)
    return picked[:n]


def check_shares(shares: Mapping[str, float], templates: set[str]) -> Mapping[str, float]:
    """`shares` as given, or a ValueError naming the template or share that is wrong."""
    if not isinstance(shares, Mapping):
        raise ValueError(f"template shares must map template names to fractions, got {shares!r}")
    for template, share in shares.items():
        if template not in templates:
            raise ValueError(f"template share: no template {template!r} in the split; known: "
                             f"{', '.join(sorted(templates))}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"template share of {template!r} must be a fraction between 0 and 1, got {share!r}")
    if sum(shares.values()) >= 1:
        raise ValueError(f"template shares add up to {sum(shares.values()):g}: they must leave room for the other "
                         "templates (under 1)")
    return shares


async def collect(store: Store, n: int, split: str = "train", browser_dir: Path | None = None, owner: str = "",
                  on_task: Callable[[TaskOutcome], None] | None = None, vary: bool | None = None,
                  shares: Mapping[str, float] | None = None) -> DemoReport:
    """Teacher traces for `n` tasks (`shares`: as `pick_tasks`), stored as they happen, tagged `demo` and the split;
    a failed task's trace is kept but excluded from training. With `vary` (the default for the train split) trace i
    runs in a world of its own (`training_facts(i)`: other product names, prices, order, story), so the names and
    values in the traces are ones a model can only get right by copying them from the prompt or the page, not by
    recalling them; the held-out split is always the demo's own world."""
    vary = split == "train" if vary is None else vary
    browser_dir = browser_dir or store.path.parent / "demo-browser"
    report = DemoReport(split=split, model=TEACHER, base_url="")
    teacher = TeacherBackend()
    async with teacher_endpoint(teacher) as endpoint, running_world(browser_dir) as world:
        report.base_url = endpoint.base_url
        for number, task in enumerate(pick_tasks(split, n, shares), start=1):
            task = task_by_id(task.id, training_facts(number)) if vary else task
            teacher.facts = task.facts
            trace_id = open_trace(store, model=TEACHER, base_url=endpoint.base_url, tools=world.tools.openai_tools(),
                                  settings={"task_id": task.id, "max_steps": COLLECT_MAX_STEPS}, owner=owner,
                                  source="demo", tags=[DEMO_TAG, split, task.template])
            outcome, _ = await run_task(world, task, endpoint, sink=sink_for(store, trace_id),
                                        max_steps=COLLECT_MAX_STEPS)
            outcome.trace_id = trace_id
            if not outcome.success:
                store.update(trace_id, f"exclude: the teacher failed ({outcome.reason})", included=False)
            report.tasks.append(outcome)
            if on_task:
                on_task(outcome)
    return report


async def evaluate_tasks(endpoint: Endpoint, split: str | None = "heldout", limit: int | None = None,
                         browser_dir: Path | None = None, settings: CompletionSettings | None = EVAL_SETTINGS,
                         max_steps: int = 12, on_task: Callable[[TaskOutcome], None] | None = None,
                         transcripts: Path | None = None, task_ids: list[str] | None = None) -> DemoReport:
    """Any endpoint and model on the split's tasks (both splits for None; nothing stored): the first `limit`, or
    those in `task_ids`; `transcripts` appends each run's messages to a JSONL file. The browser's profile goes in
    `browser_dir`, or in a scratch folder removed after. Raises EndpointError when the endpoint does not answer at
    the start; a task it fails later is marked `endpoint_error`."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    await check_endpoint(endpoint)
    report = DemoReport(split=split or "all", model=endpoint.model, base_url=endpoint.base_url)
    tasks = [t for t in load_tasks(split) if task_ids is None or t.id in task_ids][:limit]
    async with running_world(browser_dir) as world:
        for task in tasks:
            outcome, messages = await run_task(world, task, endpoint, settings=settings, max_steps=max_steps)
            report.tasks.append(outcome)
            if transcripts:
                with transcripts.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"task_id": task.id, "model": endpoint.model, "messages": messages}) + "\n")
            if on_task:
                on_task(outcome)
    return report
