"""The analyses' figures: a PNG per analysis (matplotlib's Agg canvas, no pyplot) with the plotted numbers
in a CSV and a JSON beside it, each file written atomically."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..files import PathLike, atomic_write
from .measures import CosineDistanceResult, SelectivityResult, cosine_distance

if TYPE_CHECKING:
    import torch


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


def plot_metric_curve(
    points: Sequence[Tuple[float, float, Optional[float], int]],
    out: PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
    reference: Optional[float] = None,
    figsize: Tuple[float, float] = (5.0, 3.5),
    dpi: int = 150,
) -> Dict[str, Any]:
    """A measured quantity against a swept setting (Fig. 8: fine-tuning top-1 against the mask ratio):
    ``points`` are (x, mean, standard deviation or None, runs), drawn with error bars; ``reference`` marks
    the x the paper found best. PNG + CSV + JSON."""
    png, csv_path, json_path = _sidecars(out)
    pts = sorted(points)
    fig = _new_figure(figsize)
    ax = fig.subplots()
    xs = [p[0] for p in pts]
    ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], marker="o", markersize=4, capsize=3)
    if reference is not None:
        ax.axvline(reference, color="tab:gray", linestyle="--", linewidth=1, label=f"paper's best ({reference:g})")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, png, dpi)
    _write_csv(csv_path, ["x", "mean", "std", "runs"],
               [[f"{x:g}", f"{m:.6f}", "" if sd is None else f"{sd:.6f}", n] for x, m, sd, n in pts])
    summary = {"xlabel": xlabel, "ylabel": ylabel, "title": title, "reference": reference,
               "points": [{"x": x, "mean": m, "std": sd, "runs": n} for x, m, sd, n in pts],
               "png": png.name, "figsize": list(figsize), "dpi": dpi}
    _write_json(json_path, summary)
    return summary


__all__ = ["plot_activations", "plot_cosine_distance", "plot_metric_curve", "plot_selectivity"]
