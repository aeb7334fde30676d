"""Datasets, samplers, transforms and mixup/cutmix for the trainer.

Reproducibility design: every training sample's augmentation is drawn from its own RNG, seeded by
(seed, epoch, sample index), inside ``torch.random.fork_rng``. The sampler yields
``(index, sample_seed)`` pairs, so the same image gets the same crop whatever the number of
processes, workers, or where a resumed run restarts: a 2-process run sees exactly the pixels a
1-process run sees, and a run killed mid-epoch and resumed sees exactly what it would have seen.

Unreadable images (truncated, not an image, unsupported) are replaced by the next readable sample
and counted, never fatal: one broken file must not end a multi-day run. The count travels with the
batch (workers are separate processes) and is reported per epoch.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from ..preprocessing.images import IMAGE_EXTENSIONS, open_image
from ..preprocessing.transforms import ToRGB, final_step, interpolation_mode, train_transform
from ..preprocessing.transforms import eval_transform as preprocessing_eval_transform
from .run import TrainingInputError

_MAX_REPLACEMENTS = 64  # consecutive unreadable files before we conclude the data set is broken


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """(path, label) samples with robust loading and per-sample seeded transforms.

    ``__getitem__`` takes an int or an ``(index, seed)`` pair and returns ``(image, label, skipped)``
    where ``skipped`` counts the unreadable files passed over to produce this sample.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], transform: Optional[Callable] = None) -> None:
        if not samples:
            raise ValueError("the data set is empty")
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def check_readable(self, where: Union[str, Path]) -> None:
        """Raise ``TrainingInputError`` when none of the first files (as many as ``__getitem__`` would
        pass over) can be read: found before a run starts, not as a traceback in its first batch."""
        tried = min(_MAX_REPLACEMENTS, len(self.samples))
        first_error = None
        for path, _ in self.samples[:tried]:
            try:
                open_image(path)
                return
            except Exception as e:  # the same failures __getitem__ skips
                first_error = first_error or f"{path}: {type(e).__name__}: {e}"
        raise TrainingInputError(f"{where}: none of the first {tried} images can be read as an image "
                                 f"(first: {first_error}); is the data set intact?")

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int, int]:
        index, seed = (key, None) if isinstance(key, int) else key
        skipped = 0
        while True:
            path, label = self.samples[index]
            try:
                img = open_image(path)
                break
            except Exception as e:  # any decode failure (PIL raises OSError, ValueError, SyntaxError, ...)
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", stacklevel=2)
                skipped += 1
                if skipped >= min(_MAX_REPLACEMENTS, len(self.samples)):
                    raise TrainingInputError(f"{skipped} consecutive unreadable images up to {path}; is the data set intact?") from e
                index = (index + 1) % len(self.samples)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                img = seeded_call(self.transform, img, seed)
        return img, label, skipped


