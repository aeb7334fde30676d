"""Image folders: an ImageFolder-style dir (one sub-folder per class) or a flat folder, listed with a
seeded round-robin selection across classes, the dataset and DataLoader that read the listed files
(``image_list_loader``, which fails on an unreadable file, and ``image_files_loader``, which reports it
and goes on), and ``default_transform``, a model's own eval preprocessing.

torch is imported inside the functions that use it: importing this module (as the ``convnextv2``
command's parser does, through ``cli.analyze``) does not load it.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

from ..files import PathLike
from .images import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, is_image_name, open_image

if TYPE_CHECKING:
    import torch
    from torch import nn


def _is_image(p: Path) -> bool:
    return p.is_file() and is_image_name(p.name)


def list_images(
    root: PathLike,
    limit: Optional[int] = None,
    per_class: Optional[int] = None,
    seed: int = 0,
    require_classes: bool = False,
) -> Tuple[List[str], List[int], List[str]]:
    """Image paths, class indices and class names of an ImageFolder-style dir or a flat folder.

    Class folders (sub-directories holding images, searched recursively) win over loose files. The
    selection is seeded-random within each class and round-robin across classes, so ``limit=1000`` on
    ImageNet val gives one image of each class, the paper's "images from different classes". A flat
    folder has one unnamed class (index -1).
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"{root} is not a directory")
    rng = random.Random(seed)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups: List[List[str]] = []
    names: List[str] = []
    for name in classes:
        files = sorted(str(p) for p in (base / name).rglob("*") if _is_image(p))
        if files:
            names.append(name)
            groups.append(files)
    if not groups:
        if require_classes:
            raise ValueError(f"{root} has no class sub-folders with images (expected ROOT/CLASS/IMAGE)")
        files = sorted(str(p) for p in base.iterdir() if _is_image(p))
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
        rng.shuffle(files)
        files = files[:limit] if limit else files
        return files, [-1] * len(files), []
    for files in groups:
        rng.shuffle(files)
        if per_class:
            del files[per_class:]
    order = list(range(len(groups)))
    rng.shuffle(order)
    paths: List[str] = []
    labels: List[int] = []
    for rank in range(max(len(g) for g in groups)):
        for c in order:
            if rank < len(groups[c]):
                paths.append(groups[c][rank])
                labels.append(c)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    return paths, labels, names


class ImageList:
    """(image tensor, label) for a list of files; unreadable files fail with their path in the message.

    A map-style dataset (``__len__``/``__getitem__``), all a DataLoader needs.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        try:
            rgb = open_image(self.paths[i])
        except OSError as exc:
            raise OSError(f"cannot read image {self.paths[i]}: {exc}") from exc
        return self.transform(rgb), self.labels[i]


def default_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """The model's own eval preprocessing: its checkpoint entry's, timm's data config, else the ImageNet
    224 pipeline (``eval_transform(224)``: resize to 256, centre crop 224, bicubic, as ``tiny.fcmae_ft_in1k``)."""
    ckpt = getattr(model, "checkpoint", None)
    if ckpt is not None and hasattr(ckpt, "transforms"):
        return ckpt.transforms()
    if getattr(model, "pretrained_cfg", None):  # a timm model
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    from .transforms import eval_transform

    return eval_transform(224)


def image_list_loader(
    paths: Sequence[str], labels: Sequence[int], transform: Callable[[Any], torch.Tensor], batch_size: int, workers: int
) -> torch.utils.data.DataLoader:
    """A DataLoader of (images, labels) batches over ``ImageList(paths, labels, transform)``, in order."""
    import torch

    return torch.utils.data.DataLoader(
        ImageList(paths, labels, transform), batch_size=batch_size, shuffle=False, num_workers=workers
    )


class ImageFiles:
    """``i -> (i, tensor, None)`` for a readable file, ``(i, None, error message)`` for one that is not.

    For jobs over folders that must not stop at one bad file (``convnextv2 predict --output``, ``embed``):
    decoding and the transform run in the DataLoader's workers, and a failure comes back as data.
    """

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            return i, self.transform(open_image(self.paths[i])), None
        except UNREADABLE_IMAGE_ERRORS as exc:
            return i, None, f"cannot read image: {exc}"


class FileBatch(NamedTuple):
    """One batch of ``image_files_loader``: the indices (into its paths) of the readable images, their
    stacked tensors (None when none was readable), and ``(index, error)`` for the others."""

    indices: List[int]
    images: Optional[torch.Tensor]
    errors: List[Tuple[int, str]]


def collate_image_files(items: Sequence[Tuple[int, Optional[torch.Tensor], Optional[str]]]) -> FileBatch:
    """Stack the readable images of a batch of ``ImageFiles`` items; keep the errors apart."""
    import torch

    good = [(i, t) for i, t, _ in items if t is not None]
    errors = [(i, e) for i, t, e in items if t is None]
    images = torch.stack([t for _, t in good]) if good else None
    return FileBatch([i for i, _ in good], images, errors)


def image_files_loader(
    paths: Sequence[str], transform: Callable[[Any], torch.Tensor], batch_size: int, workers: int,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``FileBatch`` over ``ImageFiles(paths, transform)``, in order: ``workers`` processes
    decode and transform the next batches while the caller runs the current one."""
    import torch

    return torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_image_files, pin_memory=pin_memory,
    )


__all__ = ["IMAGE_EXTENSIONS", "FileBatch", "ImageFiles", "ImageList", "collate_image_files", "default_transform",
           "image_files_loader", "image_list_loader", "list_images"]
