"""Depths and widths of the eight ConvNeXt V2 variants (paper App. A.1, authors' model file)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Variant:
    name: str
    depths: Tuple[int, int, int, int]
    dims: Tuple[int, int, int, int]


VARIANTS = {
    v.name: v
    for v in (
        Variant("atto", (2, 2, 6, 2), (40, 80, 160, 320)),
        Variant("femto", (2, 2, 6, 2), (48, 96, 192, 384)),
        Variant("pico", (2, 2, 6, 2), (64, 128, 256, 512)),
        Variant("nano", (2, 2, 8, 2), (80, 160, 320, 640)),
        Variant("tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
        Variant("base", (3, 3, 27, 3), (128, 256, 512, 1024)),
        Variant("large", (3, 3, 27, 3), (192, 384, 768, 1536)),
        Variant("huge", (3, 3, 27, 3), (352, 704, 1408, 2816)),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown ConvNeXt V2 variant {name!r}; choose one of {list(VARIANTS)}") from None


def variant_of(depths: Sequence[int], dims: Sequence[int]) -> Optional[str]:
    """The name of the variant with these depths and dims, None when no variant has them."""
    for v in VARIANTS.values():
        if v.depths == tuple(depths) and v.dims == tuple(dims):
            return v.name
    return None
