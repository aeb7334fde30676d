"""Classify images with a pre-trained ConvNeXt V2 and print the top-5 ImageNet classes.

    python examples/classify.py cat.jpg dog.png                 # tiny.fcmae_ft_in1k, downloaded once
    python examples/classify.py cat.jpg --model base.fcmae_ft_in22k_in1k_384
    python examples/classify.py cat.jpg --model atto --checkpoint-path atto.safetensors   # offline

The checkpoint's own preprocessing (resize/crop/interpolation of its manifest entry) and labels are
used, so a 384 px checkpoint gets its 384 px squash resize, not a 224 centre crop.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from convnextv2_hub.cli.main import sample_image_path
from convnextv2_hub.models.factory import create
from convnextv2_hub.inference.predictor import predict


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files (default: the bundled sample photo)")
    parser.add_argument("--model", default="tiny.fcmae_ft_in1k", help="checkpoint name with a classifier head")
    parser.add_argument("--checkpoint-path", help="local weights instead of downloading (works offline)")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)

    model = create(args.model, pretrained=args.checkpoint_path is None, checkpoint_path=args.checkpoint_path)
    images = args.images or [sample_image_path()]
    for path, top in zip(images, predict(model, images, topk=args.topk)):
        print(path)
        for label, prob in top:
            print(f"  {prob:7.2%}  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
