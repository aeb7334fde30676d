"""A small real data set that needs no download: scikit-learn's handwritten digits (1,797 greyscale 8x8
images, 10 classes) upscaled and written as an ImageFolder with ``train/`` and ``val/`` splits, the layout
the trainer reads. ``convnextv2-train reproduce --data digits`` writes it into its output folder."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..files import PathLike, atomic_write_json

COMPLETE_FILE = "digits.json"  # written last: a folder without it is an interrupted write, redone


def write_digits(
    root: PathLike,
    classes: Optional[Iterable[int]] = None,
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    size: int = 64,
    val_fraction: float = 0.2,
) -> Path:
    """The digits of ``classes`` (default all 10) as ``size`` x ``size`` RGB PNGs in ``root/train/<c>/``
    and ``root/val/<c>/``. Per class the images are shuffled with a fixed seed, then ``n_val`` go to
    val (default ``val_fraction`` of the class, rounded) and ``n_train`` of the rest to train (default
    all of them); the same arguments always give the same files."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the built-in digits data set comes from scikit-learn: pip install scikit-learn") from None
    root = Path(root)
    d = load_digits()
    rng = np.random.default_rng(0)
    for c in classes if classes is not None else range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        val = round(len(idx) * val_fraction) if n_val is None else n_val
        train = len(idx) - val if n_train is None else n_train
        for split, ids in (("val", idx[train : train + val]), ("train", idx[:train])):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                a = (d.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(a, "L").resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


def digits_folder(parent: PathLike, size: int) -> Path:
    """``parent/digits-<size>px``, all 10 classes with a 20 % validation split; written once (the
    marker file ``digits.json`` says the folder is complete) and reused afterwards."""
    root = Path(parent) / f"digits-{size}px"
    if not (root / COMPLETE_FILE).is_file():
        write_digits(root, size=size)
        counts = {split: sum(1 for _ in (root / split).rglob("*.png")) for split in ("train", "val")}
        atomic_write_json(root / COMPLETE_FILE, {"source": "sklearn.datasets.load_digits", "size": size, "images": counts})
    return root
