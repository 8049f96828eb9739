"""The facts of the demo world: one source for the site's pages, the tasks and their checkers.

Everything here is plain data, gathered in `FACTS` with the two small queries (`products_page`, `search_docs`) that
the site and the tasks both call, so a page can never disagree with the answer a checker expects. `vary` draws
other versions of the same world (new prices, order, story) for training traces.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Mapping

SHOP_NAME = "Acme Outfitters"
PRODUCTS_PER_PAGE = 7


@dataclass(frozen=True)
class Product:
    slug: str
    name: str
    category: str
    price: float
    features: tuple[str, ...]
    weight_g: int
    material: str
    warranty_years: int
    made_in: str

    @property
    def price_text(self) -> str:
        return f"${self.price:,.2f}"

    @property
    def short_name(self) -> str:
        """The first word, unique across the catalogue, so answers may name a product briefly."""
        return self.name.split()[0]

    @property
    def specs(self) -> dict[str, str]:
        return {
            "Weight": f"{self.weight_g} g",
            "Material": self.material,
            "Warranty": f"{self.warranty_years} years" if self.warranty_years != 1 else "1 year",
            "Made in": self.made_in,
        }


PRODUCTS: tuple[Product, ...] = (
    Product("trailblazer-backpack", "Trailblazer Backpack 45L", "Packs", 129.00,
            ("Padded hip belt with two zip pockets", "Hydration sleeve fits a 3 litre bladder",
             "Rain cover stored in the base"), 1450, "Recycled ripstop nylon", 5, "Vietnam"),
    Product("summit-down-jacket", "Summit Down Jacket", "Clothing", 249.00,
            ("800-fill responsibly sourced down", "Packs into its own chest pocket", "Adjustable storm hood"),
            380, "Nylon shell with goose down", 3, "Portugal"),
    Product("ridge-hiking-boots", "Ridge Hiking Boots", "Footwear", 179.50,
            ("Waterproof breathable membrane", "Vibram outsole for wet rock", "Cushioned removable insole"),
            1120, "Full-grain leather", 2, "Italy"),
    Product("canyon-water-bottle", "Canyon Water Bottle", "Hydration", 24.99,
            ("Keeps drinks cold for 24 hours", "Leak-proof screw cap", "Fits standard cup holders"),
            340, "Stainless steel", 10, "Taiwan"),
    Product("alpine-trekking-poles", "Alpine Trekking Poles", "Hiking", 89.00,
            ("Quick flick-lock adjustment", "Cork grips that wick sweat", "Carbide tips with rubber caps"),
            520, "Carbon fibre", 2, "Austria"),
    Product("basecamp-tent", "Basecamp Tent 2P", "Shelter", 319.00,
            ("Two doors and two vestibules", "Colour-coded poles for fast pitching", "Fully taped seams"),
            2100, "Silicone-coated polyester", 3, "Korea"),
    Product("glacier-sleeping-bag", "Glacier Sleeping Bag", "Sleep", 199.00,
            ("Comfort rating of minus 5 degrees", "Draft collar around the shoulders", "Compression sack included"),
            1300, "Synthetic insulation", 2, "China"),
    Product("ember-camp-stove", "Ember Camp Stove", "Cooking", 64.50,
            ("Boils a litre of water in 3 minutes", "Piezo push-button ignition", "Folds to fit inside a mug"),
            210, "Aluminium and steel", 3, "Japan"),
    Product("drift-rain-shell", "Drift Rain Shell", "Clothing", 159.00,
            ("Three-layer waterproof fabric", "Pit zips for ventilation", "Helmet-compatible hood"),
            410, "Recycled polyester", 2, "Canada"),
    Product("pathfinder-headlamp", "Pathfinder Headlamp", "Lighting", 39.95,
            ("350 lumen maximum output", "Red night-vision mode", "USB-C rechargeable battery"),
            85, "Polycarbonate", 1, "Germany"),
    Product("cascade-water-filter", "Cascade Water Filter", "Hydration", 49.00,
            ("Removes 99.99 percent of bacteria", "Filters up to 1,000 litres", "Screws onto most bottles"),
            95, "Hollow fibre membrane", 1, "Switzerland"),
    Product("meadow-camp-chair", "Meadow Camp Chair", "Furniture", 74.00,
            ("Sets up in under a minute", "Side pocket for a phone", "Holds up to 120 kilograms"),
            980, "Aluminium frame with mesh", 2, "Mexico"),
    Product("horizon-binoculars", "Horizon Binoculars", "Optics", 139.00,
            ("8x magnification with 42 mm lenses", "Fog-proof nitrogen-filled barrels", "Twist-up eyecups"),
            640, "Magnesium alloy", 10, "Philippines"),
    Product("tundra-wool-socks", "Tundra Wool Socks", "Clothing", 19.50,
            ("Merino wool blend that resists odour", "Cushioned heel and toe", "Seamless toe closure"),
            90, "Merino wool and nylon", 1, "United States"),
)

PRODUCT_NAMES = frozenset(product.name for product in PRODUCTS)


@dataclass(frozen=True)
class DocSection:
    heading: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class DocPage:
    slug: str
    title: str
    topic: str  # how a person would name what the page is about
    intro: str
    sections: tuple[DocSection, ...]

    def section(self, heading: str) -> DocSection:
        for section in self.sections:
            if section.heading == heading:
                return section
        raise KeyError(f"doc page {self.slug!r} has no section {heading!r}")

    def text(self) -> str:
        parts = [self.title, self.intro]
        for section in self.sections:
            parts.append(section.heading)
            parts.extend(section.items)
        return "\n".join(parts)


DOCS: tuple[DocPage, ...] = (
    DocPage("getting-started", "Getting Started", "getting started with an account",
            "Set up your Acme account and place a first order.",
            (DocSection("Create an account", ("Choose Sign up at the top of any page",
                                              "Confirm your email address within 24 hours",
                                              "Add a delivery address to your profile")),
             DocSection("Place an order", ("Add products to your basket",
                                           "Review the basket and choose a delivery speed",
                                           "Pay by card or gift voucher")))),
    DocPage("shipping", "Shipping and Delivery", "shipping",
            "How and when your order travels to you.",
            (DocSection("Delivery options", ("Standard delivery in 3 to 5 working days",
                                             "Express delivery on the next working day",
                                             "Free collection from any Acme store")),
             DocSection("Tracking a parcel", ("Open the tracking link in your dispatch email",
                                              "Sign in to see every parcel on the Orders page",
                                              "Call the courier with your tracking number")))),
    DocPage("returns", "Returns and Exchanges", "returns",
            "Send back anything within 60 days for a refund or exchange.",
            (DocSection("Before you return", ("Keep the original tags attached",
                                              "Clean footwear and tents before packing",
                                              "Print the prepaid label from your account")),
             DocSection("Refund timing", ("Refunds start within 2 days of arrival",
                                          "Card refunds take up to 5 working days",
                                          "Gift voucher refunds are instant")))),
    DocPage("sizing", "Sizing Guide", "sizing",
            "Find the right fit for clothing and footwear.",
            (DocSection("Measuring yourself", ("Measure your chest at the fullest point",
                                               "Measure your waist at the natural waistline",
                                               "Measure your feet in the evening")),
             DocSection("Between sizes", ("Choose the larger size for layering",
                                          "Choose the smaller size for running",
                                          "Ask our team for a personal fitting")))),
    DocPage("product-care", "Product Care", "caring for your gear",
            "Make your gear last for many seasons.",
            (DocSection("Washing", ("Wash down jackets with a down-specific soap",
                                    "Close every zip before washing",
                                    "Never use fabric softener on waterproof clothing")),
             DocSection("Storage", ("Store sleeping bags loose in a large cotton sack",
                                    "Dry tents completely before storing them",
                                    "Keep boots away from direct heat")))),
    DocPage("warranty", "Warranty", "the warranty",
            "Every product carries a warranty against faults in materials and workmanship.",
            (DocSection("What is covered", ("Broken zips and buckles",
                                            "Seams that come apart in normal use",
                                            "Delamination of waterproof fabric")),
             DocSection("Making a claim", ("Find your order number or receipt",
                                           "Photograph the fault clearly",
                                           "Send the claim through the Contact page")))),
    DocPage("payment", "Payment Options", "paying for an order",
            "Ways to pay for an order at Acme Outfitters.",
            (DocSection("Accepted methods", ("Visa, Mastercard and American Express",
                                             "Acme gift vouchers",
                                             "Bank transfer for wholesale orders")),
             DocSection("Payment security", ("Card details are never stored on our servers",
                                             "Every payment page uses an encrypted connection",
                                             "Large orders may need a one-time code")))),
    DocPage("trail-safety", "Trail Safety", "staying safe on the trail",
            "Simple habits for safer days outdoors.",
            (DocSection("Before you go", ("Check the mountain weather forecast",
                                          "Tell someone your route and return time",
                                          "Pack a headlamp even for day hikes")),
             DocSection("On the trail", ("Turn back if the weather turns bad",
                                         "Drink water every hour",
                                         "Stay on marked paths")))),
)


# The "Our story" page, opened in a new tab from the home page's "Learn more" link.
STORY_FACTS: dict[str, str] = {
    "founded": "1987",
    "founder": "Marta Lindqvist",
    "headquarters": "Boulder, Colorado",
    "stores": "23",
    "employees": "410",
    "trees": "12,400",
    "recycled": "68%",
}
# Each fact's line on the story page reads "<label>: <value>".
STORY_LABELS: dict[str, str] = {"founded": "Founded", "founder": "Founder", "headquarters": "Headquarters",
                                "stores": "Stores", "employees": "Employees", "trees": "Trees planted in 2024",
                                "recycled": "Recycled materials in our range"}

CONTACT_TOPICS: tuple[str, ...] = ("Order status", "Returns", "Product question", "Wholesale", "Feedback")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: each version is built once
class Facts:
    """One version of the world's facts: what the site renders and the tasks check. `FACTS` is the demo's own;
    `vary` draws other versions, so that training traces show values a model must read off the page."""

    products: tuple[Product, ...]
    docs: tuple[DocPage, ...]
    story: Mapping[str, str]
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the demo's slug -> this world's slug

    def counterpart(self, slug: str) -> Product:
        """This world's version of the demo's product `slug` (renamed or not)."""
        return self.product_by_slug(self.renamed.get(slug, slug))

    @property
    def product_pages(self) -> int:
        return (len(self.products) + PRODUCTS_PER_PAGE - 1) // PRODUCTS_PER_PAGE

    def products_page(self, page: int) -> tuple[Product, ...]:
        """The products listed on catalogue page `page` (1-based)."""
        if not 1 <= page <= self.product_pages:
            raise ValueError(f"catalogue page {page} does not exist (pages 1..{self.product_pages})")
        start = (page - 1) * PRODUCTS_PER_PAGE
        return self.products[start:start + PRODUCTS_PER_PAGE]

    def product_by_slug(self, slug: str) -> Product:
        for product in self.products:
            if product.slug == slug:
                return product
        raise KeyError(f"no product with slug {slug!r}")

    def product_by_address(self, name_or_slug: str) -> Product:
        """The product a page address names: its slug, or its name as a person types it (any case, single
        spaces)."""
        wanted = " ".join(name_or_slug.split()).casefold()
        for product in self.products:
            if wanted in (product.slug, product.name.casefold()):
                return product
        raise KeyError(f"no product named {name_or_slug!r}")

    def doc_by_slug(self, slug: str) -> DocPage:
        for doc in self.docs:
            if doc.slug == slug:
                return doc
        raise KeyError(f"no doc page with slug {slug!r}")

    def doc_by_address(self, address: str) -> DocPage:
        """The doc page an address names: its slug, its title or its topic as a person types them (any case, single
        spaces)."""
        wanted = " ".join(address.split()).casefold()
        for doc in self.docs:
            if wanted in (doc.slug, doc.title.casefold(), doc.topic.casefold()):
                return doc
        raise KeyError(f"no doc page named {address!r}")

    def search_docs(self, query: str) -> tuple[DocPage, ...]:
        """Doc pages whose text contains `query` (case-insensitive), in catalogue order; an empty query finds
        nothing."""
        needle = " ".join(query.split()).lower()
        if not needle:
            return ()
        return tuple(doc for doc in self.docs if needle in doc.text().lower())


FACTS = Facts(PRODUCTS, DOCS, STORY_FACTS)

# New first words for renamed products: none is the first word of a demo product, a city or a founder.
NAME_WORDS = ("Granite", "Willow", "Falcon", "Cedar", "Aspen", "Timber", "Raven", "Juniper", "Nimbus", "Osprey",
              "Quartz", "Redwood", "Sierra", "Talon", "Vista", "Yukon", "Zephyr", "Kestrel", "Mesa", "Nomad",
              "Prairie", "Saddle", "Tidal", "Cobalt", "Dune", "Fjord", "Glade", "Harbor", "Jasper", "Lupine",
              "Marlin", "Onyx", "Pebble", "Rowan", "Sable", "Thistle", "Wren", "Basalt", "Cinder", "Drumlin")
FOUNDERS = ("Marta Lindqvist", "Jonas Okafor", "Ines Moreau", "Tomas Kovac", "Priya Raman", "Leah Brennan")
HEADQUARTERS = ("Boulder, Colorado", "Bend, Oregon", "Missoula, Montana", "Flagstaff, Arizona", "Ogden, Utah")


def vary(seed: int, keep_products: frozenset[str] = frozenset(), keep_docs: frozenset[str] = frozenset()) -> Facts:
    """Another version of `FACTS`, drawn from `seed`: the products not in `keep_products` get a new first word in
    their name ("Falcon Backpack 45L", slug `falcon-backpack`), trade places in the catalogue and get new prices,
    weights, warranties, materials, countries and feature order; the docs not in `keep_docs` list each section's
    items in a new order; the story's facts change. What a task asks stays; the names in it and its answer move."""
    rng = random.Random(seed)
    movable = [p for p in PRODUCTS if p.slug not in keep_products]
    first_words = rng.sample(NAME_WORDS, len(movable))
    materials = rng.sample([p.material for p in movable], len(movable))
    countries = rng.sample([p.made_in for p in movable], len(movable))
    taken_prices = {p.price for p in PRODUCTS if p.slug in keep_products}
    taken_weights = {p.weight_g for p in PRODUCTS if p.slug in keep_products}
    varied = {}
    for product, material, country, first_word in zip(movable, materials, countries, first_words):
        price = _draw(rng, taken_prices, lambda: rng.randrange(12, 340) + rng.choice((0.0, 0.5, 0.95, 0.99)))
        weight = _draw(rng, taken_weights, lambda: rng.randrange(60, 2400, 5))
        varied[product.slug] = dataclasses.replace(
            product, slug=f"{first_word.lower()}-{product.slug.split('-', 1)[1]}",
            name=f"{first_word} {product.name.split(' ', 1)[1]}", price=price, weight_g=weight,
            warranty_years=rng.choice((1, 2, 3, 5, 10)), material=material, made_in=country,
            features=tuple(rng.sample(product.features, len(product.features))))
    order = iter(rng.sample(list(varied.values()), len(varied)))
    products = tuple(p if p.slug in keep_products else next(order) for p in PRODUCTS)
    docs = tuple(doc if doc.slug in keep_docs else dataclasses.replace(doc, sections=tuple(
        DocSection(s.heading, tuple(rng.sample(s.items, len(s.items)))) for s in doc.sections)) for doc in DOCS)
    story = {
        "founded": str(rng.randrange(1950, 2011)), "founder": rng.choice(FOUNDERS),
        "headquarters": rng.choice(HEADQUARTERS), "stores": str(rng.randrange(5, 60)),
        "employees": str(rng.randrange(120, 990)), "trees": f"{rng.randrange(2, 30)},{rng.randrange(0, 1000):03d}",
        "recycled": f"{rng.randrange(20, 96)}%",
    }
    return Facts(products, docs, story, renamed={slug: p.slug for slug, p in varied.items()})


def _draw(rng: random.Random, taken: set, draw: Callable[[], float]) -> float:
    """A value `draw` gives that no other product has, so that every answer names one product's value."""
    value = draw()
    while value in taken:
        value = draw()
    taken.add(value)
    return value
