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

Decisions the paper leaves open (see ``docs`` §6.2/§6.3), made explicit here:

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
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import atomic_write

# torch is imported inside the functions that use it, so building this module's CLI parser costs nothing.
if TYPE_CHECKING:
    import torch
    from torch import nn

GRN_CHOICES = ("after", "before")
NEGATIVE_CHOICES = ("relu", "abs", "shift")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
PathLike = Union[str, os.PathLike]


# --- where the features are -----------------------------------------------------------------------
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


def _expansion_hook(block: nn.Module, grn: str, fn: Callable[[torch.Tensor, int], None]):
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
def _hooks(handles: List[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
        # index_put_ with accumulate, not index_add_: the latter takes ~0.1 s per call on narrow
        # (N, 40) double tensors on CPU (measured, torch 2.14), which dominated a whole pass.
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


# --- data -----------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(
    root: PathLike,
    limit: Optional[int] = None,
    per_class: Optional[int] = None,
    seed: int = 0,
    require_classes: bool = False,
) -> Tuple[List[str], List[int], List[str]]:
    """Image paths, class indices and class names of an ImageFolder-style dir or a flat folder.

    Class folders (sub-directories holding images, searched recursively) win over loose files. The
    selection is seeded-random within each class and round-robin across classes, so ``limit=1000`` on
    ImageNet val gives one image of each class, the paper's "images from different classes". A flat
    folder has one unnamed class (index -1).
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"{root} is not a directory")
    rng = random.Random(seed)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups: List[List[str]] = []
    names: List[str] = []
    for name in classes:
        files = sorted(str(p) for p in (base / name).rglob("*") if _is_image(p))
        if files:
            names.append(name)
            groups.append(files)
    if not groups:
        if require_classes:
            raise ValueError(f"{root} has no class sub-folders with images (expected ROOT/CLASS/IMAGE)")
        files = sorted(str(p) for p in base.iterdir() if _is_image(p))
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
        rng.shuffle(files)
        files = files[:limit] if limit else files
        return files, [-1] * len(files), []
    for files in groups:
        rng.shuffle(files)
        if per_class:
            del files[per_class:]
    order = list(range(len(groups)))
    rng.shuffle(order)
    paths: List[str] = []
    labels: List[int] = []
    for rank in range(max(len(g) for g in groups)):
        for c in order:
            if rank < len(groups[c]):
                paths.append(groups[c][rank])
                labels.append(c)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    return paths, labels, names


class ImageList:
    """(image tensor, label) for a list of files; unreadable files fail with their path in the message.

    A map-style dataset (``__len__``/``__getitem__``), all a DataLoader needs.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        from .transforms import to_rgb

        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                rgb = to_rgb(img)
        except OSError as exc:
            raise OSError(f"cannot read image {self.paths[i]}: {exc}") from exc
        return self.transform(rgb), self.labels[i]


def default_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """The model's own eval preprocessing: its checkpoint entry's, timm's data config, else 224 ImageNet."""
    ckpt = getattr(model, "checkpoint", None)
    if ckpt is not None and hasattr(ckpt, "transforms"):
        return ckpt.transforms()
    if getattr(model, "pretrained_cfg", None):  # a timm model
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    from .transforms import eval_transform

    return eval_transform(224)


def _loader(paths, labels, transform, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    import torch

    return torch.utils.data.DataLoader(
        ImageList(paths, labels, transform), batch_size=batch_size, shuffle=False, num_workers=workers
    )


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
    handles = [_expansion_hook(r.module, grn, make(i)) for i, r in enumerate(refs)]
    seen = 0
    device = _device_of(model)
    with _hooks(handles), _eval_mode(model):
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
    with _hooks(handles), _eval_mode(model):
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
        loader = _loader(paths, labels, transform or default_transform(model), batch_size, workers)
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

    with _hooks([_expansion_hook(ref.module, grn, fn)]), _eval_mode(model):
        model(image.unsqueeze(0).to(_device_of(model)))
    return captured["x"]


# --- writing --------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # figures may go to a new folder, unlike exports
    atomic_write(path, write, text=not binary)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def write(f) -> None:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)

    _atomic_write(path, write)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def _save_figure(fig, path: Path, dpi: int) -> None:
    # No bbox_inches="tight": the PNG must be exactly figsize * dpi pixels, as the CLI promises.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)


def _new_figure(figsize: Tuple[float, float]):
    """A matplotlib Figure on the Agg canvas, without pyplot: no display needed, and a notebook's or a
    user's global backend and open figures are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _sidecars(out: PathLike) -> Tuple[Path, Path, Path]:
    png = Path(out)
    if png.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    return png, png.with_suffix(".csv"), png.with_suffix(".json")


def _finite(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def plot_cosine_distance(
    results: Sequence[CosineDistanceResult],
    out: PathLike,
    figsize: Tuple[float, float] = (6.0, 4.0),
    dpi: int = 150,
) -> Dict[str, Any]:
    """Fig. 4 for one or several models; writes OUT.png, OUT.csv, OUT.json and returns the JSON dict."""
    png, csv_path, json_path = _sidecars(out)
    fig = _new_figure(figsize)
    ax = fig.subplots()
    for r in results:
        ax.plot(r.normalized_index, r.distance, marker="o", markersize=3, label=r.model)
    ax.set_xlabel("normalised layer index")
    ax.set_ylabel("feature cosine distance")
    ax.set_xlim(0, 1.02)
    ax.set_title(f"4C expansion features ({results[0].grn} GRN)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, png, dpi)
    rows = [
        [r.model, layer, module, i + 1, f"{x:.6f}", ch, f"{d:.8f}", r.num_images, r.grn]
        for r in results
        for i, (layer, module, x, ch, d) in enumerate(zip(r.layers, r.modules, r.normalized_index, r.channels, r.distance))
    ]
    _write_csv(csv_path, ["model", "block", "module", "layer", "normalized_index", "channels", "cosine_distance",
                          "num_images", "grn"], rows)
    summary = {
        "analysis": "cosine_distance",
        "formula": "D = 1/C^2 sum_ij (1 - cos(X_i, X_j)) / 2, mean over images",
        "features": f"4C expansion MLP features, {results[0].grn} GRN",
        "models": [
            {"model": r.model, "num_images": r.num_images, "grn": r.grn,
             "layers": [{"block": l, "module": m, "normalized_index": x, "channels": c, "cosine_distance": d}
                        for l, m, x, c, d in zip(r.layers, r.modules, r.normalized_index, r.channels, r.distance)]}
            for r in results
        ],
        "png": png.name, "figsize": list(figsize), "dpi": dpi,
    }
    _write_json(json_path, summary)
    return summary


def plot_selectivity(
    results: Sequence[SelectivityResult],
    out: PathLike,
    bins: int = 20,
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> Dict[str, Any]:
    """Fig. 7: a density histogram of SI over channels per block (models overlaid); PNG + CSV + JSON."""
    png, csv_path, json_path = _sidecars(out)
    labels: List[str] = []
    for r in results:
        labels += [l for l in r.layers if l not in labels]
    cols = min(6, len(labels))
    rows_n = math.ceil(len(labels) / cols)
    figsize = figsize or (2.2 * cols, 1.8 * rows_n)
    edges = np.linspace(0.0, 1.0, bins + 1)
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple"]
    fig = _new_figure(figsize)
    axes = fig.subplots(rows_n, cols, squeeze=False, sharex=True)
    summary_models = []
    for k, r in enumerate(results):
        blocks = []
        for layer, module, si in zip(r.layers, r.modules, r.selectivity):
            valid = si[np.isfinite(si)]
            counts, _ = np.histogram(valid, bins=edges)
            density, _ = np.histogram(valid, bins=edges, density=True) if valid.size else (np.zeros(bins), None)
            ax = axes.flat[labels.index(layer)]
            ax.stairs(density, edges, fill=True, alpha=0.45, color=colors[k % len(colors)],
                      label=r.model if layer == r.layers[0] else None)
            ax.set_title(f"block {layer}", fontsize=7)
            ax.tick_params(labelsize=6)
            blocks.append({
                "block": layer, "module": module, "channels": int(si.size), "undefined": int(si.size - valid.size),
                "mean": _finite(float(valid.mean())) if valid.size else None,
                "median": _finite(float(np.median(valid))) if valid.size else None,
                "histogram_counts": counts.tolist(), "histogram_density": [float(v) for v in density],
            })
        summary_models.append({"model": r.model, "negative": r.negative, "num_images": r.num_images,
                               "num_classes": r.num_classes, "images_per_class": r.images_per_class,
                               "blocks": blocks})
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.supxlabel("class selectivity index", fontsize=8)
    fig.supylabel("density", fontsize=8)
    fig.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    _save_figure(fig, png, dpi)
    csv_rows = [
        [r.model, layer, module, c, "nan" if not math.isfinite(v) else f"{v:.8f}"]
        for r in results
        for layer, module, si in zip(r.layers, r.modules, r.selectivity)
        for c, v in enumerate(si.tolist())
    ]
    _write_csv(csv_path, ["model", "block", "module", "channel", "selectivity"], csv_rows)
    summary = {
        "analysis": "class_selectivity",
        "formula": "SI = (mu_max - mu_-max) / (mu_max + mu_-max) over class-conditional mean activity",
        "activity": {"relu": "spatial mean of max(x, 0)", "abs": "spatial mean of |x|",
                     "shift": "spatial mean minus the channel's lowest class mean"}[results[0].negative],
        "features": "residual block outputs",
        "bin_edges": edges.tolist(), "models": summary_models,
        "png": png.name, "figsize": list(figsize), "dpi": dpi,
    }
    _write_json(json_path, summary)
    return summary


def plot_activations(
    features: torch.Tensor,
    out: PathLike,
    channels: int = 64,
    figsize: Tuple[float, float] = (8.0, 8.0),
    dpi: int = 100,
    title: str = "",
    info: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Fig. 3: the first ``channels`` maps of (4C, H, W) features as a grid, each scaled to its own range.

    Per-channel scaling is what makes Fig. 3's failure modes visible: a dead or saturated channel is a
    flat tile whatever its level. The raw per-channel statistics go to the CSV, so flatness is checkable.
    """
    import torch

    png, csv_path, json_path = _sidecars(out)
    n = min(channels, features.shape[0])
    if n < 1:
        raise ValueError("channels must be at least 1")
    maps = features[:n].float()
    lo = maps.flatten(1).min(dim=1).values
    hi = maps.flatten(1).max(dim=1).values
    span = hi - lo
    shown = (maps - lo[:, None, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None, None]
    cols = math.ceil(math.sqrt(n))
    rows_n = math.ceil(n / cols)
    fig = _new_figure(figsize)
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(shown[i].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.94 if title else 0.99, wspace=0.05, hspace=0.05)
    _save_figure(fig, png, dpi)
    stats = []
    for i in range(n):
        m = maps[i]
        stats.append({"channel": i, "min": float(m.min()), "max": float(m.max()), "mean": float(m.mean()),
                      "std": float(m.std(unbiased=False)), "l2": float(torch.linalg.vector_norm(m))})
    _write_csv(csv_path, ["channel", "min", "max", "mean", "std", "l2"],
               [[s["channel"]] + [f"{s[k]:.8g}" for k in ("min", "max", "mean", "std", "l2")] for s in stats])
    summary = {
        "analysis": "activations", "shape": list(features.shape), "channels_shown": n,
        "cosine_distance_all_channels": float(cosine_distance(features.unsqueeze(0), channel_dim=1)[0]),
        "flat_channels_shown": int((span <= 0).sum()),
        "channels": stats, "png": png.name, "figsize": list(figsize), "dpi": dpi, **(info or {}),
    }
    _write_json(json_path, summary)
    return summary


# --- command line (``convnextv2 analyze ...``) -----------------------------------------------------
def load_model_spec(spec: str, checkpoint_path: Optional[str] = None, device: Optional[str] = None) -> Tuple[str, nn.Module]:
    """``NAME`` (pretrained), ``NAME=WEIGHTS`` (local file) or ``timm:NAME[=WEIGHTS]`` -> (label, model).

    timm models let the figures include ConvNeXt V1, the paper's comparison (the V2 names are ours).
    """
    device = device or _default_device()
    name, _, path = spec.partition("=")
    path = path or checkpoint_path
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=not path, checkpoint_path=path or "")
    else:
        from .hub import create

        model = create(name, pretrained=not path, checkpoint_path=path)
    return name, model.to(device).eval()


def _figsize(text: str) -> Tuple[float, float]:
    try:
        w, h = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in inches, e.g. 6x4, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError("figure width and height must be positive")
    return w, h


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_cosine(args: argparse.Namespace) -> int:
    results = []
    for i, spec in enumerate([args.model] + list(args.compare or [])):
        label, model = load_model_spec(spec, args.checkpoint_path if i == 0 else None, args.device)
        results.append(compute_cosine_distance(
            model, args.data, grn=args.grn, num_images=args.images, batch_size=args.batch_size,
            workers=args.workers, seed=args.seed, name=label, progress=not args.no_progress))
        del model
    plot_cosine_distance(results, args.out, figsize=args.figsize or (6.0, 4.0), dpi=args.dpi)
    for r in results:
        print(f"{r.model}: mean cosine distance {np.mean(r.distance):.4f} over {len(r.layers)} blocks, "
              f"{r.num_images} images")
    print(f"wrote {args.out} (+ .csv, .json)")
    return 0


def _run_selectivity(args: argparse.Namespace) -> int:
    results = []
    for i, spec in enumerate([args.model] + list(args.compare or [])):
        label, model = load_model_spec(spec, args.checkpoint_path if i == 0 else None, args.device)
        results.append(compute_selectivity(
            model, args.data, negative=args.negative, images_per_class=args.images_per_class,
            num_images=args.images, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
            name=label, progress=not args.no_progress))
        del model
    plot_selectivity(results, args.out, bins=args.bins, figsize=args.figsize, dpi=args.dpi)
    for r in results:
        # One line per model: the median SI at the last block of each stage, where Fig. 7's V1/V2 gap shows.
        last_of_stage = {label.split(".")[0]: (label, si) for label, si in zip(r.layers, r.selectivity)}
        medians = ", ".join(f"{label}: {np.nanmedian(si):.3f}" for label, si in last_of_stage.values()
                            if np.isfinite(si).any())
        print(f"{r.model}: {r.num_images} images, {r.num_classes} classes; median SI at stage ends {medians}")
    print(f"wrote {args.out} (+ .csv, .json)")
    return 0


def _run_activations(args: argparse.Namespace) -> int:
    from PIL import Image

    from .transforms import to_rgb

    label, model = load_model_spec(args.model, args.checkpoint_path, args.device)
    with Image.open(args.image) as img:
        x = default_transform(model)(to_rgb(img))
    feats = expansion_activations(model, x, args.block, grn=args.grn)
    title = f"{label} block {args.block}: {min(args.channels, feats.shape[0])} of {feats.shape[0]} channels ({args.grn} GRN)"
    summary = plot_activations(feats, args.out, channels=args.channels, figsize=args.figsize or (8.0, 8.0),
                               dpi=args.dpi, title=title,
                               info={"model": label, "image": str(args.image), "block": args.block, "grn": args.grn})
    print(f"block {args.block}: {feats.shape[0]} channels at {feats.shape[1]}x{feats.shape[2]}, "
          f"cosine distance {summary['cosine_distance_all_channels']:.4f}, "
          f"{summary['flat_channels_shown']} flat of {summary['channels_shown']} shown")
    print(f"wrote {args.out} (+ .csv, .json)")
    return 0


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze cosine-distance|selectivity|activations`` to the ``convnextv2`` command."""
    parser = subparsers.add_parser("analyze", help="the paper's feature analyses (Fig. 3, 4, 7)",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="analysis", required=True)

    def common(p: argparse.ArgumentParser, default_dpi: int) -> None:
        p.add_argument("--model", required=True,
                       help="checkpoint name (downloaded), NAME=WEIGHTS for a local file, or timm:NAME[=WEIGHTS]")
        p.add_argument("--checkpoint-path", help="local weights for --model instead of downloading")
        p.add_argument("--out", required=True, help="output .png; the numbers go to the same name .csv and .json")
        p.add_argument("--figsize", type=_figsize, help="figure size in inches, WIDTHxHEIGHT (PNG = size * dpi pixels)")
        p.add_argument("--dpi", type=int, default=default_dpi)
        p.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    def grn_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--grn", choices=GRN_CHOICES, default="after",
                       help="4C features after GRN (input of pwconv2; default, comparable with V1) or before (GELU output)")

    def data_flags(p: argparse.ArgumentParser, images_default: Optional[int], images_help: str) -> None:
        p.add_argument("--compare", nargs="+", metavar="MODEL", help="more models in the same figure")
        p.add_argument("--data", required=True, help=images_help)
        p.add_argument("--images", type=int, default=images_default, help="number of images (round-robin over classes)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--workers", type=int, default=4, help="data-loading processes")
        p.add_argument("--seed", type=int, default=0, help="seed of the image selection")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("cosine-distance", help="Fig. 4: channel cosine distance of the 4C features per block")
    common(p, 150)
    data_flags(p, 1000, "ImageFolder-style dir (class sub-folders) or a flat folder of images")
    grn_flag(p)
    p.set_defaults(func=_run_cosine)

    p = sub.add_parser("selectivity", help="Fig. 7: class selectivity index of every block output")
    common(p, 100)
    data_flags(p, None, "ImageFolder-style dir: one sub-folder per class")
    p.add_argument("--images-per-class", type=int, help="at most this many images per class (paper: 50, all of val)")
    p.add_argument("--negative", choices=NEGATIVE_CHOICES, default="relu",
                   help="activity of a channel: spatial mean of max(x,0) (default), of |x|, or shifted by the lowest class mean")
    p.add_argument("--bins", type=int, default=20)
    p.set_defaults(func=_run_selectivity)

    p = sub.add_parser("activations", help="Fig. 3: activation maps of N channels of one block's 4C features")
    common(p, 100)
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--block", required=True, help="STAGE.BLOCK counted from 1, e.g. 3.5 = model.stages[2][4]")
    p.add_argument("--channels", type=int, default=64, help="show the first N channels")
    grn_flag(p)
    p.set_defaults(func=_run_activations)
    return parser


__all__ = [
    "BlockRef", "CosineDistanceMeter", "CosineDistanceResult", "SelectivityMeter", "SelectivityResult",
    "add_analyze_parser", "class_selectivity", "compute_cosine_distance", "compute_selectivity",
    "cosine_distance", "expansion_activations", "find_block", "list_images", "load_model_spec",
    "plot_activations", "plot_cosine_distance", "plot_selectivity", "residual_blocks",
]
