"""The ``convnextv2`` command: list / info / predict / embed, and the subcommands of ``cli.analyze``,
``cli.fcmae_show``, ``cli.convert``, ``cli.push`` and ``cli.compile``.

Every subcommand imports what it runs when it runs, so ``convnextv2 --help`` answers without loading torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, List, Optional

from ..preprocessing.images import SAMPLE_IMAGE, sample_image_path  # noqa: F401  (the photo predict classifies by default)
from .analyze import add_analyze_parser
from .compile import add_compile_parser
from .arguments import add_backend_arguments, add_file_job_arguments, add_weights_arguments, model_for_weights
from .convert import add_convert_parser
from .fcmae_show import add_fcmae_show_parser
from .push import add_push_parser

if TYPE_CHECKING:
    from ..inference.predictor import Predictor


def _cmd_list(args: argparse.Namespace) -> int:
    from ..checkpoints.registry import get_checkpoint, list_checkpoints, list_models

    if args.variant is None and not args.checkpoints:
        print("\n".join(list_models()))
        return 0
    rows = [get_checkpoint(n) for n in list_checkpoints(args.variant)]
    if args.json:
        print(json.dumps([c.name for c in rows], indent=2))
        return 0
    print(f"{'checkpoint':<36} {'res':>4} {'classes':>7} {'top-1':>7} {'params':>13}")
    for c in rows:
        top1 = c.meta.get("top1")
        print(f"{c.name:<36} {c.resolution:>4} {c.num_classes:>7} "
              f"{(f'{top1:.2f}' if top1 is not None else '-'):>7} {c.meta.get('params', 0):>13,}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..checkpoints.registry import get_checkpoint

    ckpt = get_checkpoint(args.name)
    info = {f.name: getattr(ckpt, f.name) for f in fields(ckpt) if f.name != "meta"}
    info.update(dict(ckpt.meta))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..inference.predictor import Predictor, check_topk, load_classifier
    from ..preprocessing.images import expand_image_paths

    # Bad arguments, mistyped paths and empty folders are named before any weights are read or downloaded
    # (unreadable files, in contrast, are reported per image and the others still classified).
    check_topk(args.topk)
    if args.output is not None:
        from ..inference.result_files import PREDICTION_FORMATS, output_format

        output_format(args.output, PREDICTION_FORMATS, "the predictions")
    images = expand_image_paths(args.images or [sample_image_path()])
    # Refuses a --num-classes that would mean a new, untrained head (for a pretrained name: before downloading).
    model = load_classifier(
        model_for_weights(args.model, args.checkpoint_path, default="tiny"),
        checkpoint_path=args.checkpoint_path,
        num_classes=args.num_classes,
        force_download=args.force_download,
    )
    # No batch larger than the images given: a compiled graph for 16 would pad one photo to 16.
    predictor = Predictor(model, backend=args.backend, batch_size=min(args.batch_size, len(images)),
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.output is not None:
        return _predict_to_file(predictor, images, args)
    preds = predictor.classify(images, topk=args.topk)
    if args.json:
        print(json.dumps(
            [{"image": p.source, "topk": [{"label": l, "prob": round(s, 6)} for l, s in p.topk], "error": p.error}
             for p in preds], indent=2))
    else:
        for p in preds:
            print(p.source)
            if p.error:
                print(f"  error: {p.error}")
            for label, prob in p.topk:
                print(f"  {prob:7.2%}  {label}")
    failed = [p for p in preds if p.error]
    if failed:
        print(f"{len(failed)} of {len(preds)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _predict_to_file(predictor: "Predictor", images: List[str], args: argparse.Namespace) -> int:
    from ..inference.file_jobs import predict_files

    summary = predict_files(predictor, images, args.output, topk=args.topk, workers=args.workers,
                            overwrite=args.overwrite, progress=False if args.no_progress else None)
    print(summary.describe(args.output), file=sys.stderr)
    if summary.errors:
        print(f"{len(summary.errors)} of {summary.processed} images could not be read (their lines in {args.output} "
              "say why)", file=sys.stderr)
    return 1 if summary.errors else 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from ..inference.file_jobs import embed_files
    from ..inference.predictor import Predictor
    from ..inference.result_files import check_embedding_output, paths_file
    from ..models.factory import create
    from ..preprocessing.images import expand_image_paths

    check_embedding_output(args.output)  # format and pyarrow, before any weights are read
    if args.no_pool and args.stage is None:
        raise ValueError("--no-pool keeps a stage's whole map: give the stage too (--stage 0..3); the pre-logits "
                         "features are pooled by definition")
    images = expand_image_paths(args.images)
    model = create(args.model, pretrained=args.checkpoint_path is None, checkpoint_path=args.checkpoint_path,
                   num_classes=args.num_classes, force_download=args.force_download)
    predictor = Predictor(model, backend=args.backend, batch_size=min(args.batch_size, len(images)))
    summary = embed_files(predictor, images, args.output, stage=args.stage, pool=not args.no_pool,
                          workers=args.workers, progress=False if args.no_progress else None)
    where = f"{args.output} (paths: {paths_file(args.output)})" if args.output.lower().endswith(".npy") else args.output
    print(summary.describe(where), file=sys.stderr)
    for path, error in summary.errors:
        print(f"{path}: {error}; left out", file=sys.stderr)
    return 1 if summary.errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnextv2", description="ConvNeXt V2 models and checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list variants, or the checkpoints of one variant")
    p.add_argument("variant", nargs="?", help="e.g. tiny; omit to list variants")
    p.add_argument("--checkpoints", action="store_true", help="list every checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a checkpoint's manifest entry")
    p.add_argument("name", help="e.g. tiny.fcmae_ft_in1k")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("predict", help="classify images (default: the bundled sample photo)")
    p.add_argument("images", nargs="*", help="image files and folders (searched recursively for images)")
    p.add_argument("--model", default=None,
                   help="model or checkpoint name (default: tiny; with --checkpoint-path, the size the file holds)")
    add_weights_arguments(p)
    p.add_argument("--topk", type=int, default=5)
    add_backend_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--output", help="write one line per image to this .jsonl or .csv file as the job goes (for "
                                    "folders of any size); run again to resume an interrupted job")
    p.add_argument("--overwrite", action="store_true", help="with --output: start the file afresh, do not resume")
    add_file_job_arguments(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("embed", help="features of images into a .npy (+ .paths.txt), .npz or .parquet file")
    p.add_argument("images", nargs="+", help="image files and folders (searched recursively for images)")
    p.add_argument("--model", default="tiny", help="model or checkpoint name, e.g. tiny or tiny.fcmae (default: tiny)")
    add_weights_arguments(p)
    p.add_argument("--output", required=True, help="feats.npy (paths in feats.paths.txt), feats.npz or feats.parquet")
    p.add_argument("--stage", type=int, choices=range(4),
                   help="a stage's output map (0-3) instead of the pooled pre-logits features")
    p.add_argument("--no-pool", action="store_true",
                   help="with --stage: keep the whole map (C x H/s x W/s per image) instead of its average")
    add_backend_arguments(p)
    add_file_job_arguments(p)
    p.set_defaults(func=_cmd_embed)
    add_analyze_parser(sub)
    add_fcmae_show_parser(sub)
    add_convert_parser(sub)
    add_push_parser(sub)
    add_compile_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        # Errors from our own code already name the problem and the fix; no traceback needed.
        print(f"convnextv2 {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
