"""The demo task suite: splits, determinism, and checkers that accept right answers and reject wrong ones."""

import urllib.parse
import urllib.request
from collections import defaultdict

import pytest

from mcpft.demo import data
from mcpft.demo.site import serve_site
from mcpft.demo.tasks import (HELDOUT_DOCS, HELDOUT_PRODUCTS, HELDOUT_TEMPLATES, load_tasks, numbers, task_by_id,
                              training_facts)

ALL = load_tasks()
COLLECTED_WORLDS = 300  # `demo collect` draws world i for trace i; the payoff runs measured up to 300 traces
FORM_TASKS = [task for task in ALL if task.template == "contact_form"]


def test_suite_size_and_splits():
    train, heldout = load_tasks("train"), load_tasks("heldout")
    assert len(ALL) >= 60 and len(train) + len(heldout) == len(ALL)
    assert {t.split for t in train} == {"train"} and {t.split for t in heldout} == {"heldout"}
    assert len({task.id for task in ALL}) == len(ALL)
    assert any(not task.needs_tools for task in train) and any(not task.needs_tools for task in heldout)


def test_heldout_has_unseen_templates_and_unseen_parameters():
    train_templates = {task.template for task in load_tasks("train")}
    heldout_templates = {task.template for task in load_tasks("heldout")}
    assert HELDOUT_TEMPLATES and HELDOUT_TEMPLATES <= heldout_templates - train_templates
    train_params = defaultdict(list)
    for task in load_tasks("train"):
        train_params[task.template].append(dict(task.params))
    for task in load_tasks("heldout"):
        assert dict(task.params) not in train_params[task.template], task.id
    train_prompts = {task.prompt for task in load_tasks("train")}
    assert not train_prompts & {task.prompt for task in load_tasks("heldout")}


def test_loading_is_deterministic_and_validated():
    assert [t.id for t in load_tasks("train")] == [t.id for t in load_tasks("train")]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_tasks("test")
    with pytest.raises(KeyError, match="no demo task with id 'nope'"):
        task_by_id("nope")


def test_prompts_carry_the_site_url_only_when_tools_are_needed():
    for task in ALL:
        prompt = task.prompt_for("http://127.0.0.1:8123/")
        assert "{" not in prompt, task.id
        assert ("http://127.0.0.1:8123" in prompt) == task.needs_tools, task.id
        assert "8123/" not in prompt  # the trailing slash is dropped, so URLs join cleanly


def wrong_answers(task) -> list[str]:
    """A hedge between the right answer and a wrong one, a negation of the right one, a wrong one alone, nothing."""
    return [f"{task.expected} or {task.wrong}", f"not {task.expected}", task.wrong, "", "  "]


@pytest.mark.parametrize("task", ALL, ids=lambda t: t.id)
def test_checker_accepts_the_right_answer_and_rejects_wrong_ones(task, site):
    site.clear_submissions()
    if task in FORM_TASKS:  # the site received the right submission: only the answer can be wrong now
        post(site.base_url, dict(task.params))
    assert task.check(task.expected, site).ok
    for answer in wrong_answers(task):
        verdict = task.check(answer, site)
        assert not verdict.ok and verdict.reason, answer


