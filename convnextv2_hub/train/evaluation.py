"""Evaluation: exact top-1/top-5 and loss over all processes, and the ``eval`` command that measures
released or own weights on a validation set."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_write_json
from ..preprocessing.transforms import normalize_images
from . import config as C
from .data import (
    EvalPreprocessing,
    ShardSampler,
    build_dataset,
    default_num_workers,
    eval_preprocessing,
    eval_transform,
    find_split,
    make_loader,
)
from .distributed import DistEnv, all_sum, init_distributed, shutdown
from .run import Run, TrainingInputError


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, amp: Optional[torch.dtype], channels_last: bool = False,
             reduce: bool = True, label_map: Optional[torch.Tensor] = None,
             normalize: Optional[Callable] = None) -> Dict[str, Any]:
    """Top-1/top-5 (percent), mean CE loss and image count; exact over processes (shards, no padding).
    ``label_map``: the model's class index for each of the data set's labels (``class_mapping``);
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
        if label_map is not None:
            labels = label_map[labels]
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
    """The ``eval`` command: top-1/top-5 of released (``--pretrained``) or own (``--init``) weights. A file of
    ours brings its head, label names and preprocessing; the folder's classes are matched to the model's
    labels (``class_mapping``), or the run is refused when they cannot be."""
    env = init_distributed(run.device, run.cfg["dist_timeout_min"])
    cfg = C.device_defaults(run.cfg, env.device.type)
    try:
        loc = find_split(run.data_path, "val", fallback_to_root=True)
        if loc is None:
            raise TrainingInputError(f"no evaluation data at {run.data_path}")
        # A model pushed to the Hub (hf-hub:OWNER/NAME) brings its head, labels and preprocessing: built first.
        hub_model = _hub_model(run)
        if hub_model is not None:
            prep = eval_preprocessing(hub_model.checkpoint, cfg["input_size"], cfg["crop_pct"],
                                      cfg["imagenet_default_mean_and_std"])
        else:
            prep = described_preprocessing(run.init, cfg) if not run.pretrained else None
            prep = prep or eval_preprocessing(run.model, cfg["input_size"], cfg["crop_pct"],
                                              cfg["imagenet_default_mean_and_std"])
        ds = build_dataset(loc, eval_transform(prep, uint8=True))
        model = hub_model if hub_model is not None else _eval_model(run, cfg)
        index, how = class_mapping(ds.classes, model, loc)
        model.to(env.device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        nw = cfg["num_workers"] if cfg["num_workers"] is not None else default_num_workers()
        loader, shard = eval_loader(ds, cfg, env, nw)
        label_map = torch.tensor(index, device=env.device) if index is not None else None
        res = evaluate(model, loader, env, amp_dtype(cfg), cfg["channels_last"], reduce=shard, label_map=label_map,
                       normalize=normalize_images(prep.mean, prep.std))
        res.update(
            model=run.model,
            weights=run.init or getattr(getattr(model, "checkpoint", None), "name", run.model),
            data=str(loc),
            classes=how,
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


def _hub_model(run: Run) -> Optional[nn.Module]:
    """The model ``--model hf-hub:OWNER/NAME`` names (pushed with ``convnextv2 push``), None for other names."""
    from ..checkpoints.hub import hub_repo_id
    from ..models.factory import create

    return create(run.model, pretrained=True) if hub_repo_id(run.model) and not run.init else None


def _eval_model(run: Run, cfg: Dict[str, Any]) -> nn.Module:
    """The released weights (``--pretrained``) or ``--init``'s, with the head the file has (or states); weights
    without a classifier head (FCMAE encoders) are refused."""
    from ..checkpoints.reading import CheckpointError
    from ..checkpoints.registry import get_checkpoint
    from ..models.factory import create

    if run.pretrained:
        if get_checkpoint(run.model).num_classes == 0:
            raise TrainingInputError(f"{get_checkpoint(run.model).name} is an encoder without a classifier head (FCMAE "
                                     "pre-training): fine-tune it first (convnextv2-train finetune --init "
                                     f"{get_checkpoint(run.model).name}), then evaluate that run's checkpoint")
        return create(run.model, pretrained=True)
    if not run.init:
        raise TrainingInputError("eval needs --pretrained or --init PATH (weights to evaluate)")
    from ..inference.predictor import load_classifier

    try:  # the file's own head, never a fresh one: evaluating an untrained head measures nothing
        return load_classifier(run.model, checkpoint_path=run.init,
                               num_classes=cfg["nb_classes"] or _checkpoint_classes(run.init))
    except CheckpointError:
        raise
    except ValueError as e:
        raise TrainingInputError(f"--init {run.init}: {e}") from e


def described_preprocessing(path: Optional[str], cfg: Dict[str, Any]) -> Optional[EvalPreprocessing]:
    """The preprocessing a file of ours states (what its weights were evaluated with), when it is at the
    run's ``input_size`` (``eval`` takes that from the file unless ``--set input_size`` says otherwise);
    ``crop_pct`` and ``imagenet_default_mean_and_std`` set by the user still apply. None otherwise."""
    from ..checkpoints.io import read_description

    description = read_description(path) if path else None
    p = description.preprocessing if description is not None else None
    if p is None or p["resolution"] != cfg["input_size"]:
        return None
    mean, std = (p["mean"], p["std"]) if cfg["imagenet_default_mean_and_std"] else ((0.5,) * 3, (0.5,) * 3)
    pct = cfg["crop_pct"] if cfg["crop_pct"] is not None else p["crop_pct"]
    return EvalPreprocessing(p["resolution"], pct, p["crop_mode"], p["interpolation"], tuple(mean), tuple(std))


def class_mapping(classes: Sequence[str], model: nn.Module, loc: Path) -> Tuple[Optional[List[int]], str]:
    """(the model's class index for each of the data set's classes, None for the identity; how they were matched).

    By name, when every class folder names one of the model's labels (its own label names; for an
    ImageNet-1K head also the WordNet ids of ImageNet's own folders): a 1000-class model then evaluates on
    a folder of a few of its classes. Else by index, when the counts agree (a folder that is the model's
    training data laid out again; ImageNet's folders sort into its class order) or the data set is a file
    list of label numbers. Anything else is refused: top-1 would compare unrelated classes and read 0."""
    from ..checkpoints.io import real_label_names
    from ..checkpoints.registry import imagenet_class_names, imagenet_wnids

    names = real_label_names(model) or []
    n = int(model.num_classes)
    lookup = {name: i for i, name in enumerate(names) if names.count(name) == 1}
    if n == 1000 and names == imagenet_class_names():
        lookup.update((wnid, i) for i, wnid in enumerate(imagenet_wnids()))
    if classes and all(c in lookup for c in classes):
        index = [lookup[c] for c in classes]
        return (None if index == list(range(len(classes))) else index), "by name"
    if len(classes) == n or loc.is_file():
        imagenet = n == 1000 and names == imagenet_class_names()
        if not names or imagenet or loc.is_file():
            return None, "by index"
        return None, (f"by index: the class folders ({', '.join(classes[:3])}{', ...' if n > 3 else ''}) are not "
                      f"the model's labels ({', '.join(names[:3])}{', ...' if n > 3 else ''}), so the folders' sorted "
                      "order is taken as the class order")
    unknown = [c for c in classes if c not in lookup]
    shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    labels = ("its ImageNet-1K labels" if n == 1000 and names == imagenet_class_names()
              else f"its labels ({', '.join(names[:5])}{', ...' if n > 5 else ''})" if names else "no label names")
    raise TrainingInputError(
        f"{loc} has {len(classes)} classes but the model has a {n}-class head with {labels}, and {shown} "
        f"{'is' if len(unknown) == 1 else 'are'} not among them, so top-1 would compare unrelated classes. "
        "Evaluate a model fine-tuned on these classes (convnextv2-train finetune --data ..., then eval --init "
        "<its checkpoint-last.safetensors>), or name the class folders after the model's labels "
        + ("(e.g. 'tabby' or its WordNet id n02123045) " if n == 1000 and names else "")
        + "to evaluate on a subset of its classes")


def _checkpoint_classes(path: Optional[str]) -> Optional[int]:
    """Class count of a weights file's head (any supported format); None without a head."""
    if not path:
        return None
    from ..checkpoints.formats import to_ours
    from ..checkpoints.reading import read_state_dict

    sd = to_ours(read_state_dict(path))
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None else None
