"""Markdown table of the per-GPU memory estimate (``convnextv2_hub.train.memory``) for fine-tuning
every variant at 224/384/512: the paper's per-GPU batch 32, bf16 autocast, AdamW (+ EMA as the
fine-tuning recipes keep it), with and without activation checkpointing. CPU only, instant.

    python benchmarks/memory_table.py [--batch 32] [--precision bf16] [--no-ema]
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from convnextv2_hub.models.variants import VARIANTS
from convnextv2_hub.train.memory import GIB, estimate


def table(batch: int, precision: str, ema: bool) -> str:
    """The markdown table, one row per variant and resolution."""
    rows = [f"Fine-tuning, batch {batch} per GPU, {precision} autocast, AdamW{' + EMA' if ema else ''}; GiB.",
            "",
            "| model | res | params | grads+AdamW{} | activations | total | activations (ckpt) | total (ckpt) |"
            .format("+EMA" if ema else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in VARIANTS:
        for res in (224, 384, 512):
            off = estimate(name, res, batch, precision, grad_checkpointing=False, ema=ema)
            on = estimate(name, res, batch, precision, grad_checkpointing=True, ema=ema)
            state = off.gradients + off.optimizer + off.ema
            rows.append(f"| {name} | {res} | {off.params / GIB:.2f} | {state / GIB:.2f} | {off.activations / GIB:.1f} "
                        f"| {off.total / GIB:.1f} | {on.activations / GIB:.1f} | {on.total / GIB:.1f} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--no-ema", action="store_true")
    args = ap.parse_args(argv)
    print(table(args.batch, args.precision, not args.no_ema))


if __name__ == "__main__":
    main()
