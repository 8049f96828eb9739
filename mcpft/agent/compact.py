"""Shorter browser pages for a small model: Playwright MCP results with what a model cannot use taken out.

A page snapshot is most of an agent trace's tokens, and tokens are what CPU training and generation pay for. Three
parts of a Playwright MCP result tell a model nothing it can act on:

- the `### Ran Playwright code` section (the JavaScript the server ran for the call just made);
- `[cursor=pointer]` on every link and button (clickable elements already say so by their role);
- the `[ref=…]` of an element no tool can act on (a heading, a paragraph, a list item, a table cell): refs are what
  click, type and fill take, so they stay on links, buttons, form fields, options, tabs, images and anything the page
  marks clickable; elsewhere they are ~5 tokens each, a quarter of a page's tokens, and they part the words a model
  reads (a list's items, a table's rows);
- a landmark block (the site's banner, its navigation, its footer) that an earlier page of the same task already
  showed word for word: it is replaced by one line saying so.

`PageCompactor` keeps what one task has shown, so it is made (or `reset`) per task. What it returns is exactly what
the model sees, and the trace stores that, so traces stay faithful to the model's view.

`ToolView` is a tool hub as a small model sees it: only some tools offered (the demo's four browser tools instead of
Playwright MCP's ~25, ~5k tokens of schemas fewer in every prompt), pages compacted, and the parameters' own
descriptions left out of the schemas (a tool keeps its description; the names, types and enums of its parameters say
how to call it: ~300 tokens fewer for the demo's four). The demo's collection, its
evaluation and the app's demo tasks all run through one, so what a model trains on is what it is tested on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from mcpft.agent.mcp import without_keywords

_RAN_CODE = re.compile(r"^### Ran Playwright code\n```\w*\n.*?\n```(?:\n|\Z)", re.MULTILINE | re.DOTALL)
_CURSOR = " [cursor=pointer]"
_LANDMARK = re.compile(r"^(?P<indent> *)- (?P<role>banner|navigation|contentinfo)\b.*$")
_REF = re.compile(r" \[ref=[^\]]*\]")
_ROLE = re.compile(r"^ *- (?P<role>[a-z]+)\b")
# Roles a browser tool acts on by ref (click, hover, type, fill, select, drag, screenshot an element).
ACTIONABLE = frozenset({"link", "button", "textbox", "searchbox", "combobox", "listbox", "option", "checkbox", "radio",
                        "switch", "slider", "spinbutton", "tab", "menuitem", "menuitemcheckbox", "menuitemradio",
                        "treeitem", "img", "iframe"})
SHOWN_BEFORE = "(the same as on the page before)"
DONE = "Done."  # a call whose whole reply was the code it ran (filling a form): it worked, the page is as it was


class PageCompactor:
    def __init__(self):
        self.shown: set[str] = set()  # landmark blocks already shown in this task, refs left out

    def reset(self) -> None:
        self.shown.clear()

    def __call__(self, text: str) -> str:
        text = _RAN_CODE.sub("", text)
        return "\n".join(self._landmarks([_thinned(line) for line in text.split("\n")])) if text.strip() else DONE

    def _landmarks(self, lines: list[str]) -> list[str]:
        kept, i = [], 0
        while i < len(lines):
            match = _LANDMARK.match(lines[i])
            if match is None:
                kept.append(lines[i])
                i += 1
                continue
            end = _block_end(lines, i, len(match["indent"]))
            key = _REF.sub("", "\n".join(lines[i:end]))
            if key in self.shown:
                kept.append(f"{match['indent']}- {match['role']}: {SHOWN_BEFORE}")
            else:
                self.shown.add(key)
                kept.extend(lines[i:end])
            i = end
        return kept


class ToolView:
    """`hub` (a `ToolHub`) with only `names` offered and callable (None: all), its pages compacted when `compact`.
    Call `new_task()` between tasks: what counts as shown before is per task."""

    def __init__(self, hub, names: Iterable[str] | None = None, compact: bool = True):
        self.hub, self.names = hub, None if names is None else frozenset(names)
        self.compact = PageCompactor() if compact else None

    def new_task(self) -> None:
        if self.compact is not None:
            self.compact.reset()

    def openai_tools(self) -> list[dict]:
        tools = [t for t in self.hub.openai_tools() if self.names is None or t["function"]["name"] in self.names]
        if self.compact is None:
            return tools
        return [{**tool, "function": {**tool["function"], "parameters": without_keywords(
            tool["function"].get("parameters", {}), {"description"})}} for tool in tools]

    async def call(self, name: str, arguments, timeout: float | None = None, **options):
        if self.names is not None and name not in self.names:  # the hub's own unknown-tool error, naming the tools
            return await self.hub.call(f"<not offered: {name}>", arguments, timeout)
        result = await self.hub.call(name, arguments, timeout, **options)
        return result if self.compact is None else dataclasses.replace(result, text=self.compact(result.text))


def _thinned(line: str) -> str:
    """The line without `[cursor=pointer]`, and without its ref unless a tool can act on the element."""
    if _CURSOR in line:
        return line.replace(_CURSOR, "")
    role = _ROLE.match(line)
    return line if role is None or role["role"] in ACTIONABLE else _REF.sub("", line, count=1)


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the YAML list item at `start`: its children are the lines indented deeper."""
    end = start + 1
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip(" ")) > indent \
            and not lines[end].startswith("```"):
        end += 1
    return end
