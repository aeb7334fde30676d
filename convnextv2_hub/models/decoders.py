"""FCMAE's alternative decoders, for the paper's decoder ablation (Table 1a): a UNet with and without
skip connections and an MAE-style Transformer. The default decoder (ConvNeXt V2 blocks) is a plain
``nn.Sequential`` of :class:`~convnextv2_hub.models.convnextv2.Block` built in ``models/fcmae.py``.

Every decoder sits between the same two FCMAE pieces: ``proj`` (1x1 conv from the encoder's final width
to ``dim``) with ``mask_token`` filled in at masked cells before it, and ``pred`` (1x1 conv to pixels)
after it. ``depth`` and ``dim`` are Table 1b/1c's decoder depth and width for every type. The paper
gives no details of its UNet or Transformer decoders; what is built here is said in each class.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .convnextv2 import Block, init_weights
from .layers import LayerNorm2d

DECODERS = ("convnext", "unet", "unet_noskip", "transformer")
# Stride of the encoder's first stage map: the UNet decoder predicts UNET_STRIDE x UNET_STRIDE pixels
# per position of that map.
UNET_STRIDE = 4


def check_decoder(kind: str, dim: int, depth: int) -> None:
    """Raise ValueError naming the problem when ``kind`` / ``dim`` / ``depth`` cannot be built."""
    if kind not in DECODERS:
        raise ValueError(f"decoder must be one of {list(DECODERS)}, got {kind!r}")
    if depth < 0 or dim <= 0:
        raise ValueError(f"need decoder_depth >= 0 and decoder_dim > 0, got {depth}, {dim}")
    if kind == "transformer" and dim % 4:
        raise ValueError(f"the transformer decoder's width must be a multiple of 4 (2-D sin-cos position "
                         f"embedding: sin and cos of rows and columns), got decoder_dim {dim}")


# --- UNet -----------------------------------------------------------------------------------------
class ConvUnit(nn.Module):
    """Residual 3x3 conv unit of the UNet decoder: ``x + conv(GELU(LayerNorm(conv(x))))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.norm = LayerNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.norm(self.conv1(x))))


def unet_widths(dim: int) -> list[int]:
    """Widths of the UNet decoder at strides 32, 16, 8, 4: ``dim`` halved at each upsampling."""
    return [max(dim >> k, 1) for k in range(4)]


class UNetDecoder(nn.Module):
    """A small UNet over the encoder's four stage maps (strides 4, 8, 16, 32).

    The paper names a UNet decoder with and without skips (Table 1a) and gives no details; this is ours:
    - at stride 32 (the projected final map with mask tokens): ``depth`` :class:`ConvUnit` at width ``dim``;
    - three times (strides 16, 8, 4, i.e. encoder stages 2, 1, 0): a 2x2 stride-2 transposed conv to half
      the width; with ``skip_dims`` (``decoder="unet"``) the encoder's stage map of that stride is
      concatenated and a 1x1 conv (``fuse``) mixes it back to that width; then ``depth`` ConvUnits.
    The output is an (N, dim/8, H/4, W/4) map; FCMAE's ``pred`` turns each position into its 4x4 pixels,
    so the targets are the same 32x32 patches as the other decoders'. The skip maps come from the
    (masked) encoder as they are: zero at masked positions with sparse encoder masking.
    """

    def __init__(self, dim: int, depth: int, skip_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = unet_widths(dim)
        self.widths = widths
        self.skip = skip_dims is not None
        self.bottleneck = nn.Sequential(*[ConvUnit(widths[0]) for _ in range(depth)])
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i], widths[i + 1], kernel_size=2, stride=2) for i in range(3)]
        )
        if skip_dims is not None:
            if len(skip_dims) != 3:
                raise ValueError(f"skip_dims: the widths of encoder stages 0-2, got {list(skip_dims)}")
            # Level i (stride 16, 8, 4) takes encoder stage 2 - i.
            self.fuse = nn.ModuleList(
                [nn.Conv2d(widths[i + 1] + skip_dims[2 - i], widths[i + 1], kernel_size=1) for i in range(3)]
            )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[ConvUnit(widths[i + 1]) for _ in range(depth)]) for i in range(3)]
        )
        self.apply(init_weights)

    @property
    def out_dim(self) -> int:
        return self.widths[-1]

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``x``: (N, dim, H/32, W/32); ``skips``: the encoder's stage 0-2 maps (used when built with skips)."""
        if self.skip and len(skips) != 3:
            raise ValueError(f"the UNet decoder with skips needs the encoder's stage 0-2 maps, got {len(skips)}")
        x = self.bottleneck(x)
        for i in range(3):
            x = self.up[i](x)
            if self.skip:
                x = self.fuse[i](torch.cat([x, skips[2 - i].to(x.dtype)], dim=1))
            x = self.stages[i](x)
        return x


