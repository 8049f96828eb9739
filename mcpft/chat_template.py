"""Chat templates that render tools: ours (Hermes/ChatML with generation markers) and a Qwen3 one.

`hermes.jinja` is installed on tokenizers whose own template cannot render a tool conversation (SmolLM2's plain
ChatML template drops tools, tool calls and tool roles). `qwen3.jinja` is Qwen3's original template, byte for byte
(as TRL ships it for identity checks), so TRL still recognises a tokenizer that carries it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# A conversation every tool-capable template must render with all four sentinels visible: the tool's definition,
# the call's name, the call's argument value and the tool's result.
_PROBE_DEFINITION = "probe_definition_7c1e"
_PROBE_CALL = "probe_call_3b9d"
_PROBE_ARGUMENT = "probe_argument_5a2f"
_PROBE_RESULT = "probe_result_9e4c"
_PROBE_TOOLS = [
    {"type": "function", "function": {
        "name": _PROBE_DEFINITION, "description": "Probe tool.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}},
]
_PROBE_MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_probe", "type": "function",
         "function": {"name": _PROBE_CALL, "arguments": '{"q": "%s"}' % _PROBE_ARGUMENT}}]},
    {"role": "tool", "tool_call_id": "call_probe", "content": _PROBE_RESULT},
]


@cache
def _template(name: str) -> str:
    return resources.files("mcpft").joinpath("templates", name).read_text(encoding="utf-8")


def hermes_template() -> str:
    """Our Hermes/ChatML template text (tools in `<tools>`, `{% generation %}` around trained assistant turns)."""
    return _template("hermes.jinja")


def qwen3_template() -> str:
    """Qwen3's original chat template text (no generation markers)."""
    return _template("qwen3.jinja")


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool definitions, calls and results (an error counts as no)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=_PROBE_TOOLS, tokenize=False)
    except Exception:  # any template failure (TemplateError, TypeError, KeyError, ...) means it cannot render tools
        return False
    return all(s in text for s in (_PROBE_DEFINITION, _PROBE_CALL, _PROBE_ARGUMENT, _PROBE_RESULT))


def ensure_tool_template(tokenizer) -> bool:
    """Install our Hermes template when the tokenizer's is missing or cannot render tools; True when replaced."""
    if renders_tools(tokenizer):
        return False
    tokenizer.chat_template = hermes_template()
    return True
