"""Compacted browser pages: what the model cannot act on is taken out, what it reads is kept. Real Playwright MCP
results from the real browser on the demo site, through the demo's tool subset (which compacts per task)."""

import asyncio
import json

from mcpft.agent.compact import DONE, SHOWN_BEFORE, PageCompactor
from mcpft.demo.snapshot import read_page
from mcpft.demo.world import running_world

FILLED = """### Ran Playwright code
```js
await page.getByRole('textbox', { name: 'Name' }).fill('Ada');
```"""


def test_a_reply_that_was_only_the_code_it_ran_says_done():
    assert PageCompactor()(FILLED) == DONE


def test_refs_stay_only_where_a_tool_can_act():
    page = """```yaml
- generic [active] [ref=e1]:
  - heading "Shop" [level=1] [ref=e2]
  - generic [ref=e3] [cursor=pointer]: Open the menu
  - listitem [ref=e4]:
    - link "Tent" [ref=e5] [cursor=pointer]:
      - /url: /products/tent
  - textbox "Search" [ref=e6]
```"""
    assert PageCompactor()(page) == """```yaml
- generic [active]:
  - heading "Shop" [level=1]
  - generic [ref=e3]: Open the menu
  - listitem:
    - link "Tent" [ref=e5]:
      - /url: /products/tent
  - textbox "Search" [ref=e6]
```"""


def test_pages_of_one_task_compact_and_a_new_task_starts_afresh(tmp_path):
    async def browse():
        async with running_world(tmp_path) as world:
            await world.reset()
            base = world.site.base_url
            raw = await world.hub.call("browser_navigate", {"url": base + "/products/summit-down-jacket"})
            await world.reset()
            base = world.site.base_url
            first = await world.tools.call("browser_navigate", {"url": base + "/products/summit-down-jacket"})
            second = await world.tools.call("browser_navigate", {"url": base + "/products?page=2"})
            await world.reset()
            fresh = await world.tools.call("browser_navigate", {"url": world.site.base_url + "/contact"})
            return raw.text, first.text, second.text, fresh.text

    raw, first, second, fresh = asyncio.run(browse())
    assert "[cursor=pointer]" in raw and "### Ran Playwright code" in raw  # what the server sends
    for text in (first, second, fresh):
        assert "[cursor=pointer]" not in text and "### Ran Playwright code" not in text
    # The first page keeps the site's banner and footer; the next page of the task names them in one line each.
    assert 'navigation "Main"' in first and SHOWN_BEFORE not in first
    assert f"- banner: {SHOWN_BEFORE}" in second and f"- contentinfo: {SHOWN_BEFORE}" in second
    assert 'navigation "Main"' not in second and 'navigation "Pagination"' in second  # a new block is shown
    assert 'navigation "Main"' in fresh and SHOWN_BEFORE not in fresh
    # Refs only where a tool can act: on links and form fields, not on headings or table cells.
    assert '- heading "Summit Down Jacket" [level=1]\n' in first and '- cell "' in first and '- cell "' in raw
    assert not any("[ref=" in line for line in first.splitlines() if "- cell" in line or "- heading" in line)
    assert all("[ref=" in line for line in fresh.splitlines() if "- textbox" in line or "- link" in line)
    # What a model reads and acts on is still there, and the teacher's reader still parses the page.
    page, raw_page = read_page(first), read_page(raw)
    assert page.h1 == raw_page.h1 == "Summit Down Jacket" and page.cell("Weight") == raw_page.cell("Weight")
    listing = read_page(second)
    assert [link.name for link in listing.links(r"^/products/[a-z]")] and all(
        link.ref for link in listing.links(r"^/products/[a-z]"))


def test_the_view_offers_only_its_tools_with_their_parameters_undescribed(tmp_path):
    from mcpft.demo.world import DEMO_TOOLS

    async def listings():
        async with running_world(tmp_path) as world:
            return world.hub.openai_tools(), world.tools.openai_tools()

    full, offered = asyncio.run(listings())
    assert sorted(t["function"]["name"] for t in offered) == sorted(DEMO_TOOLS) and len(full) > len(offered)
    by_name = {t["function"]["name"]: t["function"] for t in full}
    for tool in offered:
        function, original = tool["function"], by_name[tool["function"]["name"]]
        assert function["description"] == original["description"]
        assert "description" not in json.dumps(function["parameters"])
        assert function["parameters"]["properties"].keys() == original["parameters"]["properties"].keys()
        assert function["parameters"].get("required") == original["parameters"].get("required")
