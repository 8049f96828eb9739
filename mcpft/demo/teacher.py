"""The scripted teacher: a deterministic policy that solves every demo task through the real browser.

`next_step(messages, tools)` reads the conversation so far (the user's task prompt, earlier tool calls and the real
Playwright MCP results) and returns the next assistant turn as Hermes text: a short `<think>` and either
`<tool_call>` blocks or the final answer. It recognises the task by matching the user message against
`load_tasks()`, reads element refs from the latest page snapshot in the tool results (never hard-coded), and asks
for a fresh `browser_snapshot` whenever the page changed without showing one. It answers from what the page shows.

It goes the shortest way a person who knows the site would: straight to the address of the page the task names
(`/products/ <product name>`, `/products?page=2`, `/docs`, `/docs/search?q=…`, `/contact`) and clicks only where the
task is about the page's content (the n-th product listed, the docs page on a topic). Fewer steps make shorter
traces, which is what lets a small model train on them in minutes on a CPU, and one address pattern per kind of page
is something a small model can learn and apply to products and queries it has never seen. A product's address uses
its name exactly as the task writes it, down to the space before it (the same tokens): copying the prompt's tokens is
what a small model does reliably, while turning an unseen name into a lower-case slug is not (it wrote
`alpine-trekking-presents`), nor is re-spelling the name's first token (`/products/Axelab`). It answers from what the
page shows, so it solves a task in any version of the world (`data.vary`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from urllib.parse import quote_plus
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

from mcpft.demo import data
from mcpft.demo.snapshot import Node, Page, Tab, page_url, read_page, tabs
from mcpft.demo.tasks import FACT_ANSWERS, ORDINALS, Task, all_tasks, first_item_sentence, results_sentence
from mcpft.hermes import format_assistant_text, parse_assistant_text

MAX_ASSISTANT_TURNS = 16
# Calls after which the last snapshot no longer shows the page (unless their own result holds a new one).
PAGE_CHANGING_TOOLS = frozenset({"browser_navigate", "browser_navigate_back", "browser_click", "browser_press_key"})
FILL_TOOLS = frozenset({"browser_fill_form", "browser_type", "browser_select_option"})
GIVE_UP = "I'm sorry: I could not finish this task in the browser within the steps I allow myself."
_URL = re.compile(r"https?://[^\s\"'<>]+")


class TeacherError(ValueError):
    """The teacher cannot act: an unknown task, a missing tool, or a page without the element it needs."""


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]
    id: str | None = None
    result: str | None = None
    is_error: bool = False


@dataclass
class Step:
    """One assistant turn: reasoning plus tool calls `(name, arguments)`, or reasoning plus a final answer."""

    think: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    answer: str = ""

    def text(self) -> str:
        calls = [{"name": name, "arguments": arguments} for name, arguments in self.calls]
        return format_assistant_text(content=self.answer, reasoning=self.think, tool_calls=calls or None)


# ---- reading the conversation ---------------------------------------------------------------------------------

def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise TeacherError(f"message content must be text or a list of parts, got {type(content).__name__}")


def _assistant_calls(message: Mapping[str, Any]) -> list[Call]:
    raw_calls = message.get("tool_calls")
    if not raw_calls and "<tool_call>" in _content_text(message.get("content")):
        raw_calls = parse_assistant_text(_content_text(message.get("content"))).tool_calls
    calls = []
    for raw in raw_calls or []:
        function = raw.get("function") or raw
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = {}
        calls.append(Call(str(function.get("name", "")), arguments if isinstance(arguments, dict) else {},
                          id=raw.get("id")))
    return calls


def _is_error(text: str) -> bool:
    return text.lstrip().startswith(("### Error", "Error:"))


@dataclass
class Browsing:
    """What the conversation shows: the task, every call with its result, and the browser's current state."""

    task: Task
    base_url: str
    turns: list[list[Call]]
    page: Page | None = None  # the current page, when a result after the last page change shows it
    url: str | None = None
    open_tabs: list[Tab] = field(default_factory=list)
    seen: dict[str, Page] = field(default_factory=dict)  # every page shown so far, by its main heading

    @property
    def last_calls(self) -> list[Call]:
        return self.turns[-1] if self.turns else []

    def observe(self, call: Call) -> None:
        text = call.result or ""
        self.url = page_url(text) or self.url
        listed = tabs(text)
        if listed:
            self.open_tabs = listed
            current = next((tab for tab in listed if tab.current), None)
            if current is not None and call.name == "browser_tabs":
                self.url = current.url
        page = None if call.is_error else read_page(text, self.url)
        if page is not None:
            self.page = page
            if page.h1:
                self.seen[page.h1] = page
        elif call.is_error or changes_page(call):
            self.page = None

    def form_filled(self) -> bool:
        """The latest round of calls other than snapshots filled fields, without an error."""
        for calls in reversed(self.turns):
            if all(call.name == "browser_snapshot" for call in calls):
                continue
            return bool(calls) and all(call.name in FILL_TOOLS and not call.is_error for call in calls)
        return False


