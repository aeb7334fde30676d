"""The ``convnextv2 analyze`` command: ``cosine-distance``, ``selectivity`` and ``activations`` load the
models named on the command line, run the analysis and write its figure with the CSV and JSON."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Optional, Tuple

from ..analysis.hooks import GRN_CHOICES
from ..analysis.measures import NEGATIVE_CHOICES

if TYPE_CHECKING:
    from torch import nn


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
        from ..models.factory import create

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
    import numpy as np

    from ..analysis.figures import plot_cosine_distance
    from ..analysis.measures import compute_cosine_distance

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
    import numpy as np

    from ..analysis.figures import plot_selectivity
    from ..analysis.measures import compute_selectivity

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
    from ..analysis.figures import plot_activations
    from ..analysis.measures import expansion_activations
    from ..preprocessing.image_folder import default_transform
    from ..preprocessing.images import open_image

    label, model = load_model_spec(args.model, args.checkpoint_path, args.device)
    x = default_transform(model)(open_image(args.image))
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
                                   description="The paper's feature analyses: channel cosine distance (Fig. 4), "
                                               "class selectivity (Fig. 7) and activation maps (Fig. 3).")
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


__all__ = ["add_analyze_parser", "load_model_spec"]
