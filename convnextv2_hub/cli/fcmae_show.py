"""``convnextv2 fcmae-show IMG --checkpoint CKPT --out recon.png``."""
from __future__ import annotations

import argparse


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
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of 32x32 patches masked (default 0.6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (default 0)")
    p.add_argument("--size", type=int, default=224, help="square input size, a multiple of 32 (default 224)")
    p.set_defaults(func=run_fcmae_show)
    return p


def run_fcmae_show(args: argparse.Namespace) -> int:
    from ..analysis.reconstruction import fcmae_show

    out = fcmae_show(args.image, args.checkpoint, args.out, mask_ratio=args.mask_ratio, seed=args.seed, size=args.size)
    print(out)
    return 0


__all__ = ["add_fcmae_show_parser", "run_fcmae_show"]
