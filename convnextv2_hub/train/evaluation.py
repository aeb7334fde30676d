"""Evaluation: exact top-1/top-5 and loss over all processes, and the ``eval`` command that measures
released or own weights on a validation set."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_write_json
from ..preprocessing.transforms import normalize_images
from . import config as C
from .data import ShardSampler, build_dataset, default_num_workers, eval_preprocessing, eval_transform, find_split, make_loader
from .distributed import DistEnv, all_sum, init_distributed, shutdown
from .run import Run, TrainingInputError


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, amp: Optional[torch.dtype], channels_last: bool = False, reduce: bool = True,
             normalize: Optional[Callable] = None) -> Dict[str, Any]:
    """Top-1/top-5 (percent), mean CE loss and image count; exact over processes (shards, no padding).
    ``normalize``: applied on the device to the loader's (uint8) batches."""
    was_training = model.training
    model.eval()
    c1 = c5 = n = loss_sum = skipped = 0.0
    num_classes = None
    for images, labels, skip in loader:
        images = images.to(env.device, non_blocking=True)
        if normalize is not None:
            images = normalize(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        logits = logits.float()
        num_classes = logits.shape[1]
        if int(labels.max()) >= num_classes:
            raise TrainingInputError(f"a label ({int(labels.max())}) is out of range for a {num_classes}-class model")
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit = top == labels[:, None]
        c1 += float(hit[:, 0].sum())
        c5 += float(hit.any(dim=1).sum())
        n += labels.numel()
        skipped += skip
    if reduce:
        c1, c5, n, loss_sum, skipped = all_sum([c1, c5, n, loss_sum, skipped], env)
    model.train(was_training)
    n_int = int(n)
    return {
        "top1": 100.0 * c1 / max(n, 1),
        "top5": 100.0 * c5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "num_images": n_int,
        "skipped_images": int(skipped),
    }


def eval_loader(ds, cfg: Dict[str, Any], env: DistEnv, num_workers: int):
    """(loader, sharded): in order, sharded over processes when ``dist_eval`` (then the counts need
    summing over processes), else the whole set on every process."""
    shard = cfg["dist_eval"] and env.distributed
    sampler = ShardSampler(len(ds), env.world_size if shard else 1, env.rank if shard else 0)
    gen = torch.Generator()  # its own generator: iterating must not advance the training RNG
    gen.manual_seed(0)
    return (
        make_loader(ds, cfg["batch_size"], sampler, num_workers, cfg["pin_mem"] and env.device.type == "cuda", gen),
        shard,
    )


def amp_dtype(cfg: Dict[str, Any]) -> Optional[torch.dtype]:
    """The autocast dtype of ``use_amp`` / ``amp_dtype``; None: no autocast."""
    if not cfg["use_amp"]:
        return None
    return torch.bfloat16 if cfg["amp_dtype"] == "bfloat16" else torch.float16


def run_eval(run: Run) -> Dict[str, Any]:
    """The ``eval`` command: top-1/top-5 of released (``--pretrained``) or own (``--init``) weights."""
    from ..models.factory import create

    env = init_distributed(run.device, run.cfg["dist_timeout_min"])
    cfg = C.device_defaults(run.cfg, env.device.type)
    try:
        loc = find_split(run.data_path, "val", fallback_to_root=True)
        if loc is None:
            raise TrainingInputError(f"no evaluation data at {run.data_path}")
        prep = eval_preprocessing(run.model, cfg["input_size"], cfg["crop_pct"], cfg["imagenet_default_mean_and_std"])
        ds = build_dataset(loc, eval_transform(prep, uint8=True))
        num_classes = cfg["nb_classes"] or (None if run.pretrained else _checkpoint_classes(run.init)) or len(ds.classes)
        if run.pretrained:
            model = create(run.model, pretrained=True)
        else:
            if not run.init:
                raise TrainingInputError("eval needs --pretrained or --init PATH (weights to evaluate)")
            model = create(run.model, num_classes=num_classes, checkpoint_path=run.init)
        model.to(env.device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        nw = cfg["num_workers"] if cfg["num_workers"] is not None else default_num_workers()
        loader, shard = eval_loader(ds, cfg, env, nw)
        res = evaluate(model, loader, env, amp_dtype(cfg), cfg["channels_last"], reduce=shard,
                       normalize=normalize_images(prep.mean, prep.std))
        res.update(
            model=run.model,
            weights=run.init or getattr(getattr(model, "checkpoint", None), "name", run.model),
            data=str(loc),
            preprocessing=prep.__dict__,
        )
        if env.is_main:
            if run.output_dir:
                out = Path(run.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out / "eval.json", res)
        return res
    finally:
        shutdown(env)


def _checkpoint_classes(path: Optional[str]) -> Optional[int]:
    """Class count of a weights file's head (any supported format); None without a head."""
    if not path:
        return None
    from ..checkpoints.formats import to_ours
    from ..checkpoints.reading import read_state_dict

    sd = to_ours(read_state_dict(path))
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None else None
