"""The Acme demo site over real HTTP, and as the real Playwright MCP browser sees it (aria snapshots)."""

import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from mcpft.demo import data
from mcpft.demo.site import Site, serve_site
from mcpft.demo.snapshot import read_page
from mcpft.demo.tasks import training_facts


@pytest.fixture(scope="module")
def site():
    with serve_site() as running:
        yield running


def get(site: Site, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(site.base_url + path, timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8")


def post_contact(site: Site, fields: dict[str, str]) -> tuple[int, str]:
    body = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(site.base_url + "/contact", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8")


def test_serve_site_unpacks_as_base_url_and_stop():
    base_url, stop = serve_site()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        with urllib.request.urlopen(base_url + "/", timeout=10) as response:
            assert response.status == 200
    finally:
        stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base_url + "/", timeout=2)


def test_catalogue_has_two_pages_with_pagination(site):
    assert len(data.PRODUCTS) >= 12 and data.FACTS.product_pages == 2
    status, first = get(site, "/products")
    assert status == 200
    assert 'href="/products?page=2">Next page' in first and "Previous page" not in first
    _, second = get(site, "/products?page=2")
    assert 'href="/products?page=1">Previous page' in second and "Next page" not in second
    for page, html in ((1, first), (2, second)):
        listed = re.findall(r'<a href="/products/([a-z-]+)">', html)
        assert listed == [p.slug for p in data.FACTS.products_page(page)]


@pytest.mark.parametrize("product", data.PRODUCTS, ids=lambda p: p.slug)
def test_product_page_shows_price_features_and_specs(site, product):
    status, html = get(site, f"/products/{product.slug}")
    assert status == 200
    assert f"<h1>{product.name}</h1>" in html
    assert f"Price: {product.price_text}" in html
    assert all(f"<li>{feature}</li>" in html for feature in product.features)
    for key, value in product.specs.items():
        assert f'<th scope="row">{key}</th><td>{value}</td>' in html


@pytest.mark.parametrize("address", ["Alpine Trekking Poles", "alpine  TREKKING poles", " Basecamp Tent 2P"])
def test_a_product_page_answers_at_its_name_as_typed(site, address):
    status, html = get(site, "/products/" + urllib.parse.quote(address))
    product = data.FACTS.product_by_address(address)
    assert status == 200 and f"<h1>{product.name}</h1>" in html
    assert get(site, "/products/" + urllib.parse.quote("Alpine Trekking"))[0] == 404  # a partial name is no name


@pytest.mark.parametrize("address", [" staying safe on the trail", "The Warranty", "trail-safety", "Sizing  GUIDE"])
def test_a_doc_page_answers_at_its_topic_title_or_slug(site, address):
    status, html = get(site, "/docs/" + urllib.parse.quote(address))
    doc = data.FACTS.doc_by_address(address)
    assert status == 200 and f"<h1>{doc.title}</h1>" in html
    assert get(site, "/docs/" + urllib.parse.quote("staying safe"))[0] == 404  # a partial topic is no topic


@pytest.mark.parametrize("query", ["wash", "order", "kayak", "Gift VOUCHER"])
def test_docs_search_reports_the_count_and_links_of_search_docs(site, query):
    status, html = get(site, "/docs/search?" + urllib.parse.urlencode({"q": query}))
    results = data.FACTS.search_docs(query)
    assert status == 200
    assert re.search(rf"<p>{len(results)} results? for", html)
    assert re.findall(r'<li><a href="/docs/([a-z-]+)">', html) == [doc.slug for doc in results]


def test_doc_pages_have_headed_lists(site):
    for doc in data.DOCS:
        _, html = get(site, f"/docs/{doc.slug}")
        for section in doc.sections:
            at = html.index(f"<h2>{section.heading}</h2>")
            assert html.index(f"<li>{section.items[0]}</li>", at) > at


def test_learn_more_opens_a_new_tab_with_the_story(site):
    _, home = get(site, "/")
    assert '<a href="/about" target="_blank" rel="noopener">Learn more about our story</a>' in home
    _, story = get(site, "/about")
    assert all(value in story for value in data.STORY_FACTS.values())


def test_a_site_shows_the_world_it_is_given():
    facts = training_facts(2)
    with serve_site(facts=facts) as varied:
        _, first = get(varied, "/products")
        listed = re.findall(r'<a href="/products/([a-z-]+)">', first)
        assert listed == [p.slug for p in facts.products_page(1)] != [p.slug for p in data.FACTS.products_page(1)]
        product = facts.products[0]
        _, html = get(varied, "/products/" + urllib.parse.quote(product.name))
        assert f"Price: {product.price_text}" in html and f"<li>{product.features[0]}</li>" in html
        _, story = get(varied, "/about")
        lines = re.findall(r"<li>([^<]+)</li>", story)
        assert lines == [f"{data.STORY_LABELS[key]}: {value}" for key, value in facts.story.items()]


def test_unknown_pages_are_404(site):
    for path in ("/nope", "/products/no-such-thing", "/products?page=3", "/products?page=x", "/docs/nope"):
        assert get(site, path)[0] == 404, path


def test_contact_form_records_and_echoes_a_submission(site):
    site.clear_submissions()
    fields = {"name": " Ada Byron ", "email": "ada@example.com", "topic": "Wholesale", "message": "Forty bottles?"}
    status, html = post_contact(site, fields)
    assert status == 200
    assert "<h1>Message sent</h1>" in html and "Topic: Wholesale" in html and "Message: Forty bottles?" in html
    assert site.submissions == [{"name": "Ada Byron", "email": "ada@example.com", "topic": "Wholesale",
                                 "message": "Forty bottles?"}]


def test_contact_form_rejects_missing_or_invalid_fields(site):
    site.clear_submissions()
    status, html = post_contact(site, {"name": "Ben", "email": "ben@example.com", "topic": "Returns", "message": ""})
    assert status == 400 and "Please fill in: message." in html
    assert 'value="Ben"' in html  # the form keeps what was typed
    status, html = post_contact(site, {"name": "Ben", "email": "ben", "topic": "Lottery", "message": "hi"})
    assert status == 400 and "topic" in html and "email" in html
    assert site.submissions == []


def test_submissions_are_copies(site):
    site.clear_submissions()
    post_contact(site, {"name": "C", "email": "c@example.com", "topic": "Feedback", "message": "m"})
    site.submissions[0]["name"] = "changed"
    assert site.submissions[0]["name"] == "C"


def test_static_stylesheet_is_served(site):
    status, css = get(site, "/static/style.css")
    assert status == 200 and "font-family" in css


PAGES = ["/", "/products", "/products?page=2", "/products/basecamp-tent", "/docs", "/docs/search?q=order",
         "/docs/product-care", "/about", "/contact"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pages_give_small_clean_snapshots_in_the_real_browser(site, tmp_path, anyio_backend):
    from mcpft.agent.browser import playwright_server
    from mcpft.agent.mcp import ToolHub

    async with ToolHub([playwright_server(tmp_path, offline=True)], tmp_path) as hub:
        for path in PAGES:
            result = await hub.call("browser_navigate", {"url": site.base_url + path})
            assert not result.is_error, result.text
            assert "Console:" not in result.text, f"{path} logs console errors: {result.text[:400]}"
            page = read_page(result.text)
            assert page is not None, f"{path}: no inline snapshot in {result.text[:300]}"
            yaml_text = result.text[result.text.index("```yaml"):]
            assert len(yaml_text) < 3000, f"{path}: snapshot of {len(yaml_text)} characters"
            assert page.h1, f"{path}: no level-1 heading"
            assert all(link.name for link in page.links()), f"{path}: a link without text"
        contact = page  # the last page: every form control has its label as its accessible name
        for label in ("Name", "Email", "Message"):
            assert contact.find("textbox", label) is not None
        assert [o.name for o in contact.find("combobox", "Topic").children] == list(data.CONTACT_TOPICS)
