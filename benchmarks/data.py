"""Data-loading throughput of the trainer's pipelines: decoded + augmented images/s per loader worker on
real JPEGs, and the workers one GPU needs to keep up with a training step rate.

    python benchmarks/data.py                                   # 200 JPEGs, 224 px, workers 0,1,2, CPU
    python benchmarks/data.py --device cuda --workers 0,2,4,8   # on a GPU node: batches go to the GPU
    python benchmarks/data.py --gpu-img-s tiny=3000,base=1200   # the step rate you measured
    python benchmarks/data.py --quick                           # 48 JPEGs at 64 px: a smoke run

The images: ``--images`` JPEGs (quality 90, ImageNet-like sizes, 400-600 px on the long side) cut at random
from scikit-image's and scikit-learn's sample photos (random crops of 30-100 % of the area, random
aspect ratio 3/4-4/3, resized), written once into a temporary folder. Each pipeline is the trainer's own
(``convnextv2_hub.train.data``), read through its own data set, sampler and loader (``make_loader``:
persistent workers, pinned memory on CUDA), and every batch is moved to ``--device`` and, for uint8
batches, normalised there, as the trainer does:

- finetune: RandomResizedCrop (0.08-1) + flip + RandAugment rand-m9-mstd0.5-inc1 + normalise + random
  erasing 0.25 in the worker (float32 batches: erasing draws its noise in normalised units);
- fcmae: RandomResizedCrop (0.2-1) + flip, uint8 batches normalised on the device.

Each setting runs one untimed epoch (workers start, files enter the page cache), then one timed epoch
over all images; img/s per worker is the epoch's img/s divided by the workers (0 workers: the main
process does the work, counted as one). "Workers needed" divides a GPU's training img/s by the per-worker
rate of the 1-worker run (one worker has a core to itself there; with more workers than free cores the
per-worker rate falls). The default GPU rates are an assumption, not a measurement: timm's published
inference img/s at 224 on an RTX 4090 (AMP, torch.compile: Tiny 6254, Base 2540) divided by 3, a
training step costing about three forward passes; FCMAE steps, whose encoder sees 40 % of the image,
are faster, so its column understates the workers it needs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from inference import cpu_name  # benchmarks/inference.py

DEFAULT_GPU_IMG_S = {"tiny": round(6254 / 3), "base": round(2540 / 3)}
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera")


def sample_photos() -> List[np.ndarray]:
    """scikit-image's and scikit-learn's bundled photos as HxWx3 uint8 arrays."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = [getattr(data, name)() for name in SOURCES]
    out += list(load_sample_images().images)
    return [np.stack([a] * 3, axis=-1) if a.ndim == 2 else a[..., :3] for a in out]


def write_jpegs(folder: Path, n: int, seed: int = 0) -> List[Tuple[str, int]]:
    """``n`` photo-sized JPEGs cut at random from the sample photos; (path, label) samples."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    samples = []
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        area = rng.uniform(0.3, 1.0) * h * w
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = min(h, round(math.sqrt(area / ratio))), min(w, round(math.sqrt(area * ratio)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        long_side = int(rng.integers(400, 601))
        scale = long_side / max(ch, cw)
        img = Image.fromarray(np.ascontiguousarray(src[top:top + ch, left:left + cw]))
        img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
        path = folder / f"{i:04d}.jpg"
        img.save(path, quality=90)
        samples.append((str(path), i % 2))
    return samples


def pipelines(size: int) -> Dict[str, Tuple[Callable, bool]]:
    """name -> (transform, whether its batches are uint8), the trainer's defaults at ``size``."""
    from convnextv2_hub.train.data import eval_preprocessing, fcmae_train_transform, finetune_train_transform

    prep = eval_preprocessing("tiny", size, None)
    return {
        "finetune": (finetune_train_transform(size, prep.mean, prep.std), False),
        "fcmae": (fcmae_train_transform(size, prep.mean, prep.std, uint8=True), True),
    }


def time_epoch(samples, transform: Callable, uint8: bool, workers: int, batch: int, device: torch.device) -> float:
    """img/s of the second of two epochs through the trainer's loader, batches moved to ``device``."""
    from convnextv2_hub.preprocessing.transforms import normalize_images
    from convnextv2_hub.train.data import ImageDataset, TrainSampler, make_loader

    ds = ImageDataset(samples, ["a", "b"], transform)
    sampler = TrainSampler(len(ds), seed=0)
    gen = torch.Generator().manual_seed(0)
    loader = make_loader(ds, batch, sampler, workers, device.type == "cuda", gen)
    normalize = normalize_images((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if uint8 else None
    rate = 0.0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        n, start = 0, time.perf_counter()
        for images, _, _ in loader:
            images = images.to(device, non_blocking=True)
            if normalize is not None:
                images = normalize(images)
            n += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = n / (time.perf_counter() - start)
    del loader  # its persistent workers end here
    return rate


def parse_rates(text: str) -> Dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="JPEGs to write and read per epoch")
    p.add_argument("--size", type=int, default=224, help="training resolution")
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="where batches go (and uint8 ones are normalised): cpu or cuda")
    p.add_argument("--gpu-img-s", default=",".join(f"{k}={v}" for k, v in DEFAULT_GPU_IMG_S.items()),
                   help="training img/s of one GPU per variant (default: an assumption, see the module doc)")
    p.add_argument("--quick", action="store_true", help="48 JPEGs at 64 px, batch 8: a smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.size, a.batch_size = 48, 64, 8
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(1)  # the main process only collates and moves batches, as in training
    workers = [int(w) for w in a.workers.split(",")]
    rates = parse_rates(a.gpu_img_s)

    with tempfile.TemporaryDirectory() as tmp:
        samples = write_jpegs(Path(tmp), a.images)
        mean_kb = sum(os.path.getsize(s) for s, _ in samples) / len(samples) / 1024
        results: Dict[str, Dict[int, float]] = {}
        for name, (tf, uint8) in pipelines(a.size).items():
            results[name] = {w: time_epoch(samples, tf, uint8, w, a.batch_size, device) for w in workers}

    print(f"\nData loading, {a.images} JPEGs (mean {mean_kb:.0f} KB, 400-600 px) -> {a.size} px, batch {a.batch_size}, "
          f"batches to {device}; {cpu_name()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}\n")
    print("| pipeline | " + " | ".join(f"{w} workers: img/s (per worker)" for w in workers) + " |")
    print("|---|" + "---|" * len(workers))
    for name, by_w in results.items():
        cells = [f"{r:.0f} ({r / max(w, 1):.0f})" for w, r in by_w.items()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    base_w = 1 if 1 in workers else max(workers)
    print(f"\nWorkers one GPU needs (its training img/s / the per-worker img/s with {base_w} worker(s)):\n")
    print("| pipeline | " + " | ".join(f"{v} at {r:.0f} img/s" for v, r in rates.items()) + " |")
    print("|---|" + "---|" * len(rates))
    for name, by_w in results.items():
        per = by_w[base_w] / max(base_w, 1)
        print(f"| {name} | " + " | ".join(str(math.ceil(r / per)) for r in rates.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
