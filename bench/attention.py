"""Attention alone, SmolLM2-135M's shapes (9 query heads, 3 kv heads, head_dim 64, 30 layers), bf16 on 2 threads:
mcpft's kernel (mcpft/cpu_attention.c) against what the engine used before it.

    .venv/bin/python bench/attention.py [--threads 2] [--runs 5]

1. Prefill: one layer's 3,584 positions in the engine's 256-token chunks (each chunk over the cache before it and,
   causally, itself): the kernel against SDPA with the boolean mask the engine passed.
2. Decode: one position over 30 layers' caches at 300, 1,000 and 3,600 positions (87 MB at 3,600: more than the
   L3, as in decoding, where the weights flush it): the kernel against SDPA (a group's heads as rows, the engine's
   path below 1,536 positions) and the int8 cache (`_Int8Cache`, its path above).

Each figure is the median of `--runs`, with the largest difference from fp32 SDPA on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mcpft.cpu_attention import Kernel, kernel  # noqa: E402
from mcpft.inference import _Int8Cache  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS, CHUNK = 9, 3, 64, 30, 256


def median_ms(work, runs: int) -> float:
    work()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def prefill(found: Kernel, runs: int, positions: int = 3584) -> None:
    keys, values = (torch.randn(KV_HEADS, positions, DIM).to(torch.bfloat16) for _ in range(2))
    chunks = [(torch.randn(HEADS, CHUNK, DIM) * 2).to(torch.bfloat16) for _ in range(positions // CHUNK)]

    def sdpa(dtype=torch.bfloat16):
        outs = []
        for number, q in enumerate(chunks):
            end = (number + 1) * CHUNK
            mask = torch.ones(CHUNK, end, dtype=torch.bool).tril(diagonal=end - CHUNK)
            out = F.scaled_dot_product_attention(q[None].to(dtype), keys[None, :, :end].to(dtype),
                                                 values[None, :, :end].to(dtype), attn_mask=mask, enable_gqa=True)
            outs.append(out[0].transpose(0, 1).reshape(CHUNK, HEADS * DIM))
        return outs

    def own():
        return [found.prefill(q, keys, values, (number + 1) * CHUNK) for number, q in enumerate(chunks)]

    exact = sdpa(torch.float32)
    error = max(float((a.float() - b).abs().max()) for a, b in zip(own(), exact))
    print(f"prefill, one layer, {positions} positions in {CHUNK}-token chunks: SDPA {median_ms(sdpa, runs):.1f} ms, "
          f"kernel {median_ms(own, runs):.1f} ms (largest difference from fp32 {error:.4f})")


def decode(found: Kernel, runs: int) -> None:
    for positions in (300, 1000, 3600):
        keys, values = (torch.randn(LAYERS, KV_HEADS, positions, DIM).to(torch.bfloat16) for _ in range(2))
        q = (torch.randn(HEADS, DIM) * 2).to(torch.bfloat16)
        int8 = _Int8Cache(LAYERS, KV_HEADS, DIM, torch.device("cpu"))
        int8.reserve(positions)
        for layer in range(LAYERS):
            int8.update(layer, keys[layer], values[layer], positions)
        int8.length = positions
        rows = q.view(1, KV_HEADS, HEADS // KV_HEADS, DIM)
        ways = {
            "SDPA": lambda: [F.scaled_dot_product_attention(rows, keys[i:i + 1], values[i:i + 1])
                             for i in range(LAYERS)],
            "int8 cache": lambda: [int8.attend(i, q, positions) for i in range(LAYERS)],
            "kernel": lambda: [found.decode(q, keys[i], values[i], positions) for i in range(LAYERS)],
        }
        exact = F.scaled_dot_product_attention(q.float()[None, :, None], keys[0:1].float(), values[0:1].float(),
                                               enable_gqa=True)[0, :, 0].reshape(-1)
        error = float((found.decode(q, keys[0], values[0], positions).float() - exact).abs().max())
        figures = ", ".join(f"{name} {median_ms(work, runs):.2f} ms" for name, work in ways.items())
        print(f"decode, one position, 30 layers at {positions} positions: {figures} "
              f"(kernel's largest difference from fp32 {error:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    found = kernel()
    if not isinstance(found, Kernel):
        sys.exit(f"no attention kernel here: {found}")
    prefill(found, args.runs)
    decode(found, args.runs)


if __name__ == "__main__":
    main()
