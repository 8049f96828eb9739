"""Step-level scores, as the Berkeley Function-Calling Leaderboard (BFCL) computes them, on held-out rows.

Every trained assistant message of a row is one step; its prompt is the messages before it, with the row's tools.
The model answers the prompt (greedy, in-process or through any OpenAI-compatible endpoint), its text is parsed as
Hermes, and the answer is compared with the recorded message:

- call steps (the reference calls tools):
  - `valid_call`: the output holds at least one call and no malformed `<tool_call>` block;
  - `tool_name`: the multiset of called names equals the reference's (parallel calls in any order);
  - `arguments`: the calls can be paired one to one with the reference's (same name, arguments match). Arguments match
    when every reference key is present (a key may be left out only when the reference value is the schema's
    `default`), no other key is there ("unexpected", unless its value is the schema's `default`: stating an optional
    parameter's default changes nothing), and values are equal after normalisation: strings stripped, runs of
    whitespace collapsed and case-folded, URLs with their default port and a trailing slash of the path dropped
    (`https://trelis.com/` == `https://trelis.com`, `/blog/` == `/blog`, but `/blog` != `/about`); numbers compared
    as numbers (3 == 3.0, "3" != 3); booleans exactly (True != 1); lists element by element in order; objects key by
    key; null only equals null.
- answer steps (the reference calls nothing):
  - `irrelevance`: the model called nothing (a malformed call attempt counts as a call);
  - `answer_match`: the reference text, normalised (case-folded, every non-alphanumeric character a space, whitespace
    collapsed), is contained in the output's normalised content, or their token F1 is at least 0.5; and every number
    of the reference is in the output (compared as values, thousands commas dropped: "$1,299.00" matches "1299").
A step passes when its arguments match (call step) or when it called nothing and its answer matches (answer step).

Prompts whose tokens plus `max_new_tokens` exceed the model's context, or that an endpoint refuses as longer than its
context, are not cut: they are counted as `too_long` and left out of every rate. A rate with nothing to count is
`None`.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mcpft.hermes import ParsedAssistant, format_assistant_text, parse_assistant_text, tool_calls_end
from mcpft.models import explain_out_of_memory
from mcpft.render import row_tools
from mcpft.trace import now_iso
from mcpft.selection import rows_problem
from mcpft.train import load_adapter_model

DEFAULT_MAX_NEW_TOKENS = 512
ANSWER_F1_THRESHOLD = 0.5
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")  # 1,299.00 | 1299 | 3.5
URL_WITH_HOST = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#]+\S*", re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}
RATES = ("valid_call_rate", "tool_name_accuracy", "argument_accuracy", "irrelevance_accuracy", "answer_accuracy",
         "pass_rate")
RATE_WORDS = {  # each rate as a person who never read BFCL's paper would name it
    "valid_call_rate": "Tool calls written correctly", "tool_name_accuracy": "Right tool chosen",
    "argument_accuracy": "Right arguments", "irrelevance_accuracy": "No tool call where none was needed",
    "answer_accuracy": "Right final answer", "pass_rate": "Steps passed"}


class EvaluationError(Exception):
    """The evaluation cannot run (a bad model or endpoint, unusable rows); the message says which step or setting."""


# ---------------------------------------------------------------------------------------------------------------
# Steps


@dataclass
class Step:
    row_id: str
    trace_id: str
    index: int  # the assistant message's index in the row's messages
    prefix: list[dict]
    tools: list[dict] | None
    reference: dict

    @property
    def key(self) -> str:
        return f"{self.row_id}#{self.index}"


def steps_from_rows(rows: list[dict]) -> list[Step]:
    """One step per trained assistant message (`train` not false), prompted with the messages before it."""
    if problem := rows_problem(rows):
        raise EvaluationError(f"held-out rows: {problem}")
    steps = []
    for r, row in enumerate(rows):
        row_id = str(row.get("id", r))
        tools = row_tools(row, f"row {row_id!r}")
        messages = [{k: v for k, v in m.items() if k != "train"} for m in row.get("messages") or []]
        for i, message in enumerate(row.get("messages") or []):
            if message.get("role") == "assistant" and message.get("train") is not False and i > 0:
                steps.append(Step(row_id=row_id, trace_id=str(row.get("trace_id", row_id)), index=i,
                                  prefix=messages[:i], tools=tools, reference=messages[i]))
    if not steps:
        raise EvaluationError(f"the {len(rows)} held-out row(s) hold no trained assistant message to score")
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Scoring one step


def _reference_calls(message: dict) -> list[tuple[str, object]]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or call
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # kept as text: no prediction can match it, which the scores show
        calls.append((function.get("name", ""), arguments))
    return calls


def _schemas(tools: list[dict] | None) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]}


def normalize_string(text: str) -> str:
    return " ".join(normalize_url(text.strip()).split()).casefold()


def normalize_url(text: str) -> str:
    """A URL as the page it opens: scheme and host lower-cased, the scheme's default port and one trailing slash of
    the path dropped (`https://Trelis.com:443/` -> `https://trelis.com`); any other text as it is."""
    if not URL_WITH_HOST.fullmatch(text):
        return text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # not a URL after all (a broken IPv6 host, a port that is no number): compare it as text
        return text
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    if port is not None and port == DEFAULT_PORTS.get(scheme):
        netloc = netloc.rpartition(":")[0]
    path = parts.path.removesuffix("/")  # `/` and `` open the same page; so do `/blog/` and `/blog` on real sites
    return urlunsplit((scheme, netloc, path, parts.query, parts.fragment))


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def value_problems(predicted, reference, where: str) -> list[str]:
    """Why `predicted` does not equal `reference` under the normalisation in the module doc (empty: equal)."""
    if _type_name(predicted) != _type_name(reference):
        return [f"{where}: expected {_type_name(reference)} {reference!r}, got {_type_name(predicted)} {predicted!r}"]
    if isinstance(reference, bool) or reference is None:
        equal = predicted == reference
    elif isinstance(reference, (int, float)):
        equal = math.isclose(predicted, reference, rel_tol=1e-9, abs_tol=1e-12)
    elif isinstance(reference, str):
        equal = normalize_string(predicted) == normalize_string(reference)
    elif isinstance(reference, list):
        if len(predicted) != len(reference):
            return [f"{where}: expected {len(reference)} items, got {len(predicted)}"]
        return [p for i, (a, b) in enumerate(zip(predicted, reference)) for p in value_problems(a, b, f"{where}[{i}]")]
    else:
        return object_problems(predicted, reference, {}, where)
    return [] if equal else [f"{where}: expected {reference!r}, got {predicted!r}"]


def _is_default(value, key: str, schema: dict) -> bool:
    """Whether `value` is the schema's `default` for parameter `key` (leaving it out would mean the same)."""
    parameter = (schema.get("properties") or {}).get(key)
    if not isinstance(parameter, dict) or "default" not in parameter:
        return False
    return not value_problems(value, parameter["default"], key)


