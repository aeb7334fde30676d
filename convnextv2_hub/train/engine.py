"""The training and evaluation loop: FCMAE pre-training, fine-tuning, evaluation.

What a run writes into its output folder (all by rank 0, all atomically: temporary file, fsync,
rename, so a kill at any moment leaves either the previous file or the complete new one):

- ``config.json``: the resolved configuration (recipe row + ``--set``), with its source notes.
- ``checkpoint-last.pt``: the full training state (model, EMA, optimiser, grad scaler, epoch and
  position inside it, every process's RNG states, the data loader generator); ``--resume auto``
  continues from it bit-exactly. Written every ``save_ckpt_freq`` epochs and ``save_ckpt_steps`` steps.
- ``checkpoint-last.safetensors`` (+ ``checkpoint-last-ema.safetensors``): the weights, loadable by
  ``convnextv2_hub.create(variant, checkpoint_path=...)``; for pre-training the whole FCMAE
  (``FCMAE.from_checkpoint``; its encoder also loads into ``create`` / ``--init``).
- ``log.jsonl``: one line per ``log_interval`` optimiser steps and one per epoch.
- ``eval.json``: top-1/top-5 of the last evaluation (model and EMA).

Exact resume rests on three things: (1) augmentation randomness is per sample, seeded by (seed,
epoch, index), so restarting in the middle of an epoch replays the same pixels (``data.py``);
(2) the lr is a pure function of the position (epoch, micro-step); (3) everything else that draws
random numbers in the training process (drop path, FCMAE masks, mixup) uses the global RNGs, whose
states are saved per process at every checkpoint and restored last, just before the loop.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import config as C
from .data import (
    MixupCutmix,
    ShardSampler,
    TrainSampler,
    build_dataset,
    collate,
    default_num_workers,
    eval_preprocessing,
    eval_transform,
    fcmae_train_transform,
    find_split,
    finetune_train_transform,
)
from ..atomic import atomic_write
from .optim import absolute_lr, build_optimizer, lr_at, set_lr

STATE_FILE = "checkpoint-last.pt"
WEIGHTS_FILE = "checkpoint-last.safetensors"
EMA_WEIGHTS_FILE = "checkpoint-last-ema.safetensors"
STATE_FORMAT = "convnextv2_hub.train/1"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint."""


@dataclass
class Run:
    """One invocation: the mode, what the flags gave, and the resolved config."""

    mode: str
    model: str
    data_path: str
    output_dir: Optional[str]
    cfg: Dict[str, Any]
    init: Optional[str] = None
    pretrained: bool = False
    resume: Optional[str] = None
    device: str = "auto"
    recipe: Optional[str] = None
    notes: Dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Distributed setup
# ------------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistEnv(rank, world, local, dev, owns)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _all_sum(values: List[float], env: DistEnv) -> List[float]:
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# RNG state (stored as tensors and plain numbers so checkpoints load with weights_only=True)
# ------------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def capture_rng(device: torch.device) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------
def atomic_write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
class ModelEma:
    """Exponential moving average of a model's parameters and float buffers (timm's ModelEma):
    ema = decay * ema + (1 - decay) * model, after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_t, model_t = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                ema_t.append(e)
                model_t.append(m.detach())
            else:
                e.copy_(m)
        torch._foreach_lerp_(ema_t, model_t, 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------
class Logger:
    """Rank-0 console lines, ``log.jsonl`` and optional TensorBoard."""

    def __init__(self, out: Optional[Path], env: DistEnv, use_tensorboard: bool) -> None:
        self.active = env.is_main
        self.path = out / "log.jsonl" if (out is not None and self.active) else None
        self.tb = None
        if self.active and out is not None and use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def info(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)

    def record(self, entry: Dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        if self.tb is not None:
            step = entry.get("global_step", 0)
            for k, v in _flatten(entry).items():
                if isinstance(v, (int, float)) and k not in ("global_step", "epoch", "micro"):
                    self.tb.add_scalar(f"{entry['type']}/{k}", v, step)

    def truncate_after(self, epoch: int, global_step: int) -> None:
        """On resume: drop lines a killed run wrote after the checkpoint it resumes from, so the
        log is exactly the log of an uninterrupted run."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if e.get("type") == "epoch":
                if e["epoch"] < epoch:
                    kept.append(line)
            elif e.get("global_step", 0) <= global_step:
                kept.append(line)
        data = ("\n".join(kept) + ("\n" if kept else "")).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(data))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------
