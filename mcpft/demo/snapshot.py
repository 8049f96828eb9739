"""Reading Playwright MCP tool results: the page's aria snapshot (YAML with `[ref=…]` element refs), page URL, tabs.

    page = read_page(tool_result_text)        # None when the result holds no inline snapshot
    page.h1, page.link("Docs").ref, page.items_under("Features"), page.cell("Weight")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterator

import yaml

_KEY = re.compile(r'^(?P<role>[^\s"\[]+)(?: "(?P<name>(?:[^"\\]|\\.)*)")?(?P<attrs>(?: \[[^\]]*\])*)$')
_ATTR = re.compile(r"\[([^\]=]+)(?:=([^\]]*))?\]")
_FENCED = re.compile(r"```(?:yaml)?\n(?P<body>.*?)\n```", re.DOTALL)
_PAGE_URL = re.compile(r"^- Page URL: (?P<url>\S+)", re.MULTILINE)
_PAGE_TITLE = re.compile(r"^- Page Title: (?P<title>.*)$", re.MULTILINE)
_FILE_LINK = re.compile(r"^- \[[^\]]*\]\([^)\s]*\)$")  # `- [Snapshot](page-1.yml)`: a snapshot saved to a file
_TAB = re.compile(r"^- (?P<index>\d+): (?P<current>\(current\) )?\[(?P<title>.*)\]\((?P<url>[^)\s]*)\)$", re.MULTILINE)


@dataclass
class Node:
    """One element of an aria snapshot: `role "name" [attr=…] [ref=…]: text`, with its children."""

    role: str
    name: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    text: str = ""
    url: str = ""
    children: list["Node"] = field(default_factory=list)

    @property
    def ref(self) -> str | None:
        return self.attrs.get("ref")

    @property
    def own_text(self) -> str:
        return " ".join(part for part in (self.name, self.text) if part)

    @property
    def label(self) -> str:
        """The element's visible words: its own name and text, else its children's words."""
        return self.own_text or " ".join(child.label for child in self.children if child.label)

    def walk(self) -> Iterator["Node"]:
        yield self
        for child in self.children:
            yield from child.walk()


def _parse_key(key: str) -> Node:
    match = _KEY.match(key.strip())
    if match is None:
        return Node(role="text", text=key.strip())
    name = match["name"] or ""
    if name:
        try:
            name = json.loads(f'"{name}"')
        except json.JSONDecodeError:
            pass  # not JSON-escaped: keep the name as written
    attrs = {attr: value or "" for attr, value in _ATTR.findall(match["attrs"] or "")}
    return Node(role=match["role"], name=name, attrs=attrs)


def _build(items: object) -> tuple[list[Node], dict[str, str]]:
    """(child nodes, properties such as `/url`) of one YAML list in an aria snapshot (BaseLoader: all strings)."""
    nodes: list[Node] = []
    props: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            nodes.append(_parse_key(item))
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if key.startswith("/"):  # `- /url: …` describes the enclosing element
                props[key] = str(value)
            elif key == "text":
                nodes.append(Node(role="text", text=str(value)))
            else:
                node = _parse_key(key)
                if isinstance(value, list):
                    node.children, node_props = _build(value)
                    node.url = node_props.get("/url", "")
                elif value is not None:
                    node.text = str(value)
                nodes.append(node)
    return nodes, props


def parse_snapshot(yaml_text: str) -> list[Node]:
    """The root nodes of an aria snapshot's YAML; raises ValueError when it is not a YAML list."""
    try:
        items = yaml.load(yaml_text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds plain strings only
    except yaml.YAMLError as error:
        raise ValueError(f"the page snapshot is not valid YAML: {error}") from error
    if not isinstance(items, list):
        raise ValueError("the page snapshot is not a YAML list of elements")
    return _build(items)[0]


def snapshot_yaml(result_text: str) -> str | None:
    """The snapshot YAML inside a tool result (`### Snapshot` section, fenced or not), or None when there is none."""
    at = result_text.find("### Snapshot")
    if at == -1:
        return None
    section = result_text[at + len("### Snapshot"):]
    fenced = _FENCED.search(section)
    if fenced is not None:
        body = fenced["body"]
    else:
        end = section.find("\n### ")
        body = section[:end] if end != -1 else section
    body = body.strip("\n")
    return None if not body or _FILE_LINK.match(body) else body


def page_url(result_text: str) -> str | None:
    match = _PAGE_URL.search(result_text)
    return match["url"] if match else None


@dataclass(frozen=True)
class Tab:
    index: int
    current: bool
    title: str
    url: str


def tabs(result_text: str) -> list[Tab]:
    """The open tabs a result lists (`- 0: (current) [Title](url)`), or [] when it lists none."""
    return [Tab(int(m["index"]), bool(m["current"]), m["title"], m["url"]) for m in _TAB.finditer(result_text)]


@dataclass
class Page:
    url: str
    title: str
    roots: list[Node]

    def nodes(self) -> Iterator[Node]:
        for root in self.roots:
            yield from root.walk()

    def find(self, role: str, name: str | None = None, prefix: bool = False) -> Node | None:
        for node in self.nodes():
            if node.role != role:
                continue
            if name is None or node.name == name or (prefix and node.name.startswith(name)):
                return node
        return None

    @property
    def h1(self) -> str | None:
        heading = next((n for n in self.nodes() if n.role == "heading" and n.attrs.get("level") == "1"), None)
        return heading.name if heading else None

    def link(self, name: str, prefix: bool = False) -> Node | None:
        return self.find("link", name, prefix)

    def links(self, url_pattern: str = "") -> list[Node]:
        """Links in page order whose URL matches the regular expression `url_pattern`."""
        return [n for n in self.nodes() if n.role == "link" and re.search(url_pattern, n.url)]

    def items_under(self, heading: str) -> list[str]:
        """The item labels of the first list after the heading named `heading`, among its siblings."""
        for node in self.nodes():
            siblings = node.children
            for index, child in enumerate(siblings):
                if child.role == "heading" and child.name == heading:
                    following = next((s for s in siblings[index + 1:] if s.role in ("list", "heading")), None)
                    if following is not None and following.role == "list":
                        return [item.label for item in following.children if item.role == "listitem"]
        return []

    def cell(self, row_header: str) -> str | None:
        """The first cell of the table row whose row header is `row_header`."""
        for row in self.nodes():
            if row.role == "row" and any(c.role == "rowheader" and c.name == row_header for c in row.children):
                cell = next((c for c in row.children if c.role == "cell"), None)
                return cell.label if cell else None
        return None

    def text_matching(self, pattern: str) -> re.Match[str] | None:
        """The first match of the regular expression `pattern` in one element's own name or text."""
        regex = re.compile(pattern)
        for node in self.nodes():
            match = regex.search(node.own_text)
            if match:
                return match
        return None


def read_page(result_text: str, url: str | None = None) -> Page | None:
    """The page a tool result shows, or None when it holds no inline snapshot (only a link, or nothing)."""
    body = snapshot_yaml(result_text)
    if body is None:
        return None
    title = _PAGE_TITLE.search(result_text)
    return Page(url=page_url(result_text) or url or "", title=title["title"] if title else "",
                roots=parse_snapshot(body))
