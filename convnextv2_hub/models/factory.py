"""``create()``: one call from a model or checkpoint name to a ready ConvNeXtV2.

Names resolve through the manifest (``weights_manifest.json``), so every model carries the checkpoint
entry it was built for (``model.checkpoint``): its preprocessing, labels and metadata are never guessed.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from ..checkpoints.io import load_checkpoint
from ..checkpoints.download import download_checkpoint
from ..checkpoints.registry import Checkpoint, get_checkpoint, parse_model_name
from .convnextv2 import ConvNeXtV2, convnextv2


def create(
    name: str = "tiny",
    pretrained: bool = False,
    *,
    num_classes: Optional[int] = None,
    checkpoint_path: Union[str, os.PathLike, None] = None,
    drop_path_rate: float = 0.0,
    head_init_scale: float = 1.0,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    in_chans: int = 3,
    progress: bool = True,
) -> ConvNeXtV2:
    """Build a ConvNeXt V2 from a name such as ``"tiny"``, ``"tiny.fcmae_ft_in1k"`` or
    ``"convnextv2_tiny.fcmae_ft_in22k_in1k_384"``.

    - ``pretrained=True`` downloads the named checkpoint (the variant's default tag when the name has
      none) through the Hugging Face Hub cache, falling back to the authors' URL.
    - ``checkpoint_path`` loads a local file or folder in any supported format (ours, the authors',
      timm, HF transformers, FCMAE) instead of downloading.
    - ``num_classes`` different from the checkpoint's keeps a freshly initialised head (with a warning),
      the usual start of a fine-tune. Default: the checkpoint's class count (0 for FCMAE encoders).
    """
    variant, tag = parse_model_name(name)
    ckpt: Checkpoint = get_checkpoint(name if tag else variant)
    if num_classes is None:
        num_classes = ckpt.num_classes if (pretrained or tag) else 1000
    model = convnextv2(
        variant,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        head_init_scale=head_init_scale,
        features_only=features_only,
        out_indices=out_indices,
        in_chans=in_chans,
    )
    model.checkpoint = ckpt
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        load_checkpoint(model, download_checkpoint(ckpt, progress=progress))
    return model
