"""The visible rows of an FCMAE-masked map, for the sparse encoder path (``Block.forward_sparse``,
``ConvNeXtV2.forward_features_sparse``): where the visible positions are (``SparseLayout``), moving
between rows and maps, and GRN on rows with per-image statistics (``grn_rows``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import GRN, at_least_float32, grn_norms


class SparseLayout:
    """Where the visible positions of an (N, H, W) map are, for the sparse FCMAE path.

    ``idx`` holds the flat NHW indices of the visible positions in row-major order, so the rows of
    each image form one contiguous segment. When every image has the same number ``k`` of visible
    positions (always so for FCMAE's masks), per-image reductions are a free ``view(N, k, C)``;
    otherwise they go through ``index_add_`` on the per-row image ids ``bid``.
    """

    def __init__(self, visible: torch.Tensor) -> None:
        n, h, w = visible.shape
        self.shape = (n, h, w)
        self.idx = visible.reshape(-1).nonzero().squeeze(1)
        counts = visible.reshape(n, -1).sum(1)
        self.k: Optional[int] = int(counts[0]) if bool((counts == counts[0]).all()) else None
        self.bid = torch.repeat_interleave(torch.arange(n, device=visible.device), counts)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """(V, C) rows -> (N, C, H, W) map (channels_last storage) with zeros at masked positions.

        Channels-last is also the fastest CPU layout for the depthwise conv that usually follows."""
        n, h, w = self.shape
        c = rows.shape[1]
        dense = rows.new_zeros(n * h * w, c).index_copy(0, self.idx, rows)
        return dense.view(n, h, w, c).permute(0, 3, 1, 2)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) map -> its (V, C) visible rows (the inverse of ``scatter`` on visible positions)."""
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, self.idx)

    def per_image(self, rows: torch.Tensor, fn: nn.Module) -> torch.Tensor:
        """Apply a per-sample op (drop path) given as ``fn`` on an (N, ...) tensor to the rows."""
        n = self.shape[0]
        if self.k is not None:
            return fn(rows.view(n, self.k, rows.shape[1])).view(rows.shape)
        factor = fn(rows.new_ones(n, 1))
        return rows * factor.index_select(0, self.bid)


def grn_rows(grn: GRN, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """GRN on visible rows (V, D) with the L2 norm per image over its visible rows.

    Same steps and statistics precision as ``GRN.forward`` on the zero-masked dense map: masked zeros
    add nothing to the sum of squares. (The authors' MinkowskiGRN pools over the whole batch, their
    issue #86; the paper and their dense code are per image, and so is this.)
    """
    n = layout.shape[0]
    d = x.shape[1]
    if layout.k is not None:
        xs = x.view(n, layout.k, d)
        return grn.scale_by_norm(xs, grn_norms(xs, [1])).view(x.shape)
    # Images of unequal row counts: the per-image sum of squares is a segment sum, not a reduction
    # over one axis as in grn_norms (pinned to the dense path by the FCMAE tests).
    xf = at_least_float32(x)
    sumsq = xf.new_zeros(n, d).index_add_(0, layout.bid, xf * xf)
    # sqrt has an infinite gradient at 0 where vector_norm's is 0: route zeros around it.
    pos = sumsq > 0
    gx = torch.where(pos, torch.where(pos, sumsq, torch.ones_like(sumsq)).sqrt(), torch.zeros_like(sumsq))
    return grn.apply_scale(x, grn.channel_scale(gx, x.dtype).index_select(0, layout.bid))
