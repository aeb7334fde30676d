"""Where the analysed features are: the residual blocks of a ConvNeXt (ours, the authors', timm's V1/V2)
and forward hooks on their 4C expansion features, read before or after GRN."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

# torch is imported inside the functions that use it: building the analyze CLI parser does not load it.
if TYPE_CHECKING:
    import torch
    from torch import nn

GRN_CHOICES = ("after", "before")


@dataclass(frozen=True)
class BlockRef:
    """One residual block: ``label`` "S.B" counted from 1 as in the paper ("stage 3, layer 12")."""

    label: str
    stage: int  # 0-based, as in ``model.stages[stage][index]``
    index: int  # 0-based
    name: str  # module path, e.g. "stages.2.11"
    module: nn.Module


def _block_parts(block: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """(activation, projection) of a ConvNeXt block's expansion MLP, or None if it is not one.

    Ours and the authors' blocks hold ``act``/``pwconv2`` directly; timm's (V1 and V2) hold them in
    ``mlp`` as ``act``/``fc2`` (with GRN, or Identity for V1, in ``mlp.norm`` between them).
    """
    if hasattr(block, "pwconv1") and hasattr(block, "act") and hasattr(block, "pwconv2"):
        return block.act, block.pwconv2
    mlp = getattr(block, "mlp", None)
    if mlp is not None and hasattr(mlp, "fc1") and hasattr(mlp, "act") and hasattr(mlp, "fc2"):
        return mlp.act, mlp.fc2
    return None


def residual_blocks(model: nn.Module) -> List[BlockRef]:
    """Every residual block of a ConvNeXt (ours, the authors', timm's V1/V2), in forward order."""
    stages = getattr(model, "stages", None)
    if stages is None:
        raise ValueError(f"{type(model).__name__} has no .stages; expected a ConvNeXt (V2 or timm V1/V2)")
    refs: List[BlockRef] = []
    for s, stage in enumerate(stages):
        blocks = getattr(stage, "blocks", stage)  # timm wraps each stage's blocks in .blocks
        for b, block in enumerate(blocks):
            if _block_parts(block) is None:
                raise ValueError(f"stages.{s}: block {b} ({type(block).__name__}) has no expansion MLP")
            prefix = f"stages.{s}.blocks.{b}" if blocks is not stage else f"stages.{s}.{b}"
            refs.append(BlockRef(f"{s + 1}.{b + 1}", s, b, prefix, block))
    if not refs:
        raise ValueError("the model has no residual blocks")
    return refs


def find_block(model: nn.Module, block: str) -> BlockRef:
    """The block named "S.B" (stage and block counted from 1, e.g. "3.5" = ``model.stages[2][4]``)."""
    refs = residual_blocks(model)
    for ref in refs:
        if ref.label == block.strip():
            return ref
    depths: Dict[int, int] = {}
    for ref in refs:
        depths[ref.stage + 1] = ref.index + 1
    raise ValueError(f"no block {block!r}: use STAGE.BLOCK counted from 1; this model's stages have "
                     + ", ".join(f"stage {s}: blocks 1..{n}" for s, n in depths.items()))


def _channel_dim(proj: nn.Module) -> int:
    import torch

    # The expansion MLP is a Linear on channels-last maps (ours, the authors', timm default) or a 1x1
    # Conv2d on channels-first ones (timm conv_mlp=True).
    return 1 if isinstance(proj, torch.nn.Conv2d) else -1


def expansion_hook(block: nn.Module, grn: str, fn: Callable[[torch.Tensor, int], None]):
    """Register ``fn(features, channel_dim)`` on a block's 4C expansion features; returns the handle."""
    if grn not in GRN_CHOICES:
        raise ValueError(f"grn must be one of {GRN_CHOICES}, got {grn!r}")
    parts = _block_parts(block)
    assert parts is not None
    act, proj = parts
    cdim = _channel_dim(proj)
    if grn == "before":
        return act.register_forward_hook(lambda _m, _inp, out: fn(out, cdim))
    # The projection's input is the post-GRN tensor in V2 and the post-GELU tensor in V1.
    return proj.register_forward_pre_hook(lambda _m, inp: fn(inp[0], cdim))


@contextlib.contextmanager
def removing_hooks(handles: List[Any]) -> Iterator[None]:
    """Run the block, then remove the hooks ``handles`` registered (also when the block raises)."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["BlockRef", "GRN_CHOICES", "expansion_hook", "find_block", "removing_hooks", "residual_blocks"]
