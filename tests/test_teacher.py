"""The scripted teacher: task recognition, snapshot reading, and real episodes through Playwright MCP + Chromium."""

import dataclasses
import json
import re

import pytest

from mcpft.demo import data
from mcpft.demo.site import serve_site
from mcpft.demo.snapshot import parse_snapshot, read_page, tabs
from mcpft.demo.tasks import load_tasks, task_by_id
from mcpft.demo.teacher import TeacherError, next_step, recognise, run_episode
from mcpft.hermes import parse_assistant_text

BASE = "http://127.0.0.1:8765"


def one_per_template() -> list:
    chosen = {}
    for task in load_tasks("train") + load_tasks("heldout"):
        chosen.setdefault(task.template, task)
    return list(chosen.values())


# ---- without a browser ----------------------------------------------------------------------------------------

def test_recognises_every_task_from_its_prompt():
    for task in load_tasks():
        found, base_url = recognise(task.prompt_for(BASE))
        assert found is task
        assert base_url == (BASE if task.needs_tools else "http://127.0.0.1")


def test_an_unknown_prompt_or_a_missing_user_message_is_an_error():
    with pytest.raises(TeacherError, match="matches no demo task: 'Book me a flight"):
        next_step("Book me a flight to Oslo", [])
    with pytest.raises(TeacherError, match="no user message"):
        next_step([{"role": "system", "content": "hi"}], [])


def test_a_tool_task_without_the_browser_tools_is_an_error():
    with pytest.raises(TeacherError, match="needs the tool 'browser_navigate'"):
        next_step(task_by_id("price_by_position-1").prompt_for(BASE), [])


@pytest.mark.parametrize("task", [t for t in load_tasks() if not t.needs_tools], ids=lambda t: t.id)
def test_tool_free_tasks_are_answered_at_once(task):
    parsed = parse_assistant_text(next_step(task.prompt_for(BASE), [{"type": "function", "function": {
        "name": "browser_navigate", "parameters": {"type": "object", "properties": {"url": {"type": "string"}}}}}]))
    assert parsed.tool_calls == [] and parsed.flags == []
    assert parsed.reasoning and task.check(parsed.content).ok


# A snapshot as Playwright MCP 0.0.83 prints it (quoted values, children, /url properties).
SNAPSHOT = """### Open tabs
- 0: [Home · Acme Outfitters](http://127.0.0.1:1/)
- 1: (current) [Our story · Acme Outfitters](http://127.0.0.1:1/about)
### Page
- Page URL: http://127.0.0.1:1/about
- Page Title: Our story · Acme Outfitters
### Snapshot
```yaml
- main [ref=f5e9]:
  - heading "Our story" [level=1] [ref=f5e10]
  - paragraph [ref=f5e11]: "Price: $1.00"
  - heading "Acme in numbers" [level=2] [ref=f5e12]
  - list [ref=f5e13]:
    - listitem [ref=f5e14]: "Founded: 1987"
    - listitem [ref=f5e15]:
      - link "Say \\"hi\\"" [ref=f5e16] [cursor=pointer]:
        - /url: /contact
      - text: today
  - heading "Empty" [level=2] [ref=f5e17]
```"""


def test_snapshot_reading():
    page = read_page(SNAPSHOT)
    assert page.url == "http://127.0.0.1:1/about" and page.title == "Our story · Acme Outfitters"
    assert page.h1 == "Our story"
    assert page.items_under("Acme in numbers") == ["Founded: 1987", 'Say "hi" today']
    assert page.items_under("Empty") == []
    link = page.link('Say "hi"')
    assert (link.ref, link.url, link.attrs["cursor"]) == ("f5e16", "/contact", "pointer")
    assert page.text_matching(r"Price: (\$[\d.]+)")[1] == "$1.00"
    assert [(t.index, t.current) for t in tabs(SNAPSHOT)] == [(0, False), (1, True)]
    assert read_page("### Snapshot\n- [Snapshot](page-1.yml)") is None
    # A compacted page may hold no ref at all (nothing on it to act on): it is still a page.
    assert read_page('### Snapshot\n```yaml\n- heading "Message sent" [level=1]\n```').h1 == "Message sent"
    with pytest.raises(ValueError, match="not a YAML list"):
        parse_snapshot("just: a mapping")


# ---- real episodes --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def site():
    with serve_site() as running:
        yield running


@pytest.fixture(scope="module")
async def hub(tmp_path_factory):
    from mcpft.agent.browser import playwright_server
    from mcpft.agent.mcp import ToolHub

    out = tmp_path_factory.mktemp("browser")
    async with ToolHub([playwright_server(out, offline=True)], out) as live:
        yield live


def refs_used(message: dict) -> list[str]:
    refs = []
    for call in message.get("tool_calls", []):
        arguments = json.loads(call["function"]["arguments"])
        for item in [arguments, *arguments.get("fields", [])]:
            refs += [item[key] for key in ("ref", "target") if key in item]
    return refs


