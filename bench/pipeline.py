"""Data-core throughput: N synthetic traces shaped like the recorded Playwright ones through import (parse,
normalise, validate, store in SQLite), read back + unroll, and render + tokenize with SmolLM2's real tokenizer.
Each stage prints wall seconds (the best of --repeat runs) and this process's CPU seconds in that run: on a shared
machine the wall time grows with the others' load; CPU time much less so (tokenizing uses both cores).

    .venv/bin/python bench/pipeline.py --n 2000 --repeat 3

A trace: 1-3 user turns, 1-2 navigate steps a turn, each answered by an aria snapshot of 5-16k characters (varied
roles, names, URLs and text, ~3.2 characters per SmolLM2 token like the recorded ones), reasoning on every assistant
message, and the 25-tool Playwright list (~11k characters): ~48-50 KB of JSON a trace (the Trelis traces: ~43 KB).

Goals on 2 cores: import + validate + unroll >= 3,500 traces/s; the whole path >= 355 traces/s (the Trelis
workshop's script loads and unrolls 355 traces/s without rendering or tokenizing).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from mcpft.config import data_dir
from mcpft.dataset import rows_from_traces
from mcpft.ingest import import_paths
from mcpft.models import load_tokenizer
from mcpft.render import render_many
from mcpft.store import Store

GOALS = {"import + validate + unroll": 3_500, "whole path": 355}  # traces/s
STAGES = {"import + validate (to SQLite)": (0, 1), "read back + unroll": (1, 2), "import + validate + unroll": (0, 2),
          "render + tokenize": (2, 3), "whole path": (0, 3)}  # between which time marks

ELEMENT = "Human-readable element description used to obtain permission to interact with the element"
REF = "Exact target element reference from the page snapshot"
# The Playwright MCP server's 25 browser tools as the recorded traces list them: (name, description,
# {property: (type, description)}, required). A trace carries its tool list, ~11k characters of JSON.
PLAYWRIGHT_TOOLS = [
    ("browser_close", "Close the page", {}, []),
    ("browser_resize", "Resize the browser window", {"width": ("number", "Width of the browser window"),
                                                     "height": ("number", "Height of the browser window")},
     ["width", "height"]),
    ("browser_console_messages", "Returns all console messages", {}, []),
    ("browser_handle_dialog", "Handle a dialog", {
        "accept": ("boolean", "Whether to accept the dialog."),
        "promptText": ("string", "The text of the prompt in case of a prompt dialog.")}, ["accept"]),
    ("browser_file_upload", "Upload one or multiple files", {"paths": (
        "array", "The absolute paths to the files to upload. Can be a single file or multiple files.")}, ["paths"]),
    ("browser_install", "Install the browser specified in the config. Call this if you get an error about the "
                        "browser not being installed.", {}, []),
    ("browser_press_key", "Press a key on the keyboard", {"key": (
        "string", "Name of the key to press or a character to generate, such as `ArrowLeft` or `a`")}, ["key"]),
    ("browser_navigate", "Navigate to a URL", {"url": ("string", "The URL to navigate to")}, ["url"]),
    ("browser_navigate_back", "Go back to the previous page", {}, []),
    ("browser_navigate_forward", "Go forward to the next page", {}, []),
    ("browser_network_requests", "Returns all network requests since loading the page", {}, []),
    ("browser_pdf_save", "Save page as PDF", {"filename": (
        "string", "File name to save the pdf to. Defaults to `page-{timestamp}.pdf` if not specified.")}, []),
    ("browser_take_screenshot", "Take a screenshot of the current page. You can't perform actions based on the "
                                "screenshot, use browser_snapshot for actions.", {
        "raw": ("boolean", "Whether to return without compression (in PNG format). Default is false, which returns "
                           "a JPEG image."),
        "filename": ("string", "File name to save the screenshot to. Defaults to `page-{timestamp}.{png|jpeg}` if "
                               "not specified."),
        "element": ("string", "Human-readable element description used to obtain permission to screenshot the "
                              "element. If not provided, the screenshot will be taken of viewport. If element is "
                              "provided, ref must be provided too."),
        "ref": ("string", "Exact target element reference from the page snapshot. If not provided, the screenshot "
                          "will be taken of viewport. If ref is provided, element must be provided too.")}, []),
    ("browser_snapshot", "Capture accessibility snapshot of the current page, this is better than screenshot", {},
     []),
    ("browser_click", "Perform click on a web page", {"element": ("string", ELEMENT), "ref": ("string", REF)},
     ["element", "ref"]),
    ("browser_drag", "Perform drag and drop between two elements", {
        "startElement": ("string", "Human-readable source element description used to obtain the permission to "
                                   "interact with the element"),
        "startRef": ("string", "Exact source element reference from the page snapshot"),
        "endElement": ("string", "Human-readable target element description used to obtain the permission to "
                                 "interact with the element"),
        "endRef": ("string", "Exact target element reference from the page snapshot")},
     ["startElement", "startRef", "endElement", "endRef"]),
    ("browser_hover", "Hover over element on page", {"element": ("string", ELEMENT), "ref": ("string", REF)},
     ["element", "ref"]),
    ("browser_type", "Type text into editable element", {
        "element": ("string", ELEMENT), "ref": ("string", REF), "text": ("string", "Text to type into the element"),
        "submit": ("boolean", "Whether to submit entered text (press Enter after)"),
        "slowly": ("boolean", "Whether to type one character at a time. Useful for triggering key handlers in the "
                              "page. By default entire text is filled in at once.")}, ["element", "ref", "text"]),
    ("browser_select_option", "Select an option in a dropdown", {
        "element": ("string", ELEMENT), "ref": ("string", REF),
        "values": ("array", "Array of values to select in the dropdown. This can be a single value or multiple "
                            "values.")}, ["element", "ref", "values"]),
    ("browser_tab_list", "List browser tabs", {}, []),
    ("browser_tab_new", "Open a new tab", {"url": (
        "string", "The URL to navigate to in the new tab. If not provided, the new tab will be blank.")}, []),
    ("browser_tab_select", "Select a tab by index", {"index": ("number", "The index of the tab to select")},
     ["index"]),
    ("browser_tab_close", "Close a tab", {"index": (
        "number", "The index of the tab to close. Closes current tab if not provided.")}, []),
    ("browser_generate_playwright_test", "Generate a Playwright test for given scenario", {
        "name": ("string", "The name of the test"), "description": ("string", "The description of the test"),
        "steps": ("array", "The steps of the test")}, ["name", "description", "steps"]),
    ("browser_wait_for", "Wait for text to appear or disappear or a specified time to pass", {
        "time": ("number", "The time to wait in seconds"), "text": ("string", "The text to wait for"),
        "textGone": ("string", "The text to wait for to disappear")}, []),
]

# Words of page text, link titles and reasoning: varied enough that the tokenizer sees real-looking text
# (SmolLM2 reads the recorded snapshots at ~3.2 characters per token).
WORDS = """the of and to in for on with about from how what why new your our all more most best guide
research tools tutorials language models fine tuning training data agent agents browser page pages site search
results article articles post posts news blog home about contact privacy terms policy cookie settings account sign
login subscribe newsletter free trial pricing plans features product products service services support help center
documentation docs api reference examples quick start install download release notes changelog community forum
discussion questions answers events webinar video videos course courses lesson lessons chapter week month year
today yesterday latest popular trending featured recommended related previous next first last open source python
javascript typescript rust model inference evaluation benchmark dataset datasets prompt prompts reasoning tool calls
function functions server servers client clients deployment cloud local machine learning deep neural network
transformer attention memory context window tokens token speed cost price cheap fast small large medium team
company careers jobs press partners customers stories case study studies report reports paper papers approach
approaches method methods results summary overview introduction conclusion solving puzzle puzzles abstraction
program synthesis test time domain specific languages shop cart checkout order orders delivery shipping returns
refund size color colour stock available sold out add remove quantity total subtotal discount coupon code
weather forecast city cities hotel hotels flight flights booking book table restaurant menu lunch dinner reviews
rating stars map directions opening hours phone email address street road london paris berlin tokyo york
""".split()
ROLES_WITH_TEXT = ("paragraph", "text", "generic", "listitem", "cell", "strong", "emphasis")
CONTAINERS = ("generic", "list", "listitem", "navigation", "main", "article", "region", "banner", "contentinfo",
              "section", "group", "row")
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def tools() -> list[dict]:
    return [{"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {key: {"type": kind, "description": text} for key, (kind, text)
                                         in properties.items()},
        "required": required, "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}}
        for name, description, properties, required in PLAYWRIGHT_TOOLS]


def phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def title(rng: random.Random, low: int = 2, high: int = 6) -> str:
    return " ".join(word.capitalize() if rng.random() < 0.6 else word for word in phrase(rng, low, high).split())


def url(rng: random.Random, site: str) -> str:
    return f"https://{site}/" + "/".join("-".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in
                                         range(rng.randint(0, 2)))


def aria_lines(rng: random.Random, site: str, target: int) -> list[str]:
    """An aria snapshot's lines as Playwright writes them: a tree of roles with names, refs, URLs and text."""
    lines, size, ref, depth = [], 0, 1, 0
    while size < target:
        ref += 1
        pad, kind = "  " * depth, rng.random()
        pointer = " [cursor=pointer]" if rng.random() < 0.3 else ""
        if kind < 0.25:
            line = f"{pad}- {rng.choice(CONTAINERS)} [ref=e{ref}]{pointer}:"
            depth = min(depth + 1, 12)
        elif kind < 0.45:
            line = (f'{pad}- link "{title(rng)}" [ref=e{ref}] [cursor=pointer]:\n'
                    f"{pad}  - /url: {url(rng, site)}")
        elif kind < 0.65:
            line = f"{pad}- {rng.choice(ROLES_WITH_TEXT)} [ref=e{ref}]{pointer}: {phrase(rng, 2, 12).capitalize()}."
        elif kind < 0.72:
            line = f'{pad}- heading "{title(rng)}" [level={rng.randint(1, 4)}] [ref=e{ref}]'
        elif kind < 0.80:
            line = f'{pad}- button "{title(rng, 1, 3)}" [ref=e{ref}] [cursor=pointer]'
        elif kind < 0.86:
            line = f'{pad}- img "{title(rng, 1, 4)}" [ref=e{ref}]{pointer}'
        elif kind < 0.90:
            line = f"{pad}- time [ref=e{ref}]: {rng.choice(MONTHS)} {rng.randint(1, 28)}"
        elif kind < 0.93:
            line = f'{pad}- textbox "{title(rng, 1, 2)}" [ref=e{ref}]'
        else:
            line = f"{pad}- text: {phrase(rng, 2, 10)}"
        if rng.random() < 0.3:
            depth = max(depth - rng.randint(1, 3), 1)
        lines.append(line)
        size += len(line) + 1
    return lines


