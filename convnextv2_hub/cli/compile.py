"""``convnextv2 compile``: build the compiled CPU graphs of a model ahead of time, list or clear the store.

A deployment runs it once per machine kind (and thread count); every later process that serves the same
weights at a compiled batch size loads the graphs (``inference.compiled_store``) instead of compiling.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from .arguments import add_weights_arguments, model_for_weights


def _cmd_compile(args: argparse.Namespace) -> int:
    from ..inference import compiled_store

    if args.list:
        return _list_store()
    if args.clear:
        root = compiled_store.store_dir()
        size = sum(e["bytes"] for e in compiled_store.entries())
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root} ({size / 1e6:.1f} MB)")
        return 0
    import torch

    from ..inference.predictor import Predictor, load_classifier

    if any(n < 1 for n in args.batch_size):
        raise ValueError(f"--batch-size takes sizes >= 1, got {args.batch_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_classifier(model_for_weights(args.model, args.checkpoint_path, default="tiny"),
                            checkpoint_path=args.checkpoint_path, num_classes=args.num_classes,
                            force_download=args.force_download)
    predictor = Predictor(model, backend="compile", device="cpu", precision=args.precision,
                          batch_size=max(args.batch_size), autotune=not args.no_autotune,
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    for n in args.batch_size:
        predictor.warmup(batch_size=n, image_size=args.image_size, embed=args.embed)
        print(f"batch {n}: {', '.join(predictor.compile_events[-(2 if args.embed else 1):])} "
              f"({predictor.precision}, {torch.get_num_threads()} threads)")
    print(f"store: {compiled_store.store_dir()}; processes with the same weights, batch size, precision, "
          f"thread count and machine load these graphs instead of compiling")
    return 0


def _list_store() -> int:
    from ..inference import compiled_store

    here = {k: v for k, v in compiled_store.machine_key().items() if k in ("torch", "cpu")}
    rows = compiled_store.entries()
    print(f"{compiled_store.store_dir()}: {len(rows)} entries, "
          f"{sum(r['bytes'] for r in rows) / 1e6:.1f} MB")
    for r in rows:
        key: Any = (r["manifest"] or {}).get("key")
        if key is None:
            print(f"  {r['folder'].name}  {r['bytes'] / 1e6:8.1f} MB  unreadable (rebuilt when next needed)")
            continue
        usable = all(key.get(k) == v for k, v in here.items())
        print(f"  {r['folder'].name}  {r['bytes'] / 1e6:8.1f} MB  input {'x'.join(map(str, key['input']['shape']))}"
              f"  {key['autocast'] or 'float32'}  {key['threads']} threads"
              f"{'  embed' if key['pre_logits'] else ''}{'' if usable else '  (another torch or CPU)'}")
    return 0


def add_compile_parser(sub: Any) -> None:
    p = sub.add_parser("compile", help="compile a model's CPU graphs ahead of time into the store "
                                       "(later processes load them); --list / --clear the store")
    p.add_argument("model", nargs="?", default=None,
                   help="model or checkpoint name (default: tiny; with --checkpoint-path, the size the file holds)")
    add_weights_arguments(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[16], help="one graph per batch size (default 16)")
    p.add_argument("--image-size", type=int, help="input size (default: the checkpoint's resolution)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="default: bf16 where the CPU has native bf16, else fp32 (what Predictor picks)")
    p.add_argument("--threads", type=int, help="intra-op threads the graphs are built for (default: torch's); "
                                               "serve with the same number")
    p.add_argument("--no-autotune", action="store_true", help="compile in about half the time, with oneDNN's GEMMs")
    p.add_argument("--embed", action="store_true", help="also the graph that ends in the pooled features")
    p.add_argument("--list", action="store_true", help="list the store's entries")
    p.add_argument("--clear", action="store_true", help="remove every entry")
    p.set_defaults(func=_cmd_compile)
