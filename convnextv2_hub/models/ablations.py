"""The paper's architecture ablations as switches of the one model class (``ConvNeXtV2(..., block=,
grn=, grn_aggregation=, grn_normalization=, grn_residual=, grn_form=)``): ``ArchOptions`` holds and
checks them, ``grn_slot`` builds what sits in GRN's place in a block, and the modules here are the
alternatives to GRN (paper Table 2d, 2e). GRN itself and its parts (Table 2a-c, Table 16) are
``layers.GRN``'s options; the ConvNeXt V1 block is ``convnextv2.Block`` with LayerScale and no GRN.

Every module in GRN's place takes ``(x, keep)``: ``x`` an NHWC tensor, already zero at FCMAE-masked
positions, and ``keep`` (N, H, W, 1) with 1 at visible positions, or None without a mask. Statistics
over positions (BatchNorm's, SE's and CBAM's pooling) are taken over the visible positions only, so
the dense-masked computation equals the sparse one (``forward_rows``, on the visible rows of
``sparse.SparseLayout``) as for GRN.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GRN, GRN_AGGREGATIONS, GRN_FORMS, GRN_NORMALIZATIONS, at_least_float32, masked_mean
from .sparse import SparseLayout

BLOCKS = ("v2", "v1")
GRN_PLACES = ("grn", "none", "lrn", "bn", "ln", "se", "cbam")
# SE's and CBAM's bottleneck: the SE paper's reduction. It gives Base 88.7M -> 109.6M parameters,
# the paper's 89M -> 109M (Table 2e).
GATE_REDUCTION = 16
V1_LAYER_SCALE_INIT = 1e-6  # ConvNeXt V1's LayerScale init (its ``layer_scale_init_value``)


@dataclass(frozen=True)
class ArchOptions:
    """The architecture switches; every default is the released ConvNeXt V2.

    ``block``: ``"v2"`` or ``"v1"`` (ConvNeXt V1: LayerScale ``gamma`` (C,) initialised to 1e-6, no
    GRN). ``grn``: what sits in GRN's place in a v2 block (``GRN_PLACES``). The ``grn_*`` parts apply
    to ``grn="grn"`` only (``layers.GRN``). A switch that would have no effect is an error, so a
    stored configuration always means what it says.
    """

    block: str = "v2"
    grn: str = "grn"
    grn_aggregation: str = "l2"
    grn_normalization: str = "divisive"
    grn_residual: bool = True
    grn_form: str = "full"

    def __post_init__(self) -> None:
        for name, allowed in (("block", BLOCKS), ("grn", GRN_PLACES), ("grn_aggregation", GRN_AGGREGATIONS),
                              ("grn_normalization", GRN_NORMALIZATIONS), ("grn_form", GRN_FORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.grn_residual, bool):
            raise ValueError(f"grn_residual must be true or false, got {self.grn_residual!r}")
        parts = {k: v for k, v in self.non_default().items() if k.startswith("grn_")}
        if self.block == "v1" and (self.grn != "grn" or parts):
            raise ValueError(f"block='v1' has no GRN, so it takes no GRN switch (got {dict(parts, grn=self.grn)}); "
                             "drop them or use block='v2'")
        if self.grn != "grn" and parts:
            raise ValueError(f"the grn_* switches {sorted(parts)} change GRN, but grn={self.grn!r} replaces it")
        if self.grn_form in ("affine", "x_g") and self.grn_normalization != "divisive":
            raise ValueError(f"grn_form={self.grn_form!r} has no normalisation, so grn_normalization must stay "
                             f"'divisive' (got {self.grn_normalization!r})")
        if self.grn_form in ("affine", "x_n") and self.grn_aggregation != "l2":
            raise ValueError(f"grn_form={self.grn_form!r} has no aggregation, so grn_aggregation must stay 'l2' "
                             f"(got {self.grn_aggregation!r})")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "ArchOptions":
        """Options from a mapping (a checkpoint's stored switches, a training config); unknown names
        are an error that lists the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown architecture switch(es) {unknown}; known: {known}")
        return cls(**dict(options))

    def non_default(self) -> Dict[str, Any]:
        """The switches that differ from the released ConvNeXt V2 (empty for it): what checkpoints store."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

def grn_slot(dim: int, options: ArchOptions) -> nn.Module:
    """The module in GRN's place of a block of ``dim`` (= 4C) expansion channels."""
    if options.block == "v1" or options.grn == "none":
        return NoNorm()
    if options.grn == "grn":
        return GRN(dim, aggregation=options.grn_aggregation, normalization=options.grn_normalization,
                   residual=options.grn_residual, form=options.grn_form)
    return {"lrn": LocalResponseNorm, "bn": MaskedBatchNorm, "ln": ChannelLayerNorm,
            "se": SqueezeExcite, "cbam": CBAM}[options.grn](dim)


# ------------------------------------------------------------------------------------------------
# Per-position alternatives: the sparse rows are simply the positions
# ------------------------------------------------------------------------------------------------
class NoNorm(nn.Module):
    """Nothing in GRN's place (Table 2d/2e "Baseline"; the V1 block)."""

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x

    def forward_rows(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        return rows


class LocalResponseNorm(nn.Module):
    """AlexNet's local response normalisation across channels, per position (Table 2d "LRN"):
    size 5, alpha 1e-4, beta 0.75, k 2, AlexNet's constants. No parameters."""

    def __init__(self, dim: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1], 1)  # (positions, channels, 1): LRN runs along dim 1
        return F.local_response_norm(rows, self.size, self.alpha, self.beta, self.k).reshape(x.shape)

    def forward_rows(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        return self.forward(rows)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position (Table 2d "LN"), eps 1e-6 as every LayerNorm here."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_rows(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        return self.forward(rows)


class MaskedBatchNorm(nn.Module):
    """BatchNorm of the channels (Table 2d "BN"), statistics over the batch's visible positions.

    Under an FCMAE mask the statistics are those of the visible positions only, as the sparse
    encoder's BatchNorm (which sees only them) has them; masked zeros would bias mean and variance.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if keep is None or not self.training:  # eval: running statistics, a per-position op
            return self.bn(flat).reshape(x.shape)
        visible = keep.reshape(-1) > 0
        out = torch.zeros_like(flat)
        out[visible] = self.bn(flat[visible])
        return out.reshape(x.shape)

    def forward_rows(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        return self.bn(rows)


# ------------------------------------------------------------------------------------------------
# Gating (Table 2e): per-image pooling, over the visible positions
# ------------------------------------------------------------------------------------------------
def masked_max(x: torch.Tensor, dims: List[int], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Max of ``x`` over ``dims`` (kept), over the positions where ``keep`` is 1 (0 where there is none)."""
    if keep is None:
        return x.amax(dim=dims, keepdim=True)
    out = x.masked_fill(keep == 0, float("-inf")).amax(dim=dims, keepdim=True)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al.; Table 2e "SE"): average pool over the (visible) positions ->
    Linear dim -> dim/16 -> ReLU -> Linear -> sigmoid, multiplied into every position."""

    def __init__(self, dim: int, reduction: int = GATE_REDUCTION) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = masked_mean(at_least_float32(x), [1, 2], keep).to(x.dtype)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))

    def forward_rows(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        images, keep = layout.images(rows)
        return layout.rows(self.forward(images, keep))


class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al. 2018; Table 2e "CBAM"): channel attention
    (average- and max-pooled positions through one shared MLP dim -> dim/16 -> dim, summed, sigmoid),
    then spatial attention (channel mean and max -> 7x7 conv -> sigmoid). The spatial conv has a bias
    and no BatchNorm after it (the CBAM paper's code has BN; it would be one more batch statistic).
    """

    def __init__(self, dim: int, reduction: int = GATE_REDUCTION, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        xf = at_least_float32(x)
        avg = masked_mean(xf, [1, 2], keep).to(x.dtype)
        mx = masked_max(xf, [1, 2], keep).to(x.dtype)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(avg))) + self.fc2(F.relu(self.fc1(mx))))
        # Masked positions are zero here, so their channel mean and max are 0: the 7x7 conv sees
        # masked neighbours as zeros, the submanifold convolution of the sparse encoder.
        pooled = torch.cat([x.mean(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)], dim=-1)
        attn = torch.sigmoid(self.spatial(pooled.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return x * attn

    def forward_rows(self, rows: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        # The spatial conv needs the map: run the dense-masked form and take the visible rows back.
        x = layout.scatter(rows).permute(0, 2, 3, 1)
        return layout.gather(self.forward(x, layout.keep()).permute(0, 3, 1, 2))


__all__ = [
    "ArchOptions",
    "BLOCKS",
    "CBAM",
    "ChannelLayerNorm",
    "GATE_REDUCTION",
    "GRN_PLACES",
    "LocalResponseNorm",
    "MaskedBatchNorm",
    "NoNorm",
    "SqueezeExcite",
    "V1_LAYER_SCALE_INIT",
    "grn_slot",
    "masked_max",
]
