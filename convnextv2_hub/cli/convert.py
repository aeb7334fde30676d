"""``convnextv2 convert SRC --to timm|hf|authors|ours --out PATH``: a checkpoint in any layout we read,
written in the layout another library loads (``checkpoints.io.save_checkpoint``).

torch and the checkpoint code are imported when the command runs, so ``convnextv2 --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

TARGETS = ("timm", "hf", "authors", "ours")  # checkpoints.formats.SAVE_FORMATS, pinned equal by a test


def add_convert_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register ``convnextv2 convert``."""
    p = subparsers.add_parser(
        "convert",
        help="write a checkpoint in timm's, HF transformers' or the authors' layout (or ours)",
        description="Read SRC (ours, the authors' .pt, timm or HF weights, an FCMAE encoder; a file or an HF "
                    "folder) and write it as --to says, atomically; prints how to load the result.",
    )
    p.add_argument("src", help="checkpoint file or HF folder")
    p.add_argument("--to", required=True, choices=TARGETS, help="output layout")
    p.add_argument("--out", required=True, help="output file (timm, authors, ours) or folder (hf)")
    p.add_argument("--model", help="variant or checkpoint name (e.g. tiny, tiny.fcmae_ft_in22k_in1k_384): says the "
                                   "variant when SRC does not, and whose preprocessing the HF folder gets")
    p.add_argument("--num-classes", type=int, help="head size (default: SRC's; 0 for an encoder)")
    p.add_argument("--encoder-only", action="store_true",
                   help="convert the encoder of an FCMAE pre-training checkpoint, leaving its decoder out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    from ..checkpoints.io import save_checkpoint

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # before SRC is read: a mistyped --out costs nothing
        raise FileExistsError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    model, name = _load_source(args.src, args.model, args.num_classes, args.encoder_only)
    save_checkpoint(model, out, format=args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to}: {name}, {model.num_classes} classes)")
    print(f"load it with: {_load_line(args.to, out, model.variant, name, model.num_classes)}")
    return 0


def _source_facts(src: str) -> Tuple[Optional[str], Dict[str, str], Optional[list]]:
    """(name SRC gives itself, our metadata, label names of an HF folder's config.json) where SRC has them."""
    from ..checkpoints.reading import is_safetensors, read_metadata

    path = Path(src)
    meta: Dict[str, str] = {}
    if path.is_file() and is_safetensors(path):
        meta = read_metadata(path)
    name = None
    if meta.get("format") == "convnextv2_hub" and meta.get("variant"):
        name = meta["variant"] + (f".{meta['tag']}" if meta.get("tag") else "")
    labels = None
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
        labels = [id2label[str(i)] for i in range(len(id2label))] if all(
            str(i) in id2label for i in range(len(id2label))) else None
    return name, meta, labels


def _load_source(src: str, model_name: Optional[str], num_classes: Optional[int], encoder_only: bool) -> Tuple[Any, str]:
    """The model SRC holds, built for its variant and head, and the name it was built under."""
    from ..checkpoints.formats import detect_format, is_v1_layout, split_fcmae_sparse, to_ours
    from ..checkpoints.io import load_checkpoint, read_arch, stage_layout
    from ..checkpoints.reading import read_state_dict
    from ..checkpoints.registry import get_checkpoint
    from ..models.factory import create
    from ..models.variants import variant_of

    sd = read_state_dict(src)
    fmt = detect_format(sd)
    if fmt == "fcmae_sparse":
        rest = split_fcmae_sparse(sd)[1]
        if rest and not encoder_only:
            raise ValueError(
                f"{src} is an FCMAE pre-training checkpoint with its decoder ({len(rest)} tensors: proj, mask_token, "
                "decoder, pred); no format written here holds a decoder (FCMAE.save keeps it). Pass --encoder-only "
                "to convert the encoder alone")
    ours = to_ours(sd, fmt)
    own_name, _, labels = _source_facts(src)
    dims, depths = stage_layout(ours)
    head = ours.get("head.weight")
    has = int(head.shape[0]) if head is not None else 0
    if own_name and "." in own_name and get_checkpoint(own_name).num_classes != has:
        # Our older files name the checkpoint the model was created from, not what it became (a new head).
        own_name = own_name.split(".")[0]
    name = model_name or own_name or (variant_of(depths, dims) if dims and depths else None)
    if name is None:
        raise ValueError(f"cannot tell the ConvNeXt V2 variant of {src} (dims {dims}, depths {depths}); "
                         "pass --model NAME (e.g. --model tiny)")
    n = has if num_classes is None else num_classes
    if n not in (has, 0):  # 0 drops a head (an encoder); any other size would be written untrained
        raise ValueError(f"{src} has {f'a {has}-class head' if has else 'no classifier head'}; --num-classes {n} "
                         "would write a new, untrained head. Convert with its own head (omit --num-classes) or "
                         "--num-classes 0 for the encoder; fine-tune (convnextv2-train) for another class count")
    # Architecture switches: stored in files of ours; a ConvNeXt V1 file (no metadata) says so by its keys.
    switches = read_arch(src) or ({"block": "v1"} if is_v1_layout(ours) else {})
    model = create(name, num_classes=n, **switches)
    load_checkpoint(model, src)  # the path, so that its warnings name the file
    if labels is not None and len(labels) == n:
        model.label_names = labels  # an HF folder's class names travel on
    return model.eval(), name


def _load_line(fmt: str, out: Path, variant: str, name: str, n: int) -> str:
    from ..checkpoints.io import timm_load_hint

    if fmt == "timm":
        return timm_load_hint(out, variant, n)
    if fmt == "hf":
        cls = "ConvNextV2ForImageClassification" if n else "ConvNextV2Model"
        return (f"transformers.{cls}.from_pretrained({str(out)!r}); "
                f"transformers.AutoImageProcessor.from_pretrained({str(out)!r}, backend='pil') preprocesses exactly "
                "as this package does (the default torchvision backend resizes tensors: off by a grey level or two)")
    if fmt == "authors":
        return (f"torch.load({str(out)!r})['model'] in the authors' key layout (their main_finetune.py --finetune, "
                f"or convnextv2_hub.create({name!r}, num_classes={n}, checkpoint_path=...))")
    return f"convnextv2_hub.create({name!r}, num_classes={n}, checkpoint_path={str(out)!r})"


__all__ = ["TARGETS", "add_convert_parser", "run_convert"]
