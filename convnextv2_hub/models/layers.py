"""The three small layers ConvNeXt V2 is built from: LayerNorm2d, GRN and DropPath."""
from __future__ import annotations

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


class GRN(nn.Module):
    """Global Response Normalization on an NHWC tensor, per sample (paper Alg. 1, authors' dense code).

    ``gamma``/``beta`` keep the authors' (1, 1, 1, C) shape so their checkpoints load unchanged.
    The spatial L2 norm is computed in fp32: in fp16 its sum of squares overflows (the NaNs users
    of the peers report). The output ``gamma * (x * Nx) + beta + x`` is evaluated as
    ``x * (1 + gamma * Nx) + beta``: the per-channel factor is tiny, so the big tensor is read once.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)
        return self.scale_by_norm(x, gx)

    def scale_by_norm(self, x: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        """GRN's output for ``x`` given its spatial L2 norms ``gx`` (N, 1, 1, C) in fp32."""
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        scale = (self.gamma * nx + 1.0).to(x.dtype)
        # Left to itself, inductor inlines the sqrt and division into the loop over every position
        # (8% of Tiny's compiled time).
        scale = stored_once_when_compiled(scale)
        return torch.addcmul(self.beta.to(x.dtype), x, scale)


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
