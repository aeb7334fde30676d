"""Classify images with a ConvNeXtV2, using the preprocessing and labels of its checkpoint."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, UnidentifiedImageError

from .model import ConvNeXtV2

ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass
class Prediction:
    """Top-k result for one input; ``error`` is set (and ``topk`` empty) when the input could not be read."""

    source: str
    topk: List[Tuple[str, float]] = field(default_factory=list)
    error: Optional[str] = None


def label_names(model: ConvNeXtV2) -> List[str]:
    """Class names for the model's head: the checkpoint's (ImageNet-1K) when the head matches it."""
    names = getattr(model, "label_names", None)
    if names is None:
        ckpt = getattr(model, "checkpoint", None)
        if ckpt is not None and ckpt.num_classes == model.num_classes:
            names = ckpt.label_names
    if names is None or len(names) != model.num_classes:
        names = [f"class_{i}" for i in range(model.num_classes)]
    return list(names)


def default_transform(model: ConvNeXtV2) -> Callable:
    from .transforms import create_transform

    ckpt = getattr(model, "checkpoint", None)
    return ckpt.transforms() if ckpt is not None else create_transform("tiny.fcmae_ft_in1k")


def _load(item: ImageInput) -> Tuple[str, Image.Image]:
    if isinstance(item, Image.Image):
        return "<PIL.Image>", item
    path = os.fspath(item)
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here and is reported for this file only
        return path, img.copy() if img.mode != "P" else img.convert("RGBA")


def classify(
    model: ConvNeXtV2,
    images: Iterable[ImageInput],
    topk: int = 5,
    batch_size: int = 16,
    transform: Optional[Callable] = None,
    device: Union[str, torch.device, None] = None,
) -> List[Prediction]:
    """Classify files or PIL images; unreadable inputs get a Prediction with ``error`` set."""
    if model.features_only or model.num_classes <= 0:
        raise ValueError("predict needs a model with a classifier head (num_classes > 0); "
                         "create it from a fine-tuned checkpoint, e.g. create('tiny', pretrained=True)")
    transform = transform or default_transform(model)
    names = label_names(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    k = max(1, min(topk, model.num_classes))
    results: List[Prediction] = []
    pending: List[Tuple[Prediction, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending]).to(device)
        with torch.inference_mode():
            probs = model(batch).float().softmax(dim=-1)
        values, indices = probs.topk(k, dim=-1)
        for (pred, _), v, i in zip(pending, values.tolist(), indices.tolist()):
            pred.topk = [(names[j], p) for j, p in zip(i, v)]
        pending.clear()

    was_training = model.training
    model.eval()
    try:
        for item in images:
            pred = Prediction(source=os.fspath(item) if not isinstance(item, Image.Image) else "<PIL.Image>")
            results.append(pred)
            try:
                _, img = _load(item)
                tensor = transform(img)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                pred.error = f"cannot read image: {exc}"
                continue
            pending.append((pred, tensor))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        model.train(was_training)
    return results


def predict(
    model: ConvNeXtV2,
    images: Union[ImageInput, Sequence[ImageInput]],
    topk: int = 5,
    batch_size: int = 16,
    transform: Optional[Callable] = None,
    device: Union[str, torch.device, None] = None,
) -> List[List[Tuple[str, float]]]:
    """Top-k ``(label, probability)`` per image, in input order.

    An unreadable image yields an empty list and a warning naming the file; the others are classified.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = []
    for pred in classify(model, images, topk=topk, batch_size=batch_size, transform=transform, device=device):
        if pred.error:
            warnings.warn(f"{pred.source}: {pred.error}", stacklevel=2)
        out.append(pred.topk)
    return out