def object_problems(predicted: dict, reference: dict, schema: dict, where: str = "") -> list[str]:
    """Missing and unexpected keys, then unequal values. As BFCL's possible answers allow, an optional parameter
    stated with its default matches one left out, whichever side states it."""
    prefix = f"{where}." if where else ""
    problems = [f"missing argument {prefix}{key}" for key, value in reference.items()
                if key not in predicted and not _is_default(value, key, schema)]
    problems += [f"unexpected argument {prefix}{key}" for key, value in predicted.items()
                 if key not in reference and not _is_default(value, key, schema)]
    for key in [k for k in reference if k in predicted]:
        problems += value_problems(predicted[key], reference[key], f"{prefix}{key}")
    return problems


def call_problems(predicted: tuple[str, object], reference: tuple[str, object], schemas: dict) -> list[str]:
    (p_name, p_args), (r_name, r_args) = predicted, reference
    if p_name != r_name:
        return [f"called {p_name}, expected {r_name}"]
    if not isinstance(r_args, dict):
        return [f"{r_name}: the reference's arguments are not a JSON object"]
    return [f"{r_name}: {p}" for p in object_problems(p_args, r_args, schemas.get(r_name, {}))]


def _match_calls(predicted: list, reference: list, schemas: dict) -> tuple[bool, list[str]]:
    """Whether the calls pair up one to one (any order); else the problems of the closest pairing."""
    if len(predicted) != len(reference):
        return False, [f"{len(predicted)} call(s), expected {len(reference)}"]
    problems = [[call_problems(p, r, schemas) for r in reference] for p in predicted]

    def pair(i: int, used: frozenset) -> bool:
        return i == len(predicted) or any(
            not problems[i][j] and pair(i + 1, used | {j}) for j in range(len(reference)) if j not in used)

    if pair(0, frozenset()):
        return True, []
    # Explain each reference call nothing matches by the unmatched prediction closest to it (fewest problems).
    spare = [i for i in range(len(predicted)) if all(problems[i][j] for j in range(len(reference)))]
    reasons = []
    for j in range(len(reference)):
        if spare and all(problems[i][j] for i in range(len(predicted))):
            reasons += min((problems[i][j] for i in spare), key=len)
    return False, reasons or ["the calls cannot be paired one to one with the reference's"]


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w]|_", " ", text.casefold()).split())


