"""``convnextv2-train``: FCMAE pre-training, fine-tuning and evaluation with the paper's recipes.

    convnextv2-train pretrain --model base --data /imagenet --output runs/pt
    convnextv2-train finetune --model base --data /imagenet --output runs/ft --init runs/pt/checkpoint-last.safetensors
    convnextv2-train finetune --model tiny --data /my_folder --recipe finetune_in1k --set epochs=30 --set lr=1e-4
    convnextv2-train eval     --model tiny --pretrained --data /imagenet/val
    convnextv2-train eval     --model hf-hub:OWNER/NAME --data /my_folder/val     (a model pushed with convnextv2 push)
    convnextv2-train eval     --init runs/ft/checkpoint-last.safetensors --data /my_folder/val
    torchrun --nproc_per_node 8 --nnodes 2 ... -m convnextv2_hub.train finetune ...   (same flags)
    convnextv2-train recipes [NAME]     # list recipes, or print one
    convnextv2-train keys               # every config key with its default
    convnextv2-train reproduce table3-codesign --data digits --output runs/t3   # a table of the paper's ablations

A fine-tune starts from the variant's released FCMAE weights (``<variant>.fcmae``) unless ``--init`` says
otherwise (a checkpoint name, a path, ``none``); recipe values that do not fit a small run adapt with a notice
unless ``--strict-recipe`` (``train.start``, ``train.config.fit_schedule`` / ``fit_batch``).

Errors in what the user gave (config, data, checkpoint files, a blown-up run, a full disk) are one line
on stderr and exit status 2 (config and flags) or 1 (everything after); a traceback means a bug.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple, Type

from ..train import config as C
from .reproduce import add_reproduce_parser, options


def _add_common(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("--model", required=mode != "eval",
                   help="variant (atto ... huge) or checkpoint name (tiny.fcmae_ft_in22k_in1k_384)"
                   + ("; or hf-hub:OWNER/NAME, a model pushed with `convnextv2 push`; may be left out with --init "
                      "of a file that says its size" if mode == "eval" else ""))
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (or train.txt / val.txt file lists)"
                   + ("; or a folder/list to evaluate directly" if mode == "eval" else ""))
    p.add_argument("--output", default=None, help="run folder (checkpoints, log.jsonl, eval.json, config.json)"
                   + ("" if mode == "eval" else "; default runs/" + mode))
    if mode != "eval":
        p.add_argument("--recipe", default=C.DEFAULT_RECIPE[mode],
                       help=f"recipe name ({', '.join(r for r in C.list_recipes())}) or a .json path; default {C.DEFAULT_RECIPE[mode]}")
        p.add_argument("--resume", default=None, help="'auto': continue from <output>/checkpoint-last.pt if there is one; or a path")
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an output folder that holds an earlier run (its log.jsonl and eval.json are "
                            "removed when training starts, its checkpoints replaced at the first save); without it, "
                            "such a folder is refused")
        p.add_argument("--strict-recipe", action="store_true",
                       help="keep every recipe value as written (paper reproduction): refuse a warm-up longer than "
                            "--set epochs or a batch larger than the data set instead of adapting them")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (authors' argument names; 'convnextv2-train keys' lists them); repeatable")
    p.add_argument("--init", default=None, help={
        "pretrain": "continue from an FCMAE checkpoint (with decoder); default: random weights",
        "finetune": "start from: a checkpoint name (tiny.fcmae, tiny.fcmae_ft_in22k_in1k), a file (FCMAE encoder or "
                    "classifier, any supported format; the authors' --finetune), or 'none' for random weights; "
                    "default: the variant's released FCMAE weights (<variant>.fcmae), as the paper",
        "eval": "weights to evaluate (any supported format; a file of ours brings its labels and preprocessing)",
    }[mode])
    if mode != "pretrain":
        p.add_argument("--pretrained", action="store_true",
                       help="start from / evaluate the released weights --model names (its default checkpoint for a bare variant)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers per process (config key num_workers)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process per step (config key batch_size)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnextv2-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for mode, text in (("pretrain", "FCMAE self-supervised pre-training (Table 8)"),
                       ("finetune", "supervised fine-tuning (Tables 9-13)"),
                       ("eval", "top-1/top-5 of released or own weights")):
        _add_common(sub.add_parser(mode, help=text, description=text), mode)
    r = sub.add_parser("recipes", help="list the packaged recipes or print one")
    r.add_argument("name", nargs="?")
    sub.add_parser("keys", help="list every config key with its default")
    add_reproduce_parser(sub)
    return parser


def _resolve(args: argparse.Namespace):
    """(config, source notes, adaptation notices); for ``eval``, ``args.model`` is filled in from ``--init``'s
    file when it was left out, and for training ``args.start`` is where the weights start. A pushed model
    (``hf-hub:OWNER/NAME``) is evaluated at its own preprocessing: its config.json says it."""
    from ..checkpoints.hub import hub_repo_id, pull
    from ..checkpoints.registry import parse_model_name
    from ..train.start import resolve_start

    mode = args.command
    repo = hub_repo_id(args.model) if mode == "eval" and args.model else None
    hub_config = pull(repo, weights=False)[0] if repo else None
    if mode == "eval" and hub_config is None:
        from .arguments import model_for_weights

        described = args.init if args.init and os.path.isfile(args.init) else None
        args.model = model_for_weights(args.model, described)
    variant = hub_config.variant if hub_config else parse_model_name(args.model)[0]
    overrides = C.parse_set(args.sets)
    for flag, key in ((args.num_workers, "num_workers"), (args.batch_size, "batch_size")):
        if flag is not None:
            overrides[key] = flag
    if getattr(args, "overwrite", False) and getattr(args, "resume", None):
        raise C.ConfigError("--overwrite starts over and --resume continues: give one of them")
    adapted: list = []
    if mode == "eval":
        # Evaluate at the resolution the weights were made for (a file of ours or a pushed repo says it)
        # unless told otherwise.
        size = hub_config.preprocessing["resolution"] if hub_config else _eval_resolution(args)
        cfg, notes = C.resolve(mode, variant, None, overrides, {"input_size": size})
    else:
        args.start = resolve_start(mode, args.model, args.init, args.pretrained if mode == "finetune" else False)
        cfg, notes = C.resolve(mode, variant, args.recipe, overrides, None, None if args.strict_recipe else adapted)
    return cfg, notes, adapted


def _eval_resolution(args: argparse.Namespace) -> int:
    from ..checkpoints.io import read_description
    from ..checkpoints.registry import get_checkpoint

    description = read_description(args.init) if args.init and not args.pretrained else None
    if description is not None and description.preprocessing is not None:
        return int(description.preprocessing["resolution"])
    return get_checkpoint(args.model).resolution


def _fixed_keys(args: argparse.Namespace) -> List[str]:
    """The config keys the user set: ``--set`` and the flags that stand for keys."""
    keys = list(C.parse_set(args.sets))
    keys += [key for flag, key in ((args.num_workers, "num_workers"), (args.batch_size, "batch_size")) if flag is not None]
    return keys


def _error(e: BaseException, status: int) -> int:
    print(f"convnextv2-train: error: {e}", file=sys.stderr)
    return status


def _expected_errors() -> Tuple[Type[BaseException], ...]:
    """The exceptions that report a problem with the input or the machine, not a bug in the trainer.
    OSError covers what the file system refuses (permissions, a full disk: ``files.DiskFullError``)."""
    from ..checkpoints.download import CheckpointDownloadError
    from ..checkpoints.reading import CheckpointError
    from ..train.distributed import RanksDifferError
    from ..train.engine import NonFiniteLossError
    from ..train.run import TrainingInputError

    return (C.ConfigError, TrainingInputError, CheckpointError, CheckpointDownloadError, NonFiniteLossError,
            RanksDifferError, OSError)


def _print_recipes(name: Optional[str]) -> None:
    if name:
        print(open(C.load_recipe(name).path, encoding="utf-8").read())
    else:
        for recipe in C.list_recipes():
            print(f"{recipe}: {C.load_recipe(recipe).description}")


def train_command(argv: List[str]) -> Dict[str, Any]:
    """Run a ``pretrain`` / ``finetune`` command line in this process and return the trainer's summary.
    Errors are raised, not printed: ``reproduce`` tells a diverged run from a broken one."""
    args = build_parser().parse_args(argv)
    if args.command not in ("pretrain", "finetune") or args.dry_run:
        raise ValueError(f"train_command runs pretrain or finetune, got {argv[:1]}")
    cfg, notes, adapted = _resolve(args)
    return _run(args, cfg, notes, adapted)


def _reproduce(args: argparse.Namespace) -> int:
    from ..train.reproduce import ReproduceError, reproduce

    try:
        return reproduce(options(args), train_command)
    except C.ConfigError as e:  # a bad table, row id, --set or recipe value
        return _error(e, 2)
    except (*_expected_errors(), ReproduceError, ImportError) as e:
        return _error(e, 1)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "keys":
        print(C.known_keys_text())
        return 0
    try:
        if args.command == "recipes":
            _print_recipes(args.name)
            return 0
        cfg, notes, adapted = _resolve(args)
    except ValueError as e:  # ConfigError, or parse_model_name's unknown name
        return _error(e, 2)
    except _expected_errors() as e:  # eval: a --init file that cannot be read
        return _error(e, 1)
    if args.dry_run:
        start = getattr(args, "start", None)
        print(json.dumps({"config": cfg, "sources": notes, "adapted": adapted,
                          **({"start": start.as_dict()} if start is not None else {})}, indent=2))
        return 0
    try:
        _run(args, cfg, notes, adapted)
    except _expected_errors() as e:
        return _error(e, 1)
    return 0


def _run(args: argparse.Namespace, cfg: Dict[str, Any], notes: Dict[str, str],
         adapted: List[str]) -> Optional[Dict[str, Any]]:
    from ..train.engine import train
    from ..train.evaluation import run_eval
    from ..train.run import Run

    run = Run(
        mode=args.command, model=args.model, data_path=args.data, output_dir=args.output, cfg=cfg,
        init=args.init, pretrained=getattr(args, "pretrained", False), resume=getattr(args, "resume", None),
        overwrite=getattr(args, "overwrite", False), device=args.device, recipe=getattr(args, "recipe", None), notes=notes,
        start=getattr(args, "start", None), fixed=tuple(_fixed_keys(args)), strict_recipe=getattr(args, "strict_recipe", False),
        adapted=adapted,
    )
    if run.mode == "eval":
        res = run_eval(run)
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one report, not one per process
            print(json.dumps({k: res[k] for k in ("top1", "top5", "loss", "num_images", "skipped_images", "classes")}, indent=1))
        return None
    return train(run)


if __name__ == "__main__":
    sys.exit(main())
