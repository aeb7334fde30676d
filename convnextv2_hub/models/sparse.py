"""The visible rows of an FCMAE-masked map, for the sparse encoder path (``Block.forward_sparse``,
``ConvNeXtV2.forward_features_sparse``): where the visible positions are (``SparseLayout``), moving
between rows and maps, and GRN on rows with per-image statistics (``grn_rows``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .layers import GRN


class SparseLayout:
    """Where the visible positions of an (N, H, W) map are, for the sparse FCMAE path.

    ``idx`` holds the flat NHW indices of the visible positions in row-major order, so the rows of
    each image form one contiguous segment. When every image has the same number ``k`` of visible
    positions (always so for FCMAE's masks), per-image reductions are a free ``view(N, k, C)``;
    otherwise they go through ``images``, a zero-padded (N, K, 1, C) stack with K the largest count.
    """

    def __init__(self, visible: torch.Tensor) -> None:
        n, h, w = visible.shape
        self.shape = (n, h, w)
        self.idx = visible.reshape(-1).nonzero().squeeze(1)
        counts = visible.reshape(n, -1).sum(1)
        self.k: Optional[int] = int(counts[0]) if bool((counts == counts[0]).all()) else None
        self.visible = visible
        self.bid = torch.repeat_interleave(torch.arange(n, device=visible.device), counts)
        # Each row's slot in its image's segment of ``images``: its rank among the image's rows.
        starts = torch.cumsum(counts, 0) - counts
        self.slot = torch.arange(self.idx.numel(), device=visible.device) - starts.index_select(0, self.bid)
        self.kmax = int(counts.max()) if n > 0 else 0

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

    def keep(self) -> torch.Tensor:
        """(N, H, W, 1) float map, 1 at visible positions: the ``keep`` of the dense-masked path."""
        return self.visible.unsqueeze(-1).float()

    def images(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(V, C) rows -> ((N, K, 1, C) per-image stack, its ``keep`` (N, K, 1, 1) or None).

        Every per-image statistic over positions (GRN's, SE's pooling) runs on this stack as on an
        NHWC map of K x 1 positions. With equal counts it is a free view and ``keep`` is None; else
        the images are zero-padded to the largest count and ``keep`` marks the real rows."""
        n, c = self.shape[0], rows.shape[1]
        if self.k is not None:
            return rows.view(n, self.k, 1, c), None
        flat = self.bid * self.kmax + self.slot
        stack = rows.new_zeros(n * self.kmax, c).index_copy(0, flat, rows)
        keep = rows.new_zeros(n * self.kmax).index_fill(0, flat, 1.0)
        return stack.view(n, self.kmax, 1, c), keep.view(n, self.kmax, 1, 1)

    def rows(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of ``images``: (N, K, 1, C) -> the (V, C) rows."""
        c = images.shape[-1]
        if self.k is not None:
            return images.reshape(-1, c)
        return images.reshape(-1, c).index_select(0, self.bid * self.kmax + self.slot)

    def per_image(self, rows: torch.Tensor, fn: nn.Module) -> torch.Tensor:
        """Apply a per-sample op (drop path) given as ``fn`` on an (N, ...) tensor to the rows."""
        n = self.shape[0]
        if self.k is not None:
            return fn(rows.view(n, self.k, rows.shape[1])).view(rows.shape)
        factor = fn(rows.new_ones(n, 1))
        return rows * factor.index_select(0, self.bid)


def grn_rows(grn: GRN, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """GRN on visible rows (V, D) with its statistics per image over its visible rows.

    Same steps and statistics precision as ``GRN.forward`` on the zero-masked dense map: masked zeros
    add nothing to the norms, and ``keep`` gives the mean its count. (The authors' MinkowskiGRN pools
    over the whole batch, their issue #86; the paper and their dense code are per image, and so is this.)
    """
    images, keep = layout.images(x)
    return layout.rows(grn(images, keep))
