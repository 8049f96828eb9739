"""How much of a small LoRA update a bf16 forward pass still shows: the reason bf16 training learns less per step.

Under `torch.autocast("cpu", dtype=torch.bfloat16)` a LoRA layer adds its update to the frozen layer's bf16 output, and
the sum is rounded to bf16 (8 significant bits). An update much smaller than the output's rounding step disappears
from the forward pass, though its gradient is still computed. A LoRA update starts at zero (B = 0) and grows step by
step, so early steps see a weakened adapter. This measures it on one SmolLM2-sized projection (576 x 576, r=16),
with B drawn at growing scales, against the same layer in fp32.

    .venv/bin/python bench/bf16_adapter_visibility.py
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model


class _Projection(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, x):
        return self.proj(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=576, help="the projection's width (SmolLM2-135M: 576)")
    parser.add_argument("--rows", type=int, default=256, help="token positions in the batch")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = get_peft_model(_Projection(args.width), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]))
    lora_b = model.base_model.model.proj.lora_B["default"].weight
    x = torch.randn(args.rows, args.width)
    print("| update / output (fp32) | bf16 outputs that change | cosine, bf16 vs fp32 update | bf16 / fp32 size |")
    print("|---|---|---|---|")
    with torch.no_grad():
        lora_b.zero_()
        base32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base16 = model(x).float()
        for scale in (1e-5, 1e-4, 1e-3, 1e-2):
            lora_b.normal_(0, scale)
            update32 = model(x) - base32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                update16 = model(x).float() - base16
            relative = (update32.abs().mean() / base32.abs().mean()).item()
            changed = (update16 != 0).float().mean().item()
            cosine = torch.nn.functional.cosine_similarity(update32.flatten(), update16.flatten(), 0).item()
            size = (update16.norm() / update32.norm()).item()
            print(f"| {relative:.1e} | {changed:.0%} | {cosine:.2f} | {size:.2f} |")


if __name__ == "__main__":
    main()