# --- Transformer ----------------------------------------------------------------------------------
def sincos_2d(dim: int, h: int, w: int, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h*w, dim) fixed 2-D sin-cos position embedding in row-major (h, w) order, as MAE's decoder:
    the first half of the channels encodes the row, the second the column, each as sin then cos of
    ``dim/4`` frequencies ``1 / 10000^(k / (dim/4))``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    rows = torch.arange(h, device=device, dtype=torch.float64)[:, None] * omega  # (h, dim/4)
    cols = torch.arange(w, device=device, dtype=torch.float64)[:, None] * omega  # (w, dim/4)
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([row_emb, col_emb], dim=2).reshape(h * w, 4 * quarter).to(dtype)


def transformer_heads(dim: int) -> int:
    """16 attention heads, MAE's decoder's count, or the largest count below that divides ``dim``."""
    return math.gcd(dim, 16)


class TransformerDecoder(nn.Module):
    """MAE-style Transformer decoder over the final-grid tokens (the paper's Table 1a row; details MAE's).

    The (N, dim, h, w) map with mask tokens at masked cells (FCMAE's ``proj`` and ``mask_token``) becomes
    h*w tokens in row-major order; the fixed 2-D sin-cos position embedding (:func:`sincos_2d`, computed
    for the input's grid, so any H and W work) is added; ``depth`` pre-norm Transformer blocks
    (``nn.TransformerEncoderLayer``: multi-head self-attention with :func:`transformer_heads` heads, MLP
    4x with GELU, no dropout) and a final LayerNorm follow, and the tokens go back to an (N, dim, h, w) map
    for FCMAE's ``pred`` (a 1x1 conv, i.e. MAE's per-token Linear to the patch pixels).
    """

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        check_decoder("transformer", dim, depth)
        heads = transformer_heads(dim)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       layer_norm_eps=1e-6, batch_first=True, norm_first=True)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)  # the Linears; attention's in_proj keeps torch's xavier_uniform (as MAE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + sincos_2d(c, h, w, x.device, x.dtype)
        tokens = self.norm(self.blocks(tokens))
        return tokens.transpose(1, 2).reshape(n, c, h, w)


# --- building and recognising ---------------------------------------------------------------------
def build_decoder(kind: str, dim: int, depth: int, skip_dims: Sequence[int]) -> tuple[nn.Module, int, int]:
    """(decoder module, its output width, the stride of its output map) for ``kind`` in ``DECODERS``.

    ``skip_dims``: the encoder's stage 0-2 widths (used by ``"unet"``). The ConvNeXt decoder is
    ``nn.Sequential`` of V2 Blocks, as the authors' (its keys are ``decoder.{i}.*``)."""
    check_decoder(kind, dim, depth)
    if kind == "convnext":
        return nn.Sequential(*[Block(dim, 0.0) for _ in range(depth)]), dim, 32
    if kind == "transformer":
        return TransformerDecoder(dim, depth), dim, 32
    unet = UNetDecoder(dim, depth, skip_dims if kind == "unet" else None)
    return unet, unet.out_dim, UNET_STRIDE


def decoder_from_keys(keys: Iterable[str]) -> tuple[str, int]:
    """(decoder type, depth) of an FCMAE state dict's ``decoder.*`` keys (the ones this module builds)."""
    keys = [k for k in keys if k.startswith("decoder.")]
    index = {k.split(".")[2] for k in keys if k.startswith("decoder.bottleneck.")}
    if any(k.startswith("decoder.up.") for k in keys):
        kind = "unet" if any(k.startswith("decoder.fuse.") for k in keys) else "unet_noskip"
        return kind, len(index)
    if "decoder.norm.weight" in keys:
        return "transformer", len({k.split(".")[2] for k in keys if k.startswith("decoder.blocks.")})
    return "convnext", len({k.split(".")[1] for k in keys})


__all__ = [
    "DECODERS",
    "ConvUnit",
    "TransformerDecoder",
    "UNetDecoder",
    "build_decoder",
    "check_decoder",
    "decoder_from_keys",
    "sincos_2d",
    "transformer_heads",
    "unet_widths",
]
