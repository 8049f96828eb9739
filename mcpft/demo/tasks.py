"""The demo task suite: prompts from templates × parameters, each with a checker tolerant of phrasing.

Tasks are built deterministically from `mcpft.demo.data`, the same facts the site renders. Two fixed splits:
`train`, and `heldout`, which holds parameters no train task uses (three products, two doc pages, some queries,
facts, forms and questions) and two whole templates train never shows (`compare_price`,
`docs_search_first_result`).

    for task in load_tasks("train"):
        prompt = task.prompt_for(site.base_url)
        ...
        result = task.check(final_answer, site)   # CheckResult(ok, reason)
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Protocol

from mcpft.demo import data
from mcpft.demo.data import FACTS, Facts, Product
from mcpft.hermes import CALL_OPEN

SPLITS = ("train", "heldout")
HELDOUT_PRODUCTS = frozenset({"alpine-trekking-poles", "ember-camp-stove", "horizon-binoculars"})
HELDOUT_DOCS = frozenset({"warranty", "trail-safety"})
HELDOUT_TEMPLATES = frozenset({"compare_price", "docs_search_first_result"})

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")
NUMBER_WORDS = {"zero": 0, "no": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}


class SiteState(Protocol):
    """What a checker may read of the browser's effects: the site's recorded contact-form submissions."""

    @property
    def submissions(self) -> list[dict[str, str]]: ...


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


Checker = Callable[[str, "SiteState | None"], CheckResult]


@dataclass(frozen=True, eq=False)
class Task:
    """One task. `prompt` holds a `{base_url}` placeholder; `expected` is a right answer, `wrong` a plausible wrong one."""

    id: str
    template: str
    split: str
    prompt: str
    needs_tools: bool
    params: Mapping[str, Any]
    expected: str
    wrong: str
    checker: Checker = field(repr=False, compare=False)
    facts: Facts = field(default=FACTS, repr=False, compare=False)  # the world the answers hold in

    def prompt_for(self, base_url: str) -> str:
        return self.prompt.format(base_url=base_url.rstrip("/"))

    def check(self, answer: str, site_state: SiteState | None = None, read_site: bool = True) -> CheckResult:
        """`read_site`: whether any tool call of the run worked. A task about the site answered without reading it
        is a guess, failed even where it guessed right (which one of two products is lighter is a coin toss)."""
        if not isinstance(answer, str):
            raise TypeError(f"task {self.id}: answer must be a string, got {type(answer).__name__}")
        if not answer.strip():
            return _fail("the answer is empty")
        if self.needs_tools and not read_site:
            return _fail("answered without reading the site (no tool call worked): a guess")
        verdict = self.checker(answer, site_state)
        flaw = (hedging(answer) or repeating(answer) or unparsed_call(answer)) if verdict.ok else None
        return _fail(flaw) if flaw else verdict


# ---- answer reading helpers -----------------------------------------------------------------------------------

NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
MONEY = re.compile(rf"\$\s*({NUMBER})|({NUMBER})\s*(?:dollars?|usd)\b", re.IGNORECASE)
REPEATS, LOOP_WORDS = 3, 4  # a run of 4 words said 3 times makes an answer a loop
HEDGES = ("or", "either", "nor", "maybe", "perhaps", "possibly", "probably")
NEGATION = re.compile(r"\b(?:not|never|cannot)\b|n['’]t\b", re.IGNORECASE)
# Product names carry numbers ("Backpack 45L", "Tent 2P") that are no part of an answer's value.
_NAME_TOKENS = {p.name for p in data.PRODUCTS} | {t for p in data.PRODUCTS for t in p.name.split()
                                                  if any(c.isdigit() for c in t)}
PRODUCT_NAMES = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(_NAME_TOKENS, key=len, reverse=True))) + r")\b",
                           re.IGNORECASE)


def unnamed(text: str) -> str:
    """`text` without the product names in it, whose numbers ("Backpack 45L") are no price or weight it states."""
    return PRODUCT_NAMES.sub(" ", text)


# American spellings of British words the site writes ("Aluminium and steel"): a model that answers "aluminum" read
# the right line.
BRITISH = {"aluminum": "aluminium", "liter": "litre", "liters": "litres", "color": "colour", "colors": "colours",
           "odor": "odour", "fiber": "fibre", "fibers": "fibres", "gray": "grey", "meter": "metre", "meters": "metres",
           "center": "centre"}


def words(text: str) -> list[str]:
    """The lower-case words and numbers of the text, American spellings in their British form."""
    return [BRITISH.get(word, word) for word in re.findall(r"[a-z0-9]+", text.lower())]


def compact(text: str) -> str:
    """Lower-case letters and digits only, so "HyperText" matches "Hypertext" and "12,400" matches "12400"."""
    return "".join(words(text))


def numbers(text: str) -> list[float]:
    """Every number in the text, digits ("$1,450.00", "68%") or small number words ("three")."""
    found = [float(raw.replace(",", "")) for raw in re.findall(NUMBER, text)]
    found += [float(NUMBER_WORDS[word]) for word in words(text) if word in NUMBER_WORDS and word != "no"]
    if re.search(r"\bno (?:results?|matches|pages)\b", text.lower()):
        found.append(0.0)
    return found


def amounts(text: str) -> list[float]:
    """The dollar amounts in the text: "$1,450.00", "129 dollars"."""
    return [float((dollar or spelled).replace(",", "")) for dollar, spelled in MONEY.findall(text)]


def same(a: float, b: float) -> bool:
    return abs(a - b) < 0.005


def mentions_number(text: str, value: float) -> bool:
    return any(same(number, value) for number in numbers(text))


def mentions_words(answer: str, phrase: str) -> bool:
    """All words of `phrase` occur in `answer`, in any order and casing."""
    present = set(words(answer))
    return all(word in present for word in words(phrase))


def mentions_phrase(answer: str, phrase: str) -> bool:
    """`phrase` occurs in `answer`, spacing, punctuation and casing aside."""
    return compact(phrase) in compact(answer)


def mentions_product(answer: str, product: Product) -> bool:
    return product.short_name.lower() in words(answer)


def hedge_words(text: str) -> list[str]:
    """The hedges ("or", "maybe") and negations ("not", "isn't") in the text."""
    return [word for word in words(text) if word in HEDGES] + NEGATION.findall(text)


@lru_cache(maxsize=1)
def _verbatim() -> re.Pattern[str]:
    """The site's and the tasks' own texts that hold such words ("Find your order number or receipt", a contact
    message "... has not updated."): quoting one is no hedge."""
    texts = [*(feature for p in data.PRODUCTS for feature in p.features),
             *(line for doc in data.DOCS for line in doc.text().splitlines()),
             *(message for _, _, _, message, _ in CONTACTS)]
    quoted = sorted({text.rstrip(".?!") for text in texts if hedge_words(text)}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, quoted)), re.IGNORECASE)


def hedging(answer: str) -> str | None:
    """Why the answer hedges ("A or B", "maybe A") or negates ("not A") instead of committing to one answer, or
    None when it does not."""
    found = hedge_words(_verbatim().sub(" ", answer))
    return f"hedges or negates ({found[0]!r}) instead of committing to one answer" if found else None


def repeating(answer: str) -> str | None:
    """Why the answer is a loop rather than an answer (a run of `LOOP_WORDS` words said `REPEATS` times or more: a
    small model stuck repeating itself can name the right value in passing), or None when it is not."""
    said = re.findall(r"\w+", answer.casefold())
    runs = Counter(" ".join(said[i:i + LOOP_WORDS]) for i in range(len(said) - LOOP_WORDS + 1))
    run, times = runs.most_common(1)[0] if runs else ("", 0)
    return f"repeats itself ({run!r} {times} times) instead of answering once" if times >= REPEATS else None


def unparsed_call(answer: str) -> str | None:
    """Why the answer is a tool call gone wrong (its markup left in the text), or None when it is not."""
    return "holds tool-call markup: a call that did not parse, not an answer" if CALL_OPEN in answer else None


def _ok(reason: str = "matches") -> CheckResult:
    return CheckResult(True, reason)


def _fail(reason: str) -> CheckResult:
    return CheckResult(False, reason)


# ---- checkers -------------------------------------------------------------------------------------------------
# Each states the right value and rejects an answer that also states a rival value of the same kind; hedges,
# negations, loops and unparsed calls are refused for every task by `Task.check`.

def about(product: Product, facts: Facts, check: Checker) -> Checker:
    """`check`, on an answer that names no other product of the world (by its name's first word): the right value
    told as another product's ("the fifth is the Canyon …, $89.00") is a wrong answer."""
    others = {p.short_name.lower(): p.name for p in facts.products if p.slug != product.slug}

    def checked(answer: str, state: SiteState | None) -> CheckResult:
        verdict = check(answer, state)
        named = sorted({others[word] for word in words(answer) if word in others}) if verdict.ok else []
        return _fail(f"also names other products {named}") if named else verdict
    return checked


def check_price(product: Product, facts: Facts, require_name: bool = False) -> Checker:
    other_prices = {p.price for p in facts.products if p.price != product.price}

    def check(answer: str, _: SiteState | None) -> CheckResult:
        values = unnamed(answer)
        if not mentions_number(values, product.price):
            return _fail(f"expected the price {product.price_text}")
        rivals = {a for a in amounts(values) if not same(a, product.price)}
        rivals |= {price for price in other_prices if mentions_number(values, price)}
        if rivals:
            return _fail(f"also names other prices {sorted(rivals)}")
        if require_name and not mentions_product(answer, product):
            return _fail(f"expected the product name {product.name!r}")
        return _ok()
    return check


def check_numeric(accepted: tuple[float, ...], want: str, context: tuple[float, ...] = (), unit: str = "") -> Checker:
    """States one of `accepted` (with `unit` when given) and no other number but those the question gave
    (`context`, e.g. "17 times 23") or a product name holds."""
    def check(answer: str, _: SiteState | None) -> CheckResult:
        stated = numbers(unnamed(answer))
        if unit not in answer.lower() or not any(same(n, a) for n in stated for a in accepted):
            return _fail(f"expected {want}")
        rivals = sorted({n for n in stated if not any(same(n, a) for a in accepted + context)})
        if rivals:
            return _fail(f"also states other numbers {rivals}")
        return _ok()
    return check


def check_named(value: str, rivals: tuple[str, ...], want: str, rival_kind: str,
                match: Callable[[str, str], bool] = mentions_words) -> Checker:
    """Names `value` and none of `rivals` (other values of its kind) that `value` does not itself contain."""
    rivals = tuple(rival for rival in rivals if not match(value, rival))

    def check(answer: str, _: SiteState | None) -> CheckResult:
        if not match(answer, value):
            return _fail(f"expected {want}")
        named = [rival for rival in rivals if match(answer, rival)]
        if named:
            return _fail(f"also names other {rival_kind} {named}")
        return _ok()
    return check


def check_spec(product: Product, spec: str, facts: Facts) -> Checker:
    value = product.specs[spec]
    want = f"the {spec.lower()} {value!r}"
    if spec == "Warranty":
        return check_numeric((product.warranty_years,), want, unit="year")
    if spec == "Weight":
        grams = check_numeric((product.weight_g,), want)
        either_unit = check_numeric((product.weight_g, product.weight_g / 1000), want)
        return lambda answer, state: (either_unit if "kg" in answer.lower() else grams)(answer, state)
    rivals = tuple(sorted({p.specs[spec] for p in facts.products} - {value}))
    return check_named(value, rivals, want, f"{spec.lower()} values")


def check_first_of(items: tuple[str, ...], what: str, rivals: tuple[str, ...] = ()) -> Checker:
    """The answer names items[0] and does not hedge by also naming the other items of the list (or `rivals`)."""
    return check_named(items[0], items[1:] + rivals, f"the first {what} {items[0]!r}", f"{what}s")


def check_choice(right: Product, other: Product, what: str, keyword: str) -> Checker:
    """The answer names `right` as the `what` one: the verdict word `keyword` never follows `other` ("B is
    lighter", "A is lighter. B is lighter."), while the figures may come first ("B weighs 1450 g and A 210 g, so A
    is lighter"); without the word, `right` is named first."""
    def check(answer: str, _: SiteState | None) -> CheckResult:
        answer_words = words(answer)
        right_key, other_key = right.short_name.lower(), other.short_name.lower()
        if right_key not in answer_words:
            return _fail(f"expected {right.name!r} as the {what} one")
        sequence = [word for word in answer_words if word in (right_key, other_key, keyword)]
        if any(a == other_key and b == keyword for a, b in zip(sequence, sequence[1:])):
            return _fail(f"calls {other.name!r} {keyword}")
        if keyword not in sequence and sequence[0] != right_key:
            return _fail(f"names {other.name!r} before {right.name!r}: ambiguous which is {what}")
        return _ok()
    return check


def check_compared_weights(lighter: Product, heavier: Product) -> Checker:
    """`lighter` named the lighter one, and the weights the answer gives (g or kg) are the two products' own: none
    made up, and not one figure for both."""
    choice = check_choice(lighter, heavier, "lighter", keyword="lighter")
    weights = (lighter.weight_g, heavier.weight_g)

    def check(answer: str, state: SiteState | None) -> CheckResult:
        verdict = choice(answer, state)
        if not verdict.ok:
            return verdict
        stated = numbers(unnamed(answer))
        meant = [next((w for w in weights if same(n, w) or same(n * 1000, w)), None) for n in stated]
        made_up = sorted(n for n, w in zip(stated, meant) if w is None)
        if made_up:
            return _fail(f"states weights that are neither product's {made_up}")
        if len(meant) > 1 and len(set(meant)) == 1:
            return _fail(f"gives both products the weight {meant[0]} g")
        return _ok()
    return check


DIFFERENCE_WORDS = re.compile(r"\b(?:more|difference|differ|differs|extra|higher|dearer|pricier|expensive|by)\b",
                              re.IGNORECASE)


def check_price_difference(dearer: Product, cheaper: Product) -> Checker:
    difference = round(dearer.price - cheaper.price, 2)
    name_check = check_choice(dearer, cheaper, "more expensive", keyword="more")
    stated_prices = (difference, dearer.price, cheaper.price)

    # Where the difference is also a price (129.00 - 64.50), the figure alone may be that price read off a page.
    as_price = any(same(difference, price) for price in (dearer.price, cheaper.price))

    def check(answer: str, state: SiteState | None) -> CheckResult:
        named = name_check(answer, state)
        if not named.ok:
            return named
        if not mentions_number(answer, difference):
            return _fail(f"expected the difference ${difference:,.2f}")
        if as_price and not DIFFERENCE_WORDS.search(answer):
            return _fail(f"states ${difference:,.2f} only as a price: no difference given")
        rivals = sorted({a for a in amounts(answer) if not any(same(a, p) for p in stated_prices)})
        if rivals:
            return _fail(f"also names other amounts {rivals}")
        return _ok()
    return check


def check_count(expected: int, ceiling: int) -> Checker:
    """The expected count is stated and no other count up to `ceiling` is."""
    def check(answer: str, _: SiteState | None) -> CheckResult:
        counts = {int(n) for n in numbers(answer) if n == int(n) and 0 <= n <= ceiling}
        if expected not in counts:
            return _fail(f"expected the count {expected}")
        if counts - {expected}:
            return _fail(f"also states other counts {sorted(counts - {expected})}")
        return _ok()
    return check


def check_fact(key: str, facts: Facts) -> Checker:
    value = facts.story[key]
    if key in ("founder", "headquarters"):  # the surname, the city: "Boulder, Colorado" may be said "Boulder"
        return check_named(value.split(",")[0].split()[-1], (), repr(value), "names")
    return check_numeric((float(compact(value)),), repr(value), context=tuple(numbers(FACT_QUESTIONS[key])))


def check_number(expected: float, question: str) -> Checker:
    return check_numeric((expected,), f"{expected:g}", context=tuple(numbers(question)))


def check_phrase(phrase: str, rivals: tuple[str, ...]) -> Checker:
    return check_named(phrase, rivals, repr(phrase), "expansions", match=mentions_phrase)


def normalise_field(name: str, value: str) -> str:
    collapsed = " ".join(value.split())
    return collapsed.lower() if name == "email" else collapsed


def check_submission(expected: Mapping[str, str]) -> Checker:
    """The site recorded a contact submission whose fields all equal `expected` (whitespace and email case aside)."""
    def check(_: str, state: SiteState | None) -> CheckResult:
        if state is None:
            return _fail("needs the site state (its submissions) to check a form task")
        submissions = state.submissions
        if not submissions:
            return _fail("no contact form submission was recorded")
        for submission in reversed(submissions):
            wrong = [name for name, value in expected.items()
                     if normalise_field(name, submission.get(name, "")) != normalise_field(name, value)]
            if not wrong:
                return _ok("submission recorded")
        closest = min(submissions, key=lambda s: sum(normalise_field(k, s.get(k, "")) != normalise_field(k, v)
                                                     for k, v in expected.items()))
        diffs = [f"{name}={closest.get(name, '')!r} (expected {value!r})" for name, value in expected.items()
                 if normalise_field(name, closest.get(name, "")) != normalise_field(name, value)]
        return _fail("closest submission differs: " + ", ".join(diffs))
    return check


# ---- templates ------------------------------------------------------------------------------------------------

SPEC_QUESTIONS = {
    "Weight": "How much does the {name} weigh",
    "Material": "What material is the {name} made of",
    "Warranty": "How long is the warranty on the {name}",
    "Made in": "In which country is the {name} made",
}
SPEC_KEYS = tuple(SPEC_QUESTIONS)

FACT_QUESTIONS = {
    "founded": "the year Acme was founded",
    "founder": "who founded Acme",
    "headquarters": "which city Acme's headquarters are in",
    "stores": "how many stores Acme has",
    "employees": "how many people work at Acme",
    "trees": "how many trees Acme planted in 2024",
    "recycled": "what share of Acme's range uses recycled materials",
}
FACT_ANSWERS = {
    "founded": "Acme was founded in {}.", "founder": "Acme was founded by {}.",
    "headquarters": "Acme's headquarters are in {}.", "stores": "Acme has {} stores.",
    "employees": "{} people work at Acme.", "trees": "Acme planted {} trees in 2024.",
    "recycled": "{} of Acme's range uses recycled materials.",
}
FACT_WRONG = {"founded": "1978", "founder": "Marta Lindgren", "headquarters": "Denver, Colorado", "stores": "32",
              "employees": "401", "trees": "14,200", "recycled": "86%"}
HELDOUT_FACTS = frozenset({"employees", "recycled"})

SEARCHES_TRAIN = ("wash", "delivery", "order", "card", "weather", "zip", "account", "kayak", "page", "store")
SEARCHES_HELDOUT = ("tent", "gift", "water", "days", "hour")
FIRST_RESULT_SEARCHES = ("refund", "label", "voucher", "hour")

CONTACTS = (  # (name, email, topic, message, split)
    ("Ada Byron", "ada@example.com", "Order status", "Where is order 1042?", "train"),
    ("Ben Okafor", "ben.okafor@example.org", "Returns", "The boots are a size too small.", "train"),
    ("Chen Wei", "chen.wei@example.net", "Product question", "Is the tent good for snow?", "train"),
    ("Dana Ruiz", "dana@ruiz.example", "Wholesale", "We run a climbing gym and want 40 bottles.", "train"),
    ("Emil Sorensen", "emil@example.com", "Feedback", "Great service in the Boulder store.", "train"),
    ("Fatima Noor", "f.noor@example.org", "Order status", "My parcel tracking has not updated.", "train"),
    ("Igor Petrov", "igor.petrov@example.com", "Feedback", "The staff in Denver were very helpful.", "train"),
    ("Julia Mendes", "julia@mendes.example", "Order status", "Has order 2271 left the warehouse?", "train"),
    ("Kofi Mensah", "kofi.mensah@example.net", "Product question", "Can the headlamp run on batteries?", "train"),
    ("Lena Vogel", "lena.vogel@example.org", "Returns", "I would like to exchange my jacket for a medium.",
     "train"),
    ("Marco Rossi", "marco@rossi.example", "Wholesale", "Do you offer discounts for school groups?", "train"),
    ("Nadia Haddad", "nadia.h@example.com", "Feedback", "Please add more colours for the socks.", "train"),
    ("Oscar Lindgren", "oscar@lindgren.example", "Order status", "My order arrived without the rain cover.",
     "train"),
    ("Priya Shah", "priya.shah@example.net", "Product question", "Is the sleeping bag machine washable?", "train"),
    ("Quinn Taylor", "quinn@example.org", "Returns", "The tent poles arrived bent.", "train"),
    ("Rosa Jimenez", "rosa.jimenez@example.com", "Wholesale", "We need 25 chairs for a festival.", "train"),
    ("Gus Harlan", "gus.harlan@example.com", "Returns", "Please send a label for my jacket.", "heldout"),
    ("Hana Sato", "hana@sato.example", "Product question", "Does the stove work at altitude?", "heldout"),
)

ARITHMETIC = (  # (question, answer, split)
    ("What is 17 times 23?", 391, "train"),
    ("What is 144 divided by 12?", 12, "train"),
    ("What is 15% of 80?", 12, "train"),
    ("What is 1,250 plus 4,375?", 5625, "train"),
    ("What is 9 squared?", 81, "train"),
    ("What is 1000 minus 358?", 642, "train"),
    ("What is 36 times 25?", 900, "heldout"),
    ("What is 20% of 450?", 90, "heldout"),
)

ABBREVIATIONS = (  # (abbreviation, expansion, split)
    ("HTTP", "Hypertext Transfer Protocol", "train"),
    ("URL", "Uniform Resource Locator", "train"),
    ("HTML", "HyperText Markup Language", "train"),
    ("CSS", "Cascading Style Sheets", "train"),
    ("JSON", "JavaScript Object Notation", "train"),
    ("SQL", "Structured Query Language", "train"),
    ("API", "Application Programming Interface", "heldout"),
    ("PDF", "Portable Document Format", "heldout"),
)


def _split_for(*products: Product) -> str:
    return "heldout" if any(p.slug in HELDOUT_PRODUCTS for p in products) else "train"


def _neighbour(product: Product, facts: Facts, offset: int = 1) -> Product:
    return facts.products[(facts.products.index(product) + offset) % len(facts.products)]


def price_by_position_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for index, product in enumerate(facts.products_page(1)):
        ordinal = ORDINALS[index]
        tasks.append(Task(
            id=f"price_by_position-{index + 1}", template="price_by_position", split=_split_for(product),
            prompt=f"Go to the Acme Outfitters shop at {{base_url}}, open the {ordinal} product in the catalogue "
                   "and tell me its price.",
            needs_tools=True, params={"position": index + 1, "product": product.slug},
            expected=f"The {ordinal} product, the {product.name}, costs {product.price_text}.",
            wrong=f"It costs {_neighbour(product, facts).price_text}.",
            checker=about(product, facts, check_price(product, facts))))
    return tasks


def page2_product_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for index, product in enumerate(facts.products_page(2)):
        ordinal = ORDINALS[index]
        other = _neighbour(product, facts)
        tasks.append(Task(
            id=f"page2_product-{index + 1}", template="page2_product", split=_split_for(product),
            prompt=f"On the shop at {{base_url}}, go to page 2 of the product catalogue and tell me the name and "
                   f"price of the {ordinal} product listed there.",
            needs_tools=True, params={"position": index + 1, "product": product.slug},
            expected=f"The {ordinal} product on page 2 is the {product.name}, priced at {product.price_text}.",
            wrong=f"It is the {other.name}, priced at {other.price_text}.",
            checker=about(product, facts, check_price(product, facts, require_name=True))))
    return tasks


def product_spec_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for index, listed in enumerate(data.PRODUCTS):  # which specs a product is asked about: the same in every world
        product = facts.counterpart(listed.slug)
        for spec in (SPEC_KEYS[index % 4], SPEC_KEYS[(index + 2) % 4]):
            other = next(p for offset in range(1, len(facts.products))
                         if (p := _neighbour(product, facts, offset)).specs[spec] != product.specs[spec])
            question = SPEC_QUESTIONS[spec].format(name=product.name)
            tasks.append(Task(
                id=f"product_spec-{listed.slug}-{spec.lower().replace(' ', '_')}", template="product_spec",
                split=_split_for(product),
                prompt=f"{question}? Look it up on the shop at {{base_url}}.",
                needs_tools=True, params={"product": product.slug, "spec": spec},
                expected=f"{spec} of the {product.name}: {product.specs[spec]}.",
                wrong=f"{spec}: {other.specs[spec]}.",
                checker=about(product, facts, check_spec(product, spec, facts))))
    return tasks


def product_first_feature_tasks(facts: Facts) -> list[Task]:
    return [Task(
        id=f"product_first_feature-{listed.slug}", template="product_first_feature", split=_split_for(product),
        prompt=f"Open the {product.name} page on the shop at {{base_url}} and tell me the first feature listed.",
        needs_tools=True, params={"product": product.slug},
        expected=f"The first feature listed is: {product.features[0]}.",
        wrong=f"The first feature listed is: {product.features[1]}.",
        checker=about(product, facts, check_first_of(product.features, "feature")))
        for listed, product in ((listed, facts.counterpart(listed.slug)) for listed in data.PRODUCTS)]


def _pairs(facts: Facts) -> list[tuple[str, Product, Product]]:
    """Each product against the one seven places on in the demo's own catalogue (other page), plus neighbours on the
    same page: the same pairs in every world (named by the demo's slugs, for the task id), with that world's
    products."""
    products = data.PRODUCTS
    across = [(products[i], products[i + data.PRODUCTS_PER_PAGE]) for i in range(data.PRODUCTS_PER_PAGE)]
    beside = [(products[i], products[i + 1]) for i in range(0, len(products) - 1, 2)]
    return [(f"{a.slug}-{b.slug}", facts.counterpart(a.slug), facts.counterpart(b.slug)) for a, b in across + beside]


def compare_weight_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for pair, first, second in _pairs(facts):
        lighter, heavier = sorted((first, second), key=lambda p: p.weight_g)
        tasks.append(Task(
            id=f"compare_weight-{pair}", template="compare_weight",
            split=_split_for(first, second),
            prompt=f"Which is lighter, the {first.name} or the {second.name}? Compare their weights on the shop "
                   "at {base_url}.",
            needs_tools=True, params={"products": [first.slug, second.slug]},
            expected=f"The {lighter.name} is lighter ({lighter.weight_g} g vs {heavier.weight_g} g).",
            wrong=f"The {heavier.name} is lighter.",
            checker=check_compared_weights(lighter, heavier)))
    return tasks


def compare_price_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for pair, first, second in _pairs(facts)[::3]:
        cheaper, dearer = sorted((first, second), key=lambda p: p.price)
        difference = f"${dearer.price - cheaper.price:,.2f}"
        tasks.append(Task(
            id=f"compare_price-{pair}", template="compare_price", split="heldout",
            prompt=f"Which costs more, the {first.name} or the {second.name}, and by how much? Check both on the "
                   "shop at {base_url}.",
            needs_tools=True, params={"products": [first.slug, second.slug]},
            expected=f"The {dearer.name} costs {difference} more ({dearer.price_text} vs {cheaper.price_text}).",
            wrong=f"The {cheaper.name} costs {difference} more.",
            checker=check_price_difference(dearer, cheaper)))
    return tasks


def docs_first_item_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for doc in facts.docs:
        for section in doc.sections:
            tasks.append(Task(
                id=f"docs_first_item-{doc.slug}-{compact(section.heading)}", template="docs_first_item",
                split="heldout" if doc.slug in HELDOUT_DOCS else "train",
                prompt=f"Find the docs page about {doc.topic} on {{base_url}} and tell me the first item under "
                       f"\"{section.heading}\".",
                needs_tools=True, params={"doc": doc.slug, "heading": section.heading},
                expected=first_item_sentence(section.heading, section.items[0]),
                wrong=f"The first item is: {section.items[1]}.",
                checker=check_first_of(section.items, "item")))
    return tasks


def first_item_sentence(heading: str, item: str) -> str:
    """The item right after its heading, as on the page (the teacher's answer too): with the page's title between
    them ("… on the Warranty page is: …"), tuned models went on from the title to the page's intro (docs/benchmarks.md,
    run 61)."""
    return f"The first item under \"{heading}\" is: {item}."


def results_sentence(query: str, count: int) -> str:
    """A search count said as the count asked for, not as the search done (the teacher's answer too: docs/benchmarks.md,
    run 58)."""
    return f"There {'is' if count == 1 else 'are'} {count} result{'' if count == 1 else 's'} for \"{query}\"."


def docs_search_count_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for split, queries in (("train", SEARCHES_TRAIN), ("heldout", SEARCHES_HELDOUT)):
        for query in queries:
            count = len(facts.search_docs(query))
            tasks.append(Task(
                id=f"docs_search_count-{query}", template="docs_search_count", split=split,
                prompt=f"Search the docs at {{base_url}} for \"{query}\" and tell me how many results there are.",
                needs_tools=True, params={"query": query},
                expected=results_sentence(query, count),
                wrong=f"There are {count + 1} results.", checker=check_count(count, len(facts.docs))))
    return tasks


def docs_search_first_result_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for query in FIRST_RESULT_SEARCHES:
        results = facts.search_docs(query)
        titles = tuple(doc.title for doc in results)
        wrong = next(doc.title for doc in facts.docs if doc.title not in titles)
        tasks.append(Task(
            id=f"docs_search_first_result-{query}", template="docs_search_first_result", split="heldout",
            prompt=f"Search the docs at {{base_url}} for \"{query}\" and tell me the title of the first result.",
            needs_tools=True, params={"query": query},
            expected=f"The first result is \"{titles[0]}\".", wrong=f"The first result is \"{wrong}\".",
            checker=check_first_of(titles, "result", tuple(d.title for d in facts.docs if d.title not in titles))))
    return tasks


def learn_more_fact_tasks(facts: Facts) -> list[Task]:
    return [Task(
        id=f"learn_more_fact-{key}", template="learn_more_fact",
        split="heldout" if key in HELDOUT_FACTS else "train",
        prompt=f"On {{base_url}}, click the \"Learn more\" link on the home page, switch to the new tab it opens "
               f"and tell me {question}.",
        needs_tools=True, params={"fact": key},
        expected=FACT_ANSWERS[key].format(facts.story[key]), wrong=f"The answer is {FACT_WRONG[key]}.",
        checker=check_fact(key, facts))
        for key, question in FACT_QUESTIONS.items()]


def contact_form_tasks(facts: Facts) -> list[Task]:
    tasks = []
    for name, email, topic, message, split in CONTACTS:
        fields = {"name": name, "email": email, "topic": topic, "message": message}
        tasks.append(Task(
            id=f"contact_form-{compact(name)}", template="contact_form", split=split,
            prompt=f"Use the contact form on {{base_url}} to send a message with name \"{name}\", email "
                   f"\"{email}\", topic \"{topic}\" and message \"{message}\".",
            needs_tools=True, params=fields,
            expected=f"I sent the message \"{message}\" as {name} ({email}) under \"{topic}\".",
            wrong="I could not find the contact form.", checker=check_submission(fields)))
    return tasks


def no_tool_arithmetic_tasks(facts: Facts) -> list[Task]:
    return [Task(
        id=f"no_tool_arithmetic-{index + 1}", template="no_tool_arithmetic", split=split, prompt=question,
        needs_tools=False, params={"answer": answer}, expected=f"{answer:,}", wrong=f"{answer + 1:,}",
        checker=check_number(answer, question))
        for index, (question, answer, split) in enumerate(ARITHMETIC)]


def no_tool_definition_tasks(facts: Facts) -> list[Task]:
    expansions = [expansion for _, expansion, _ in ABBREVIATIONS]
    return [Task(
        id=f"no_tool_definition-{abbreviation.lower()}", template="no_tool_definition", split=split,
        prompt=f"What does the abbreviation {abbreviation} stand for?", needs_tools=False,
        params={"abbreviation": abbreviation, "expansion": expansion},
        expected=f"{abbreviation} stands for {expansion}.",
        wrong=f"{abbreviation} stands for {expansions[(index + 1) % len(expansions)]}.",
        checker=check_phrase(expansion, tuple(expansions))) for index, (abbreviation, expansion, split)
        in enumerate(ABBREVIATIONS)]


# Each builds its template's tasks from the world it is given (the form and tool-free templates need nothing of it);
# `_built` marks every task with that world.
TEMPLATE_BUILDERS = (
    price_by_position_tasks, page2_product_tasks, product_spec_tasks, product_first_feature_tasks,
    compare_weight_tasks, compare_price_tasks, docs_first_item_tasks, docs_search_count_tasks,
    docs_search_first_result_tasks, learn_more_fact_tasks, contact_form_tasks, no_tool_arithmetic_tasks,
    no_tool_definition_tasks,
)


def all_tasks(facts: Facts = FACTS) -> tuple[Task, ...]:
    """Every task, its answers as they hold in the world of `facts`. Ids are the same in every world; a prompt
    differs only in the names of the products it asks about."""
    return _built(facts)  # one cache key per world, however the argument is passed


@lru_cache(maxsize=4)
def _built(facts: Facts) -> tuple[Task, ...]:
    tasks = tuple(dataclasses.replace(task, facts=facts) for build in TEMPLATE_BUILDERS for task in build(facts))
    ids = [task.id for task in tasks]
    duplicates = sorted({task_id for task_id in ids if ids.count(task_id) > 1})
    if duplicates:
        raise RuntimeError(f"duplicate demo task ids: {duplicates}")
    return tasks


def load_tasks(split: str | None = None, facts: Facts = FACTS) -> list[Task]:
    """The tasks of `split` ("train" or "heldout"), or all tasks when `split` is None, in a fixed order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or None")
    return [task for task in all_tasks(facts) if split is None or task.split == split]


def task_by_id(task_id: str, facts: Facts = FACTS) -> Task:
    for task in all_tasks(facts):
        if task.id == task_id:
            return task
    raise KeyError(f"no demo task with id {task_id!r}")


@lru_cache(maxsize=4)
def training_facts(seed: int) -> Facts:
    """A version of the world for training trace number `seed`: the held-out products and docs as they are, the rest
    moved and re-valued, so a model trained on many such traces must read answers off the page (the held-out
    tasks run in the demo's own world, `FACTS`)."""
    return data.vary(seed, keep_products=HELDOUT_PRODUCTS, keep_docs=HELDOUT_DOCS)
