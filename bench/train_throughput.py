"""LoRA SFT throughput through `mcpft.train.train`: trained tokens per second, seconds per step, peak memory.

CPU (default): the packaged SmolLM2-135M on synthetic tool-calling rows of about `--tokens` tokens each.

    .venv/bin/python bench/train_throughput.py --steps 5
    .venv/bin/python bench/train_throughput.py --steps 8 --tokens 4000 --precision both   # fp32 vs bf16, same rows

`--precision both` trains twice on the same rows from the same seed, fp32 then bf16 autocast, and prints each run's
loss per step beside its speed (peak RSS is the process's, so the second run's is the larger of the two).

CUDA: Unsloth against TRL + PEFT on a Qwen3-4B-shaped model with random weights (no download: the config is
written here, the tokenizer is SmolLM2's with our template), each backend in its own process (Unsloth patches
transformers when imported, so the two cannot share one).

    python bench/train_throughput.py --device cuda --steps 20 --tokens 4096

Prints one JSON object per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mcpft.config import data_dir
from mcpft.models import load_tokenizer
from mcpft.render import render
from mcpft.train import TrainConfig, train

TOOL = {"type": "function", "function": {"name": "browser_navigate", "description": "Open a URL.", "parameters": {
    "type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}}
FILLER = ("- link \"Research\" [ref=e12]\n  - /url: /research\n- heading \"Tools and tutorials\" [level=2] "
          "[ref=e13]\n- paragraph [ref=e14]: Fine-tuning small models on agent traces.\n")
# Qwen3-4B's shape (config.json of Qwen/Qwen3-4B), with random weights.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def synthetic_row(tokenizer, index: int, tokens: int) -> dict:
    """A navigate call, a snapshot-like result long enough for the row to reach about `tokens` tokens, an answer."""
    def row_with(repeats: int) -> dict:
        return {"id": f"bench-{index}", "trace_id": f"bench-{index}", "tools": json.dumps([TOOL]), "messages": [
            {"role": "user", "content": f"Open example.com and summarise page {index}."},
            {"role": "assistant", "content": "", "train": True, "tool_calls": [{"id": "call_0", "type": "function",
             "function": {"name": "browser_navigate", "arguments": json.dumps({"url": "https://example.com/"})}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": FILLER * repeats},
            {"role": "assistant", "content": f"Page {index} is about fine-tuning small models.", "train": True}]}

    per_repeat = max(1, render(tokenizer, row_with(2)).n_tokens - render(tokenizer, row_with(1)).n_tokens)
    base = render(tokenizer, row_with(1)).n_tokens
    return row_with(max(1, 1 + (tokens - base) // per_repeat))


def random_qwen3_4b(folder: Path, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**QWEN3_4B, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_once(args, base_model: str | None, backend: str, precision: str = "auto") -> dict:
    tokenizer = load_tokenizer(base_model, data_dir())
    rows = [synthetic_row(tokenizer, i, args.tokens) for i in range(args.steps * args.grad_accum)]
    config = TrainConfig(max_steps=args.steps, gradient_accumulation_steps=args.grad_accum, backend=backend,
                         max_length=max(render(tokenizer, r).n_tokens for r in rows) + 1,
                         gradient_checkpointing=args.gradient_checkpointing, precision=precision,
                         learning_rate=args.lr)
    progress = []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train(config, rows, Path(out) / "adapter", base_model=base_model, on_progress=progress.append)
        seconds = time.perf_counter() - started
    row_tokens = sum(render(tokenizer, r).n_tokens for r in rows)
    figures = {
        "backend": result.path, "why": result.why, "device": args.device, "model": base_model or "SmolLM2-135M",
        "precision": precision,
        "steps": result.steps, "rows_per_step": args.grad_accum, "gradient_checkpointing": args.gradient_checkpointing, "tokens_per_row": row_tokens // len(rows),
        "wall_s": round(seconds, 2), "train_s": round(result.runtime_s, 2),
        "tokens_per_s": round(progress[-1].tokens_per_s, 1),  # all tokens seen / time since training began
        "s_per_step": round(result.runtime_s / max(1, result.steps), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss": [round(p.loss, 4) for p in progress if p.loss is not None],
    }
    if args.device == "cuda":
        import torch

        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--grad-accum", type=int, default=1, help="rows per optimizer step")
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per row")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the training default for the device")
    parser.add_argument("--backend", choices=("unsloth", "trl+peft"), default=None,
                        help="CUDA: run only this backend (in this process)")
    parser.add_argument("--model-dir", type=Path, default=None, help="CUDA: reuse a random Qwen3-4B folder")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                        help="CPU: mixed precision of the run (both: fp32, then bf16 on the same rows)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    args = parser.parse_args()
    if args.device == "cpu":
        for precision in ("fp32", "bf16") if args.precision == "both" else (args.precision,):
            print(json.dumps(run_once(args, None, "auto", precision)), flush=True)
        return
    if args.backend:
        print(json.dumps(run_once(args, str(args.model_dir), args.backend)))
        return
    with tempfile.TemporaryDirectory() as folder:
        model_dir = random_qwen3_4b(Path(folder) / "qwen3-4b-random", load_tokenizer(None, data_dir()))
        for backend in ("unsloth", "trl+peft"):
            argv = [sys.executable, __file__, "--device", "cuda", "--steps", str(args.steps), "--grad-accum",
                    str(args.grad_accum), "--tokens", str(args.tokens), "--backend", backend, "--model-dir",
                    str(model_dir)]
            done = subprocess.run(argv, capture_output=True, text=True)
            print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else
                  json.dumps({"backend": backend, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