# Model building
# ------------------------------------------------------------------------------------------------
def _variant(model_name: str) -> str:
    from ..manifest import parse_model_name

    return parse_model_name(model_name)[0]


def build_finetune_model(run: Run, num_classes: int, logger: Logger) -> nn.Module:
    """``create()`` with the recipe's drop path and head init scale; then ``--init`` weights (an
    FCMAE file keeps the fresh, scaled head and norm; a head of another class count is replaced)."""
    from ..convert import load_checkpoint
    from ..hub import create

    cfg = run.cfg
    model = create(run.model, pretrained=run.pretrained, num_classes=num_classes, drop_path_rate=cfg["drop_path"], head_init_scale=cfg["head_init_scale"])
    if run.init:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = load_checkpoint(model, run.init)
        for w in caught:
            logger.info(f"note: {w.message}")
        logger.info(f"loaded {run.init} ({report.format}); kept fresh: {report.reinitialized or 'nothing'}")
    return model


def build_pretrain_model(run: Run) -> nn.Module:
    from ..fcmae import FCMAE

    cfg = run.cfg
    kw = dict(mask_ratio=cfg["mask_ratio"], norm_pix_loss=cfg["norm_pix_loss"])
    if run.init:
        model = FCMAE.from_checkpoint(run.init, drop_path_rate=cfg["drop_path"], **kw)
    else:
        model = FCMAE(
            _variant(run.model),
            patch_size=cfg["patch_size"],
            decoder_dim=cfg["decoder_embed_dim"],
            decoder_depth=cfg["decoder_depth"],
            drop_path_rate=cfg["drop_path"],
            **kw,
        )
    # The encoder's final LayerNorm is not used by FCMAE (the decoder reads the last stage map):
    # frozen, so it is not in the optimiser and DDP needs no find_unused_parameters pass.
    model.encoder.norm.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, amp: Optional[torch.dtype], channels_last: bool = False, reduce: bool = True) -> Dict[str, Any]:
    """Top-1/top-5 (percent), mean CE loss and image count; exact over processes (shards, no padding)."""
    was_training = model.training
    model.eval()
    c1 = c5 = n = loss_sum = skipped = 0.0
    num_classes = None
    for images, labels, skip in loader:
        images = images.to(env.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        logits = logits.float()
        num_classes = logits.shape[1]
        if int(labels.max()) >= num_classes:
            raise ValueError(f"a label ({int(labels.max())}) is out of range for a {num_classes}-class model")
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit = top == labels[:, None]
        c1 += float(hit[:, 0].sum())
        c5 += float(hit.any(dim=1).sum())
        n += labels.numel()
        skipped += skip
    if reduce:
        c1, c5, n, loss_sum, skipped = _all_sum([c1, c5, n, loss_sum, skipped], env)
    model.train(was_training)
    n_int = int(n)
    return {
        "top1": 100.0 * c1 / max(n, 1),
        "top5": 100.0 * c5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "num_images": n_int,
        "skipped_images": int(skipped),
    }


def _eval_loader(ds, cfg: Dict[str, Any], env: DistEnv, num_workers: int):
    from torch.utils.data import DataLoader

    shard = cfg["dist_eval"] and env.distributed
    sampler = ShardSampler(len(ds), env.world_size if shard else 1, env.rank if shard else 0)
    gen = torch.Generator()  # its own generator: iterating must not advance the training RNG
    gen.manual_seed(0)
    return (
        DataLoader(ds, batch_size=cfg["batch_size"], sampler=sampler, num_workers=num_workers, collate_fn=collate,
                   pin_memory=cfg["pin_mem"] and env.device.type == "cuda", generator=gen),
        shard,
    )


def _amp_dtype(cfg: Dict[str, Any]) -> Optional[torch.dtype]:
    if not cfg["use_amp"]:
        return None
    return torch.bfloat16 if cfg["amp_dtype"] == "bfloat16" else torch.float16


def run_eval(run: Run) -> Dict[str, Any]:
    """The ``eval`` command: top-1/top-5 of released (``--pretrained``) or own (``--init``) weights."""
    from ..hub import create

    cfg = run.cfg
    env = init_distributed(run.device)
    try:
        loc = find_split(run.data_path, "val", fallback_to_root=True)
        if loc is None:
            raise FileNotFoundError(f"no evaluation data at {run.data_path}")
        prep = eval_preprocessing(run.model, cfg["input_size"], cfg["crop_pct"], cfg["imagenet_default_mean_and_std"])
        ds = build_dataset(loc, eval_transform(prep))
        num_classes = cfg["nb_classes"] or (None if run.pretrained else _checkpoint_classes(run.init)) or len(ds.classes)
        if run.pretrained:
            model = create(run.model, pretrained=True)
        else:
            if not run.init:
                raise ValueError("eval needs --pretrained or --init PATH (weights to evaluate)")
            model = create(run.model, num_classes=num_classes, checkpoint_path=run.init)
        model.to(env.device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        nw = cfg["num_workers"] if cfg["num_workers"] is not None else default_num_workers(env.world_size)
        loader, shard = _eval_loader(ds, cfg, env, nw)
        res = evaluate(model, loader, env, _amp_dtype(cfg), cfg["channels_last"], reduce=shard)
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
    from ..convert import read_state_dict, to_ours

    sd = to_ours(read_state_dict(path))
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None else None


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def find_resume(run: Run) -> Optional[Path]:
    if not run.resume:
        return None
    if run.resume == "auto":
        p = Path(run.output_dir or ".") / STATE_FILE
        return p if p.is_file() else None
    p = Path(run.resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {run.resume}: no such file")
    return p


def _nonfinite_message(loss: float, epoch: int, micro: int, step: int, out: Path, ckpt_info: str) -> str:
    return (
        f"loss is {loss} at epoch {epoch}, iteration {micro}, optimiser step {step}: stopping. "
        f"Nothing was saved after this point; the last good checkpoint is {out / STATE_FILE} ({ckpt_info}). "
        "Lower the lr (blr), set clip_grad, or use amp_dtype=bfloat16 / use_amp=false, then --resume auto."
    )


def train(run: Run) -> Dict[str, Any]:
    """Pre-train (``run.mode == 'pretrain'``) or fine-tune; returns a summary dict."""
    from torch.utils.data import DataLoader

    cfg = run.cfg
    mode = run.mode
    env = init_distributed(run.device)
    out = Path(run.output_dir or "runs/" + mode)
    try:
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        _barrier(env)
        logger = Logger(out, env, cfg["tensorboard"])
        seed_all(cfg["seed"] + env.rank)
        update_freq, eff_batch = C.effective_batch(cfg, env.world_size)
        lr = absolute_lr(cfg, eff_batch)
        if cfg["eff_batch_size"] and eff_batch != cfg["eff_batch_size"] and cfg["lr"] is None:
            logger.info(f"note: effective batch {eff_batch} differs from the recipe's {cfg['eff_batch_size']}; "
                        f"lr = blr * {eff_batch} / 256 = {lr:.3g}")

        # ---- data
        train_loc = find_split(run.data_path, "train")
        if train_loc is None:
            raise FileNotFoundError(f"no training data: expected {run.data_path}/train/ (ImageFolder) or {run.data_path}/train.txt")
        prep = eval_preprocessing(run.model, cfg["input_size"], cfg["crop_pct"], cfg["imagenet_default_mean_and_std"])
        if mode == "pretrain":
            tf = fcmae_train_transform(cfg["input_size"], prep.mean, prep.std, cfg["train_interpolation"], cfg["train_crop_scale"] or (0.2, 1.0))
        else:
            tf = finetune_train_transform(cfg["input_size"], prep.mean, prep.std, cfg["aa"], cfg["reprob"], cfg["remode"],
                                          cfg["train_interpolation"], cfg["train_crop_scale"] or (0.08, 1.0))
        train_ds = build_dataset(train_loc, tf)
        val_ds = None
        num_classes = 0
        if mode == "finetune":
            num_classes = cfg["nb_classes"] or len(train_ds.classes)
            if min(lab for _, lab in train_ds.samples) < 0:
                raise ValueError(f"{train_loc}: fine-tuning needs a label for every image")
            val_loc = find_split(run.data_path, "val")
            if val_loc is not None:
                val_ds = build_dataset(val_loc, eval_transform(prep))
                if not val_loc.is_file() and not train_loc.is_file() and val_ds.classes != train_ds.classes:
                    raise ValueError(f"train/ and val/ have different class folders ({len(train_ds.classes)} vs {len(val_ds.classes)})")
            else:
                logger.info(f"note: no {run.data_path}/val: no evaluation during training")

        bs = cfg["batch_size"]
        sampler = TrainSampler(len(train_ds), env.world_size, env.rank, seed=cfg["seed"])
        micro_per_epoch = (sampler.num_samples // bs) // update_freq * update_freq
        if micro_per_epoch == 0:
            raise ValueError(
                f"{len(train_ds)} images are fewer than one optimiser step needs "
                f"(batch_size {bs} x update_freq {update_freq} x {env.world_size} processes)"
            )
        steps_per_epoch = micro_per_epoch // update_freq
        num_workers = cfg["num_workers"] if cfg["num_workers"] is not None else default_num_workers(env.world_size)
        loader_gen = torch.Generator()
        loader_gen.manual_seed(cfg["seed"] + env.rank)
        loader = DataLoader(
            train_ds, batch_size=bs, sampler=sampler, num_workers=num_workers, collate_fn=collate, drop_last=True,
            pin_memory=cfg["pin_mem"] and env.device.type == "cuda", generator=loader_gen,
        )
        val_loader, val_shard = _eval_loader(val_ds, cfg, env, num_workers) if val_ds is not None else (None, False)

        # ---- model, EMA, optimiser
        raw: nn.Module = build_pretrain_model(run) if mode == "pretrain" else build_finetune_model(run, num_classes, logger)
        raw.to(env.device)
        if cfg["channels_last"]:
            raw.to(memory_format=torch.channels_last)
        if cfg["grad_checkpointing"]:
            (raw.encoder if mode == "pretrain" else raw).set_grad_checkpointing(True)
        ema = ModelEma(raw, cfg["model_ema_decay"]) if (mode == "finetune" and cfg["model_ema"]) else None
        optimizer = build_optimizer(raw, cfg, mode, lr)
        amp = _amp_dtype(cfg)
        scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)

        resolved = dict(cfg, update_freq=update_freq, lr=lr)
        meta = {
            "mode": mode, "model": run.model, "data_path": run.data_path, "output_dir": str(out), "recipe": run.recipe,
            "finetune": run.init, "pretrained": run.pretrained, "device": str(env.device), "world_size": env.world_size,
            "effective_batch": eff_batch, "num_classes": num_classes, "train_images": len(train_ds),
            "steps_per_epoch": steps_per_epoch,
        }

        # ---- resume
        start_epoch, start_micro, global_step = 0, 0, 0
        sums = {"loss": 0.0, "count": 0.0, "skipped": 0.0}
        best: Dict[str, Any] = {}
        rng_to_restore: Optional[Dict[str, Any]] = None
        ckpt_path = find_resume(run)
        ckpt_info = "none yet"
        if ckpt_path is not None:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if state.get("format") != STATE_FORMAT or state.get("mode") != mode:
                raise ValueError(f"{ckpt_path} is not a {mode} training state of this trainer")
            raw.load_state_dict(state["model"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, start_micro, global_step = state["epoch"], state["micro"], state["global_step"]
            sums = dict(state["epoch_sums"])
            best = dict(state.get("best", {}))
            if state["world_size"] == env.world_size and state["micro_per_epoch"] == micro_per_epoch:
                rng_to_restore = state["rng"][env.rank]
                loader_gen.set_state(state["loader_generator"][env.rank])
            else:
                logger.info("warning: world size or batch layout changed since the checkpoint; continuing with fresh RNG "
                            "streams at the next epoch boundary (not bit-exact)")
                if start_micro:
                    start_epoch, start_micro = start_epoch + 1, 0
                    sums = {"loss": 0.0, "count": 0.0, "skipped": 0.0}
            changed = {k: (state["config"].get(k), v) for k, v in resolved.items() if state["config"].get(k) != v}
            if changed:
                logger.info(f"note: config differs from the checkpoint's: {changed}")
            logger.truncate_after(start_epoch, global_step)
            ckpt_info = f"epoch {start_epoch}, iteration {start_micro}, step {global_step}"
            logger.info(f"resumed from {ckpt_path}: {ckpt_info}")

        if env.is_main:
            atomic_write_json(out / "config.json", {"run": meta, "config": resolved, "sources": run.notes})
        logger.info(json.dumps({"run": meta, "config": resolved}, indent=1, default=str))

        # ---- wrapping
        fwd: nn.Module = torch.compile(raw) if cfg["compile"] else raw
        eval_model = fwd
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        mixer = None
        if mode == "finetune" and (cfg["mixup"] > 0 or cfg["cutmix"] > 0):
            mixer = MixupCutmix(cfg["mixup"], cfg["cutmix"], cfg["mixup_prob"], cfg["mixup_switch_prob"], cfg["smoothing"], num_classes)

        def save_state(epoch: int, micro: int, gen_state: torch.Tensor) -> None:
            rng = capture_rng(env.device)
            rngs: List[Any] = [rng]
            gens: List[Any] = [gen_state]
            if env.distributed:
                rngs = [None] * env.world_size
                gens = [None] * env.world_size
                dist.all_gather_object(rngs, rng)
                dist.all_gather_object(gens, gen_state)
            if env.is_main:
                atomic_torch_save(out / STATE_FILE, {
                    "format": STATE_FORMAT, "mode": mode, "model": raw.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "micro": micro, "global_step": global_step, "micro_per_epoch": micro_per_epoch,
                    "epoch_sums": dict(sums), "best": best, "rng": rngs, "loader_generator": gens,
                    "world_size": env.world_size, "config": resolved,
                })

        def save_weights(epoch: int) -> None:
            if not env.is_main:
                return
            info = {"epoch": str(epoch), "global_step": str(global_step), "recipe": str(run.recipe)}
            if mode == "pretrain":
                raw.save(out / WEIGHTS_FILE)
            else:
                from ..convert import save_checkpoint

                save_checkpoint(raw, out / WEIGHTS_FILE, metadata=info)
                if ema is not None:
                    save_checkpoint(ema.module, out / EMA_WEIGHTS_FILE, metadata=dict(info, ema="true"))

        def train_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if mode == "pretrain":
                return fwd(images)[0]
            if mixer is not None:
                images, target = mixer(images, labels)
                return F.cross_entropy(fwd(images).float(), target)
            return F.cross_entropy(fwd(images).float(), labels, label_smoothing=cfg["smoothing"])

        # ---- loop
        if rng_to_restore is not None:
            restore_rng(rng_to_restore, env.device)  # last: nothing above may draw from it
        fwd.train()
        optimizer.zero_grad(set_to_none=True)
        last_eval: Dict[str, Any] = {}
        for epoch in range(start_epoch, cfg["epochs"]):
            first = start_micro if epoch == start_epoch else 0
            if first == 0:
                sums = {"loss": 0.0, "count": 0.0, "skipped": 0.0}
            sampler.set_epoch(epoch)
            sampler.set_start(first * bs)
            gen_at_epoch_start = loader_gen.get_state()
            t_epoch = time.perf_counter()
            t_log, imgs_log, loss_log, n_log = time.perf_counter(), 0, 0.0, 0
            bar = _progress(env, micro_per_epoch, first, f"{mode} {epoch + 1}/{cfg['epochs']}")
            pending_nonfinite: Optional[Tuple[float, int]] = None
            for i, (images, labels, skipped) in zip(range(first, micro_per_epoch), loader):
                if i % update_freq == 0:
                    cur_lr = lr_at(epoch + i / micro_per_epoch, lr, cfg["min_lr"], cfg["warmup_epochs"], cfg["epochs"])
                    set_lr(optimizer, cur_lr)
                images = images.to(env.device, non_blocking=True)
                if cfg["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(env.device, non_blocking=True)
                boundary = (i + 1) % update_freq == 0
                sync = contextlib.nullcontext() if (boundary or not env.distributed) else fwd.no_sync()
                with sync:
                    with torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss = train_loss(images, labels)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        if not env.distributed:
                            raise NonFiniteLossError(_nonfinite_message(loss_value, epoch, i, global_step, out, ckpt_info))
                        pending_nonfinite = pending_nonfinite or (loss_value, i)
                    # Every process runs backward even on a bad loss: DDP's gradient all-reduce
                    # needs all of them; the step is refused below, together.
                    scaler.scale(loss / update_freq).backward()
                sums["loss"] += loss_value if math.isfinite(loss_value) else 0.0
                sums["count"] += 1
                sums["skipped"] += skipped
                loss_log += loss_value
                n_log += 1
                imgs_log += images.shape[0] * env.world_size
                if not boundary:
                    continue
                if env.distributed:
                    bad = _all_sum([1.0 if pending_nonfinite else 0.0], env)[0]
                    if bad:
                        v, at = pending_nonfinite or (float("nan"), i)
                        raise NonFiniteLossError(_nonfinite_message(v, epoch, at, global_step, out, ckpt_info))
                if cfg["clip_grad"] is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["clip_grad"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(raw)
                global_step += 1
                if bar is not None:
                    bar.update(update_freq)
                if global_step % cfg["log_interval"] == 0:
                    elapsed = time.perf_counter() - t_log
                    mean_loss = _all_sum([loss_log, float(n_log)], env)
                    entry = {
                        "type": "step", "epoch": epoch, "micro": i + 1, "global_step": global_step,
                        "loss": mean_loss[0] / max(mean_loss[1], 1), "lr": max(g["lr"] for g in optimizer.param_groups),
                        "img_s": imgs_log / max(elapsed, 1e-9),
                    }
                    logger.record(entry)
                    if bar is not None:
                        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.3g}", img_s=f"{entry['img_s']:.1f}")
                    elif env.is_main:
                        logger.info(f"epoch {epoch} step {global_step} loss {entry['loss']:.4f} lr {entry['lr']:.3g} {entry['img_s']:.1f} img/s")
                    t_log, imgs_log, loss_log, n_log = time.perf_counter(), 0, 0.0, 0
                if cfg["save_ckpt_steps"] and global_step % cfg["save_ckpt_steps"] == 0 and i + 1 < micro_per_epoch:
                    save_state(epoch, i + 1, gen_at_epoch_start)
                    ckpt_info = f"epoch {epoch}, iteration {i + 1}, step {global_step}"
            if bar is not None:
                bar.close()

            # ---- end of epoch: evaluate, log, save
            loss_sum, count, skipped_sum = _all_sum([sums["loss"], sums["count"], sums["skipped"]], env)
            entry: Dict[str, Any] = {
                "type": "epoch", "epoch": epoch, "global_step": global_step, "train_loss": loss_sum / max(count, 1),
                "lr": max(g["lr"] for g in optimizer.param_groups), "skipped_images": int(skipped_sum),
                "time_s": time.perf_counter() - t_epoch,
            }
            if val_loader is not None:
                last_eval = {"epoch": epoch, **evaluate(eval_model, val_loader, env, amp, cfg["channels_last"], reduce=val_shard)}
                entry["val"] = {k: last_eval[k] for k in ("top1", "top5", "loss")}
                if ema is not None and cfg["model_ema_eval"]:
                    last_eval["ema"] = evaluate(ema.module, val_loader, env, amp, cfg["channels_last"], reduce=val_shard)
                    entry["val_ema"] = {k: last_eval["ema"][k] for k in ("top1", "top5", "loss")}
                if last_eval["top1"] >= best.get("top1", -1.0):
                    best = {"top1": last_eval["top1"], "epoch": epoch}
                last_eval["best"] = best
            logger.record(entry)
            logger.info(
                f"epoch {epoch}: train loss {entry['train_loss']:.4f}"
                + (f", val top-1 {entry['val']['top1']:.2f} top-5 {entry['val']['top5']:.2f}" if "val" in entry else "")
                + (f", EMA top-1 {entry['val_ema']['top1']:.2f}" if "val_ema" in entry else "")
                + (f", skipped {entry['skipped_images']} unreadable images" if entry["skipped_images"] else "")
            )
            if env.is_main and last_eval:
                atomic_write_json(out / "eval.json", dict(last_eval, model=run.model, weights=str(out / WEIGHTS_FILE)))
            if (epoch + 1) % cfg["save_ckpt_freq"] == 0 or epoch + 1 == cfg["epochs"]:
                save_state(epoch + 1, 0, loader_gen.get_state())
                save_weights(epoch + 1)
                ckpt_info = f"epoch {epoch + 1}, iteration 0, step {global_step}"
            _barrier(env)
        logger.close()
        return {"output_dir": str(out), "global_step": global_step, "eval": last_eval,
                "weights": str(out / WEIGHTS_FILE), "state": str(out / STATE_FILE)}
    finally:
        shutdown(env)


def _progress(env: DistEnv, total: int, initial: int, desc: str):
    """tqdm on rank 0 when stderr is a terminal; otherwise None (log lines are printed instead)."""
    if not env.is_main or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, leave=False)
