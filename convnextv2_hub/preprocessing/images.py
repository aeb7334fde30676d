"""Image files: which names are images, the photo shipped with the package, and ``open_image``, the one
function that reads an image file for every part of the package (prediction, analysis, training,
export verification, FCMAE reconstructions).

PIL and torch are imported inside ``open_image``, so importing this module loads neither.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import TYPE_CHECKING

from ..files import PathLike

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
SAMPLE_IMAGE = "sample.jpg"


def sample_image_path() -> str:
    """The photo shipped with the package (a tabby cat, ``convnextv2_hub/data/sample.jpg``)."""
    return str(resources.files("convnextv2_hub") / "data" / SAMPLE_IMAGE)


def open_image(path: PathLike) -> Image.Image:
    """An image file -> upright 8-bit RGB PIL image (``transforms.to_rgb`` of its first frame).

    The pixels are decoded here, so a truncated or corrupt file raises at this call (``OSError``,
    including ``PIL.UnidentifiedImageError``, or the ``ValueError``/``SyntaxError`` some decoders
    raise), and the file is closed when it returns.
    """
    from PIL import Image

    from .transforms import to_rgb

    with open(os.fspath(path), "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


__all__ = ["IMAGE_EXTENSIONS", "SAMPLE_IMAGE", "open_image", "sample_image_path"]