def snapshot(rng: random.Random, site: str) -> str:
    """A navigate tool result as the recorded Playwright server returned it: code, URL, title, 5-16k characters."""
    page = url(rng, site)
    head = (f"- Ran Playwright code:\n```js\n// Navigate to {page}\nawait page.goto('{page}');\n```\n\n"
            f"- Page URL: {page}\n- Page Title: {title(rng)} | {site}\n- Page Snapshot\n```yaml\n")
    target = rng.randint(5_000, 16_000) - len(head) - 200  # lines overshoot the target by up to ~200
    return head + "\n".join(aria_lines(rng, site, target)) + "\n```"


def reasoning(rng: random.Random, task: str) -> str:
    """200-1,500 characters of thinking in the recorded model's manner."""
    sentences = [f"Okay, the user wants me to {task}. Let me think about how to approach this."]
    length = rng.randint(200, 1_500)
    while sum(map(len, sentences)) < length:
        sentences.append(rng.choice((
            "First, I need to check which functions are available, like browser_navigate and browser_snapshot.",
            f"Looking at the tool response, there is a section about {phrase(rng, 2, 5)}.",
            f"The snapshot shows a link titled \"{title(rng)}\" with ref e{rng.randint(2, 400)}.",
            f"Maybe the {phrase(rng, 1, 3)} is on the {phrase(rng, 1, 2)} page, so I should navigate there.",
            f"Wait, the user asked for {phrase(rng, 2, 6)}, not {phrase(rng, 2, 4)}.",
            f"Hmm. {phrase(rng, 4, 14).capitalize()}.",
        )))
    return "\n" + "\n\n".join(sentences) + "\n"


