"""Export a ConvNeXt V2 classifier to ONNX and classify an image with ONNX Runtime alone.

    python examples/export_onnx.py --model tiny.fcmae_ft_in1k --out tiny.onnx cat.jpg
    python examples/export_onnx.py --model atto --checkpoint-path atto.safetensors --image-size 64 --out a.onnx

``convnextv2_hub.inference.export.export_onnx`` writes the file only after checking it against PyTorch (max
|logit difference| <= 1e-4 and the same top-1 at batch 1 and 3), and stores the checkpoint's
preprocessing and label names in the ONNX metadata. The deployment half below needs only
onnxruntime, numpy and Pillow: it reads that metadata, preprocesses with PIL exactly as the
checkpoint was evaluated (bicubic resize of the shorter side to res / crop_pct, centre crop; or a
squash resize for 384/512 checkpoints) and prints the top 5. Same command-line form as
``convnextv2-export MODEL --onnx OUT``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image

_PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def export(model_name: str, checkpoint_path: Optional[str], out: Path, image_size: Optional[int]) -> None:
    """The PyTorch half: build the model and write a verified ONNX file."""
    from convnextv2_hub.inference.export import export_onnx
    from convnextv2_hub.models.factory import create

    model = create(model_name, pretrained=checkpoint_path is None, checkpoint_path=checkpoint_path)
    export_onnx(model, out, image_size=image_size, overwrite=True, verbose=True)


def read_metadata(path: Path) -> Dict[str, Any]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def preprocess(image: Image.Image, meta: Dict[str, Any]) -> np.ndarray:
    """(1, 3, res, res) float32 from PIL alone, following the checkpoint's stored eval transform."""
    res, crop_pct = meta["resolution"], meta["crop_pct"]
    scale = math.floor(res / crop_pct)  # math.floor as timm: 224 / 0.875 -> 256
    resample = _PIL_RESAMPLE[meta["interpolation"]]
    image = image.convert("RGB")
    if meta["crop_mode"] == "squash":
        image = image.resize((scale, scale), resample)
    else:
        w, h = image.size
        # Shorter side -> scale, longer side truncated (int), as torchvision's Resize(int) does.
        size = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
        image = image.resize(size, resample)
    w, h = image.size
    left, top = int(round((w - res) / 2.0)), int(round((h - res) / 2.0))
    image = image.crop((left, top, left + res, top + res))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(meta["mean"], dtype=np.float32)) / np.asarray(meta["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", help="image file (default: the bundled sample photo)")
    parser.add_argument("--model", default="tiny.fcmae_ft_in1k", help="checkpoint with a classifier head")
    parser.add_argument("--checkpoint-path", help="local weights instead of downloading (works offline)")
    parser.add_argument("--out", default="convnextv2.onnx")
    parser.add_argument("--image-size", type=int, help="export resolution (default: the checkpoint's)")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)

    out = Path(args.out)
    export(args.model, args.checkpoint_path, out, args.image_size)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")

    # --- deployment: onnxruntime + numpy + Pillow only -------------------------------------------
    import onnxruntime as ort

    meta = read_metadata(out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    if args.image:
        path = args.image
    else:
        from convnextv2_hub.cli.main import sample_image_path

        path = sample_image_path()
    with Image.open(path) as img:
        x = preprocess(img, meta)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    names = meta["label_names"]
    print(f"{path} (onnxruntime, {meta['checkpoint']} at {meta['resolution']} px)")
    for i in np.argsort(-probs)[: args.topk]:
        print(f"  {probs[i]:7.2%}  {names[i]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
