"""``convnextv2 fcmae-show IMG --checkpoint CKPT --out recon.png``."""
from __future__ import annotations

import argparse
from typing import Optional


def add_fcmae_show_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register ``convnextv2 fcmae-show IMG --checkpoint CKPT --out recon.png``."""
    p = subparsers.add_parser(
        "fcmae-show",
        help="show an FCMAE reconstruction: original | masked | reconstruction | visible pasted back",
    )
    p.add_argument("image", help="image file")
    p.add_argument(
        "--checkpoint", required=True,
        help="FCMAE checkpoint with its decoder (FCMAE.save file or the authors' pre-training .pth); "
             "the released *.fcmae weights are encoder-only and cannot reconstruct",
    )
    p.add_argument("--out", default="recon.png", help="output PNG (default: recon.png)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of 32x32 patches masked (default: the file's, else 0.6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (default 0)")
    p.add_argument("--size", type=int, default=None,
                   help="square input size, a multiple of 32 (default: the size the file was pre-trained at when "
                        "convnextv2-train wrote it, else 224)")
    p.set_defaults(func=run_fcmae_show)
    return p


def run_fcmae_show(args: argparse.Namespace) -> int:
    """The model's size and hyper-parameters come from the file (its tensors and metadata): no --model."""
    from ..analysis.reconstruction import fcmae_show
    from ..models.fcmae import FCMAE

    kw = {} if args.mask_ratio is None else {"mask_ratio": args.mask_ratio}
    model = FCMAE.from_checkpoint(args.checkpoint, **kw)
    size = args.size or _trained_size(args.checkpoint) or 224
    variant = getattr(model.encoder, "variant", None) or "custom-size"
    print(f"{variant} FCMAE from {args.checkpoint}: mask ratio {model.mask_ratio:g}, {size} px")
    out = fcmae_show(args.image, model, args.out, seed=args.seed, size=size)
    print(out)
    return 0


def _trained_size(path: str) -> Optional[int]:
    """The ``input_size`` the trainer records in the FCMAE files it writes; None for other files."""
    from pathlib import Path

    from ..checkpoints.reading import is_safetensors, read_metadata

    if not Path(path).is_file() or not is_safetensors(path):
        return None
    value = read_metadata(path).get("input_size", "")
    return int(value) if value.isdigit() else None


__all__ = ["add_fcmae_show_parser", "run_fcmae_show"]
