"""The step scorer agrees with the Berkeley Function-Calling Leaderboard's AST checker where they used to differ:
a URL that opens the same page matches, and an optional parameter stated with its schema default matches one left
out. The cases that must still fail stay failing."""

from __future__ import annotations

import json

import pytest

from mcpft.evaluate import normalize_url, score_step
from mcpft.hermes import make_tool_call, parse_assistant_text

TOOLS = [
    {"type": "function", "function": {"name": "browser_navigate", "description": "Open a URL.", "parameters": {
        "type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}},
    {"type": "function", "function": {"name": "browser_type", "description": "Type into a field.", "parameters": {
        "type": "object", "properties": {
            "ref": {"type": "string"}, "text": {"type": "string"},
            "submit": {"type": "boolean", "default": False}, "slowly": {"type": "boolean"}},
        "required": ["ref", "text"]}}},
]


def score(reference_arguments: dict, predicted_arguments: dict, name: str) -> dict:
    reference = {"role": "assistant", "content": "", "tool_calls": [make_tool_call(name, reference_arguments)]}
    text = f"<tool_call>\n{json.dumps({'name': name, 'arguments': predicted_arguments})}\n</tool_call>"
    return score_step(reference, parse_assistant_text(text), TOOLS)


@pytest.mark.parametrize("reference, predicted", [
    ("https://trelis.com/", "https://trelis.com"),
    ("https://trelis.com", "https://trelis.com/"),
    ("https://trelis.com/blog/", "https://trelis.com/blog"),
    ("https://Trelis.COM/", "HTTPS://trelis.com"),
    ("https://trelis.com:443/", "https://trelis.com"),
    ("http://localhost:8000/shop/", "http://localhost:8000/shop"),
    ("https://trelis.com/?q=1", "https://trelis.com?q=1"),
])
def test_urls_that_open_the_same_page_match(reference, predicted):
    result = score({"url": reference}, {"url": predicted}, "browser_navigate")
    assert (result["arguments"], result["passed"], result["reasons"]) == (True, True, [])


@pytest.mark.parametrize("reference, predicted", [
    ("https://trelis.com/blog", "https://trelis.com/about"),
    ("https://trelis.com/", "https://trelis.com/blog"),
    ("https://trelis.com/", "https://trelis.org/"),
    ("http://localhost:8000/", "http://localhost:8001/"),
    ("https://trelis.com/?q=1", "https://trelis.com/?q=2"),
    ("https://trelis.com/a/b", "https://trelis.com/a"),
])
def test_urls_of_other_pages_still_fail(reference, predicted):
    result = score({"url": reference}, {"url": predicted}, "browser_navigate")
    assert not result["passed"]
    assert result["reasons"] == [f"browser_navigate: url: expected {reference!r}, got {predicted!r}"]


def test_url_normalisation_leaves_other_text_alone():
    assert normalize_url("https://Trelis.com:443/") == "https://trelis.com"
    assert normalize_url("http://trelis.com:80/blog/") == "http://trelis.com/blog"
    assert normalize_url("http://trelis.com:8080/") == "http://trelis.com:8080"
    assert normalize_url("a path/") == "a path/"  # not a URL: kept as written
    assert normalize_url("https://[::1/") == "https://[::1/"  # unparseable: compared as text


def test_optional_parameter_stated_with_its_default_matches_either_way():
    reference = {"ref": "e12", "text": "laptop"}
    stated = score(reference, {"ref": "e12", "text": "laptop", "submit": False}, "browser_type")
    assert (stated["arguments"], stated["reasons"]) == (True, [])
    mirror = score({**reference, "submit": False}, reference, "browser_type")
    assert (mirror["arguments"], mirror["reasons"]) == (True, [])


@pytest.mark.parametrize("predicted, reason", [
    ({"ref": "e12", "text": "laptop", "submit": True}, "browser_type: unexpected argument submit"),
    ({"ref": "e12", "text": "laptop", "submit": 0}, "browser_type: unexpected argument submit"),  # 0 is no boolean
    ({"ref": "e12", "text": "laptop", "slowly": False}, "browser_type: unexpected argument slowly"),  # no default
    ({"ref": "e12", "text": "laptop", "speed": 1}, "browser_type: unexpected argument speed"),  # not in the schema
])
def test_extra_arguments_that_change_the_call_still_fail(predicted, reason):
    result = score({"ref": "e12", "text": "laptop"}, predicted, "browser_type")
    assert (result["arguments"], result["reasons"]) == (False, [reason])


def test_a_stated_default_where_the_reference_chose_otherwise_fails():
    result = score({"ref": "e12", "text": "laptop", "submit": True}, {"ref": "e12", "text": "laptop", "submit": False},
                   "browser_type")
    assert result["reasons"] == ["browser_type: submit: expected True, got False"]
    omitted = score({"ref": "e12", "text": "laptop", "submit": True}, {"ref": "e12", "text": "laptop"}, "browser_type")
    assert omitted["reasons"] == ["browser_type: missing argument submit"]
