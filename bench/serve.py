"""Embedded endpoint throughput vs raw `model.generate`: same model, same prompt, greedy, tokens per second.

    .venv/bin/python bench/serve.py                      # the packaged SmolLM2-135M-Instruct
    .venv/bin/python bench/serve.py --model DIR_OR_HUB_ID --tokens 256 --runs 5

The endpoint is timed through the `openai` SDK over HTTP on 127.0.0.1, both as one reply and streamed; the goal is
at least 0.9x the raw generate rate. The table goes to stdout. The model is loaded, and raw `generate` runs, on the
server's model thread: on CPU, torch work from a second thread slows every thread's OpenMP team (see
`mcpft.serve.ModelThread`), which would make either side look worse than it is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [{"role": "user", "content": "Write a long story about a robot who learns to paint. Take your time."}]


def raw_generate(model, tokenizer, max_tokens: int) -> tuple[int, float]:
    """(new tokens, seconds) for one greedy `model.generate` on the chat-rendered prompt."""
    import torch

    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    return output.shape[1] - inputs["input_ids"].shape[1], seconds


def endpoint_reply(api, name: str, max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    reply = api.chat.completions.create(model=name, messages=PROMPT, temperature=0, max_tokens=max_tokens)
    return reply.usage.completion_tokens, time.perf_counter() - started


def endpoint_stream(api, name: str, max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    usage = None
    for chunk in api.chat.completions.create(model=name, messages=PROMPT, temperature=0, max_tokens=max_tokens,
                                             stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    return usage.completion_tokens, time.perf_counter() - started


def rates(modes: dict, runs: int) -> dict[str, tuple[int, float, float]]:
    """Per mode: (tokens, median seconds, tokens/s) over `runs` rounds after one warm-up round.

    Modes take turns within each round, so that a load change on the machine hits them all alike.
    """
    for run in modes.values():
        run()
    results = {mode: [] for mode in modes}
    for _ in range(runs):
        for mode, run in modes.items():
            results[mode].append(run())
    summary = {}
    for mode, timings in results.items():
        tokens, seconds = timings[0][0], statistics.median(s for _, s in timings)
        summary[mode] = (tokens, seconds, tokens / seconds)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="folder or Hub id (default: packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=128, help="max new tokens per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per mode (median reported)")
    parser.add_argument("--data-dir", type=Path, default=None, help="mcpft data dir (default: mcpft's)")
    args = parser.parse_args()

    import openai
    import torch

    from mcpft.config import data_dir
    from mcpft.models import load_model, model_name
    from mcpft.serve import MODEL_THREAD, TransformersBackend, create_app, serve_in_thread

    model, tokenizer = MODEL_THREAD.run(load_model, args.model, args.data_dir or data_dir())
    name = model_name(args.model)
    base_url, stop = serve_in_thread(create_app({name: TransformersBackend(model, tokenizer)}))
    api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    try:
        rows = rates({"model.generate": lambda: MODEL_THREAD.run(raw_generate, model, tokenizer, args.tokens),
                      "endpoint": lambda: endpoint_reply(api, name, args.tokens),
                      "endpoint stream": lambda: endpoint_stream(api, name, args.tokens)}, args.runs)
    finally:
        stop()
    baseline = rows["model.generate"][2]
    device = str(model.device) + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else
                                  f" ({torch.get_num_threads()} threads)")
    print(f"{name} on {device}, greedy, {args.tokens} new tokens max, median of {args.runs}")
    print(f"{'mode':<16} {'tokens':>6} {'seconds':>8} {'tokens/s':>9} {'vs generate':>11}")
    for mode, (tokens, seconds, per_second) in rows.items():
        print(f"{mode:<16} {tokens:>6} {seconds:>8.2f} {per_second:>9.1f} {per_second / baseline:>10.2f}x")


if __name__ == "__main__":
    main()