@pytest.mark.parametrize("task_id, answer", [
    ("price_by_position-1", "129"),
    ("price_by_position-1", "It's $129.00."),
    ("price_by_position-1", "129 dollars"),
    ("page2_product-3", "pathfinder headlamp, $39.95"),
    ("product_spec-trailblazer-backpack-weight", "It weighs 1.45 kg."),
    ("product_spec-trailblazer-backpack-weight", "1,450 grams"),
    ("product_spec-summit-down-jacket-material", "A NYLON shell with goose-down."),
    ("product_spec-ridge-hiking-boots-warranty", "two years"),
    ("docs_search_count-kayak", "There are no results."),
    ("docs_search_count-order", "four"),
    ("learn_more_fact-trees", "12400 trees"),
    ("learn_more_fact-recycled", "68 percent"),
    ("learn_more_fact-founder", "Marta Lindqvist founded it."),
    ("no_tool_definition-html", "Hyper Text Markup Language"),
    ("no_tool_arithmetic-4", "5625"),
    ("compare_weight-summit-down-jacket-drift-rain-shell", "The Summit Down Jacket is lighter than the Drift Rain Shell"),
    ("compare_weight-summit-down-jacket-drift-rain-shell", "Summit (380 g)"),
    ("compare_weight-summit-down-jacket-drift-rain-shell",  # the figures first, then the verdict
     "The Drift Rain Shell weighs 410 g and the Summit Down Jacket weighs 380 g, so the Summit Down Jacket is lighter."),
    ("compare_weight-summit-down-jacket-drift-rain-shell", "The Drift Rain Shell is heavier; the Summit is lighter."),
    ("compare_weight-summit-down-jacket-drift-rain-shell",
     "Of the Drift Rain Shell (0.41 kg) and the Summit Down Jacket (380 g), the Summit Down Jacket is lighter."),
    ("price_by_position-1", "The price is $129.00."),
    ("product_spec-trailblazer-backpack-weight", "The Trailblazer Backpack 45L weighs 1450 g (1.45 kg)."),
    ("learn_more_fact-trees", "Acme planted 12,400 trees in 2024."),  # the year the question gave is no rival
    ("no_tool_arithmetic-3", "15% of 80 is 12."),
    ("docs_first_item-warranty-makingaclaim", "The first item is: Find your order number or receipt."),  # quoted
    ("docs_first_item-payment-paymentsecurity", "Card details are never stored on our servers."),
    ("docs_search_first_result-refund", 'The first result is "Returns and Exchanges". Yes: "Returns and Exchanges".'),
    ("product_spec-trailblazer-backpack-weight", "It weighs 1450 g.\nIt weighs 1450 g."),  # twice is no loop yet
    ("product_spec-ember-camp-stove-material", "The Ember Camp Stove is made of aluminum and steel."),  # US spelling
    ("product_first_feature-ember-camp-stove", "The first feature listed is: Boils a liter of water in 3 minutes."),
])
def test_checkers_tolerate_phrasing(task_id, answer):
    assert task_by_id(task_id).check(answer).ok


