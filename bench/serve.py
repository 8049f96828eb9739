"""Generation speed: the embedded endpoint (mcpft.inference.Engine) vs plain fp32 `model.generate`, one run.

    .venv/bin/python bench/serve.py --data-dir /tmp/mcpft-test-cache            # packaged SmolLM2-135M-Instruct
    .venv/bin/python bench/serve.py --rows demo-rows.jsonl --tokens 64 --runs 3  # + an agent step, with/without reuse

1. Prefill and decode tokens/s at 1k and 3.6k tokens of context. "plain generate" is the path before the engine:
   the fp32 model's `generate` (prefill = the time to its first new token; decode = the other tokens over the rest,
   timed by a streamer). "endpoint" is a streamed request over HTTP to the embedded endpoint serving the same model
   (prefill = time to the first streamed text; decode = the other tokens over the rest). Every endpoint request starts
   with a new line of text, so no cached prefix helps it here.
2. With `--rows` (an unrolled JSONL export of demo traces): the longest row's last agent step, answered right after the
   step before it (as an agent does), with prefix reuse and without, and by plain fp32 `generate`.

Each figure is the median of `--runs`; the table goes to stdout. Torch work runs on the server's model thread (see
`mcpft.serve.ModelThread`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE_LINE = '  - link "Trailblazer Backpack 45L, $129.00, 1450 g, padded hip belt" [ref=e{n}] [cursor=pointer]\n'


def context_prompt(tokenizer, tokens: int, run: int) -> list[dict]:
    """A chat whose rendered prompt has about `tokens` tokens: a page snapshot and a request for a long answer."""
    head = f"Request {run}. Here is the page:\n"
    lines, n = [], 0
    while True:
        lines.append(PAGE_LINE.format(n=n))
        n += 1
        messages = [{"role": "user", "content": head + "".join(lines) + "\nDescribe every product above in detail."}]
        if n % 8 == 0 and len(prompt_ids(tokenizer, messages)) >= tokens:
            return messages


def prompt_ids(tokenizer, messages, tools=None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_rates(model, tokenizer, messages, new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of fp32 `model.generate`, timed per token by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids, stamps = torch.tensor([prompt_ids(tokenizer, messages)]), Stamps()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       streamer=stamps)
    first, last = stamps.times[1], stamps.times[-1]
    return ids.shape[1] / (first - started), (len(stamps.times) - 2) / (last - first)


def endpoint_rates(api, name: str, messages, prompt_tokens: int, new_tokens: int) -> tuple[float, float, int]:
    """(prefill tokens/s, decode tokens/s, tokens) of one streamed request to the embedded endpoint."""
    started, first, usage = time.perf_counter(), None, None
    for chunk in api.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=new_tokens,
                                             stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        usage = chunk.usage or usage
    whole = time.perf_counter() - started
    return prompt_tokens / first, (usage.completion_tokens - 1) / (whole - first), usage.completion_tokens


def context_table(model, tokenizer, api, name: str, contexts: list[int], new_tokens: int, runs: int) -> list[str]:
    from mcpft.serve import MODEL_THREAD

    lines = [f"{'context':>7} {'path':<15} {'prefill tok/s':>13} {'decode tok/s':>12}"]
    for context in contexts:
        plain, served = [], []
        for run in range(runs):
            messages = context_prompt(tokenizer, context, run)
            plain.append(MODEL_THREAD.run(plain_rates, model, tokenizer, messages, new_tokens))
            served.append(endpoint_rates(api, name, messages, len(prompt_ids(tokenizer, messages)), new_tokens))
        medians = {"plain generate": [statistics.median(r[i] for r in plain) for i in (0, 1)],
                   "endpoint": [statistics.median(r[i] for r in served) for i in (0, 1)]}
        for path, (prefill, decode) in medians.items():
            lines.append(f"{context:>7} {path:<15} {prefill:>13.0f} {decode:>12.1f}")
        base, fast = medians["plain generate"], medians["endpoint"]
        lines.append(f"{context:>7} {'ratio':<15} {fast[0] / base[0]:>12.2f}x {fast[1] / base[1]:>11.2f}x"
                     f"   (endpoint replies: {min(r[2] for r in served)}-{max(r[2] for r in served)} tokens)")
    return lines


def agent_step_table(model, tokenizer, rows_file: Path, new_tokens: int, runs: int) -> list[str]:
    """The longest row's last step, right after the step before it: with reuse, without, and plain generate."""
    from mcpft.evaluate import steps_from_rows
    from mcpft.hermes import tool_calls_end
    from mcpft.inference import Engine, end_of_turn_ids
    from mcpft.serve import MODEL_THREAD

    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    steps = steps_from_rows(rows)
    longest = max(steps, key=lambda s: len(s.prefix))
    previous, last = [s for s in steps if s.row_id == longest.row_id][-2:]
    before, after = (prompt_ids(tokenizer, s.prefix, s.tools) for s in (previous, last))
    eos = end_of_turn_ids(model, tokenizer)
    engine = Engine(model)

    def answer(ids: list[int], reuse: bool) -> float:
        started, tokens = time.perf_counter(), []
        for token in engine.generate(ids, new_tokens, reuse=reuse):
            if token in eos:
                break
            tokens.append(token)
            if tool_calls_end(tokenizer.decode(tokens)) is not None:
                break
        return time.perf_counter() - started

    def plain(ids: list[int]) -> float:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=sorted(eos))
        return time.perf_counter() - started

    timings = {"with reuse": [], "without reuse": [], "plain generate": []}
    for _ in range(runs):
        MODEL_THREAD.run(answer, before, True)  # the step before: the agent's previous request
        timings["with reuse"].append(MODEL_THREAD.run(answer, after, True))
        reused = engine.stats.reused
        timings["without reuse"].append(MODEL_THREAD.run(answer, after, False))
        timings["plain generate"].append(MODEL_THREAD.run(plain, after))
    lines = [f"agent step: {len(after)}-token prompt after a {len(before)}-token one ({reused} reused), "
             f"up to {new_tokens} new tokens, ends at the tool call"]
    seconds = {path: statistics.median(values) for path, values in timings.items()}
    lines += [f"  {path:<15} {value:>6.2f} s   {seconds['with reuse'] and value / seconds['with reuse']:.2f}x "
              "the time with reuse" for path, value in seconds.items()]
    return lines


