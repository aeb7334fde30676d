"""``convnextv2 push RUN_DIR_or_CHECKPOINT --repo OWNER/NAME``: publish a trained model on the Hugging Face Hub
(``checkpoints.hub``), or with ``--dry-run DIR`` only write the folder that would be uploaded.

A RUN_DIR is a ``convnextv2-train finetune`` output folder: its ``checkpoint-last.safetensors`` (``--ema``: the
EMA weights) is pushed, and its ``config.json`` and ``eval.json`` fill the model card (where training started,
hence the licence; recipe and the settings changed from it; data set; metrics). A CHECKPOINT is a safetensors
file written by this package; when it sits in a run folder, that folder's facts are used too.

torch and the checkpoint code are imported when the command runs, so ``convnextv2 --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

RUN_WEIGHTS = ("checkpoint-last.safetensors", "checkpoint-last-ema.safetensors")  # what convnextv2-train writes
DERIVED_KEYS = ("lr", "update_freq")  # computed per run from blr and eff_batch_size: reported, not "changed"
# Settings of the process, not of the training: they do not change the weights, so the card leaves them out.
RUNTIME_KEYS = ("num_workers", "log_interval", "tensorboard", "save_ckpt_freq", "save_ckpt_steps", "pin_mem",
                "dist_eval")


def add_push_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register ``convnextv2 push``."""
    p = subparsers.add_parser(
        "push", help="publish a trained model (run folder or checkpoint) on the Hugging Face Hub",
        description="Write a Hub repo folder (model.safetensors, config.json, a model card README.md; optional "
                    "timm/ and hf/ subfolders) and upload it in one commit. Token: HF_TOKEN or `hf auth login`; "
                    "HF_ENDPOINT selects a mirror.")
    p.add_argument("source", help="a convnextv2-train finetune output folder, or a .safetensors file of this package")
    p.add_argument("--repo", required=True, help="Hub repo id OWNER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--format", default="ours", help="comma-separated: ours (always), timm, hf (default: ours)")
    p.add_argument("--license", help="licence id for the card; weights trained from the released weights stay "
                                     "cc-by-nc-4.0 (default: that, or mit for weights trained from random init)")
    p.add_argument("--ema", action="store_true", help="push the run's EMA weights (checkpoint-last-ema.safetensors)")
    p.add_argument("--message", default="Upload model with convnextv2-hub", help="commit message")
    p.add_argument("--dry-run", metavar="DIR", help="write the folder to DIR (must not exist) and upload nothing")
    p.set_defaults(func=run_push)
    return p


def run_push(args: argparse.Namespace) -> int:
    from ..checkpoints.hub import push_model
    from ..checkpoints.hub_folder import parse_formats, write_hub_folder

    repo = args.repo.strip()
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"--repo {args.repo!r}: expected OWNER/NAME (a user or organisation, then the model's name)")
    formats = ["ours", *parse_formats([f.strip() for f in args.format.split(",") if f.strip()])]
    if args.dry_run and Path(args.dry_run).exists():  # before anything is read: a mistyped folder costs nothing
        raise FileExistsError(f"--dry-run {args.dry_run!r} already exists; give a new folder")
    weights, run = _source(Path(args.source), args.ema)
    model, info, base = _model_and_card(weights, run, repo, args.license)
    if args.dry_run:
        out = write_hub_folder(model, args.dry_run, info, formats, base_checkpoint=base)
        print(f"wrote {out} ({', '.join(sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()))});"
              f" licence {info.license}")
        print(f"upload it with: convnextv2 push {args.source} --repo {repo}" + (f" --format {args.format}" if
                                                                                  formats != ["ours"] else ""))
        return 0
    url = push_model(model, repo, info=info, formats=formats, private=True if args.private else None,
                     base_checkpoint=base, commit_message=args.message)
    print(f"pushed {weights} to {repo} ({url}); licence {info.license}")
    print(f"load it with: convnextv2_hub.create('hf-hub:{repo}', pretrained=True)  or  "
          f"convnextv2 predict IMAGES --model hf-hub:{repo}")
    return 0


def _source(source: Path, ema: bool) -> Tuple[Path, Optional[Dict[str, Any]]]:
    """(weights file, the run folder's facts or None) of a RUN_DIR or CHECKPOINT."""
    if source.is_dir():
        weights = source / RUN_WEIGHTS[1 if ema else 0]
        if not (source / "config.json").is_file() or not weights.is_file():
            have = ", ".join(sorted(p.name for p in source.iterdir())[:10]) or "nothing"
            raise FileNotFoundError(f"{source} is not a convnextv2-train finetune folder with {weights.name} and "
                                    f"config.json (it holds {have}); give the folder of a finished fine-tune, or a "
                                    "checkpoint file")
        return weights, _run_facts(source, ema)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if ema:
        raise ValueError("--ema picks the EMA weights of a run folder; with a checkpoint file, give that file")
    run_dir = source.parent
    is_ema = source.name == RUN_WEIGHTS[1]
    facts = _run_facts(run_dir, is_ema) if source.name in RUN_WEIGHTS and (run_dir / "config.json").is_file() else None
    return source, facts