def seeded_call(fn: Callable, x: Any, seed: int) -> Any:
    """``fn(x)`` with torch, numpy and python RNGs seeded by ``seed``; the callers' RNG states are
    restored afterwards (in a 0-worker loader this runs in the training process)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (2**32))
            return fn(x)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def image_folder_samples(root: Path) -> Tuple[List[Tuple[str, int]], List[str]]:
    """ImageFolder layout (one sub-folder per class, sorted names -> label ids), scanned as torchvision."""
    from torchvision.datasets.folder import find_classes, make_dataset

    classes, class_to_idx = find_classes(str(root))
    samples = make_dataset(str(root), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    return samples, classes


def file_list_samples(list_file: Path) -> Tuple[List[Tuple[str, int]], List[str]]:
    """A text file, one ``<path> <label>`` per line (label an int; path relative to the file's folder;
    '#' starts a comment). Pre-training lists may leave the label out (-1)."""
    samples: List[Tuple[str, int]] = []
    base = list_file.parent
    for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            path, lab = parts[0], int(parts[1])
        elif len(parts) == 1 or not parts[1].lstrip("-").isdigit():
            path, lab = line, -1  # no label (pre-training lists); a path may contain spaces
        else:
            raise TrainingInputError(f"{list_file}:{n}: expected '<path> <integer label>', got {line!r}")
        p = Path(path)
        samples.append((str(p if p.is_absolute() else base / p), lab))
    n_classes = max((lab for _, lab in samples), default=-1) + 1
    return samples, [str(i) for i in range(n_classes)]


def find_split(data_path: Union[str, Path], split: str, fallback_to_root: bool = False) -> Optional[Path]:
    """``<data>/<split>/`` (ImageFolder), ``<data>/<split>.txt`` (file list), ``data`` itself when it
    is a list file or (with ``fallback_to_root``) an ImageFolder; None when there is none."""
    root = Path(data_path)
    if root.is_file():
        # One list file: the training set, or what ``eval`` evaluates; never also the validation set.
        return root if (split == "train" or fallback_to_root) else None
    if (root / split).is_dir():
        return root / split
    if (root / f"{split}.txt").is_file():
        return root / f"{split}.txt"
    if fallback_to_root and root.is_dir():
        return root
    return None


def build_dataset(location: Path, transform: Optional[Callable]) -> ImageDataset:
    """The data set at ``location`` (ImageFolder or file list), checked to hold readable images."""
    if location.is_file():
        samples, classes = file_list_samples(location)
    else:
        try:
            samples, classes = image_folder_samples(location)
        except FileNotFoundError as e:  # torchvision: "Couldn't find any class folder in ..."
            raise TrainingInputError(f"{location} has no class folders: an ImageFolder holds one sub-folder "
                                     "per class, with the images inside") from e
    if not samples:
        raise TrainingInputError(f"no images found in {location} (ImageFolder: one sub-folder per class; "
                                 f"extensions {IMAGE_EXTENSIONS})")
    ds = ImageDataset(samples, classes, transform)
    ds.check_readable(location)
    return ds


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (run seed, epoch, sample); splitmix-style mixing so neighbours differ."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


class TrainSampler(Sampler):
    """DistributedSampler semantics (seeded shuffle per epoch, rank r takes every world-th index,
    tail dropped so every rank has the same count) yielding ``(index, sample_seed)``, and able to
    start mid-epoch (``set_start``) for exact resume. World size 1 is the same code path."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        self.n = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.num_samples = n // num_replicas
        if self.num_samples == 0:
            raise TrainingInputError(f"{n} training images cannot be split over {num_replicas} processes")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the epoch."""
        self.start = start

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[: self.num_samples * self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i in self.indices()[self.start :]:
            yield (i, sample_seed(self.seed, self.epoch, i))

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Evaluation: rank r takes indices r, r + world, ... (no padding, so summed counts are exact)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.idx = list(range(rank, n, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------
def fcmae_train_transform(
    input_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic", scale: Sequence[float] = (0.2, 1.0),
    uint8: bool = False,
) -> Callable:
    """The authors' pre-training augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip, nothing else
    (``preprocessing.transforms.train_transform`` with that scale; ``uint8``: unnormalised uint8 images)."""
    return train_transform(input_size, interpolation, mean, std, scale, uint8)


class RandAugmentOp(v2.RandAugment):
    """One RandAugment op whose magnitude is drawn per call from N(m, mstd) clipped to [0, 10],
    timm's 'mstd'. 101 bins make torchvision's magnitude grid timm's 0..10 scale in steps of 0.1
    (torchvision's default 31 bins would make m9 only 30 % of the maximum, not timm's 90 %)."""

    def __init__(self, magnitude: float, magnitude_std: float, fill: Sequence[int]) -> None:
        super().__init__(num_ops=1, magnitude=0, num_magnitude_bins=101, interpolation=v2.InterpolationMode.BILINEAR, fill=list(fill))
        self.m = magnitude
        self.mstd = magnitude_std

    def forward(self, *inputs: Any) -> Any:
        m = self.m
        if self.mstd > 0:
            m = m + self.mstd * float(torch.randn(()))
        self.magnitude = int(round(min(10.0, max(0.0, m)) * 10))
        return super().forward(*inputs)


def rand_augment(policy: str, mean: Sequence[float]) -> Callable:
    """timm-style ``rand-mM-mstdS-nN`` on torchvision's RandAugment ops: N ops, each applied with
    probability 0.5 (timm's default op prob) at a per-op sampled magnitude; fill = mean pixel (timm)."""
    from .config import parse_rand_augment

    num_ops, m, mstd = parse_rand_augment(policy)
    fill = [int(round(255 * c)) for c in mean]
    return v2.Compose([v2.RandomApply([RandAugmentOp(m, mstd, fill)], p=0.5) for _ in range(num_ops)])


def finetune_train_transform(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    aa: Optional[str] = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    interpolation: str = "bicubic",
    scale: Sequence[float] = (0.08, 1.0),
    uint8: bool = False,
) -> Callable:
    """timm ``create_transform(is_training=True)`` as the authors use it, on torchvision.transforms.v2:
    RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) -> flip -> RandAugment -> tensor, normalise ->
    RandomErasing(reprob; 'pixel' = per-pixel normal noise, timm's pixel mode). ``uint8`` (only without
    erasing, whose noise is drawn in normalised units): unnormalised uint8 images."""
    if uint8 and reprob > 0:
        raise ValueError("uint8 output needs reprob=0: random erasing fills with noise in normalised units")
    steps: list = [
        ToRGB(),
        v2.RandomResizedCrop(input_size, scale=tuple(scale), ratio=(3 / 4, 4 / 3), interpolation=interpolation_mode(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if aa not in (None, "", "none"):
        steps.append(rand_augment(aa, mean))
    steps.append(final_step(mean, std, uint8))
    if reprob > 0:
        steps.append(v2.RandomErasing(p=reprob, value="random" if remode == "pixel" else 0))
    return v2.Compose(steps)


@dataclass(frozen=True)
class EvalPreprocessing:
    resolution: int
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


def eval_preprocessing(model_name: Any, input_size: int, crop_pct: Optional[float], imagenet_mean_std: bool = True) -> EvalPreprocessing:
    """Eval preprocessing from the checkpoint's manifest entry (``model_name``: a name, or the entry itself,
    such as the ``model.checkpoint`` of a model pulled from the Hub).

    The entry of ``model_name`` is used when its resolution is ``input_size``; otherwise another entry of
    the same variant at that resolution, and failing that the authors' rule: centre crop with
    crop_pct 0.875 below 384, squash (crop_pct 1.0) at 384 and above. ``crop_pct`` overrides.
    """
    from ..checkpoints.registry import get_checkpoint, list_checkpoints

    ckpt = get_checkpoint(model_name)
    variant = ckpt.variant
    if ckpt.resolution != input_size:
        same = [get_checkpoint(n) for n in list_checkpoints(variant)]
        same = [c for c in same if c.resolution == input_size and c.num_classes > 0]
        if same:
            ckpt = same[0]
    if ckpt.resolution == input_size:
        pct, mode = ckpt.crop_pct, ckpt.crop_mode
    else:
        pct, mode = (0.875, "center") if input_size < 384 else (1.0, "squash")
    if crop_pct is not None:
        pct = crop_pct
    mean, std = (ckpt.mean, ckpt.std) if imagenet_mean_std else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return EvalPreprocessing(input_size, pct, mode, ckpt.interpolation, tuple(mean), tuple(std))  # type: ignore[arg-type]


def eval_transform(p: EvalPreprocessing, uint8: bool = False) -> Callable:
    """``preprocessing.transforms.eval_transform`` with these settings."""
    return preprocessing_eval_transform(p.resolution, p.crop_pct, p.crop_mode, p.interpolation, p.mean, p.std, uint8)


# ------------------------------------------------------------------------------------------------
# Mixup / cutmix
# ------------------------------------------------------------------------------------------------
class MixupCutmix:
    """timm ``Mixup`` (mode 'batch') on torchvision.transforms.v2 MixUp/CutMix: with probability
    ``prob`` one of them is applied to the batch (cutmix with ``switch_prob`` when both are on), and
    label smoothing is folded into the soft targets: t * (1 - s) + s / K, which is what timm's
    on/off values give for mixed one-hot labels."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, smoothing: float, num_classes: int) -> None:
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.prob = prob
        mix = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        cut = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        if mix is not None and cut is not None:
            self.op: Callable = v2.RandomChoice([mix, cut], p=[1.0 - switch_prob, switch_prob])
        else:
            self.op = mix if mix is not None else cut  # type: ignore[assignment]
        if self.op is None:
            raise ValueError("MixupCutmix needs mixup > 0 or cutmix > 0")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.prob >= 1.0 or float(torch.rand(())) < self.prob:
            images, target = self.op(images, labels)
        else:
            target = F.one_hot(labels, self.num_classes).to(images.dtype)
        target = target * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        return images, target


# A ceiling on the default: every worker is a process with its own copy of the sample list and
# transforms, and past a handful of workers per GPU the CPUs are better left to the other processes.
MAX_DEFAULT_WORKERS = 8


def process_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what a container, cgroup or taskset
    allows), or every CPU where the platform cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_world_size() -> int:
    """Training processes on this node: torchrun's ``LOCAL_WORLD_SIZE``, 1 without torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_num_workers(local_processes: Optional[int] = None) -> int:
    """Loader workers per process when ``num_workers`` is null: this node's CPUs shared by this node's
    processes, one CPU each left to the process itself, at most ``MAX_DEFAULT_WORKERS``. Per node, not
    per global world size: the workers of other nodes use other CPUs. The local processes are assumed
    to share this process's CPUs (torchrun's way); a launcher that binds each process to CPUs of its
    own makes this too small, and ``num_workers`` is then the key to set."""
    local = local_processes if local_processes is not None else local_world_size()
    return max(0, min(MAX_DEFAULT_WORKERS, process_cpus() // max(1, local) - 1))


def make_loader(ds: Dataset, batch_size: int, sampler: Sampler, num_workers: int, pin_memory: bool,
                generator: torch.Generator, drop_last: bool = False) -> DataLoader:
    """A DataLoader with ``collate``; its workers persist across epochs (starting them again each epoch,
    each re-importing torch and re-opening the data set, would stall every epoch's first steps)."""
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      drop_last=drop_last, pin_memory=pin_memory, generator=generator,
                      persistent_workers=num_workers > 0)


def collate(batch: List[Tuple[torch.Tensor, int, int]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels, sum(b[2] for b in batch)


__all__ = [
    "ImageDataset",
    "MixupCutmix",
    "ShardSampler",
    "TrainSampler",
    "build_dataset",
    "default_num_workers",
    "make_loader",
    "eval_preprocessing",
    "eval_transform",
    "fcmae_train_transform",
    "find_split",
    "finetune_train_transform",
]
