"""Fine-tuning step throughput: ConvNeXt V2-Tiny (``--variant``) at 224, ours vs timm's ``convnextv2_tiny``.

One step = forward, label-smoothed cross-entropy, backward, AdamW step, zero_grad: what the trainer
does per optimiser step, minus data loading (synthetic batch) and EMA. Both sides get the Tiny
recipe's optimiser: torch AdamW (0.9, 0.999), wd 0.05 with no decay on 1-D params, layer-wise lr
decay 0.9 (ours: the authors' layer ids via ``train.optim.param_groups``; timm: its own
``param_groups_layer_decay``), drop path 0.2. Steps of the two models alternate, so a machine
shared with other jobs slows both alike; the median step time is reported.

    python benchmarks/train.py                       # batch 16, 6 timed steps each
    python benchmarks/train.py --quick               # batch 8, 3 timed steps each
    python benchmarks/train.py --amp --channels-last # bf16 autocast + channels_last (both models)
    python benchmarks/train.py --device cuda --amp --channels-last --compile --batch-size 128
    python benchmarks/train.py --variant atto --resolution 64 --batch-size 4   # a small smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], float]:
    def step() -> float:
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny", help="model size (timm: convnextv2_<variant>)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--quick", action="store_true", help="batch 8, 3 timed steps, 1 warm-up step")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.quick:
        a.batch_size, a.steps, a.warmup = 8, 3, 1
    if a.threads:
        torch.set_num_threads(a.threads)

    import timm
    from timm.optim._param_groups import param_groups_layer_decay

    from convnextv2_hub.models.convnextv2 import convnextv2
    from convnextv2_hub.train.optim import param_groups

    dev = torch.device(a.device)
    torch.manual_seed(0)
    ours = convnextv2(a.variant, num_classes=1000, drop_path_rate=0.2, head_init_scale=0.001)
    theirs = timm.create_model(f"convnextv2_{a.variant}", pretrained=False, num_classes=1000, drop_path_rate=0.2)
    models = {"convnextv2_hub": ours, f"timm {timm.__version__}": theirs}
    groups = {
        "convnextv2_hub": lambda m: param_groups(m, 0.05, 0.9, "single", "finetune"),
        f"timm {timm.__version__}": lambda m: param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.9),
    }
    x = torch.randn(a.batch_size, 3, a.resolution, a.resolution, device=dev)
    y = torch.randint(0, 1000, (a.batch_size,), device=dev)
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps: Dict[str, Callable[[], float]] = {}
    for name, m in models.items():
        m.to(dev).train()
        if a.channels_last:
            m.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(groups[name](m), lr=1e-4, betas=(0.9, 0.999))
        fwd = torch.compile(m) if a.compile else m
        steps[name] = make_step(fwd, opt, x, y, a.amp)

    load_before = os.getloadavg()
    for _ in range(a.warmup):
        for s in steps.values():
            s()
    times: Dict[str, List[float]] = {n: [] for n in steps}
    for _ in range(a.steps):
        for n, s in steps.items():
            times[n].append(s())
    load_after = os.getloadavg()

    ref = statistics.median(times[f"timm {timm.__version__}"])
    mode = ", ".join(x for x, on in (("bf16 autocast", a.amp), ("channels_last", a.channels_last), ("compile", a.compile)) if on) or "fp32 eager"
    print(f"\nConvNeXt V2-{a.variant} fine-tune step, {a.resolution}px, batch {a.batch_size}, {dev}, {torch.get_num_threads()} threads, {mode}; "
          f"median of {a.steps} steps; load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| model | img/s | ms/step (median) | min ms | vs timm |")
    print("|---|---|---|---|---|")
    for n, ts in times.items():
        med = statistics.median(ts)
        print(f"| {n} | {a.batch_size / med:.2f} | {1000 * med:.0f} | {1000 * min(ts):.0f} | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