def _run_facts(run_dir: Path, ema: bool) -> Dict[str, Any]:
    """A run folder's config.json (``run``, ``config``) and eval.json (the EMA's entry with ``ema``)."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "run" not in config:
        raise ValueError(f"{run_dir / 'config.json'} is not a convnextv2-train run's config.json")
    if config["run"].get("mode") == "pretrain":
        raise ValueError(f"{run_dir} is an FCMAE pre-training run: push classifiers (a finetune run), or save the "
                         "encoder with cvh.save_checkpoint(model.encoder, ...) and push that file")
    metrics: Dict[str, Any] = {}
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        evaluated = json.loads(eval_path.read_text(encoding="utf-8"))
        ev = (evaluated.get("ema") or {}) if ema else evaluated
        metrics = {k: ev[k] for k in ("top1", "top5", "loss", "num_images") if k in ev}
        if isinstance(evaluated.get("epoch"), int):  # the trainer counts epochs from 0
            metrics["after epoch"] = evaluated["epoch"] + 1
    return {"run": config["run"], "config": config.get("config") or {}, "metrics": metrics, "ema": ema}


def _started_from(run: Dict[str, Any]) -> Tuple[Optional[bool], str, Optional[str]]:
    """(from released weights: True / False / None unknown, in words, the released checkpoint's name) of a run."""
    from ..checkpoints.registry import get_checkpoint

    start = run.get("start")  # what the trainer resolved: {"kind": "checkpoint" | "file" | "random", "source": ...}
    if isinstance(start, dict) and start.get("kind") == "random":
        return False, "random weights (--init none)", None
    if isinstance(start, dict) and start.get("kind") == "checkpoint":
        name = get_checkpoint(str(start["source"])).name
        return True, f"the released weights `{name}`", name
    init = (start or {}).get("source") if isinstance(start, dict) else None
    init = init or run.get("init") or run.get("finetune")
    if run.get("pretrained"):
        name = get_checkpoint(run["model"]).name
        return True, f"the released weights `{name}`", name
    if init:
        if not Path(str(init)).exists():
            try:
                name = get_checkpoint(str(init)).name
                return True, f"the released weights `{name}`", name
            except ValueError:
                pass
        return None, f"the weights in `{init}` (whether they derive from the released weights is not recorded)", None
    return False, "random weights (no --init, no --pretrained)", None


def _model_and_card(weights: Path, facts: Optional[Dict[str, Any]], repo: str, license: Optional[str]) -> Tuple[Any, Any, Optional[str]]:
    """(the model in ``weights``, its CardInfo, the released checkpoint it started from)."""
    from ..checkpoints.io import read_description
    from ..checkpoints.model_card import CardInfo, choose_license
    from ..checkpoints.reading import read_metadata
    from ..checkpoints.registry import get_checkpoint
    from ..models.factory import create

    if read_description(weights) is None or not read_metadata(weights).get("variant"):
        raise ValueError(f"{weights} is not a checkpoint written by convnextv2-hub; convert it first: convnextv2 "
                         "convert SRC --to ours --out model.safetensors [--model VARIANT]")
    model = create(read_metadata(weights)["variant"], checkpoint_path=weights).eval()
    from_release, started, base = (None, f"`{weights.name}` (where its training started is not recorded)", None)
    if facts is not None:
        from_release, started, base = _started_from(facts["run"])
    chosen, note = choose_license(from_release, license, started)
    info = CardInfo(repo_id=repo, license=chosen, license_note=note, from_release=from_release, started_from=started,
                    base_hub_id=get_checkpoint(base).hf_hub_id if base else None)
    if facts is not None:
        run, cfg = facts["run"], facts["config"]
        info.recipe = run.get("recipe")
        info.overrides = _overrides(run, cfg)
        info.dataset = Path(str(run.get("data_path") or "")).name or None
        info.metrics = facts["metrics"]
        info.training = {k: v for k, v in (("weights", "EMA" if facts["ema"] else "model (not the EMA)"),
                                           ("epochs", cfg.get("epochs")), ("lr as run", cfg.get("lr")),
                                           ("effective batch", run.get("effective_batch")),
                                           ("training images", run.get("train_images"))) if v is not None}
    return model, info, base


def _overrides(run: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Config keys whose value in the run differs from the recipe's (the user's --set, mostly), except the
    derived, per-device and runtime ones."""
    from ..checkpoints.registry import parse_model_name
    from ..train import config as C

    try:
        recipe, _ = C.resolve("finetune", parse_model_name(run["model"])[0], run.get("recipe"), {}, None)
    except (ValueError, KeyError, OSError):  # a recipe file since moved, a run of an older version
        return {}
    # A recipe value of None is decided per run (device defaults such as channels_last): not a change.
    return {k: v for k, v in cfg.items() if k not in DERIVED_KEYS + RUNTIME_KEYS and recipe.get(k) is not None
            and recipe[k] != v}


__all__: List[str] = ["RUN_WEIGHTS", "add_push_parser", "run_push"]