def synthetic_trace(rng: random.Random) -> dict:
    """One conversation in the Trelis recorder's format: 1-3 user turns of 1-2 navigate steps and an answer."""
    site = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}.example"
    messages = []
    for _ in range(rng.randint(1, 3)):
        task = f"go to {site} and find the {phrase(rng, 1, 3)} about {title(rng, 1, 3)}"
        messages.append({"role": "user", "content": task})
        for step in range(rng.randint(1, 2)):
            call_id = f"chatcmpl-tool-{rng.getrandbits(128):032x}"
            arguments = {"url": url(rng, site)}
            messages.append({"role": "assistant", "content": "\n\n", "reasoning_content": reasoning(rng, task),
                             "tool_calls": [{"id": call_id, "type": "function", "function": {
                                 "name": "browser_navigate",
                                 "arguments": arguments if step else json.dumps(arguments)}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": snapshot(rng, site)})
        messages.append({"role": "assistant", "content": f"\n\nThe {phrase(rng, 1, 3)} is **{title(rng)}**.",
                         "reasoning_content": reasoning(rng, task)})
    minutes, second = divmod(rng.randrange(86_400), 60)
    return {"timestamp": f"202505{rng.randint(10, 28)}_{minutes // 60:02}{minutes % 60:02}{second:02}",
            "model": "Qwen/Qwen3-30B-A3B-FP8", "messages": messages, "tools": tools()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=1, help="runs; each stage reports its best (a shared machine)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mcpft-bench-"))
    source = work / "traces.jsonl"
    rng = random.Random(0)
    traces = [synthetic_trace(rng) for _ in range(args.n)]
    source.write_text("".join(json.dumps(trace) + "\n" for trace in traces))
    tokenizer = load_tokenizer(None, data_dir())
    results = [run_once(tokenizer, source, work / f"bench-{run}.db", args.max_length) for run in range(args.repeat)]
    n, rows, rendered = results[-1][1:]
    if n != args.n:
        raise SystemExit(f"only {n} of {args.n} traces were imported: the generator makes invalid traces")
    tokens = sum(r.n_tokens for r in rendered)
    results_text = [m["content"] for trace in traces[:50] for m in trace["messages"] if m["role"] == "tool"]
    results_tokens = sum(len(ids) for ids in tokenizer(results_text, add_special_tokens=False)["input_ids"])
    print(f"traces: {n} ({source.stat().st_size / n / 1000:.0f} KB of JSON a trace; tool results "
          f"{sum(map(len, results_text)) / results_tokens:.1f} characters a token), {len(rows)} rows, "
          f"{tokens:,} tokens ({tokens / len(rows):,.0f} a row), {sum(r.over_length for r in rendered)} over "
          f"{args.max_length}; best of {args.repeat} run(s)")
    print(f"{'stage':30} {'seconds':>8} {'CPU s':>7} {'traces/s':>9} {'goal':>7}")
    for stage in STAGES:
        wall, cpu = min((result[0][stage] for result in results), key=lambda pair: pair[0])
        goal = f"{GOALS[stage]:7,}" if stage in GOALS else ""
        print(f"{stage:30} {wall:8.2f} {cpu:7.2f} {n / wall:9,.0f} {goal}")


def run_once(tokenizer, source: Path, db: Path, max_length: int):
    """(wall, CPU) seconds per stage, the number of traces imported, the rows and their rendering."""
    marks = [(time.perf_counter(), time.process_time())]  # CPU time of all this process's threads
    with Store(db) as store:
        report = import_paths(store, [source])
        marks.append((time.perf_counter(), time.process_time()))
        rows = rows_from_traces(store.traces())
        marks.append((time.perf_counter(), time.process_time()))
    rendered = render_many(tokenizer, rows, max_length=max_length)
    marks.append((time.perf_counter(), time.process_time()))
    seconds = {stage: tuple(b - a for a, b in zip(marks[start], marks[end])) for stage, (start, end) in STAGES.items()}
    return seconds, len(report.imported), rows, rendered


if __name__ == "__main__":
    main()
