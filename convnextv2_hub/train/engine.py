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

Companion modules: ``distributed`` (torchrun processes), ``rng`` (RNG states), ``ema`` (``ModelEma``),
``runlog`` (console, ``log.jsonl``, TensorBoard), ``run`` (``Run``), ``models`` (building the trained
model), ``evaluation`` (top-1/top-5 and the ``eval`` command) and ``convnextv2_hub.files`` (atomic writes).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import config as C
from ..files import atomic_torch_save, atomic_write_json
from .data import (
    MixupCutmix,
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
from .distributed import DistEnv, all_sum, barrier, init_distributed, shutdown
from .ema import ModelEma
from .evaluation import amp_dtype, eval_loader, evaluate
from .models import build_finetune_model, build_pretrain_model
from .optim import absolute_lr, build_optimizer, lr_at, set_lr
from .rng import capture_rng, restore_rng, seed_all
from .run import Run  # importable from here too, where it was defined before train.run
from .runlog import Logger

STATE_FILE = "checkpoint-last.pt"
WEIGHTS_FILE = "checkpoint-last.safetensors"
EMA_WEIGHTS_FILE = "checkpoint-last-ema.safetensors"
STATE_FORMAT = "convnextv2_hub.train/1"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint."""


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
        barrier(env)
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
        val_loader, val_shard = eval_loader(val_ds, cfg, env, num_workers) if val_ds is not None else (None, False)

        # ---- model, EMA, optimiser
        raw: nn.Module = build_pretrain_model(run) if mode == "pretrain" else build_finetune_model(run, num_classes, logger)
        raw.to(env.device)
        if cfg["channels_last"]:
            raw.to(memory_format=torch.channels_last)
        if cfg["grad_checkpointing"]:
            (raw.encoder if mode == "pretrain" else raw).set_grad_checkpointing(True)
        ema = ModelEma(raw, cfg["model_ema_decay"]) if (mode == "finetune" and cfg["model_ema"]) else None
        optimizer = build_optimizer(raw, cfg, mode, lr)
        amp = amp_dtype(cfg)
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
                from ..checkpoints.io import save_checkpoint

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
                    bad = all_sum([1.0 if pending_nonfinite else 0.0], env)[0]
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
                    mean_loss = all_sum([loss_log, float(n_log)], env)
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
            loss_sum, count, skipped_sum = all_sum([sums["loss"], sums["count"], sums["skipped"]], env)
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
            barrier(env)
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
