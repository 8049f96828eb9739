"""The Acme Outfitters demo website: a small shop + docs site served on 127.0.0.1 for agent tasks.

Pages are generated from `mcpft.demo.data` (the version of the world a site is started with, `serve_site(facts=…)`;
the demo's own by default), so tasks and checkers share the site's facts. The server runs in a background thread
(stdlib `ThreadingHTTPServer`) and records every accepted contact-form submission, which is the browser state a
checker verifies:

    with serve_site() as site:          # or: base_url, stop = serve_site()
        ...  # point the browser at site.base_url
        site.submissions                # [{"name", "email", "topic", "message"}, ...]
"""

from __future__ import annotations

import threading
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from string import Template
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from mcpft.demo import data
from mcpft.demo.data import FACTS, Facts

MAX_FORM_BYTES = 64 * 1024
CONTACT_FIELDS = ("name", "email", "topic", "message")

_SITE_FILES = resources.files("mcpft.demo") / "site"
_LAYOUT = Template(_SITE_FILES.joinpath("layout.html").read_text(encoding="utf-8"))
_STATIC = {"/static/style.css": ("text/css; charset=utf-8", _SITE_FILES.joinpath("style.css").read_bytes())}


class PageNotFound(Exception):
    """The path names no page of the site."""


def _page(title: str, body: str) -> str:
    return _LAYOUT.substitute(title=escape(title), body=body)


def _list(items: list[str]) -> str:
    """A <ul> of already-escaped HTML items."""
    return "<ul>\n" + "\n".join(f"<li>{item}</li>" for item in items) + "\n</ul>"


def home_page(facts: Facts = FACTS) -> str:
    body = f"""<h1>{escape(data.SHOP_NAME)}</h1>
<p>Gear for trails, peaks and campsites since {facts.story["founded"]}.</p>
<h2>Shop</h2>
<p><a href="/products">Browse all products</a></p>
<h2>Help</h2>
<p><a href="/docs">Read the docs</a> or <a href="/contact">send us a message</a>.</p>
<h2>Our story</h2>
<p>A garage workshop that grew into an outdoor brand.
<a href="/about" target="_blank" rel="noopener">Learn more about our story</a></p>"""
    return _page("Home", body)


def products_list_page(page: int, facts: Facts = FACTS) -> str:
    products = facts.products_page(page)
    items = [f'<a href="/products/{p.slug}">{escape(p.name)}</a> · {escape(p.category)}' for p in products]
    links = []
    if page > 1:
        links.append(f'<a href="/products?page={page - 1}">Previous page</a>')
    for number in range(1, facts.product_pages + 1):
        current = ' aria-current="page"' if number == page else ""
        links.append(f'<a href="/products?page={number}"{current}>Page {number}</a>')
    if page < facts.product_pages:
        links.append(f'<a href="/products?page={page + 1}">Next page</a>')
    body = f"""<h1>Products</h1>
<p>Page {page} of {facts.product_pages} · {len(facts.products)} products</p>
{_list(items)}
<nav aria-label="Pagination">{" ".join(links)}</nav>"""
    return _page(f"Products, page {page}", body)


def product_page(name_or_slug: str, facts: Facts = FACTS) -> str:
    try:
        product = facts.product_by_address(name_or_slug)
    except KeyError as error:
        raise PageNotFound(name_or_slug) from error
    list_page = facts.products.index(product) // data.PRODUCTS_PER_PAGE + 1
    rows = "\n".join(f'<tr><th scope="row">{escape(key)}</th><td>{escape(value)}</td></tr>'
                     for key, value in product.specs.items())
    body = f"""<h1>{escape(product.name)}</h1>
<p class="price">Price: {product.price_text}</p>
<p>Category: {escape(product.category)}</p>
<h2>Features</h2>
{_list([escape(feature) for feature in product.features])}
<h2>Specifications</h2>
<table>
{rows}
</table>
<p><a href="/products?page={list_page}">Back to products</a></p>"""
    return _page(product.name, body)


