"""Image preprocessing exactly as the checkpoints were evaluated (authors' ``build_transform``, timm cfgs).

Eval, per checkpoint:
- ``center`` (224 checkpoints, crop_pct 0.875): resize the shorter side to ``floor(res / crop_pct)``
  (224 -> 256), bicubic, then centre-crop ``res``.
- ``squash`` (384/512 checkpoints, crop_pct 1.0): resize straight to ``(res, res)``, bicubic, no crop;
  the aspect ratio is not kept. This is the authors' "warp" for input sizes >= 384.
- then scale to float in [0, 1] and normalise with the ImageNet mean/std.

The resize runs on the PIL image (torchvision.transforms.v2 dispatches PIL inputs to PIL's own
resampling), as timm's and the authors' pipelines do: a tensor-side bicubic resize differs from PIL's
by a few grey levels near edges, which is enough to move logits.

``to_rgb`` runs first and turns whatever a user passes (any PIL mode, EXIF-rotated phone photos,
16-bit scans, a uint8 tensor or array) into an upright 8-bit RGB PIL image; ``to_normalized_tensor``
runs last. They, ``ToRGB`` and ``interpolation_mode`` are the pieces the trainer's augmentations
(``train.data``) are built from.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Transparent pixels are composited on white: the colour under alpha=0 is undefined (often black,
# sometimes leftover garbage), and a plain convert("RGB") would expose it. White is what browsers and
# viewers show for transparent logos and product shots, the usual sources of RGBA images.
_BACKGROUND = (255, 255, 255)


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise TypeError(f"image arrays and tensors must be uint8 (0..255), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    # uint8 HxW / HxWx3 / HxWx4 map to L / RGB / RGBA by shape alone (Pillow deprecated fromarray's mode=).
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(a))
    raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image array, got shape {a.shape}")


def _greyscale_to_l(img: Image.Image) -> Image.Image:
    """High-bit-depth greyscale -> 8 bit by scaling its value range; Pillow's convert("L") clips at 255.

    - ``I;16*``: 0..65535 -> 0..255.
    - ``I`` (32-bit int): Pillow decodes 16-bit PNG/TIFF data into it, so values within 0..65535 are
      scaled as 16-bit; anything outside that range is scaled from its own min..max.
    - ``F`` (32-bit float): values within [0, 1] (the float-image convention) are scaled by 255;
      anything else from its own min..max.
    """
    a = np.asarray(img).astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    out = np.clip(np.rint((a - lo) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def to_rgb(img: ImageLike) -> Image.Image:
    """Any image a user may pass -> upright 8-bit RGB PIL image.

    Accepts PIL images of any mode, a uint8 torch tensor (C x H x W, C in 1/3/4) or a uint8 numpy array
    (H x W or H x W x C, C in 1/3/4). PIL images are turned upright by their EXIF orientation first:
    phone cameras store the sensor's orientation in EXIF, and the network sees what a viewer shows.
    """
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise ValueError(f"expected a C x H x W or H x W image tensor, got shape {tuple(img.shape)}")
        img = _array_to_pil(t.numpy())
    elif isinstance(img, np.ndarray):
        img = _array_to_pil(img)
    elif not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, a torch uint8 tensor or a numpy uint8 array, got {type(img).__name__}")

    img = ImageOps.exif_transpose(img)  # a copy without the orientation tag; unchanged pixels when there is none
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _greyscale_to_l(img).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode in ("L", "1"):
        return img.convert("RGB")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, img).convert("RGB")
    # CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion (CMYK without an ICC profile, as timm's loaders do).
    return img.convert("RGB")


class ToRGB:
    """``to_rgb`` as a pipeline step (a class, so the composed transform has a readable repr and pickles)."""

    def __call__(self, img: ImageLike) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """torchvision's interpolation mode for a name such as ``"bicubic"`` (case-insensitive)."""
    try:
        return v2.InterpolationMode(name.lower())
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use one of {[m.value for m in v2.InterpolationMode]}") from None


def normalize_images(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """uint8 images (3, H, W) or a batch of them (N, 3, H, W), on any device -> float32 in [0, 1] ->
    ``(x - mean) / std``. The same element-wise operations on one image or a batch give the same
    numbers, so the trainer runs this on the GPU for batches that travel as uint8."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The last step of every pipeline: RGB PIL image -> float32 (3, H, W) in [0, 1] -> ``(x - mean) / std``."""
    return v2.Compose([v2.PILToTensor(), normalize_images(mean, std)])


def final_step(mean: Sequence[float], std: Sequence[float], uint8: bool = False) -> Callable:
    """``to_normalized_tensor``, or with ``uint8`` the image as a uint8 (3, H, W) tensor, to be
    normalised later by ``normalize_images`` (a quarter of the bytes through the loader and onto the GPU)."""
    return v2.PILToTensor() if uint8 else to_normalized_tensor(mean, std)


def eval_transform(
    resolution: int,
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    uint8: bool = False,
) -> Callable[[ImageLike], torch.Tensor]:
    """Deterministic eval pipeline: image -> float32 tensor (3, resolution, resolution) (with ``uint8``:
    the uint8 image, see ``final_step``).

    ``crop_mode="center"``: shorter side to ``floor(resolution / crop_pct)`` then centre crop
    (``math.floor``, as timm, so 224 / 0.875 -> 256). ``"squash"``: resize both sides to
    ``floor(resolution / crop_pct)`` then centre crop, i.e. a plain warp at crop_pct 1.0.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale = math.floor(resolution / crop_pct)
    mode = interpolation_mode(interpolation)
    if crop_mode == "center":
        resize = v2.Resize(scale, interpolation=mode, antialias=True)
    elif crop_mode == "squash":
        resize = v2.Resize((scale, scale), interpolation=mode, antialias=True)
    else:
        raise ValueError(f"crop_mode must be 'center' or 'squash', got {crop_mode!r}")
    steps = [ToRGB(), resize]
    if scale != resolution or crop_mode == "center":
        steps.append(v2.CenterCrop(resolution))
    return v2.Compose(steps + [final_step(mean, std, uint8)])


def train_transform(
    resolution: int,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: Sequence[float] = (0.08, 1.0),
    uint8: bool = False,
) -> Callable[[ImageLike], torch.Tensor]:
    """Basic training pipeline: RandomResizedCrop (bicubic, timm's default scale) + horizontal flip
    (``uint8``: see ``final_step``).

    FCMAE pre-training is this pipeline with scale (0.2, 1.0) (``train.data.fcmae_train_transform``);
    the authors' fine-tuning adds RandAugment and random erasing (``train.data.finetune_train_transform``).
    """
    return v2.Compose(
        [
            ToRGB(),
            v2.RandomResizedCrop(resolution, scale=tuple(scale), interpolation=interpolation_mode(interpolation), antialias=True),
            v2.RandomHorizontalFlip(),
            final_step(mean, std, uint8),
        ]
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ToRGB",
    "eval_transform",
    "final_step",
    "interpolation_mode",
    "normalize_images",
    "to_normalized_tensor",
    "to_rgb",
    "train_transform",
]