@pytest.mark.parametrize("task_id, answer, reason", [
    ("price_by_position-1", "It is $129.00 or maybe $249.00.", "other prices"),
    ("price_by_position-1", "It costs $129.00, not $135.00.", "other prices"),
    ("price_by_position-1", "It costs $129.00, or about that.", "hedges or negates ('or')"),
    ("price_by_position-1", "It probably costs $129.00.", "hedges or negates ('probably')"),
    ("price_by_position-1", "", "the answer is empty"),
    ("no_tool_arithmetic-1", "391, 392", "other numbers [392.0]"),
    ("no_tool_arithmetic-1", "It isn't 391.", "hedges or negates (\"n't\")"),
    ("product_spec-trailblazer-backpack-weight", "1450 g, 1120 g", "other numbers [1120.0]"),
    ("product_spec-summit-down-jacket-made_in", "Portugal, with parts from Vietnam", "other made in values"),
    ("learn_more_fact-founded", "Acme was founded in 1987. or The answer is 1978.", "other numbers [1978.0]"),
    ("no_tool_definition-html", "HyperText Markup Language, Hypertext Transfer Protocol", "other expansions"),
    ("docs_search_first_result-refund", "\"Returns and Exchanges\", then \"Warranty\"", "other results"),
    ("docs_first_item-payment-paymentsecurity", "Not: Card details are never stored on our servers.",
     "hedges or negates ('Not')"),
    ("compare_weight-summit-down-jacket-drift-rain-shell",
     "The Summit Down Jacket is lighter. The Drift Rain Shell is lighter.", "calls 'Drift Rain Shell' lighter"),
    ("compare_price-trailblazer-backpack-ember-camp-stove",
     "The Trailblazer Backpack 45L costs $64.50 more, about $70.00.", "other amounts [70.0]"),
    ("page2_product-3", "It costs $39.95.", "expected the product name"),
    ("product_first_feature-summit-down-jacket",
     "800-fill responsibly sourced down; Packs into its own chest pocket", "other features"),
    ("docs_search_count-order", "4 results, or perhaps 5", "other counts"),
    ("compare_weight-summit-down-jacket-drift-rain-shell", "The Drift Rain Shell is heavier than the Summit",
     "ambiguous"),
    ("compare_weight-summit-down-jacket-drift-rain-shell", "The Drift Rain Shell is lighter than the Summit",
     "calls 'Drift Rain Shell' lighter"),
    ("compare_weight-summit-down-jacket-drift-rain-shell",
     "The Summit Down Jacket weighs 380 g and the Drift Rain Shell weighs 410 g, so the Drift Rain Shell is lighter.",
     "calls 'Drift Rain Shell' lighter"),
    ("compare_price-trailblazer-backpack-ember-camp-stove", "The Trailblazer Backpack costs more.",
     "expected the difference"),
    ("compare_price-trailblazer-backpack-ember-camp-stove",  # the cheaper price, which is also the difference
     "The Trailblazer Backpack 45L costs 129.00, while the Ember Camp Stove costs 64.50.", "only as a price"),
    ("learn_more_fact-founded", "It was founded in 1978.", "expected '1987'"),
    ("docs_search_first_result-refund",  # a tuned model's loop (payoff run 50) that names the right title in passing
     'Searching the docs for "refund" gives: "Refund"\nSearching the docs for "refund" gives: refund\n'
     'Searching the docs for "Returns and Exchanges" gives: returns and exchanges\n'
     'Searching the docs for "Refund" gives: refund', "repeats itself ('searching the docs for' 4 times)"),
    ("docs_search_first_result-refund", 'Searching the docs for "refund" gives: "refund"\n<tool_call>\n{"name": '
     '"browser_fill_form", "arguments": {"fields": [{"element": "Returns and Exchanges link"}]}}\n</tool_call>',
     "holds tool-call markup"),
    ("compare_weight-summit-down-jacket-drift-rain-shell",  # the right verdict on a made-up figure
     "The Summit Down Jacket is lighter: it weighs 380 g, while the Drift Rain Shell weighs 319 g.",
     "states weights that are neither product's [319.0]"),
    ("compare_weight-summit-down-jacket-drift-rain-shell",
     "The Summit Down Jacket is lighter: it weighs 410 g, while the Drift Rain Shell weighs 410 g.",
     "gives both products the weight 410 g"),
    ("product_spec-trailblazer-backpack-weight", "It weighs 1450 g. It weighs 1450 g! It weighs 1450 g.",
     "repeats itself"),
    ("price_by_position-5",  # the right price told as another product's (payoff run 50)
     "The fifth product in the catalogue is the Canyon Sleeping Bag, priced at $89.00.",
     "also names other products ['Canyon Water Bottle']"),
    ("product_spec-alpine-trekking-poles-weight", "The Glacier Sleeping Bag weighs 520 g.",
     "also names other products"),
    ("product_first_feature-alpine-trekking-poles",
     "The Summit Down Jacket's first feature: Quick flick-lock adjustment.", "also names other products"),
])
def test_checkers_reject_hedged_or_incomplete_answers(task_id, answer, reason):
    verdict = task_by_id(task_id).check(answer)
    assert not verdict.ok and reason in verdict.reason


def test_every_expected_answer_passes_its_check_in_the_worlds_training_draws():
    """The teacher's answers are judged by the same checks; a trace whose right answer failed would be left out.
    ("The Cedar Backpack 45L costs $271.95." where another product costs $45.00: the name's 45 is no price.)"""
    for seed in range(1, COLLECTED_WORLDS + 1):
        for task in load_tasks("train", training_facts(seed)):
            if task.template != "contact_form":  # a form's check reads the site
                assert task.check(task.expected).ok, (seed, task.id, task.check(task.expected).reason)


def test_check_rejects_a_non_string_answer():
    with pytest.raises(TypeError, match="price_by_position-1: answer must be a string"):
        task_by_id("price_by_position-1").check(None)