def changes_page(call: Call) -> bool:
    """Whether the call may have changed what the page shows (typing changes it only when it submits)."""
    if call.name == "browser_tabs":
        return call.arguments.get("action") != "list"
    if call.name == "browser_type":
        return bool(call.arguments.get("submit"))
    return call.name in PAGE_CHANGING_TOOLS


def _task_index(base_url: str, facts: data.Facts) -> dict[str, Task]:
    return {task.prompt_for(base_url): task for task in all_tasks(facts)}


def recognise(user_text: str, facts: data.Facts = data.FACTS) -> tuple[Task, str]:
    """The task whose prompt is `user_text` in the world of `facts`, and the site's base URL found in it."""
    text = user_text.strip()
    candidates = [url.rstrip(".,;:!?)\"'") for url in _URL.findall(text)] or ["http://127.0.0.1"]
    for base_url in candidates:
        task = _task_index(base_url.rstrip("/"), facts).get(text)
        if task is not None:
            return task, base_url.rstrip("/")
    raise TeacherError(f"the user message matches no demo task: {text[:120]!r}")


def read_conversation(messages: str | Sequence[Mapping[str, Any]], facts: data.Facts = data.FACTS) -> Browsing:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        raise TeacherError("the conversation has no user message to take the task from")
    task, base_url = recognise(_content_text(messages[users[0]].get("content")), facts)
    browsing = Browsing(task, base_url, turns=[])
    for message in messages[users[0] + 1:]:
        role = message.get("role")
        if role == "assistant":
            browsing.turns.append(_assistant_calls(message))
        elif role == "tool" and browsing.turns:
            call = _answered_call(browsing.last_calls, message.get("tool_call_id"))
            if call is not None:
                call.result = _content_text(message.get("content"))
                call.is_error = _is_error(call.result)
                browsing.observe(call)
    return browsing


def _answered_call(calls: list[Call], call_id: str | None) -> Call | None:
    """The call a tool message answers: by id, else the first call still without a result."""
    pending = [call for call in calls if call.result is None]
    by_id = [call for call in pending if call_id and call.id == call_id]
    return (by_id or pending or [None])[0]


# ---- acting ---------------------------------------------------------------------------------------------------

