"""Nearest neighbours in a folder of images: embed every image, then name each one's closest other image.

    python examples/nearest_neighbours.py photos/                        # tiny's pre-logits features
    python examples/nearest_neighbours.py photos/ --model tiny.fcmae --save feats.npz
    python examples/nearest_neighbours.py photos/ --model atto --checkpoint-path atto.safetensors --resolution 96

The features are the pooled pre-logits ones (``Predictor.embed``: global average pool and the head's
LayerNorm, what the classifier sees), computed by ``embed_files``, the job behind ``convnextv2 embed``:
worker processes decode the images while the model runs. Similarity is the cosine of two feature
vectors; for a large collection, put the normalised vectors into a vector index (faiss, annoy) instead
of the full N x N matrix below.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import List, Optional

import numpy as np

from convnextv2_hub.inference.file_jobs import embed_files
from convnextv2_hub.inference.predictor import Predictor
from convnextv2_hub.inference.result_files import load_embeddings
from convnextv2_hub.models.factory import create
from convnextv2_hub.preprocessing.images import expand_image_paths
from convnextv2_hub.preprocessing.transforms import eval_transform


def nearest(features: np.ndarray) -> List[tuple]:
    """For each row: (index of the most cosine-similar other row, that similarity)."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)  # an image is not its own neighbour
    best = sim.argmax(axis=1)
    return [(int(j), float(sim[i, j])) for i, j in enumerate(best)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--model", default="tiny", help="model or checkpoint name (default: tiny)")
    parser.add_argument("--checkpoint-path", help="local weights instead of downloading (works offline)")
    parser.add_argument("--resolution", type=int, help="input size (default: the checkpoint's preprocessing)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: sized to the CPUs)")
    parser.add_argument("--save", help="keep the embeddings in this .npy/.npz/.parquet file")
    args = parser.parse_args(argv)

    paths = expand_image_paths(args.images)
    if len(paths) < 2:
        parser.error("nearest neighbours need at least two images")
    model = create(args.model, pretrained=args.checkpoint_path is None, checkpoint_path=args.checkpoint_path)
    transform = None
    if args.resolution:
        ckpt = model.checkpoint
        transform = eval_transform(args.resolution, ckpt.crop_pct, ckpt.crop_mode, ckpt.interpolation, ckpt.mean,
                                   ckpt.std)
    predictor = Predictor(model, backend="auto", transform=transform, batch_size=min(16, len(paths)))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.save or os.path.join(tmp, "feats.npz")
        summary = embed_files(predictor, paths, out, workers=args.workers)
        features, names = load_embeddings(out)
    for path, error in summary.errors:
        print(f"skipped {path}: {error}")
    print(f"{len(names)} images, {features.shape[1]} features each ({summary.images_per_s:.1f} img/s)")
    for name, (j, sim) in zip(names, nearest(features)):
        print(f"{name} -> {names[j]}  (cosine {sim:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
