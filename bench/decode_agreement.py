"""Ways of computing, answer for answer: fp32, bf16, and either with int8 decoding weights, on every step of some rows.

    .venv/bin/python bench/decode_agreement.py --rows demo-rows.jsonl [--adapter DIR] [--ways fp32,bf16,int8,fp32-int8]

The engine decodes with int8 weights on every CPU (`mcpft.inference.decode_weights`), computing the rest in bf16 where
the CPU has native BF16 ("int8" here) and in fp32 where it does not ("fp32-int8"). This scores
every step of `--rows` (an unrolled JSONL export) once per way, each on its own engine over the same model, and
prints, against the first way: how many answers are identical token for token, how many get the same verdict, the
pass counts and the seconds. bf16 against fp32 shows how much rounding alone moves greedy answers; int8 against both
shows what quantizing adds. With `--adapter` the model is the base with that LoRA adapter (folded in, then quantized).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from mcpft.config import data_dir as default_data_dir
    from mcpft.evaluate import LocalGenerator, evaluate_rows
    from mcpft.inference import Engine
    from mcpft.models import load_model
    from mcpft.train import load_adapter_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, type=Path, help="an unrolled JSONL export")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter dir (default: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--ways", default="fp32,bf16,int8", help="comma-separated; the first is the reference")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    data_dir = args.data_dir or default_data_dir()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    model, tokenizer = (load_adapter_model(args.adapter, None, data_dir) if args.adapter
                        else load_model(None, data_dir))
    import torch

    ways = {"fp32": (torch.float32, "same"), "bf16": (torch.bfloat16, "same"), "int8": (torch.bfloat16, "int8"),
            "fp32-int8": (torch.float32, "int8")}
    chosen = args.ways.split(",")
    reports, seconds = {}, {}
    for way in chosen:
        dtype, decode = ways[way]
        engine = Engine(model, dtype=dtype, decode=decode)
        generator = LocalGenerator(model, tokenizer, way, args.max_new_tokens, engine=engine)
        start = time.perf_counter()
        reports[way] = evaluate_rows(rows, generator)
        seconds[way] = time.perf_counter() - start
        print(f"{way}: {engine.kind}, {seconds[way]:.1f} s", file=sys.stderr)

    reference = chosen[0]
    model_name = f"base + adapter {args.adapter}" if args.adapter else "base"
    print(f"| model | way | steps scored | identical to {reference} | same verdict as {reference} | passed | seconds |")
    print("|---|---|---|---|---|---|---|")
    for way in chosen:
        pairs = [(a, b) for a, b in zip(reports[reference]["steps"], reports[way]["steps"]) if not a.get("too_long")]
        identical = sum(a["output"]["text"] == b["output"]["text"] for a, b in pairs)
        same_verdict = sum(a["passed"] == b["passed"] for a, b in pairs)
        passed = sum(b.get("passed", False) for _, b in pairs)
        print(f"| {model_name} | {way} | {len(pairs)} | {identical} | {same_verdict} | {passed} | "
              f"{seconds[way]:.0f} |")
        for a, b in pairs:
            if a["output"]["text"] != b["output"]["text"]:
                print(f"\n{way}, {a['row_id']} step {a['index']}:\n  {reference}: {a['output']['text'][:300]!r}\n"
                      f"  {way}: {b['output']['text'][:300]!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
