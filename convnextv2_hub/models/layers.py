"""The three small layers ConvNeXt V2 is built from: LayerNorm2d, GRN and DropPath."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def stored_once_when_compiled(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself; under ``torch.compile``, through a no-op ``as_strided`` view, which makes inductor
    write ``x`` to memory once instead of inlining (recomputing) it in every kernel that reads it."""
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        return torch.as_strided(x, x.shape, x.stride())
    return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the authors' ``channels_first`` LayerNorm).

    Runs ``F.layer_norm`` on an NHWC view instead of the authors' hand-written mean/var: it is one
    fused kernel, and it does not overflow in fp16 the way ``(x - u).pow(2)`` does.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision statistics and losses are computed in: float64 stays float64, everything
    else (fp16 and bf16, whose sums of squares overflow or lose digits, and float32 itself) is float32."""
    if x.dtype == torch.float64:
        return x
    return x.float()


def grn_norms(x: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """GRN's statistic: the L2 norm of each channel of ``x`` over ``dims`` (kept), in ``at_least_float32``."""
    return torch.linalg.vector_norm(at_least_float32(x), ord=2, dim=dims, keepdim=True)


class GRN(nn.Module):
    """Global Response Normalization on an NHWC tensor, per sample (paper Alg. 1, authors' dense code).

    ``gamma``/``beta`` keep the authors' (1, 1, 1, C) shape so their checkpoints load unchanged.
    GRN is three steps, which every path that computes it (dense, sparse rows, compiled, fp16 export)
    shares: the statistics (``grn_norms``: per-channel spatial L2 norms, in fp32 for fp16/bf16 inputs,
    whose sum of squares overflows, and in the input's own precision for float32 and float64), the
    per-channel factor ``channel_scale`` and ``apply_scale``. The output ``gamma * (x * Nx) + beta + x``
    is evaluated as ``x * (1 + gamma * Nx) + beta``: the per-channel factor is tiny, so the big tensor
    is read once.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_by_norm(x, grn_norms(x, [1, 2]))

    def channel_scale(self, gx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The factor ``1 + gamma * Nx`` (shape of ``gx``) from the L2 norms ``gx`` (..., C) of one
        sample's channels, computed in ``gx``'s precision and returned in ``dtype``."""
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return (self.gamma.reshape(-1).to(gx.dtype) * nx + 1.0).to(dtype)

    def apply_scale(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x * scale + beta`` for channels-last ``x`` (..., C) and a factor that broadcasts to it."""
        return torch.addcmul(self.beta.reshape(-1).to(x.dtype), x, scale)

    def scale_by_norm(self, x: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        """GRN's output for ``x`` given its per-channel L2 norms ``gx`` (``grn_norms``)."""
        scale = self.channel_scale(gx, x.dtype)
        # Left to itself, inductor inlines the sqrt and division into the loop over every position,
        # recomputing them per element instead of once per channel.
        scale = stored_once_when_compiled(scale)
        return self.apply_scale(x, scale)


class DropPath(nn.Module):
    """Per-sample stochastic depth, scaled by 1/keep_prob (timm's DropPath with scale_by_keep)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