def assert_grounded(messages: list[dict], tool_names: set[str]) -> None:
    """Every call names an offered tool and every element ref was shown in an earlier tool result."""
    shown: set[str] = set()
    for message in messages[1:]:
        if message["role"] == "tool":
            shown |= set(re.findall(r"\[ref=([^\]]+)\]", message["content"]))
            continue
        assert message.get("reasoning_content"), message
        assert {call["function"]["name"] for call in message.get("tool_calls", [])} <= tool_names
        for ref in refs_used(message):
            assert ref in shown, f"ref {ref} was never shown before it was used"


async def run(task, site, hub, tools):
    site.clear_submissions()
    await hub.call("browser_close", {})  # a fresh browser with one tab for each task
    return await run_episode(task, site.base_url, tools, hub.call)



@pytest.mark.anyio
@pytest.mark.parametrize("task", one_per_template(), ids=lambda t: t.id)
async def test_teacher_solves_one_task_per_template(task, site, hub):
    tools = hub.openai_tools()
    episode = await run(task, site, hub, tools)
    assert episode.answer is not None, episode.messages[-1]
    verdict = task.check(episode.answer, site)
    assert verdict.ok, f"{verdict.reason}: {episode.answer!r}"
    calls = [m for m in episode.messages if m.get("tool_calls")]
    assert bool(calls) == task.needs_tools
    assert_grounded(episode.messages, {t["function"]["name"] for t in tools})
    # The answer opens with what was asked, not with the way the prompt opens: "Searching the docs for … gives 2
    # results" was the one sentence tuned models had for prompts opening "Search the docs", and they answered the
    # unseen first-result template with it (docs/benchmarks.md, run 58).
    assert opening(episode.answer) != opening(task.prompt), episode.answer
    if task.template == "docs_first_item":
        # The item right after its heading, as on the page: with the page's title between them ("… on the Warranty
        # page is: …"), tuned models went on from the title to the page's intro (docs/benchmarks.md, run 61).
        assert task.facts.doc_by_slug(task.params["doc"]).title not in episode.answer, episode.answer


def opening(text: str) -> list[str]:
    """The first three words, each cut to five letters ("Searching the docs" opens as "Search the docs")."""
    return [word[:5].lower() for word in re.findall(r"[A-Za-z]+", text)[:3]]


@pytest.mark.anyio
async def test_teacher_asks_for_snapshots_and_types_field_by_field_when_it_must(site, tmp_path):
    """Snapshot links left as links (not inlined) and no browser_fill_form: the teacher still gets there."""
    from mcpft.agent.browser import playwright_server
    from mcpft.agent.mcp import ToolHub

    spec = dataclasses.replace(playwright_server(tmp_path, offline=True), inline_snapshots=False)
    async with ToolHub([spec], tmp_path) as linked:
        tools = [t for t in linked.openai_tools() if t["function"]["name"] != "browser_fill_form"]
        task = task_by_id("contact_form-hanasato")
        episode = await run(task, site, linked, tools)
    assert task.check(episode.answer or "", site).ok, episode.messages[-1]
    names = [call["function"]["name"] for m in episode.messages for call in m.get("tool_calls", [])]
    assert "browser_snapshot" in names and "browser_fill_form" not in names
    assert names.count("browser_type") == 3 and names.count("browser_select_option") == 1
    assert_grounded(episode.messages, {t["function"]["name"] for t in tools})


FIRST_PAGES = {  # template -> the address the teacher opens first (the page the task names, not the home page)
    "price_by_position": "/products?page=1", "page2_product": "/products?page=2",
    # A product's page: its name as the prompt writes it, the space before it included (the same tokens).
    "product_spec": "/products/ {product}", "product_first_feature": "/products/ {product}",
    "compare_weight": "/products/ {product}", "compare_price": "/products/ {product}",
    "docs_first_item": "/docs/ {topic}",  # the topic as the prompt writes it, like a product's name
    "docs_search_count": "/docs/search?q={query}", "docs_search_first_result": "/docs/search?q={query}",
    "learn_more_fact": "", "contact_form": "/contact",
}


@pytest.mark.parametrize("task", [t for t in one_per_template() if t.needs_tools], ids=lambda t: t.id)
def test_the_teacher_goes_straight_to_the_page_the_task_names(task):
    tools = [{"type": "function", "function": {"name": "browser_navigate", "parameters": {
        "type": "object", "properties": {"url": {"type": "string"}}}}}]
    parsed = parse_assistant_text(next_step(task.prompt_for(BASE), tools))
    [call] = parsed.tool_calls
    params = task.params
    first_slug = (params.get("products") or [params.get("product")])[0]
    first_name = data.FACTS.product_by_slug(first_slug).name if first_slug else ""
    topic = data.FACTS.doc_by_slug(params["doc"]).topic if "doc" in params else ""
    path = FIRST_PAGES[task.template].format(product=first_name, topic=topic,
                                             query=params.get("query", "").replace(" ", "+"))
    assert call["function"]["name"] == "browser_navigate"
    assert json.loads(call["function"]["arguments"]) == {"url": BASE + path}
