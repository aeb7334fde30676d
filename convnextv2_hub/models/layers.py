"""The three small layers ConvNeXt V2 is built from: LayerNorm2d, GRN and DropPath."""
from __future__ import annotations

from typing import List, Optional

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


GRN_AGGREGATIONS = ("l2", "l1", "mean")
GRN_NORMALIZATIONS = ("divisive", "standardize", "inverse_sum")
GRN_FORMS = ("full", "affine", "x_g", "x_n")


def masked_mean(x: torch.Tensor, dims: List[int], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` (kept), over the visible positions only when ``keep`` (1 = visible,
    broadcastable to ``x``) is given. ``x`` must already be zero where ``keep`` is 0 (the blocks zero
    masked positions before GRN's place), so the sum needs no masking, only the right count."""
    if keep is None:
        return x.mean(dim=dims, keepdim=True)
    count = keep.to(x.dtype).sum(dim=dims, keepdim=True).clamp_min(1.0)
    return x.sum(dim=dims, keepdim=True) / count


def grn_norms(
    x: torch.Tensor, dims: List[int], aggregation: str = "l2", keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """GRN's statistic G(X): per channel of ``x`` over ``dims`` (kept), in ``at_least_float32``.

    ``aggregation`` (paper Table 2a): ``"l2"`` the L2 norm (GRN), ``"l1"`` the L1 norm, ``"mean"``
    global average pooling (over the visible positions of ``keep``; the norms need no ``keep``, masked
    zeros add nothing to them).
    """
    xf = at_least_float32(x)
    if aggregation == "l2":
        return torch.linalg.vector_norm(xf, ord=2, dim=dims, keepdim=True)
    if aggregation == "l1":
        return torch.linalg.vector_norm(xf, ord=1, dim=dims, keepdim=True)
    return masked_mean(xf, dims, keep)


class GRN(nn.Module):
    """Global Response Normalization on an NHWC tensor, per sample (paper Alg. 1, authors' dense code).

    ``gamma``/``beta`` keep the authors' (1, 1, 1, C) shape so their checkpoints load unchanged.
    GRN is three steps, which every path that computes it (dense, sparse rows, compiled, fp16 export)
    shares: the statistics (``statistic``, by default ``grn_norms``: per-channel spatial L2 norms, in
    fp32 for fp16/bf16 inputs, whose sum of squares overflows, and in the input's own precision for
    float32 and float64), the per-channel factor ``channel_scale`` and ``apply_scale``. The output
    ``gamma * (x * Nx) + beta + x`` is evaluated as ``x * (1 + gamma * Nx) + beta``: the per-channel
    factor is tiny, so the big tensor is read once.

    The paper's ablations of its parts (all defaults = GRN):

    - ``aggregation`` G (Table 2a): ``"l2"``, ``"l1"``, ``"mean"`` (global average pooling).
    - ``normalization`` N (Table 2b), across channels: ``"divisive"`` ``G_i / mean_j G_j`` (the
      paper's ``G_i / sum_j G_j`` times C, its footnote 1), ``"standardize"`` ``(G_i - mu) / sigma``
      (mean and population std over channels), ``"inverse_sum"`` ``1 / mean_j G_j`` (``1 / sum_j G_j``
      times C, as divisive).
    - ``residual`` (Table 2c): without it the output is ``gamma * (x * Nx) + beta``; gamma then starts
      at 1, not 0, so the layer starts as ``x * Nx`` instead of a constant zero that would cut the
      gradient of the whole block branch (the paper does not say how it initialised this row).
    - ``form`` (Table 16): ``"full"`` X·N(G(X)); ``"affine"`` no statistic (Nx = 1, a per-channel scale
      and shift); ``"x_g"`` X·G(X) (no normalisation); ``"x_n"`` X·N(|X|), normalised per position
      across channels without aggregation (the paper's unstable row).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        aggregation: str = "l2",
        normalization: str = "divisive",
        residual: bool = True,
        form: str = "full",
    ) -> None:
        super().__init__()
        for name, value, allowed in (("aggregation", aggregation, GRN_AGGREGATIONS),
                                     ("normalization", normalization, GRN_NORMALIZATIONS), ("form", form, GRN_FORMS)):
            if value not in allowed:
                raise ValueError(f"GRN {name} must be one of {list(allowed)}, got {value!r}")
        self.eps = eps
        self.aggregation = aggregation
        self.normalization = normalization
        self.residual = bool(residual)
        self.form = form
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim) if residual else torch.ones(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        # keep (N, H, W, 1), 1 = visible: FCMAE's mask; x is already zero where it is 0.
        return self.scale_by_norm(x, self.statistic(x, [1, 2], keep))

    def is_plain(self) -> bool:
        """Whether this is the paper's GRN (every part at its default)."""
        return (self.aggregation == "l2" and self.normalization == "divisive" and self.residual
                and self.form == "full")

    def statistic(self, x: torch.Tensor, dims: List[int], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What ``channel_scale`` turns into the factor: G(X) over ``dims`` (``grn_norms``), |X| per
        position for form ``"x_n"``, and a constant 1 for ``"affine"``, which has no statistic."""
        if self.form == "x_n":
            return at_least_float32(x).abs()
        if self.form == "affine":
            return torch.ones(1, dtype=at_least_float32(x).dtype, device=x.device)
        return grn_norms(x, dims, self.aggregation, keep)

    def channel_scale(self, gx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The factor ``1 + gamma * Nx`` (``gamma * Nx`` without the residual; shape of ``gx``
        broadcast with gamma) from the statistic ``gx`` (..., C) of one sample's channels
        (``statistic``), computed in ``gx``'s precision and returned in ``dtype``."""
        if self.form == "full" or self.form == "x_n":
            if self.normalization == "divisive":
                nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
            elif self.normalization == "standardize":
                mu = gx.mean(dim=-1, keepdim=True)
                nx = (gx - mu) / (gx.std(dim=-1, keepdim=True, correction=0) + self.eps)
            else:
                nx = 1.0 / (gx.mean(dim=-1, keepdim=True) + self.eps)
        else:
            nx = gx
        scale = self.gamma.reshape(-1).to(gx.dtype) * nx
        return (scale + 1.0 if self.residual else scale).to(dtype)

    def apply_scale(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x * scale + beta`` for channels-last ``x`` (..., C) and a factor that broadcasts to it."""
        return torch.addcmul(self.beta.reshape(-1).to(x.dtype), x, scale)

    def scale_by_norm(self, x: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        """GRN's output for ``x`` given its statistic ``gx`` (``statistic``; by default ``grn_norms``)."""
        scale = self.channel_scale(gx, x.dtype)
        # Left to itself, inductor inlines the sqrt and division into the loop over every position,
        # recomputing them per element instead of once per channel.
        scale = stored_once_when_compiled(scale)
        return self.apply_scale(x, scale)

    def extra_repr(self) -> str:
        if self.is_plain():
            return ""
        return (f"aggregation={self.aggregation!r}, normalization={self.normalization!r}, "
                f"residual={self.residual}, form={self.form!r}")


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
