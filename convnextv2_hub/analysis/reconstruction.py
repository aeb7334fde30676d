"""What an FCMAE sees and rebuilds, as one PNG row (original | masked | reconstruction |
reconstruction with the visible patches pasted back); ``convnextv2 fcmae-show`` runs it."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..files import PathLike, atomic_path
from ..models.fcmae import ENCODER_STRIDE, FCMAE, patchify, unpatchify
from ..preprocessing.images import open_image
from ..preprocessing.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor

PANEL_GAP = 4  # white pixels between the four panels


def _load_image(image_path: PathLike, size: Tuple[int, int]) -> torch.Tensor:
    """File -> normalised (1, 3, H, W): upright RGB, the largest centred region of the panel's aspect
    ratio scaled to ``size`` (``ImageOps.fit``, bicubic).

    ``ImageOps.fit`` scales the exact (possibly fractional) centre region; the eval pipeline's
    resize-then-crop rounds the resized size and the crop offset to whole pixels, so it can sample up
    to a pixel differently.
    """
    from PIL import Image, ImageOps

    img = ImageOps.fit(open_image(image_path), (size[1], size[0]), method=Image.Resampling.BICUBIC)
    return to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD)(img).unsqueeze(0)


@torch.no_grad()
def reconstruct(
    model: FCMAE, imgs: torch.Tensor, mask_ratio: Optional[float] = None, generator: Optional[torch.Generator] = None
) -> Dict[str, torch.Tensor]:
    """The four normalised image tensors of the fcmae-show panel for a batch, plus the mask.

    With ``norm_pix_loss`` the network predicts per-patch-normalised pixels; they are mapped back with
    the mean/std of the true patch (MAE's visualisation convention), so the colours of masked
    patches come from the original and the shapes from the model.
    """
    n, _, height, width = imgs.shape
    h, w = model._grid(height, width)
    p = model.patch_size
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, generator=generator)
    finally:
        model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        t = patchify(imgs.float(), p)
        pred = pred * (t.var(dim=-1, keepdim=True, correction=1) + 1.0e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
    recon = unpatchify(pred, h, w, p)
    m = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3), h, w, p)
    return dict(
        original=imgs,
        masked=imgs * (1 - m),  # 0 in normalised space = the ImageNet mean grey
        reconstruction=recon,
        pasted=imgs * (1 - m) + recon * m,
        mask=mask,
    )


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.cpu() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def fcmae_show(
    image_path: PathLike,
    checkpoint: Union[PathLike, FCMAE],
    out: PathLike,
    mask_ratio: float = 0.6,
    seed: int = 0,
    size: int = 224,
) -> Path:
    """Write one PNG row: original | masked | reconstruction | reconstruction with visible patches
    pasted back, each ``size`` x ``size`` (a multiple of 32), with a 4-pixel white gap.

    ``checkpoint``: an FCMAE file (ours or the authors' pre-training checkpoint) or an FCMAE model.
    The released ``*.fcmae`` weights hold the encoder only (no decoder), so they cannot reconstruct.
    """
    from PIL import Image

    if size % ENCODER_STRIDE:
        raise ValueError(f"size must be a multiple of {ENCODER_STRIDE}, got {size}")
    model = checkpoint if isinstance(checkpoint, FCMAE) else FCMAE.from_checkpoint(checkpoint)
    imgs = _load_image(image_path, (size, size))
    ref = next(model.parameters())
    imgs = imgs.to(device=ref.device, dtype=ref.dtype)
    gen = torch.Generator(device=imgs.device).manual_seed(seed)
    panels = reconstruct(model, imgs, mask_ratio=mask_ratio, generator=gen)
    tiles = [_to_uint8(panels[k][0]) for k in ("original", "masked", "reconstruction", "pasted")]
    gap = np.full((size, PANEL_GAP, 3), 255, dtype=np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(row).save(tmp, format="PNG")
    return out


__all__ = ["reconstruct", "fcmae_show"]
