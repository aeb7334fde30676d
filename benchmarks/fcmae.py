"""FCMAE training step: dense-masked encoder vs the sparse fast path, same run.

Times forward + backward of the whole FCMAE (encoder, decoder, loss; no optimizer step) at one mask
ratio, and the peak memory of each mode. Every mode runs in its own fresh subprocess, so its peak
resident set (``resource.getrusage(...).ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated``)
is its own; modes alternate over ``--rounds`` to spread the noise of a shared machine evenly.

Modes:
  dense     ConvNeXtV2.forward_features(x, mask): masked positions zeroed, everything dense (NCHW)
  dense-cl  the same with a channels_last input (separates the layout gain from the sparsity gain:
            the sparse path's depthwise convs run on channels_last maps)
  sparse    ConvNeXtV2.forward_features_sparse: per-position work on the visible rows only

    python benchmarks/fcmae.py                                  # tiny, 224 px, batch 32, CPU
    python benchmarks/fcmae.py --variant atto --batch-size 8 --threads 2
    python benchmarks/fcmae.py --device cuda --batch-size 128 --bf16

Prints a markdown table. Step time is the median over ``--steps`` timed steps (after ``--warmup``),
then the best of the rounds (the least disturbed by other jobs).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

MODES = ("dense", "dense-cl", "sparse")


def _worker(args: argparse.Namespace) -> Dict[str, float]:
    import torch

    from convnextv2_hub.models.fcmae import FCMAE

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tf32:  # as the trainer runs the fp32 FCMAE recipe on GPUs (its ``tf32`` key)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = FCMAE(args.variant, mask_ratio=args.mask_ratio, sparse=(args.worker == "sparse")).to(device).train()
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    if args.worker == "dense-cl":
        x = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    mask = model.gen_random_mask(x, generator=gen)  # one fixed mask: every mode does identical work
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, _, _ = model(x, mask=mask)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    out = dict(
        step_s=statistics.median(times),
        rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        rss_before_mib=rss_before,
        threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _run_mode(mode: str, args: argparse.Namespace) -> Dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", mode] + _forwarded(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mode {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> List[str]:
    out = [
        "--variant", args.variant, "--batch-size", str(args.batch_size), "--size", str(args.size),
        "--mask-ratio", str(args.mask_ratio), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--device", args.device, "--threads", str(args.threads),
    ]
    return out + (["--bf16"] if args.bf16 else []) + (["--tf32"] if args.tf32 else [])


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="square input size, a multiple of 32")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate the modes this many times")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and cuDNN convolutions (CUDA; the trainer's default there)")
    p.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {list(MODES)}")
    results: Dict[str, List[Dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            results[mode].append(_run_mode(mode, args))

    import torch

    best = {m: min(r, key=lambda d: d["step_s"]) for m, r in results.items()}
    ref = best.get("dense")
    threads = next(iter(best.values()))["threads"]
    print(
        f"FCMAE-{args.variant}, {args.size}x{args.size}, batch {args.batch_size}, mask ratio {args.mask_ratio}, "
        f"forward+backward, {args.device}{' bf16 autocast' if args.bf16 else ' fp32'}{' (TF32)' if args.tf32 else ''}, {int(threads)} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}; median of {args.steps} steps, "
        f"best of {args.rounds} round(s)\n"
    )
    mem_col = "CUDA peak (MiB)" if args.device.startswith("cuda") else "peak RSS (MiB)"
    print(f"| encoder path | step (s) | img/s | speed-up vs dense | {mem_col} | RSS above model+inputs (MiB) |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        r = best[m]
        speed = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        mem = r.get("cuda_peak_mib", r["rss_peak_mib"])
        print(
            f"| {m} | {r['step_s']:.3f} | {args.batch_size / r['step_s']:.1f} | {speed} | {mem:.0f} | "
            f"{r['rss_peak_mib'] - r['rss_before_mib']:.0f} |"
        )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
