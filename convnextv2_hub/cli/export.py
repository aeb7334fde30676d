"""``convnextv2-export``: a ConvNeXt V2 to ONNX or TorchScript, verified against PyTorch before it is written."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .arguments import add_weights_arguments, model_for_weights

# The exporter (and torch) are imported once the arguments are checked, so --help answers at once.
HELP_DEFAULT_OPSET = 18  # inference.export.DEFAULT_OPSET, pinned equal by a test


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convnextv2-export",
        description="Export a ConvNeXt V2 to ONNX or TorchScript, verified against PyTorch before it is written.")
    p.add_argument("model", nargs="?", default=None,
                   help="model or checkpoint name, e.g. tiny or tiny.fcmae_ft_in22k_in1k_384; may be left out with "
                        "--checkpoint-path (the file's size is read from it)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--onnx", metavar="OUT", help="write an ONNX file")
    out.add_argument("--torchscript", metavar="OUT", help="write a TorchScript file")
    add_weights_arguments(p)
    p.add_argument("--image-size", type=int, help="input size (multiple of 32; default: the checkpoint's)")
    p.add_argument("--static-batch", type=int, metavar="N", help="fix the batch axis to N (default: dynamic)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {HELP_DEFAULT_OPSET})")
    p.add_argument("--quantize", choices=["int8"], help="ONNX only: dynamic int8 quantization of the Linear weights")
    p.add_argument("--half", action="store_true", help="fp16 weights and activations (GRN statistics stay fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.onnx or args.torchscript)
    try:
        if args.torchscript and (args.quantize or args.static_batch or args.opset is not None):
            raise ValueError("--quantize, --static-batch and --opset apply to --onnx only")
        # Cheap argument checks first, so a typo does not cost a download.
        if args.image_size is not None and (args.image_size <= 0 or args.image_size % 32):
            raise ValueError(f"--image-size must be a positive multiple of 32, got {args.image_size}")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output folder {str(out.parent)!r} does not exist; create it first")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{str(out)!r} already exists; pass --overwrite to replace it")
        from ..inference.export import DEFAULT_OPSET, export_onnx, export_torchscript
        from ..models.factory import create

        name = model_for_weights(args.model, args.checkpoint_path)
        model = create(name, pretrained=args.checkpoint_path is None,
                       checkpoint_path=args.checkpoint_path, num_classes=args.num_classes,
                       force_download=args.force_download)
        common = dict(image_size=args.image_size, half=args.half, overwrite=args.overwrite,
                      verify=not args.no_verify, verbose=True)
        if args.onnx:
            export_onnx(model, out, opset=args.opset or DEFAULT_OPSET, static_batch=args.static_batch, quantize=args.quantize, **common)
        else:
            export_torchscript(model, out, **common)
    except Exception as exc:  # every failure: one line, non-zero exit, no output file
        print(f"convnextv2-export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