def test_connection_line(base_url: str, name: str) -> str:
    """The app's "Test connection" (the quick probe: models and a one-token completion), and the deep one."""
    import asyncio

    from mcpft.agent.endpoint import Endpoint, probe

    timings = {}
    for deep in (False, True):
        started = time.perf_counter()
        report = asyncio.run(probe(Endpoint(base_url, name), timeout=600, deep=deep))
        timings["with tool probe" if deep else "quick"] = (time.perf_counter() - started, report.ok)
    return "test connection: " + ", ".join(f"{kind} {seconds:.2f} s ({'ok' if ok else 'PROBLEM'})"
                                           for kind, (seconds, ok) in timings.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="folder or Hub id (default: packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", type=Path, default=None, help="mcpft data dir (default: mcpft's)")
    parser.add_argument("--contexts", default="1000,3600", help="prompt sizes in tokens, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median reported)")
    parser.add_argument("--rows", type=Path, default=None, help="unrolled JSONL export of demo traces (agent step)")
    args = parser.parse_args()

    import openai
    import torch

    from mcpft.config import data_dir
    from mcpft.models import load_model, model_name
    from mcpft.serve import MODEL_THREAD, TransformersBackend, create_app, serve_in_thread

    model, tokenizer = MODEL_THREAD.run(load_model, args.model, args.data_dir or data_dir(), torch.float32)
    name = model_name(args.model)
    backend = TransformersBackend(model, tokenizer)
    base_url, stop = serve_in_thread(create_app({name: backend}))
    api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    print(f"{name}; endpoint: {backend.engine.kind}; plain: transformers generate (fp32); "
          f"{torch.get_num_threads()} threads; median of {args.runs}, {args.tokens} new tokens")
    try:
        endpoint_rates(api, name, context_prompt(tokenizer, 200, -1), 200, 8)  # warm-up
        print(test_connection_line(base_url, name))
        contexts = [int(c) for c in args.contexts.split(",")]
        print("\n".join(context_table(model, tokenizer, api, name, contexts, args.tokens, args.runs)))
        if args.rows:
            print("\n".join(agent_step_table(model, tokenizer, args.rows, args.tokens, args.runs)))
    finally:
        stop()


if __name__ == "__main__":
    main()
