"""The paper's three feature analyses, rerunnable on any checkpoint (paper §4 Fig. 3/4, App. C Fig. 7).

- **Feature cosine distance** (Fig. 4): for the 4C expansion features X (H x W x 4C) of every block,
  ``D(X) = 1/C^2 * sum_{i,j} (1 - cos(X_i, X_j)) / 2`` over all channel pairs *including* i = j (which
  add 0), averaged over images and plotted against the normalised layer index ``l / L``. With this
  normalisation identical channels give 0 and mutually orthogonal ones give ``0.5 * (1 - 1/C)``
  (0.5 for large C; the diagonal's zeros keep it just below). ``D`` needs no C x C matrix:
  ``sum_{i,j} cos = ||sum_i X_i/||X_i||||^2``, so one image costs O(HW * C).
- **Class selectivity index** (Fig. 7, Morcos et al. 2018): per channel of every residual-block output,
  ``SI = (mu_max - mu_-max) / (mu_max + mu_-max)`` over class-conditional mean activities.
- **Activation maps** (Fig. 3): N channels of one block's 4C expansion features for one image.

Decisions the paper leaves open, made explicit here:

- *Before or after GRN* (``grn="after"`` by default): "after" reads the 4C tensor the block actually
  projects back to C, i.e. the input of ``pwconv2``. That is the one position that exists in V1
  (GELU output, no GRN), V2 and timm's ConvNeXt alike, so curves of different models compare the same
  thing, and for V2 it includes the layer whose effect Fig. 4 is about. ``grn="before"`` reads the
  GELU output. Cosine similarity ignores per-channel positive scaling, so the two readings differ
  only through GRN's bias ``beta`` (and channels whose factor ``1 + gamma*N`` turns negative); at
  initialisation (gamma = beta = 0) they are identical.
- *Zero channels*: a channel that is exactly zero over the whole map has no direction; it counts as
  orthogonal to every other channel (cos 0) and as identical to itself (the diagonal adds 0 as in the
  formula).
- *Negative activity* (``negative="relu"`` by default): the per-image activity of a channel is the
  spatial mean of its rectified response ``max(x, 0)``, the analogue of Morcos et al.'s post-ReLU
  units (a firing rate is non-negative, and SI stays in [0, 1] as the paper states). ``"abs"`` uses
  the response magnitude, ``"shift"`` the raw spatial mean minus the channel's lowest class mean.
  A channel whose class means are all 0 (never active) has no selectivity: NaN in the CSV, counted as
  ``undefined`` in the JSON, left out of the histogram.

Everything streams: hooks on the model itself (no copy) reduce each batch to running sums at once
(one number per layer for the cosine distance; a classes x channels table of sums for selectivity),
so 50,000 images cost no more memory than 50. Each figure's numbers go to a CSV and a JSON next to
the PNG, written atomically (temp file + ``os.replace``).

This module computes the analyses; ``analysis.hooks`` finds the blocks and hooks their features,
``preprocessing.image_folder`` lists and reads the images, ``analysis.figures`` draws the figures and
writes their CSV/JSON, and ``cli.analyze`` is the ``convnextv2 analyze`` command.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..files import PathLike
from ..preprocessing.image_folder import default_transform, image_list_loader, list_images
from .hooks import expansion_hook, find_block, removing_hooks, residual_blocks

# torch is imported inside the functions that use it: building the analyze CLI parser does not load it.
if TYPE_CHECKING:
    import torch
    from torch import nn

NEGATIVE_CHOICES = ("relu", "abs", "shift")


# --- the measures ---------------------------------------------------------------------------------
def cosine_distance(features: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """Per-image average pairwise channel cosine distance ``D`` of the paper's Fig. 4 formula.

    ``features``: (N, ..., C) with ``channel_dim=-1`` (e.g. NHWC) or (N, C, ...) with ``channel_dim=1``.
    Returns (N,) in [0, 1]: 0 for identical channels, ``0.5 * (1 - 1/C)`` for mutually orthogonal ones.
    """
    import torch

    x = features.detach().float()
    if channel_dim != -1 and channel_dim != x.dim() - 1:
        x = x.movedim(channel_dim, -1)
    n, c = x.shape[0], x.shape[-1]
    x = x.reshape(n, -1, c)  # (N, HW, C): each channel map is an HW vector
    norms = torch.linalg.vector_norm(x, dim=1)  # (N, C)
    live = norms > 0
    unit = x / torch.where(live, norms, torch.ones_like(norms)).unsqueeze(1)
    # sum_{i,j} cos_ij = ||sum_i u_i||^2 with u_i the unit channel vectors (zero channels: u_i = 0, so
    # they add cos 0 with every other channel; their own diagonal term must still be 1).
    total = unit.sum(dim=2, dtype=torch.float64).pow(2).sum(dim=1) + (~live).sum(dim=1)
    d = 0.5 - total / (2.0 * c * c)
    return d.clamp_(0.0, 1.0).to(torch.float32)


def class_selectivity(class_means: torch.Tensor) -> torch.Tensor:
    """Morcos et al.'s class selectivity index per channel from (classes, channels) mean activities.

    ``mu_max`` is the largest class mean, ``mu_-max`` the mean of the other classes' means. Activities
    must be non-negative (see ``negative``); a channel with all means 0 gives NaN (no selectivity).
    """
    import torch

    m = class_means.double()
    k = m.shape[0]
    if k < 2:
        raise ValueError(f"class selectivity needs at least 2 classes, got {k}")
    if bool((m < 0).any()):
        raise ValueError("class mean activities must be non-negative; rectify or shift them first")
    mu_max = m.max(dim=0).values
    mu_rest = (m.sum(dim=0) - mu_max) / (k - 1)
    denom = mu_max + mu_rest
    si = (mu_max - mu_rest) / denom
    return torch.where(denom > 0, si, torch.full_like(si, float("nan"))).clamp(max=1.0)


class CosineDistanceMeter:
    """Running mean of per-image ``D`` for a fixed set of layers: state is two numbers per layer."""

    def __init__(self, num_layers: int) -> None:
        import torch

        self.sums = torch.zeros(num_layers, dtype=torch.float64)
        self.counts = torch.zeros(num_layers, dtype=torch.int64)

    def update(self, layer: int, features: torch.Tensor, channel_dim: int = -1) -> None:
        d = cosine_distance(features, channel_dim)
        self.sums[layer] += d.double().sum().cpu()
        self.counts[layer] += d.numel()

    def compute(self) -> torch.Tensor:
        return (self.sums / self.counts.clamp(min=1)).float()


class SelectivityMeter:
    """Per-class running sums of per-image channel activity: a (classes, channels) table, no features."""

    def __init__(self, num_classes: int, channels: int, negative: str = "relu") -> None:
        import torch

        if negative not in NEGATIVE_CHOICES:
            raise ValueError(f"negative must be one of {NEGATIVE_CHOICES}, got {negative!r}")
        self.negative = negative
        self.sums = torch.zeros(num_classes, channels, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, activations: torch.Tensor, labels: torch.Tensor) -> None:
        """``activations`` (N, C, H, W) block outputs; ``labels`` (N,) class indices."""
        import torch

        a = activations.detach().float()
        if self.negative == "relu":
            a = a.clamp(min=0)
        elif self.negative == "abs":
            a = a.abs()
        activity = a.flatten(2).mean(dim=2).double().cpu()  # (N, C): spatial mean per channel
        labels = labels.cpu().long()
        # index_put_ with accumulate, not index_add_: index_add_ is far slower on narrow (N, C) double
        # tensors on the CPU, enough to dominate a whole pass.
        self.sums.index_put_((labels,), activity, accumulate=True)
        self.counts += torch.bincount(labels, minlength=self.counts.numel())

    def class_means(self) -> torch.Tensor:
        """(seen classes, channels): classes without images are left out (they have no mean)."""
        seen = self.counts > 0
        means = self.sums[seen] / self.counts[seen].unsqueeze(1)
        if self.negative == "shift":
            means = means - means.min(dim=0, keepdim=True).values
        return means

    def compute(self) -> torch.Tensor:
        return class_selectivity(self.class_means()).float()


# --- running the model ----------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not enabled, leave=False)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# --- results --------------------------------------------------------------------------------------
@dataclass
class CosineDistanceResult:
    """Mean ``D`` per block for one model (``layers`` in forward order, ``x = l / L``)."""

    model: str
    grn: str
    layers: List[str]
    modules: List[str]
    channels: List[int]
    distance: List[float]
    num_images: int

    @property
    def normalized_index(self) -> List[float]:
        n = len(self.layers)
        return [(i + 1) / n for i in range(n)]


@dataclass
class SelectivityResult:
    """Class selectivity index of every channel of every residual-block output, for one model."""

    model: str
    negative: str
    layers: List[str]
    modules: List[str]
    selectivity: List[np.ndarray]  # one (channels,) float array per block, NaN = undefined
    num_images: int
    num_classes: int
    images_per_class: Dict[str, int] = field(default_factory=dict)


def compute_cosine_distance(
    model: nn.Module,
    images: Union[PathLike, torch.utils.data.DataLoader, Sequence[torch.Tensor]],
    *,
    grn: str = "after",
    num_images: Optional[int] = 1000,
    transform: Optional[Callable[[Any], torch.Tensor]] = None,
    batch_size: int = 32,
    workers: int = 0,
    seed: int = 0,
    name: str = "model",
    progress: bool = True,
) -> CosineDistanceResult:
    """Fig. 4: mean over images of ``D`` on every block's 4C expansion features.

    ``images``: a folder (ImageFolder or flat; ``num_images`` picked round-robin across classes), a
    DataLoader yielding image batches (or (images, labels)), or a sequence of (N, 3, H, W) batches.
    """
    refs = residual_blocks(model)
    meter = CosineDistanceMeter(len(refs))
    channels = [0] * len(refs)

    def make(i: int):
        def fn(feat: torch.Tensor, cdim: int) -> None:
            channels[i] = feat.shape[cdim]
            meter.update(i, feat, cdim)

        return fn

    if isinstance(images, (str, os.PathLike)):
        paths, labels, _ = list_images(images, num_images, seed=seed)
        images = (paths, labels)
    batches, total = _batches(model, images, transform, batch_size, workers, labelled=False)
    handles = [expansion_hook(r.module, grn, make(i)) for i, r in enumerate(refs)]
    seen = 0
    device = _device_of(model)
    with removing_hooks(handles), _eval_mode(model):
        for x, _ in _progress(batches, total, f"cosine distance ({name})", progress):
            model(x.to(device))
            seen += x.shape[0]
    if seen == 0:
        raise ValueError("no images to analyse")
    return CosineDistanceResult(name, grn, [r.label for r in refs], [r.name for r in refs], channels,
                                meter.compute().tolist(), seen)


def compute_selectivity(
    model: nn.Module,
    images: Union[PathLike, torch.utils.data.DataLoader],
    *,
    num_classes: Optional[int] = None,
    negative: str = "relu",
    images_per_class: Optional[int] = None,
    num_images: Optional[int] = None,
    transform: Optional[Callable[[Any], torch.Tensor]] = None,
    batch_size: int = 32,
    workers: int = 0,
    seed: int = 0,
    name: str = "model",
    progress: bool = True,
) -> SelectivityResult:
    """Fig. 7: class selectivity index per channel at every residual-block output.

    ``images``: an ImageFolder-style dir (labels from the class folders) or a DataLoader of
    (images, labels) with ``num_classes`` given.
    """
    import torch

    refs = residual_blocks(model)
    class_names: List[str] = []
    if isinstance(images, (str, os.PathLike)):
        paths, labels, class_names = list_images(images, num_images, images_per_class, seed, require_classes=True)
        num_classes = len(class_names)
        images = (paths, labels)
    elif num_classes is None:
        raise ValueError("num_classes is required when images is a DataLoader")
    batches, total = _batches(model, images, transform, batch_size, workers, labelled=True)
    meters: List[Optional[SelectivityMeter]] = [None] * len(refs)
    current: Dict[str, torch.Tensor] = {}

    def make(i: int):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if meters[i] is None:  # channel counts are only known once a tensor passes
                meters[i] = SelectivityMeter(num_classes, out.shape[1], negative)
            meters[i].update(out, current["labels"])

        return hook

    handles = [r.module.register_forward_hook(make(i)) for i, r in enumerate(refs)]
    seen = 0
    device = _device_of(model)
    with removing_hooks(handles), _eval_mode(model):
        for x, y in _progress(batches, total, f"selectivity ({name})", progress):
            y = torch.as_tensor(y)
            if bool((y < 0).any()) or bool((y >= num_classes).any()):
                raise ValueError(f"labels must be class indices in 0..{num_classes - 1}")
            current["labels"] = y
            model(x.to(device))
            seen += x.shape[0]
    if seen == 0:
        raise ValueError("no images to analyse")
    first = meters[0]
    assert first is not None
    counts = first.counts.tolist()
    if sum(c > 0 for c in counts) < 2:
        raise ValueError("class selectivity needs images of at least 2 classes")
    per_class = {(class_names[k] if class_names else str(k)): int(c) for k, c in enumerate(counts)}
    return SelectivityResult(
        name, negative, [r.label for r in refs], [r.name for r in refs],
        [m.compute().numpy() for m in meters if m is not None], seen, int(num_classes), per_class,
    )


def _batches(
    model: nn.Module,
    images: Union[Tuple[List[str], List[int]], torch.utils.data.DataLoader, Sequence[torch.Tensor]],
    transform: Optional[Callable[[Any], torch.Tensor]],
    batch_size: int,
    workers: int,
    labelled: bool,
) -> Tuple[Any, int]:
    """(iterable of (x, y) batches, number of batches) from (paths, labels), a DataLoader or tensors."""
    import torch

    if isinstance(images, tuple):
        paths, labels = images
        loader = image_list_loader(paths, labels, transform or default_transform(model), batch_size, workers)
        return loader, len(loader)
    if isinstance(images, torch.utils.data.DataLoader):
        loader = images

        def pairs() -> Iterator[Tuple[torch.Tensor, Any]]:
            for item in loader:
                if isinstance(item, (list, tuple)):
                    yield item[0], item[1]
                elif labelled:
                    raise ValueError("the DataLoader must yield (images, labels) for selectivity")
                else:
                    yield item, None

        return pairs(), len(loader)
    if labelled:
        raise ValueError("selectivity needs labels: pass a class-folder dir or a DataLoader of (images, labels)")
    batches = [(b, None) for b in images]
    return batches, len(batches)


def expansion_activations(
    model: nn.Module, image: torch.Tensor, block: str, grn: str = "after"
) -> torch.Tensor:
    """The 4C expansion features (4C, H, W) of block "S.B" for one preprocessed image (3, H, W)."""
    ref = find_block(model, block)
    captured: Dict[str, torch.Tensor] = {}

    def fn(feat: torch.Tensor, cdim: int) -> None:
        f = feat[0].detach().float().cpu()
        captured["x"] = f.permute(2, 0, 1).contiguous() if cdim == -1 else f

    with removing_hooks([expansion_hook(ref.module, grn, fn)]), _eval_mode(model):
        model(image.unsqueeze(0).to(_device_of(model)))
    return captured["x"]


__all__ = [
    "CosineDistanceMeter", "CosineDistanceResult", "SelectivityMeter", "SelectivityResult",
    "class_selectivity", "compute_cosine_distance", "compute_selectivity", "cosine_distance",
    "expansion_activations",
]
