"""Data-core throughput: N synthetic traces with real-size tool results (5-16k characters of aria snapshot)
through import (parse, normalise, validate, store), unroll, and render + tokenize with SmolLM2's real tokenizer.

    .venv/bin/python bench/pipeline.py --n 2000

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

TOOLS = [{"type": "function", "function": {"name": n, "description": f"Browser tool {n}", "parameters": {
    "type": "object", "properties": {"url": {"type": "string"}, "ref": {"type": "string"}}}}}
    for n in ("browser_navigate", "browser_click", "browser_snapshot", "browser_type")]
WORDS = "link button heading text generic list listitem img paragraph navigation main cursor pointer".split()


def snapshot(rng: random.Random) -> str:
    lines, size, target = [], 0, rng.randint(5_000, 16_000)
    while size < target:
        line = f'{"  " * rng.randint(0, 6)}- {rng.choice(WORDS)} "{" ".join(rng.choices(WORDS, k=3))}" [ref=e{rng.randint(1, 999)}]'
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def synthetic_trace(i: int, rng: random.Random) -> dict:
    messages = [{"role": "system", "content": "You are a browsing agent."}]
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": f"task {i}.{turn}: find the title of page {rng.randint(1, 99)}"})
        for step in range(rng.randint(1, 2)):
            call_id = f"c{i}-{turn}-{step}"
            messages.append({"role": "assistant", "content": "\n\n", "reasoning_content": "Let me look at the page.",
                             "tool_calls": [{"id": call_id, "type": "function", "function": {
                                 "name": "browser_navigate", "arguments": {"url": f"https://site.test/{i}"}}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": snapshot(rng)})
        messages.append({"role": "assistant", "content": f"The title is Page {i}.", "reasoning_content": "Found it."})
    return {"timestamp": "20250529_113358", "model": "bench", "messages": messages, "tools": TOOLS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=32768)
    args = parser.parse_args()
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="mcpft-bench-"))
    source = work / "traces.jsonl"
    with source.open("w") as f:
        for i in range(args.n):
            f.write(json.dumps(synthetic_trace(i, rng)) + "\n")
    size_mb = source.stat().st_size / 2**20
    tokenizer = load_tokenizer(None, data_dir())

    t0 = time.perf_counter()
    with Store(work / "bench.db") as store:
        report = import_paths(store, [source])
        t1 = time.perf_counter()
        rows = rows_from_traces(store.traces())
        t2 = time.perf_counter()
    rendered = render_many(tokenizer, rows, max_length=args.max_length)
    t3 = time.perf_counter()

    n = len(report.imported)
    tokens = sum(r.n_tokens for r in rendered)
    print(f"traces: {n} ({size_mb:.0f} MB JSONL, {len(rows)} rows, {tokens:,} tokens, "
          f"{sum(r.over_length for r in rendered)} over {args.max_length})")
    print(f"{'stage':34} {'seconds':>8} {'traces/s':>10}")
    for stage, seconds in (("import + validate (to SQLite)", t1 - t0), ("read back + unroll", t2 - t1),
                           ("import + validate + unroll", t2 - t0), ("render + tokenize", t3 - t2),
                           ("whole path", t3 - t0)):
        print(f"{stage:34} {seconds:8.2f} {n / seconds:10.0f}")


if __name__ == "__main__":
    main()
