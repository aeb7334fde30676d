"""Image files: which names are images, the photo shipped with the package, ``expand_image_paths`` (files and
folders as a user names them on a command line) and ``open_image``, the one function that reads an image file
for every part of the package (prediction, analysis, training, export verification, FCMAE reconstructions).

PIL and torch are imported inside ``open_image``, so importing this module loads neither.
"""
from __future__ import annotations

import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from ..files import PathLike

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
SAMPLE_IMAGE = "sample.jpg"


# What reading or preprocessing one bad image file raises (PIL.UnidentifiedImageError is an OSError; some
# decoders raise ValueError or SyntaxError): the callers that report bad files one by one catch these.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


class ImageTooLargeError(OSError):
    """An image file with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``: a possible decompression bomb.

    An ``OSError`` like every other unreadable file, so the callers that report or skip unreadable files
    one by one (``predict``, the ``convnextv2 predict`` command, the training data sets) treat it alike.
    """


def sample_image_path() -> str:
    """The photo shipped with the package (a tabby cat, ``convnextv2_hub/data/sample.jpg``)."""
    return str(resources.files("convnextv2_hub") / "data" / SAMPLE_IMAGE)


def open_image(path: PathLike) -> Image.Image:
    """An image file -> upright 8-bit RGB PIL image (``transforms.to_rgb`` of its first frame).

    The pixels are decoded here, so a truncated or corrupt file raises at this call (``OSError``,
    including ``PIL.UnidentifiedImageError``, or the ``ValueError``/``SyntaxError`` some decoders
    raise), and the file is closed when it returns.

    An image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` raises ``ImageTooLargeError`` naming the
    file, before anything is decoded. PIL itself only warns (without naming the file) up to twice that limit
    and decodes the image; here that range is refused too, so the limit a user can raise is the one that
    applies: a file of a few hundred KB must not cost gigabytes of memory by default.
    """
    from PIL import Image

    from .transforms import to_rgb

    with open(os.fspath(path), "rb") as f:
        # PIL's own warning names no file and is replaced by the check below. catch_warnings changes the
        # process-wide filters while PIL reads the header (thread-safe only from Python 3.14 on, but the
        # only effect of a race is that PIL's warning is shown or hidden in another thread).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(f)
            except Image.DecompressionBombError as exc:
                raise ImageTooLargeError(_too_large_message(path, None, _pixels_in(str(exc)))) from None
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            raise ImageTooLargeError(_too_large_message(path, img.size, img.width * img.height))
        img.load()
    return to_rgb(img)


def _pixels_in(pil_message: str) -> Optional[int]:
    """The pixel count in PIL's "Image size (N pixels) exceeds limit ..." message, if it still says so."""
    found = re.search(r"\((\d+) pixels\)", pil_message)
    return int(found.group(1)) if found else None


def _too_large_message(path: PathLike, size: Optional[Tuple[int, int]], pixels: Optional[int]) -> str:
    from PIL import Image

    if size is not None:
        what = f"{size[0]} x {size[1]} = {pixels:,} pixels"
    elif pixels is not None:
        what = f"{pixels:,} pixels"
    else:
        what = "more than twice as many pixels"
    return (f"{os.fspath(path)}: image of {what} exceeds the pixel limit of {Image.MAX_IMAGE_PIXELS:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS), a guard against decompression bombs; if you trust this file, "
            "raise the limit first (e.g. PIL.Image.MAX_IMAGE_PIXELS = None)")


def is_image_name(name: str) -> bool:
    """True for a visible file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def expand_image_paths(paths: Sequence[PathLike]) -> List[str]:
    """Files as given and folders expanded to their image files, in the order given.

    A folder contributes every image file under it (``IMAGE_EXTENSIONS``, recursively, hidden files and
    folders skipped, sorted by path), as image tools do with a folder argument; a file named explicitly is
    kept whatever its extension (if it is no image, reading it fails and is reported for it alone).
    Raises ``FileNotFoundError`` naming every missing path and ``ValueError`` for a folder without images.
    """
    missing = [os.fspath(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"no such image file or folder: {', '.join(missing)}; check the path(s)")
    out: List[str] = []
    for p in paths:
        if not os.path.isdir(p):
            out.append(os.fspath(p))
            continue
        found = _images_under(Path(p))
        if not found:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {os.fspath(p)} "
                             "or its sub-folders")
        out.extend(found)
    return out


def _images_under(root: Path) -> List[str]:
    found: List[Tuple[Tuple[str, ...], str]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            full = Path(folder) / name
            if is_image_name(name) and full.is_file():
                # Sorted by path components, so a folder's files and sub-folders interleave by name.
                found.append((full.relative_to(root).parts, str(full)))
    return [path for _, path in sorted(found)]


__all__ = ["IMAGE_EXTENSIONS", "SAMPLE_IMAGE", "UNREADABLE_IMAGE_ERRORS", "ImageTooLargeError", "expand_image_paths",
           "is_image_name", "open_image", "sample_image_path"]
