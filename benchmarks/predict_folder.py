"""Classifying a folder of photo-sized JPEGs end to end: ``convnextv2 predict DIR --output`` against a plain timm +
DataLoader loop with the same model, weights, preprocessing, batch size and decoding workers.

Each row reads every JPEG, decodes and preprocesses it (resize, centre crop 224, normalise) in DataLoader
worker processes, runs the model and writes one JSON line per image with its top-5. Time is wall-clock from
the first image read to the last line written, worker start-up included.

- timm + DataLoader: ``timm.create_model("convnextv2_<size>")``, timm's eval transform for it, a map-style
  dataset of PIL images, ``torch.inference_mode()``, top-5 lines written as each batch ends.
- ours eager / ours auto: ``inference.file_jobs.predict_files`` (what ``convnextv2 predict --output`` runs)
  with ``Predictor(backend="eager" | "auto")``, our model holding timm's weights (loaded from timm's layout).

The folder is made once from scikit-image's and scikit-learn's sample photos: random crops, resized to a
random 4:3 or 3:4 size between 500 x 375 and 1024 x 768, JPEG quality 90 (seeded, so every run reads the
same files). Rows run in interleaved rounds, so noise on a shared machine hits every row alike.

    python benchmarks/predict_folder.py                                  # atto, 2000 images, 1 round
    python benchmarks/predict_folder.py --model tiny --images 500 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image
from inference import cpu_name  # benchmarks/inference.py


def sample_photos() -> List[np.ndarray]:
    """scikit-image's colour sample photos and scikit-learn's two, as RGB arrays."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "cat", "colorwheel")
    photos = [getattr(data, n)() for n in names if hasattr(data, n)]
    photos += list(load_sample_images().images)
    return [p[..., :3] for p in photos if p.ndim == 3]


def make_folder(folder: Path, count: int, seed: int = 0) -> List[str]:
    """``count`` JPEGs of 500 x 375 .. 1024 x 768 (either orientation) cut from the sample photos."""
    paths = [str(folder / f"img_{i:05d}.jpg") for i in range(count)]
    if all(os.path.exists(p) for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in sample_photos()]
    for path in paths:
        src = photos[rng.integers(len(photos))]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        long_side = int(rng.uniform(500, 1024))
        size = (long_side, long_side * 3 // 4) if rng.random() < 0.7 else (long_side * 3 // 4, long_side)
        src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return paths


class TimmFiles(torch.utils.data.Dataset):
    """The timm loop's dataset: PIL decode, RGB, timm's transform."""

    def __init__(self, paths: List[str], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i


def run_timm(model: torch.nn.Module, paths: List[str], out: str, batch_size: int, workers: int) -> float:
    import timm.data

    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    from convnextv2_hub.checkpoints.registry import imagenet_class_names

    names = imagenet_class_names()  # what ours writes too
    loader = torch.utils.data.DataLoader(TimmFiles(paths, tf), batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    with torch.inference_mode(), open(out, "w", encoding="utf-8") as f:
        for x, idx in loader:
            values, indices = model(x).softmax(-1).topk(5, dim=-1)
            f.write("".join(json.dumps({"image": paths[i], "topk": [{"label": names[j], "prob": round(p, 6)}
                                                                     for j, p in zip(ji, vi)]}) + "\n"
                            for i, ji, vi in zip(idx.tolist(), indices.tolist(), values.tolist())))
    return time.perf_counter() - start


def run_ours(model: torch.nn.Module, backend: str, paths: List[str], out: str, batch_size: int,
             workers: int) -> float:
    from convnextv2_hub.inference.file_jobs import predict_files
    from convnextv2_hub.inference.predictor import Predictor

    predictor = Predictor(model, backend=backend, batch_size=batch_size)
    start = time.perf_counter()
    predict_files(predictor, paths, out, topk=5, workers=workers, overwrite=True, progress=False)
    elapsed = time.perf_counter() - start
    run_ours.last_path = predictor.active_path  # type: ignore[attr-defined]
    return elapsed


def top1(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["topk"][0]["label"] for line in f]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="atto", help="ConvNeXt V2 size (timm's convnextv2_<size>)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: ours, sized to the CPUs)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "convnextv2_predict_folder"))
    a = p.parse_args()

    import timm

    from safetensors.torch import save_file

    from convnextv2_hub.inference.file_jobs import default_workers
    from convnextv2_hub.models.factory import create

    workers = default_workers() if a.workers is None else a.workers
    t0 = time.perf_counter()
    paths = make_folder(Path(a.folder), a.images)
    print(f"{len(paths)} JPEGs in {a.folder} ({time.perf_counter() - t0:.0f} s to make or find)")

    torch.manual_seed(0)
    ref = timm.create_model(f"convnextv2_{a.model}", pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "timm.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, weights)
        ours = create(a.model, checkpoint_path=weights).eval()  # timm's layout, detected and converted
        rows: Dict[str, List[float]] = {"timm + DataLoader (eager fp32)": [], "ours eager": [], "ours auto": []}
        outs = {name: os.path.join(tmp, f"{i}.jsonl") for i, name in enumerate(rows)}
        paths_taken: Dict[str, str] = {}
        for _ in range(a.rounds):
            rows["timm + DataLoader (eager fp32)"].append(
                run_timm(ref, paths, outs["timm + DataLoader (eager fp32)"], a.batch_size, workers))
            for backend in ("eager", "auto"):
                name = f"ours {backend}"
                rows[name].append(run_ours(ours, backend, paths, outs[name], a.batch_size, workers))
                paths_taken[name] = run_ours.last_path  # type: ignore[attr-defined]
        agree = [np.mean([x == y for x, y in zip(top1(outs[name]), top1(outs["timm + DataLoader (eager fp32)"]))])
                 for name in ("ours eager", "ours auto")]

    base = len(paths) / statistics.median(rows["timm + DataLoader (eager fp32)"])
    print(f"\nConvNeXt V2-{a.model.capitalize()}, {len(paths)} JPEGs (500x375..1024x768), batch {a.batch_size}, "
          f"{workers} decoding workers, {torch.get_num_threads()} torch threads, {cpu_name()} "
          f"({os.cpu_count()} CPUs), torch {torch.__version__}, timm {timm.__version__}; "
          f"median of {a.rounds} round(s)\n")
    print("| path | img/s | vs timm | last batch ran on | top-1 = timm's |")
    print("|---|---|---|---|---|")
    for i, (name, times) in enumerate(rows.items()):
        speed = len(paths) / statistics.median(times)
        ran = paths_taken.get(name, "eager fp32")
        same = f"{agree[i - 1]:.1%}" if i else "-"
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {ran} | {same} |")


if __name__ == "__main__":
    main()
