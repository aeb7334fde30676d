"""Multi-scale feature maps from a ConvNeXt V2 backbone (``features_only=True``), for dense tasks.

    python examples/features.py cat.jpg --model tiny.fcmae_ft_in1k          # all four stages
    python examples/features.py cat.jpg --out-indices 1 2 3 --save feats.npz
    python examples/features.py --model atto --checkpoint-path atto.safetensors --resolution 320

The backbone returns one map per requested stage, at strides 4, 8, 16 and 32 with ``dims`` channels
(``model.feature_info`` says which). Inputs need not be square or 224 px: any H, W divisible by 32
keep every stride exact, which is what detection and segmentation heads expect.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from convnextv2_hub.cli.main import sample_image_path
from convnextv2_hub.models.factory import create
from convnextv2_hub.preprocessing.transforms import eval_transform, to_rgb


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", help="image file (default: the bundled sample photo)")
    parser.add_argument("--model", default="tiny.fcmae_ft_in1k")
    parser.add_argument("--checkpoint-path", help="local weights instead of downloading (works offline)")
    parser.add_argument("--out-indices", type=int, nargs="+", default=[0, 1, 2, 3], help="stages, 0..3")
    parser.add_argument("--resolution", type=int, default=None,
                        help="shorter side after resize, cropped square (default: the checkpoint's)")
    parser.add_argument("--save", help="write the maps to this .npz (keys stage0..stage3)")
    args = parser.parse_args(argv)

    backbone = create(args.model, pretrained=args.checkpoint_path is None, checkpoint_path=args.checkpoint_path,
                      features_only=True, out_indices=args.out_indices).eval()
    ckpt = backbone.checkpoint
    res = args.resolution or ckpt.resolution
    # The checkpoint's resize/normalisation, at the requested size; crop_pct 1 keeps the whole image.
    transform = eval_transform(res, 1.0, "center", ckpt.interpolation, ckpt.mean, ckpt.std)
    with Image.open(args.image or sample_image_path()) as img:
        x = transform(to_rgb(img)).unsqueeze(0)
    with torch.inference_mode():
        maps = backbone(x)

    print(f"input {tuple(x.shape)}")
    print(f"{'stage':>5} {'channels':>8} {'stride':>6} {'shape':>20} {'mean':>8} {'std':>8}")
    for i, fmap in zip(args.out_indices, maps):
        info = backbone.feature_info[i]
        assert fmap.shape[1] == info["num_chs"] and x.shape[-1] // fmap.shape[-1] == info["reduction"]
        print(f"{i:>5} {info['num_chs']:>8} {info['reduction']:>6} {str(tuple(fmap.shape)):>20} "
              f"{fmap.mean().item():8.3f} {fmap.std().item():8.3f}")
    if args.save:
        np.savez(args.save, **{f"stage{i}": m[0].numpy() for i, m in zip(args.out_indices, maps)})
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