def _tool_schemas(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Tool name -> JSON schema of its arguments, from OpenAI functions or MCP tool listings."""
    schemas = {}
    for tool in tools:
        function = tool.get("function") or tool
        schema = function.get("parameters") or function.get("input_schema") or function.get("inputSchema") or {}
        schemas[str(function.get("name"))] = schema
    return schemas


def _ref_key(schema: Mapping[str, Any]) -> str:
    """Playwright MCP names the element ref `ref` in older versions and `target` since 0.0.7x."""
    properties = schema.get("properties") or {}
    return "ref" if "ref" in properties else "target"


def _describe(node: Node | None) -> str:
    """The human-readable element description Playwright MCP asks for, e.g. "Docs link"."""
    return f"{node.name} {node.role}".strip() if node else "element"


class Actions:
    """Builds steps with the tools the conversation offers, reading refs from the current page."""

    def __init__(self, browsing: Browsing, tools: Sequence[Mapping[str, Any]]):
        self.browsing = browsing
        self.schemas = _tool_schemas(tools)

    def _tool(self, name: str) -> Mapping[str, Any]:
        if name not in self.schemas:
            raise TeacherError(f"the task needs the tool {name!r}, which the conversation does not offer")
        return self.schemas[name]

    def _target(self, tool: str, node: Node | None, what: str, schema: Mapping[str, Any] | None = None) -> dict:
        if node is None or not node.ref:
            url = self.browsing.page.url if self.browsing.page else "?"
            raise TeacherError(f"task {self.browsing.task.id}: no {what} with a ref on the page {url}")
        return {"element": what, _ref_key(schema or self._tool(tool)): node.ref}

    def navigate(self, url: str, think: str) -> Step:
        self._tool("browser_navigate")
        return Step(think, [("browser_navigate", {"url": url})])

    def snapshot(self, think: str) -> Step:
        self._tool("browser_snapshot")
        return Step(think, [("browser_snapshot", {})])

    def click(self, node: Node | None, think: str) -> Step:
        return Step(think, [("browser_click", self._target("browser_click", node, _describe(node)))])

    def select_tab(self, tab: Tab, think: str) -> Step:
        self._tool("browser_tabs")
        return Step(think, [("browser_tabs", {"action": "select", "index": tab.index})])

    def fill_form(self, page: Page, values: Mapping[str, str], think: str) -> Step:
        """Fill textboxes and the topic select: one `browser_fill_form` call, else one call per field."""
        fields = [(page.find("textbox", label) or page.find("combobox", label), label, value)
                  for label, value in values.items()]
        if "browser_fill_form" in self.schemas:
            item_schema = ((self.schemas["browser_fill_form"].get("properties") or {}).get("fields") or {}).get("items")
            entries = []
            for node, label, value in fields:
                entry = self._target("browser_fill_form", node, f"{label} field", item_schema or {})
                entry.update(name=label, type=node.role, value=value)
                entries.append(entry)
            return Step(think, [("browser_fill_form", {"fields": entries})])
        calls = []
        for node, label, value in fields:
            if node is not None and node.role == "combobox":
                arguments = self._target("browser_select_option", node, f"{label} select")
                calls.append(("browser_select_option", {**arguments, "values": [value]}))
            else:
                calls.append(("browser_type", {**self._target("browser_type", node, f"{label} field"), "text": value}))
        return Step(think, calls)


# ---- navigation (each returns None once the goal page is shown) -----------------------------------------------

def _list_page_number(page: Page) -> int | None:
    if page.h1 != "Products":
        return None
    match = page.text_matching(r"Page (\d+) of \d+")
    return int(match[1]) if match else None


def goto_catalogue_page(act: Actions, page: Page | None, number: int, why: str = "") -> Step | None:
    """Open catalogue page `number`; `why` (a sentence) says what the page is wanted for."""
    current = _list_page_number(page) if page is not None else None
    if current == number:
        return None
    why = why + " " if why else ""
    if current is not None:
        return act.click(page.link(f"Page {number}"), f"{why}This is page {current} of the catalogue; I need page "
                                                       f"{number}, so I'll follow its pagination link.")
    return act.navigate(catalogue_url(act.browsing.base_url, number), f"{why}Page {number} of the catalogue is "
                                                                      f"at {catalogue_path(number)}.")


def goto_product(act: Actions, page: Page | None, product: data.Product) -> Step | None:
    if page is not None and page.h1 == product.name:
        return None
    return act.navigate(act.browsing.base_url + product_path(product),
                        f"The {product.name} page is at {product_path(product)}.")


def goto_doc(act: Actions, page: Page | None, doc: data.DocPage) -> Step | None:
    if page is not None and page.h1 == doc.title:
        return None
    path = doc_path(doc)
    return act.navigate(act.browsing.base_url + path, f"The docs page about {doc.topic} is at {path}.")


def goto_search(act: Actions, page: Page | None, query: str) -> Step | None:
    box = page.find("searchbox") if page is not None else None
    if page is not None and page.h1 == "Search results" and box is not None and box.text == query:
        return None
    path = search_path(query)
    return act.navigate(act.browsing.base_url + path, f"The docs search for \"{query}\" is at {path}.")


# The site's addresses, as a person who knows the site would type them.
def product_path(product: data.Product) -> str:
    # The name as the prompt has it, space before it included: "the Alpine Trekking Poles" holds the token
    # " Alpine", which "/products/Alpine" would split into "Al" + "pine", a spelling a small model gets wrong for a
    # name it never wrote; with the space the address is a copy of the prompt's tokens (the site ignores the space).
    return f"/products/ {product.name}"


def doc_path(doc: data.DocPage) -> str:
    # The topic as the prompt has it ("the docs page about the warranty"), as product_path copies a product's name.
    return f"/docs/ {doc.topic}"


def catalogue_path(number: int) -> str:
    return f"/products?page={number}"


def catalogue_url(base_url: str, number: int) -> str:
    return base_url + catalogue_path(number)


def search_path(query: str) -> str:
    return f"/docs/search?q={quote_plus(query)}"


# ---- one policy per template ----------------------------------------------------------------------------------

PRICE = r"Price: (\$[\d,]+\.\d\d)"


def _price(page: Page) -> str:
    match = page.text_matching(PRICE)
    if match is None:
        raise TeacherError(f"no price on the product page {page.url}")
    return match[1]


def _product_at(act: Actions, page: Page | None, catalogue_page: int, position: int) -> Step | None:
    """Open the product at `position` on catalogue page `catalogue_page`; None once its page is shown (the teacher
    only ever reaches a product page from that catalogue page, by counting)."""
    if page is not None and page.text_matching(PRICE) is not None:
        return None
    ordinal = ORDINALS[position - 1]
    step = goto_catalogue_page(act, page, catalogue_page, f"The {ordinal} product I want is on page "
                                                          f"{catalogue_page} of the catalogue.")
    if step is not None:
        return step
    links = page.links(r"^/products/[a-z]")
    if len(links) < position:
        raise TeacherError(f"catalogue page {catalogue_page} lists {len(links)} products, fewer than {position}")
    link = links[position - 1]
    # Counting the whole page aloud, one name per number, whichever position is asked: the same list every time,
    # so picking the n-th becomes looking up "n." in its own words, which carries over to positions never trained.
    counted = ", ".join(f"{n}. {each.name}" for n, each in enumerate(links, start=1))
    return act.click(link, f"Page {catalogue_page} of the catalogue is open. Counting its products: {counted}. "
                           f"The {ordinal} is the {link.name}, so I'll open it.")


def solve_price_by_position(task: Task, act: Actions, page: Page | None) -> Step:
    position = task.params["position"]
    step = _product_at(act, page, 1, position)
    if step is not None:
        return step
    price = _price(page)
    return Step(f"The product page shows \"Price: {price}\".",
                answer=f"The {ORDINALS[position - 1]} product in the catalogue is the {page.h1}. It costs {price}.")


def solve_page2_product(task: Task, act: Actions, page: Page | None) -> Step:
    position = task.params["position"]
    step = _product_at(act, page, 2, position)
    if step is not None:
        return step
    price = _price(page)
    return Step(f"This is the {page.h1} page and it shows \"Price: {price}\".",
                answer=f"The {ORDINALS[position - 1]} product on page 2 is the {page.h1}, priced at {price}.")


SPEC_ANSWERS = {
    "Weight": "The {name} weighs {value}.",
    "Material": "The {name} is made of {value_lower}.",
    "Warranty": "The {name} comes with a warranty of {value}.",
    "Made in": "The {name} is made in {value}.",
}


def solve_product_spec(task: Task, act: Actions, page: Page | None) -> Step:
    product = task.facts.product_by_slug(task.params["product"])
    spec = task.params["spec"]
    step = goto_product(act, page, product)
    if step is not None:
        return step
    value = page.cell(spec)
    if value is None:
        raise TeacherError(f"the {product.name} page has no {spec!r} row")
    answer = SPEC_ANSWERS[spec].format(name=page.h1, value=value, value_lower=value[:1].lower() + value[1:])
    return Step(f"The specifications table lists {spec}: {value}.", answer=answer)


def solve_product_first_feature(task: Task, act: Actions, page: Page | None) -> Step:
    product = task.facts.product_by_slug(task.params["product"])
    step = goto_product(act, page, product)
    if step is not None:
        return step
    features = page.items_under("Features")
    if not features:
        raise TeacherError(f"the {product.name} page lists no features")
    return Step(f"The Features list starts with \"{features[0]}\".",
                answer=f"The first feature listed for the {page.h1} is: {features[0]}.")


def _visit_all(act: Actions, browsing: Browsing, page: Page, products: list[data.Product],
               read: Callable[[Page], str]) -> Step | None:
    """Open each product's page in turn; `read` names what a page shows of it ("weight: 520 g"), said before moving
    on so that the value stays in the conversation's own words."""
    for product in products:
        if product.name not in browsing.seen:
            step = goto_product(act, page, product)
            done = [p for p in products if p.name in browsing.seen]
            if step is not None and done:
                said = f"The {done[-1].name} page shows its {read(browsing.seen[done[-1].name])}."
                step = dataclasses.replace(step, think=f"{said} {step.think}")
            return step
    return None


def _grams(text: str) -> int:
    return int(re.sub(r"[^\d]", "", text))


def solve_compare_weight(task: Task, act: Actions, page: Page | None) -> Step:
    products = [task.facts.product_by_slug(slug) for slug in task.params["products"]]
    step = _visit_all(act, act.browsing, page, products, lambda seen: f"weight: {seen.cell('Weight')}")
    if step is not None:
        return step
    weights = {p.name: act.browsing.seen[p.name].cell("Weight") or "" for p in products}
    lighter, heavier = sorted(products, key=lambda p: _grams(weights[p.name]))
    return Step(f"The {products[0].name} weighs {weights[products[0].name]} and the {products[1].name} weighs "
                f"{weights[products[1].name]}.",
                answer=f"The {lighter.name} is lighter: it weighs {weights[lighter.name]}, while the "
                       f"{heavier.name} weighs {weights[heavier.name]}.")


def solve_compare_price(task: Task, act: Actions, page: Page | None) -> Step:
    products = [task.facts.product_by_slug(slug) for slug in task.params["products"]]
    step = _visit_all(act, act.browsing, page, products, lambda seen: f"price: {_price(seen)}")
    if step is not None:
        return step
    prices = {p.name: _price(act.browsing.seen[p.name]) for p in products}
    amount = {name: float(text.strip("$").replace(",", "")) for name, text in prices.items()}
    cheaper, dearer = sorted(products, key=lambda p: amount[p.name])
    difference = amount[dearer.name] - amount[cheaper.name]
    return Step(f"The {products[0].name} costs {prices[products[0].name]} and the {products[1].name} costs "
                f"{prices[products[1].name]}.",
                answer=f"The {dearer.name} costs more: {prices[dearer.name]} against {prices[cheaper.name]} for "
                       f"the {cheaper.name}, a difference of ${difference:,.2f}.")


def solve_docs_first_item(task: Task, act: Actions, page: Page | None) -> Step:
    doc = task.facts.doc_by_slug(task.params["doc"])
    heading = task.params["heading"]
    step = goto_doc(act, page, doc)
    if step is not None:
        return step
    items = page.items_under(heading)
    if not items:
        raise TeacherError(f"the {doc.title} page has no list under {heading!r}")
    return Step(f"Under the heading \"{heading}\" the first item is \"{items[0]}\".",
                answer=first_item_sentence(heading, items[0]))


def _result_count(page: Page) -> int:
    match = page.text_matching(r"(\d+) results? for")
    if match is None:
        raise TeacherError(f"no result count on the search page {page.url}")
    return int(match[1])


def solve_docs_search_count(task: Task, act: Actions, page: Page | None) -> Step:
    query = task.params["query"]
    step = goto_search(act, page, query)
    if step is not None:
        return step
    count = _result_count(page)
    noun = "result" if count == 1 else "results"
    return Step(f"The results page says {count} {noun} for \"{query}\".", answer=results_sentence(query, count))


def solve_docs_search_first_result(task: Task, act: Actions, page: Page | None) -> Step:
    query = task.params["query"]
    step = goto_search(act, page, query)
    if step is not None:
        return step
    results = page.links(r"^/docs/(?!search)")
    if not results:
        return Step(f"The search for \"{query}\" found nothing.", answer=f"The docs have no results for \"{query}\".")
    return Step(f"The results list starts with \"{results[0].name}\".",
                answer=f"The first result for \"{query}\" is \"{results[0].name}\".")


def solve_learn_more_fact(task: Task, act: Actions, page: Page | None) -> Step:
    key = task.params["fact"]
    if page is not None and page.h1 == "Our story":
        label = data.STORY_LABELS[key]
        value = next((item.split(":", 1)[1].strip() for item in page.items_under("Acme in numbers")
                      if item.startswith(f"{label}:")), None)
        if value is None:
            raise TeacherError(f"the story page lists no {label!r}")
        return Step(f"The question is about the \"{label}\" line of the list. The new tab shows \"{label}: "
                    f"{value}\".", answer=FACT_ANSWERS[key].format(value))
    link = page.link("Learn more", prefix=True) if page is not None else None
    if link is not None and link.url.startswith("/"):
        return act.navigate(act.browsing.base_url + link.url, f"The \"Learn more\" link leads to {link.url}; I'll "
                                                              "open that page directly, as the new tab would.")
    if link is not None:
        return act.click(link, "The home page has the \"Learn more\" link; clicking it opens a new tab.")
    return act.navigate(act.browsing.base_url, "The \"Learn more\" link is on the home page; I'll go there.")


def solve_contact_form(task: Task, act: Actions, page: Page | None) -> Step:
    values = {"Name": task.params["name"], "Email": task.params["email"], "Topic": task.params["topic"],
              "Message": task.params["message"]}
    if page is None:
        return act.navigate(act.browsing.base_url + "/contact", "The contact form is at /contact.")
    if page.h1 == "Message sent":
        sent = page.items_under("What you sent")
        echoed = "; ".join(sent)
        return Step(f"The page now says \"Message sent\", so the form went through, and it echoes what was sent: "
                    f"{echoed}" + ("" if echoed[-1:] in ".?!" else "."),
                    answer=f"Done: I sent the message through the contact form as {task.params['name']} "
                           f"({task.params['email']}) with the topic \"{task.params['topic']}\". "
                           "The site confirmed it and will reply within two working days.")
    if page.find("textbox", "Name") is not None:
        if act.browsing.form_filled():
            return act.click(page.find("button", "Send message"), "The form is filled in; I'll send it.")
        return act.fill_form(page, values, "This is the contact form; I'll fill in the name, email, topic and "
                                           "message.")
    return act.click(page.link("Contact"), "I'll open the Contact page.")


Solver = Callable[[Task, Actions, "Page | None"], Step]  # None: no page shown yet
SOLVERS: dict[str, Solver] = {
    "price_by_position": solve_price_by_position, "page2_product": solve_page2_product,
    "product_spec": solve_product_spec, "product_first_feature": solve_product_first_feature,
    "compare_weight": solve_compare_weight, "compare_price": solve_compare_price,
    "docs_first_item": solve_docs_first_item, "docs_search_count": solve_docs_search_count,
    "docs_search_first_result": solve_docs_search_first_result, "learn_more_fact": solve_learn_more_fact,
    "contact_form": solve_contact_form,
}


def solve_without_tools(task: Task) -> Step:
    if task.template == "no_tool_arithmetic":
        answer = task.params["answer"]
        return Step("This is plain arithmetic, so I don't need the browser.", answer=f"The answer is {answer:,}.")
    if task.template == "no_tool_definition":
        abbreviation, expansion = task.params["abbreviation"], task.params["expansion"]
        return Step("This is general knowledge; no need to browse.",
                    answer=f"{abbreviation} stands for {expansion}.")
    raise TeacherError(f"task {task.id}: no tool-free answer for template {task.template!r}")


GOALS = {
    "price_by_position": "The user wants the price of the {ordinal} product in the Acme catalogue.",
    "page2_product": "The user wants the name and price of the {ordinal} product on page 2 of the catalogue.",
    "product_spec": "The user wants the {spec_lower} of the {product_name}, which is on its product page.",
    "product_first_feature": "The user wants the first feature listed for the {product_name}.",
    "compare_weight": "I need the weights of both products from their spec tables.",
    "compare_price": "I need the prices of both products.",
    "docs_first_item": "I need the first item under \"{heading}\" on the docs page about {doc_topic}.",
    "docs_search_count": "I need to search the docs for \"{query}\" and count the results.",
    "docs_search_first_result": "I need to search the docs for \"{query}\" and read the first result.",
    "learn_more_fact": "I need to open the \"Learn more\" link on the home page and read the new tab.",
    "contact_form": "I need to fill in and send the contact form.",
}


def goal(task: Task) -> str:
    params = task.params
    product = task.facts.product_by_slug(params["product"]) if "product" in params else None
    doc = task.facts.doc_by_slug(params["doc"]) if "doc" in params else None
    position = params.get("position")
    return GOALS[task.template].format(
        ordinal=ORDINALS[position - 1] if position else "", spec_lower=str(params.get("spec", "")).lower(),
        product_name=product.name if product else "", heading=params.get("heading", ""),
        doc_topic=doc.topic if doc else "", query=params.get("query", ""))


def _why_snapshot(calls: list[Call]) -> str:
    if any(call.is_error for call in calls):
        return "That did not work; I'll look at the page again."
    if any(call.name == "browser_tabs" for call in calls):
        return "I'm on the new tab now; I'll take a snapshot to read it."
    if any("[Snapshot](" in (call.result or "") for call in calls):
        return "The result only links to the page snapshot, so I'll ask for the snapshot itself."
    return "I need to see the page as it is now."


def plan(browsing: Browsing, tools: Sequence[Mapping[str, Any]]) -> Step:
    task = browsing.task
    if not task.needs_tools:
        return solve_without_tools(task)
    if len(browsing.turns) >= MAX_ASSISTANT_TURNS:
        return Step("I have used too many steps without finishing.", answer=GIVE_UP)
    act = Actions(browsing, tools)
    if not browsing.turns:  # no page yet: each solver's first move is the address of the page it needs
        first = SOLVERS[task.template](task, act, None)
        return dataclasses.replace(first, think=f"{goal(task)} {first.think}")
    waiting = [tab for tab in browsing.open_tabs if tab.url.endswith("/about") and not tab.current]
    if task.template == "learn_more_fact" and waiting:
        return act.select_tab(waiting[-1], f"The link opened \"{waiting[-1].title}\" in tab {waiting[-1].index}; "
                                           "I'll switch to it.")
    if browsing.page is None:
        return act.snapshot(_why_snapshot(browsing.last_calls))
    return SOLVERS[task.template](task, act, browsing.page)


def next_step(messages: str | Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
              facts: data.Facts = data.FACTS) -> str:
    """The teacher's next assistant turn, as Hermes text, for the conversation so far, in the world of `facts` (whose
    product names the task's prompt uses).

    `messages`: the task prompt, or OpenAI-format messages (the first user message is the task prompt; tool
    results carry the real Playwright MCP output, snapshots inline or not). `tools`: the offered tools, as OpenAI
    functions or MCP listings. Raises TeacherError for an unknown task or a missing tool.
    """
    return plan(read_conversation(messages, facts), tools).text()


# ---- running the teacher without the agent loop ---------------------------------------------------------------

ToolCaller = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass
class Episode:
    """One teacher run: the conversation (mcpft message format) and the final answer (None if it never came)."""

    task: Task
    messages: list[dict[str, Any]]
    answer: str | None


async def run_episode(task: Task, base_url: str, tools: Sequence[Mapping[str, Any]], call_tool: ToolCaller,
                      max_turns: int = MAX_ASSISTANT_TURNS + 1) -> Episode:
    """Drive the teacher on `task` until it answers: each turn's Hermes text is parsed, its calls run through
    `call_tool(name, arguments)` (returning the result text, or an object with `.text` such as a ToolHub result)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.prompt_for(base_url)}]
    for _ in range(max_turns):
        parsed = parse_assistant_text(next_step(messages, tools, task.facts))
        if parsed.flags:
            raise TeacherError(f"task {task.id}: the teacher wrote malformed Hermes text: {parsed.flags}")
        messages.append(parsed.to_message())
        if not parsed.tool_calls:
            return Episode(task, messages, parsed.content)
        for tool_call in parsed.tool_calls:
            function = tool_call["function"]
            result = await call_tool(function["name"], json.loads(function["arguments"]))
            messages.append({"role": "tool", "tool_call_id": tool_call["id"], "name": function["name"],
                             "content": result if isinstance(result, str) else result.text})
    return Episode(task, messages, None)