def test_numbers_reads_digits_thousands_and_words():
    assert numbers("$1,450.00, 68% and three, 4, 5") == [1450.0, 68.0, 4.0, 5.0, 3.0]


def post(base_url: str, fields: dict[str, str]) -> None:
    request = urllib.request.Request(base_url + "/contact", data=urllib.parse.urlencode(fields).encode(),
                                     method="POST")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as error:
        assert error.code == 400  # the site refused an incomplete form


@pytest.fixture(scope="module")
def site():
    with serve_site() as running:
        yield running


@pytest.mark.parametrize("task", FORM_TASKS, ids=lambda t: t.id)
def test_form_checker_reads_the_sites_submissions(site, task):
    fields = dict(task.params)
    site.clear_submissions()
    assert "no contact form submission" in task.check(task.expected, site).reason
    post(site.base_url, {**fields, "message": ""})  # missing field: the site refuses it, nothing is recorded
    assert not task.check(task.expected, site).ok
    other_topic = next(topic for topic in data.CONTACT_TOPICS if topic != fields["topic"])
    post(site.base_url, {**fields, "topic": other_topic})
    verdict = task.check(task.expected, site)
    assert not verdict.ok and f"topic={other_topic!r}" in verdict.reason
    post(site.base_url, {**fields, "email": fields["email"].upper(), "message": f"  {fields['message']} "})
    assert task.check("done", site).ok
    assert not task.check("done", None).ok


def test_a_training_world_keeps_the_heldout_facts_and_moves_the_rest():
    varied = training_facts(1)
    assert varied is training_facts(1)
    assert data.vary(1, HELDOUT_PRODUCTS, HELDOUT_DOCS).products == varied.products  # drawn from the seed alone
    for listed, shown in zip(data.PRODUCTS, varied.products):
        assert (shown is listed) == (listed.slug in HELDOUT_PRODUCTS)  # held-out products: same place, same values
    train = [p for p in data.PRODUCTS if p.slug not in HELDOUT_PRODUCTS]
    assert [p.slug for p in varied.products if p.slug not in HELDOUT_PRODUCTS] != [p.slug for p in train]
    assert all(varied.counterpart(p.slug).price != p.price for p in train)
    # Renamed: a new first word (a new short name, none shared), the same kind of product.
    for p in train:
        renamed = varied.counterpart(p.slug)
        assert renamed.name.split()[1:] == p.name.split()[1:] and renamed.slug != p.slug
        assert renamed.short_name not in {q.short_name for q in data.PRODUCTS}
    assert len({p.short_name for p in varied.products}) == len(varied.products)
    assert len({p.price for p in varied.products}) == len({p.weight_g for p in varied.products}) == len(train) + 3
    for doc, shown in zip(data.DOCS, varied.docs):
        assert (shown is doc) == (doc.slug in HELDOUT_DOCS)
        assert [sorted(s.items) for s in shown.sections] == [sorted(s.items) for s in doc.sections]
    assert varied.story != data.STORY_FACTS and varied.story.keys() == data.STORY_FACTS.keys()
    assert training_facts(2).products != varied.products


def test_tasks_read_the_same_in_every_world_and_answer_in_their_own():
    varied = load_tasks("train", training_facts(1))
    assert sorted(t.id for t in varied) == sorted(t.id for t in load_tasks("train"))
    renamed = [p.name for p in data.PRODUCTS if p.slug not in HELDOUT_PRODUCTS]
    for task in varied:  # the same question; only the names of the products in it change
        own = task_by_id(task.id)
        assert task.template == own.template and task.split == own.split
        assert not any(name in task.prompt for name in renamed), task.id
        if not any(name in own.prompt for name in renamed):
            assert task.prompt == own.prompt, task.id
    answered = [task for task in varied if task.template != "contact_form"]  # a form's check reads the site
    assert all(task.facts is training_facts(1) and task.check(task.expected).ok for task in answered)
    # Most answers move with the world: the demo's own answer is wrong there, and the other way round.
    moved = [task for task in answered if not task.check(task_by_id(task.id).expected).ok]
    assert len(moved) >= 40
    assert all(not task_by_id(task.id).check(task.expected).ok for task in moved)