def _search_form(query: str = "") -> str:
    return f"""<form role="search" action="/docs/search" method="get">
<label for="q">Search the docs</label>
<input type="search" id="q" name="q" value="{escape(query)}">
<button type="submit">Search</button>
</form>"""


def docs_index_page(facts: Facts = FACTS) -> str:
    links = [f'<a href="/docs/{doc.slug}">{escape(doc.title)}</a>' for doc in facts.docs]
    body = f"""<h1>Docs</h1>
{_search_form()}
<h2>All pages</h2>
{_list(links)}"""
    return _page("Docs", body)


def docs_search_page(query: str, facts: Facts = FACTS) -> str:
    results = facts.search_docs(query)
    count = f"{len(results)} result" + ("" if len(results) == 1 else "s")
    links = [f'<a href="/docs/{doc.slug}">{escape(doc.title)}</a>' for doc in results]
    body = f"""<h1>Search results</h1>
{_search_form(query)}
<p>{count} for “{escape(query)}”</p>
{_list(links) if links else ""}"""
    return _page(f"Search: {query}", body)


def doc_page(address: str, facts: Facts = FACTS) -> str:
    try:
        doc = facts.doc_by_address(address)
    except KeyError as error:
        raise PageNotFound(address) from error
    sections = "\n".join(f"<h2>{escape(section.heading)}</h2>\n{_list([escape(i) for i in section.items])}"
                         for section in doc.sections)
    body = f"""<h1>{escape(doc.title)}</h1>
<p>{escape(doc.intro)}</p>
{sections}
<p><a href="/docs">All docs</a></p>"""
    return _page(doc.title, body)


def story_page(facts: Facts = FACTS) -> str:
    story = facts.story
    items = [f"{data.STORY_LABELS[key]}: {value}" for key, value in story.items()]
    body = f"""<h1>Our story</h1>
<p>{escape(story['founder'])} started Acme in a garage, repairing tents for friends.</p>
<h2>Acme in numbers</h2>
{_list([escape(item) for item in items])}"""
    return _page("Our story", body)


def contact_page(values: dict[str, str] | None = None, missing: tuple[str, ...] = ()) -> str:
    values = values or {}
    error = f'<p class="error" role="alert">Please fill in: {", ".join(missing)}.</p>' if missing else ""
    options = "\n".join(
        f'<option{" selected" if values.get("topic") == topic else ""}>{escape(topic)}</option>'
        for topic in data.CONTACT_TOPICS)
    body = f"""<h1>Contact us</h1>
{error}
<form action="/contact" method="post">
<label for="name">Name</label>
<input id="name" name="name" required value="{escape(values.get('name', ''))}">
<label for="email">Email</label>
<input id="email" name="email" type="email" required value="{escape(values.get('email', ''))}">
<label for="topic">Topic</label>
<select id="topic" name="topic">
{options}
</select>
<label for="message">Message</label>
<textarea id="message" name="message" rows="4" required>{escape(values.get('message', ''))}</textarea>
<button type="submit">Send message</button>
</form>"""
    return _page("Contact", body)


def contact_sent_page(submission: dict[str, str]) -> str:
    echoed = [f"{field.capitalize()}: {escape(submission[field])}" for field in CONTACT_FIELDS]
    body = f"""<h1>Message sent</h1>
<p>Thank you, {escape(submission['name'])}. We will reply within two working days.</p>
<h2>What you sent</h2>
{_list(echoed)}"""
    return _page("Message sent", body)