def token_f1(predicted: str, reference: str) -> float:
    p_tokens, r_tokens = normalize_answer(predicted).split(), normalize_answer(reference).split()
    common = sum((Counter(p_tokens) & Counter(r_tokens)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p_tokens), common / len(r_tokens)
    return 2 * precision * recall / (precision + recall)


def _number_value(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def missing_numbers(predicted: str, reference: str) -> list[str]:
    """The reference's numbers (as written there) whose value is not among the answer's numbers."""
    found = {_number_value(n) for n in NUMBER.findall(predicted)}
    return [n for n in dict.fromkeys(NUMBER.findall(reference)) if _number_value(n) not in found]


def answer_problem(predicted: str, reference: str) -> str | None:
    """Why the answer does not match the reference (see the module doc), or None when it does. An empty reference
    needs an empty answer; a text match with a wrong number is no match ("$249.00" for "$129.00")."""
    p_norm, r_norm = normalize_answer(predicted), normalize_answer(reference)
    if not r_norm:
        return "the answer does not match" if p_norm else None
    if f" {r_norm} " not in f" {p_norm} " and token_f1(predicted, reference) < ANSWER_F1_THRESHOLD:
        return "the answer does not match"
    missing = missing_numbers(predicted, reference)
    return f"the answer lacks the reference's number(s) {', '.join(missing)}" if missing else None


def answer_matches(predicted: str, reference: str) -> bool:
    return answer_problem(predicted, reference) is None


def score_step(reference: dict, parsed: ParsedAssistant, tools: list[dict] | None = None) -> dict:
    """The step's scores (see the module doc) and, when it fails, the reasons."""
    reference_calls = _reference_calls(reference)
    predicted = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]
    malformed = [f for f in parsed.flags if f.startswith("malformed tool call")]
    if not reference_calls:
        no_call = not predicted and not malformed
        problem = answer_problem(parsed.content, reference.get("content") or "")
        reasons = ([] if no_call else [f"called {', '.join(n for n, _ in predicted) or 'a malformed tool call'}, "
                                       "expected no call"]) + ([problem] if problem else [])
        return {"kind": "answer", "irrelevance": no_call, "answer_match": problem is None,
                "passed": no_call and problem is None, "reasons": reasons}
    valid = bool(predicted) and not malformed
    names = valid and Counter(n for n, _ in predicted) == Counter(n for n, _ in reference_calls)
    arguments, reasons = _match_calls(predicted, reference_calls, _schemas(tools)) if names else (False, [])
    if not valid:
        reasons = malformed or ["no tool call, expected " + ", ".join(n for n, _ in reference_calls)]
    elif not names:
        reasons = [f"called {', '.join(sorted(n for n, _ in predicted))}, expected "
                   f"{', '.join(sorted(n for n, _ in reference_calls))}"]
    return {"kind": "call", "valid_call": valid, "tool_name": names, "arguments": arguments, "passed": arguments,
            "reasons": reasons}


# ---------------------------------------------------------------------------------------------------------------
# Generators: a local model, or an OpenAI-compatible endpoint


@dataclass
class Output:
    text: str  # what the model wrote, as Hermes text (reasoning, content, calls)
    parsed: ParsedAssistant


class LocalGenerator:
    """Greedy generation with a transformers model (a PeftModel for an adapter) and its tokenizer, through
    `mcpft.inference.Engine`: steps are scored in order, so each step of a trace prefills only what it adds to the
    one before. A reply ends at the end-of-turn token or once its Hermes tool calls are complete."""

    def __init__(self, model, tokenizer, name: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, engine=None):
        from mcpft.inference import Engine, end_of_turn_ids

        self.model, self.tokenizer, self.name, self.max_new_tokens = model, tokenizer, name, max_new_tokens
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.eos_ids = end_of_turn_ids(model, tokenizer)
        self.engine = engine or Engine(model)

    def _prompt(self, step: Step) -> str:
        return self.tokenizer.apply_chat_template(step.prefix, tools=step.tools, add_generation_prompt=True,
                                                  tokenize=False)

    def prompt_tokens(self, step: Step) -> int:
        return len(self.tokenizer(self._prompt(step), add_special_tokens=False)["input_ids"])

    def generate(self, step: Step) -> Output:
        prompt = self._prompt(step)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens, text = [], ""
        for token in self.engine.generate(ids, self.max_new_tokens):
            if token in self.eos_ids:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if step.tools and (end := tool_calls_end(text)) is not None:  # the calls are complete
                text = text[:end]
                break
        return Output(text=text, parsed=parse_assistant_text(text, think_opened=prompt.rstrip().endswith("<think>")))


def local_generator(model_spec: str | None = None, adapter: str | Path | None = None, data_dir: Path | None = None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> LocalGenerator:
    """The base model (`model_spec`, None = packaged SmolLM2), or it with a LoRA adapter on top."""
    from mcpft.config import data_dir as default_data_dir
    from mcpft.models import load_model, model_name

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if adapter is None:
        model, tokenizer = load_model(model_spec, data_dir)
        return LocalGenerator(model, tokenizer, model_name(model_spec), max_new_tokens)
    model, tokenizer = load_adapter_model(adapter, model_spec, data_dir)
    return LocalGenerator(model, tokenizer, Path(adapter).resolve().name, max_new_tokens)


class EndpointGenerator:
    """Greedy chat completions from an OpenAI-compatible endpoint (vLLM, `mcpft serve`, ...).

    Tool calls come from the reply's `tool_calls`; a reply without them whose content holds Hermes call text (a
    server without a tool parser) is parsed here. A prompt the server refuses as longer than its context (the 400
    "maximum context length is N tokens" of vLLM and `mcpft serve`) counts as too long. With `tokenizer` and
    `context_length` the prompt is counted here first, so that prompt + `max_new_tokens` beyond the context counts as
    too long too, rather than the server quietly shortening the answer's budget.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, tokenizer=None, context_length: int | None = None,
                 timeout: float = 600.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=1)
        self.name, self.max_new_tokens = model, max_new_tokens
        self.tokenizer, self.context_length = tokenizer, context_length

    def prompt_tokens(self, step: Step) -> int | None:
        if self.tokenizer is None:
            return None
        prompt = self.tokenizer.apply_chat_template(step.prefix, tools=step.tools, add_generation_prompt=True,
                                                    tokenize=False)
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(self, step: Step) -> Output:
        import openai

        request = {"model": self.name, "messages": step.prefix, "temperature": 0, "max_tokens": self.max_new_tokens}
        if step.tools:
            request["tools"] = step.tools
        try:
            reply = self.client.chat.completions.create(**request)
        except openai.BadRequestError as error:
            if _context_exceeded(error):
                raise _TooLong(str(error)) from None
            raise EvaluationError(f"step {step.key}: the endpoint refused the request: {error}") from None
        except openai.APIError as error:
            raise EvaluationError(f"step {step.key}: the endpoint failed: {error}") from None
        message = reply.choices[0].message
        reasoning = getattr(message, "reasoning_content", None) or (message.model_extra or {}).get("reasoning") or ""
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                "arguments": c.function.arguments or "{}"}}
                 for c in message.tool_calls or []]
        if calls:
            parsed = ParsedAssistant(content=(message.content or "").strip(), reasoning=reasoning,
                                     tool_calls=_json_calls(calls))
        else:
            parsed = parse_assistant_text(message.content or "")
            parsed.reasoning = parsed.reasoning or reasoning
        text = format_assistant_text(parsed.content, parsed.reasoning, parsed.tool_calls or None)
        return Output(text=text, parsed=parsed)


def _json_calls(calls: list[dict]) -> list[dict]:
    """Calls whose arguments are not a JSON object are kept as a malformed flag's subject, not as calls."""
    good = []
    for call in calls:
        try:
            if isinstance(json.loads(call["function"]["arguments"]), dict):
                good.append(call)
        except json.JSONDecodeError:
            pass
    return good


class _TooLong(Exception):
    """The endpoint said the prompt does not fit its context."""


def _context_exceeded(error) -> bool:
    """A 400 saying the prompt exceeds the context: vLLM's and `mcpft serve`'s wording, or OpenAI's error code."""
    return error.code == "context_length_exceeded" or "maximum context length" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# Running an evaluation


def evaluate_rows(rows: list[dict], generator, on_step: Callable[[int, int, dict], None] | None = None,
                  stop_event: threading.Event | None = None) -> dict:
    """Score every step of `rows` with `generator` (LocalGenerator or EndpointGenerator); the report as a dict."""
    steps = steps_from_rows(rows)
    records = []
    for n, step in enumerate(steps, 1):
        if stop_event is not None and stop_event.is_set():
            break
        records.append(_evaluate_step(step, generator))
        if on_step:
            on_step(n, len(steps), records[-1])
    return build_report(records, model=generator.name, settings={"max_new_tokens": generator.max_new_tokens,
                                                                 "context_length": generator.context_length,
                                                                 "stopped_early": len(records) < len(steps)})


def _evaluate_step(step: Step, generator) -> dict:
    record = {"row_id": step.row_id, "trace_id": step.trace_id, "index": step.index, "prompt": _last_user(step),
              "reference": _message_view(step.reference)}
    prompt_tokens = generator.prompt_tokens(step)
    record["prompt_tokens"] = prompt_tokens
    context = generator.context_length
    if prompt_tokens is not None and context and prompt_tokens + generator.max_new_tokens > context:
        return {**record, "too_long": True, "kind": _kind(step.reference), "passed": False,
                "reasons": [f"prompt of {prompt_tokens} tokens + {generator.max_new_tokens} new tokens exceeds the "
                            f"context of {context}"]}
    doing = f"generating step {step.key}" + (f" ({prompt_tokens} prompt tokens)" if prompt_tokens is not None else "")
    try:
        with explain_out_of_memory(doing, f"Lower max_new_tokens (now {generator.max_new_tokens}), leave the longest "
                                          "held-out rows out, or evaluate a smaller model."):
            output = generator.generate(step)
    except _TooLong as error:
        return {**record, "too_long": True, "kind": _kind(step.reference), "passed": False, "reasons": [str(error)]}
    parsed = output.parsed
    scores = score_step(step.reference, parsed, step.tools)
    return {**record, "too_long": False, "output": {
        "text": output.text, "content": parsed.content, "reasoning": parsed.reasoning,
        "tool_calls": [_call_view(c) for c in parsed.tool_calls], "flags": list(parsed.flags)}, **scores}


def _kind(reference: dict) -> str:
    return "call" if reference.get("tool_calls") else "answer"


def _last_user(step: Step) -> str:
    return next((m.get("content") or "" for m in reversed(step.prefix) if m.get("role") == "user"), "")


def _call_view(call: dict) -> dict:
    function = call.get("function") or call
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": function.get("name"), "arguments": arguments}


def _message_view(message: dict) -> dict:
    return {"content": message.get("content") or "", "tool_calls": [_call_view(c) for c in message.get("tool_calls")
                                                                     or []]}


def _rate(records: list[dict], key: str) -> float | None:
    return sum(bool(r[key]) for r in records) / len(records) if records else None


def totals(records: list[dict]) -> dict:
    """The report's counts and rates over `records` (too-long steps are counted, never scored)."""
    scored = [r for r in records if not r.get("too_long")]
    calls = [r for r in scored if r["kind"] == "call"]
    answers = [r for r in scored if r["kind"] == "answer"]
    return {"steps": len(records), "scored": len(scored), "too_long": len(records) - len(scored),
            "call_steps": len(calls), "answer_steps": len(answers),
            "valid_call_rate": _rate(calls, "valid_call"), "tool_name_accuracy": _rate(calls, "tool_name"),
            "argument_accuracy": _rate(calls, "arguments"), "irrelevance_accuracy": _rate(answers, "irrelevance"),
            "answer_accuracy": _rate(answers, "answer_match"), "pass_rate": _rate(scored, "passed")}


def build_report(records: list[dict], model: str = "", settings: dict | None = None) -> dict:
    by_trace = defaultdict(list)
    for record in records:
        by_trace[record["trace_id"]].append(record)
    return {"model": model, "created": now_iso(), "settings": settings or {}, "totals": totals(records),
            "traces": {trace_id: totals(items) for trace_id, items in by_trace.items()}, "steps": records}


# ---------------------------------------------------------------------------------------------------------------
# Reading a report: Markdown, and base beside fine-tuned


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _cell(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def verdict(record: dict) -> str:
    return "too long" if record.get("too_long") else "pass" if record.get("passed") else "fail"


def report_markdown(report: dict) -> str:
    t = report["totals"]
    lines = [f"# Step scores: {report.get('model') or 'model'}", "",
             f"{t['steps']} steps ({t['call_steps']} call, {t['answer_steps']} answer, {t['too_long']} too long).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_percent(t[name])} |" for name in RATES]
    lines += ["", "## Per trace", "", "| trace | steps | pass rate | argument accuracy | irrelevance accuracy |",
              "|---|---|---|---|---|"]
    lines += [f"| {_cell(trace_id)} | {s['steps']} | {_percent(s['pass_rate'])} | {_percent(s['argument_accuracy'])} "
              f"| {_percent(s['irrelevance_accuracy'])} |" for trace_id, s in report["traces"].items()]
    lines += ["", "## Per step", "", "| row | step | kind | verdict | reasons |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(r['row_id'])} | {r['index']} | {r['kind']} | {verdict(r)} | {_cell('; '.join(r['reasons']))} |"
              for r in report["steps"]]
    return "\n".join(lines) + "\n"


def compare(base_report: dict, tuned_report: dict) -> dict:
    """Per held-out step, the base model's answer beside the fine-tuned one's, with verdicts and the change."""
    base = {(r["row_id"], r["index"]): r for r in base_report["steps"]}
    tuned = {(r["row_id"], r["index"]): r for r in tuned_report["steps"]}
    if base.keys() != tuned.keys():
        raise EvaluationError(f"the reports cover different steps ({len(base)} vs {len(tuned)}): evaluate both on "
                              "the same held-out rows")
    steps = []
    for key, b in base.items():
        t = tuned[key]
        b_verdict, t_verdict = verdict(b), verdict(t)
        change = ("fixed" if t_verdict == "pass" and b_verdict != "pass" else
                  "broken" if b_verdict == "pass" and t_verdict != "pass" else
                  "both pass" if b_verdict == "pass" else "both fail")
        steps.append({"row_id": b["row_id"], "trace_id": b["trace_id"], "index": b["index"], "kind": b["kind"],
                      "prompt": b["prompt"], "reference": b["reference"],
                      "base": _side(b, b_verdict), "tuned": _side(t, t_verdict), "change": change})
    base_totals, tuned_totals = base_report["totals"], tuned_report["totals"]
    delta = {name: (None if base_totals[name] is None or tuned_totals[name] is None
                    else tuned_totals[name] - base_totals[name]) for name in RATES}
    return {"base_model": base_report.get("model"), "tuned_model": tuned_report.get("model"),
            "totals": {"base": base_totals, "tuned": tuned_totals, "delta": delta},
            "changes": dict(Counter(s["change"] for s in steps)), "steps": steps}


def _side(record: dict, record_verdict: str) -> dict:
    return {"output": (record.get("output") or {}).get("text", ""), "verdict": record_verdict,
            "reasons": record.get("reasons", []), "valid_call": record.get("valid_call")}


SMALL_SAMPLE = 20  # fewer scored steps than this: the verdict says the sample is small


def comparison_sentence(comparison: dict) -> str:
    """The verdict in words, counts first: passed steps, then valid tool calls; a small sample says so."""
    scored = [s for s in comparison["steps"] if s["base"]["verdict"] != "too long"]
    total = len(scored)
    base, tuned = (sum(s[side]["verdict"] == "pass" for s in scored) for side in ("base", "tuned"))
    sentence = f"Fine-tuned passed {tuned} of {total} held-out steps (base {base} of {total})"
    calls = [s for s in scored if s["kind"] == "call"]
    if calls:
        valid = {side: sum(bool(s[side].get("valid_call")) for s in calls) for side in ("base", "tuned")}
        sentence += (f"; valid tool calls in {valid['tuned']} of {len(calls)} call steps "
                     f"(base {valid['base']} of {len(calls)})")
    sentence += "."
    if total < SMALL_SAMPLE:
        sentence += (f" That is a small sample ({total} steps, under {SMALL_SAMPLE}): one step more or less moves a "
                     "rate by several points.")
    return sentence


def compare_markdown(comparison: dict) -> str:
    totals_ = comparison["totals"]
    lines = [f"# {comparison['base_model']} → {comparison['tuned_model']}", "", comparison_sentence(comparison), "",
             "| metric | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {name} | {_percent(totals_['base'][name])} | {_percent(totals_['tuned'][name])} |" for name in RATES]
    lines += ["", "| row | step | base | fine-tuned | change |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(s['row_id'])} | {s['index']} | {s['base']['verdict']} | {s['tuned']['verdict']} | "
              f"{s['change']} |" for s in comparison["steps"]]
    return "\n".join(lines) + "\n"

