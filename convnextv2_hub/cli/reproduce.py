"""``convnextv2-train reproduce TABLE``: the flags, and the call into ``train.reproduce``. Building the
parser reads the table names from the package data and loads no torch."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..train import ablations as A

DESCRIPTION = """Run one of the paper's ablation tables: every row a pre-training -> fine-tuning pair (or a
supervised run) with the row's switches and the same budget, for --seeds seeds. Writes results.md and
results.json (the paper's number beside ours, mean and spread over seeds) after every finished row, and the
table's figure where the paper has one. A second call resumes: finished stages are skipped, interrupted ones
continue from their last checkpoint.

  convnextv2-train reproduce table3-codesign --data digits --output runs/table3            # mini: Atto on a CPU
  convnextv2-train reproduce table2-grn --data /imagenet --output runs/t2 --scale full --dry-run   # torchrun commands
  convnextv2-train reproduce fig4-collapse --data digits --output runs/fig4 --rows v1-fcmae --seeds 1 --set epochs=2
"""


def add_reproduce_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``reproduce`` to the ``convnextv2-train`` subcommands."""
    p = sub.add_parser("reproduce", help="run one of the paper's ablation tables (pre-train -> fine-tune per row)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=A.list_tables(), help="the table to run")
    p.add_argument("--data", required=True,
                   help="ImageFolder root with train/ and val/; 'digits': scikit-learn's digits, written into OUTPUT/data")
    p.add_argument("--output", required=True, type=Path, help="folder of the runs (runs/<row>/seed<k>/<stage>) and results")
    p.add_argument("--scale", choices=list(A.SCALES), default="mini",
                   help="; ".join(f"{s.name}: {s.description}" for s in A.SCALES.values()) + " (default mini)")
    p.add_argument("--seeds", type=int, default=None, help="runs per row, seeds 0..N-1 (default: the table's, per scale)")
    p.add_argument("--rows", default=None, help="comma-separated row ids to run (default: all; the others are still listed)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[STAGE.]KEY=VALUE",
                   help="change the budget of every row: a config key for both stages, or pretrain.KEY / finetune.KEY "
                        "for one; a row's own switches still apply on top. Repeatable")
    p.add_argument("--launcher", default=None,
                   help="command that runs '-m convnextv2_hub.train ...' (default: torchrun --nproc_per_node gpu at "
                        "--scale full; this process at mini); '' runs in this process")
    p.add_argument("--dry-run", action="store_true", help="print every row's commands and exit")
    return p


def options(args: argparse.Namespace) -> Any:
    """The parsed flags as ``train.reproduce.Options`` (imported here: that module is only needed to run)."""
    from ..train.reproduce import Options

    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    return Options(table=args.table, data=args.data, output=args.output, scale=args.scale, seeds=args.seeds,
                   rows=rows, sets=args.sets, launcher=args.launcher, dry_run=args.dry_run)


__all__ = ["add_reproduce_parser", "options"]