def parse_contact_form(body: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The submitted fields (whitespace-trimmed) and the names of required fields left empty or invalid."""
    fields = parse_qs(body, keep_blank_values=True)
    values = {name: fields.get(name, [""])[0].strip() for name in CONTACT_FIELDS}
    missing = tuple(name for name in CONTACT_FIELDS if not values[name])
    if values["topic"] and values["topic"] not in data.CONTACT_TOPICS:
        missing += ("topic",)
    if values["email"] and "@" not in values["email"]:
        missing += ("email",)
    return values, missing


def render_get(path: str, query: dict[str, list[str]], facts: Facts = FACTS) -> str:
    """The HTML of the page at `path` in the world of `facts`; raises PageNotFound for an unknown path or page
    number."""
    if path == "/":
        return home_page(facts)
    if path == "/products":
        try:
            return products_list_page(int(query.get("page", ["1"])[0]), facts)
        except ValueError as error:
            raise PageNotFound(path) from error
    if path.startswith("/products/"):
        # The browser sends a typed name percent-encoded: /products/Alpine%20Trekking%20Poles.
        return product_page(unquote(path.removeprefix("/products/")), facts)
    if path == "/docs":
        return docs_index_page(facts)
    if path == "/docs/search":
        return docs_search_page(query.get("q", [""])[0], facts)
    if path.startswith("/docs/"):
        return doc_page(unquote(path.removeprefix("/docs/")), facts)
    if path == "/about":
        return story_page(facts)
    if path == "/contact":
        return contact_page()
    raise PageNotFound(path)


class _Handler(BaseHTTPRequestHandler):
    server: "_SiteServer"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in _STATIC:
            content_type, payload = _STATIC[url.path]
            self._send(HTTPStatus.OK, payload, content_type)
            return
        try:
            html = render_get(url.path, parse_qs(url.query), self.server.site.facts)
        except PageNotFound:
            self._send_html(HTTPStatus.NOT_FOUND, _page("Not found", "<h1>Page not found</h1>"))
            return
        self._send_html(HTTPStatus.OK, html)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/contact":
            self._send_html(HTTPStatus.NOT_FOUND, _page("Not found", "<h1>Page not found</h1>"))
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_FORM_BYTES:
            self._send_html(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _page("Too large", "<h1>Message too long</h1>"))
            return
        values, missing = parse_contact_form(self.rfile.read(length).decode("utf-8", errors="replace"))
        if missing:
            self._send_html(HTTPStatus.BAD_REQUEST, contact_page(values, missing))
            return
        self.server.site.record_submission(values)
        self._send_html(HTTPStatus.OK, contact_sent_page(values))

    def _send_html(self, status: HTTPStatus, html: str) -> None:
        self._send(status, html.encode("utf-8"), "text/html; charset=utf-8")

    def _send(self, status: HTTPStatus, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the site serves tests and benchmarks, where access logs are noise."""


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], site: "Site") -> None:
        super().__init__(address, _Handler)
        self.site = site


class Site:
    """The running demo site. Unpacks as `(base_url, stop)`; `submissions` holds accepted contact forms."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, facts: Facts = FACTS) -> None:
        self.facts = facts
        self._lock = threading.Lock()
        self._submissions: list[dict[str, str]] = []
        self._server = _SiteServer((host, port), self)
        self.base_url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="acme-site", daemon=True)
        self._thread.start()

    @property
    def submissions(self) -> list[dict[str, str]]:
        """Copies of the accepted contact-form submissions, oldest first."""
        with self._lock:
            return [dict(submission) for submission in self._submissions]

    def record_submission(self, values: dict[str, str]) -> None:
        with self._lock:
            self._submissions.append(dict(values))

    def clear_submissions(self) -> None:
        """Forget recorded submissions, so a rerun of a form task is judged on its own."""
        with self._lock:
            self._submissions.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __iter__(self) -> Iterator[object]:
        return iter((self.base_url, self.stop))

    def __enter__(self) -> "Site":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_site(port: int = 0, host: str = "127.0.0.1", facts: Facts = FACTS) -> Site:
    """Start the demo site on `host:port` (0 = a free port) in a background thread and return it; it shows the world
    of `facts` (the demo's own unless given)."""
    return Site(host, port, facts)
