"""The training loop: FCMAE pre-training and fine-tuning, with evaluation during training.

``train(run)`` reads as its outline: set up the output folder, log, seeds, effective batch and lr
(``_setup``); build the datasets and loaders (``_build_data``); build the model, EMA, optimiser and
grad scaler (``_build_model``); load ``--resume``'s training state (``_resume``); write
``config.json``; wrap the model (torch.compile, DDP, mixup/cutmix); restore the RNG states; then per
epoch, train (``_train_epoch``) and close the epoch: evaluate, log, save (``_end_epoch``).

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

Nothing is written before the data, the model and ``--resume``'s file have been checked: a run that
fails on its input leaves no folder, ``config.json`` or log behind. A checkpoint is never written over
a good one with ruined weights: before every save (and after every epoch) the weights, EMA and
optimiser moments are checked to be finite, and a non-finite evaluation loss (weights that overflow
without being inf yet) stops the run the same way; the message names the last good checkpoint.

Exact resume rests on three things: (1) augmentation randomness is per sample, seeded by (seed,
epoch, index), so restarting in the middle of an epoch replays the same pixels (``data.py``);
(2) the lr is a pure function of the position (epoch, micro-step); (3) everything else that draws
random numbers in the training process (drop path, FCMAE masks, mixup) uses the global RNGs, whose
states are saved per process at every checkpoint and restored last, just before the loop.

Companion modules: ``run`` (``Run``, the input; also importable from here), ``distributed``
(torchrun processes), ``rng`` (RNG states), ``ema`` (``ModelEma``), ``runlog`` (console,
``log.jsonl``, TensorBoard), ``models`` (building the trained model), ``evaluation`` (top-1/top-5
and the ``eval`` command) and ``convnextv2_hub.files`` (the atomic writes).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import config as C
from ..checkpoints.reading import CheckpointError, read_checkpoint_file
from ..files import atomic_torch_save, atomic_write_json
from ..preprocessing.transforms import normalize_images
from .data import (
    MixupCutmix,
    TrainSampler,
    build_dataset,
    default_num_workers,
    eval_preprocessing,
    eval_transform,
    fcmae_train_transform,
    find_split,
    finetune_train_transform,
    make_loader,
)
from .distributed import (
    DistEnv,
    RanksDifferError,
    all_gather_tensor,
    all_sum,
    barrier,
    broadcast_object,
    broadcast_state,
    digest,
    fingerprint,
    init_distributed,
    shutdown,
)
from .ema import ModelEma
from .evaluation import amp_dtype, eval_loader, evaluate
from .memory import plan_grad_checkpointing
from .models import build_finetune_model, build_pretrain_model, pretrain_model_keys, start_of
from .optim import absolute_lr, build_optimizer, lr_at, set_lr
from .rng import capture_rng, restore_rng, seed_all
from .run import Run  # also importable from here: ``from convnextv2_hub.train.engine import Run``
from .run import TrainingInputError
from .runlog import Logger

STATE_FILE = "checkpoint-last.pt"
WEIGHTS_FILE = "checkpoint-last.safetensors"
EMA_WEIGHTS_FILE = "checkpoint-last-ema.safetensors"
STATE_FORMAT = "convnextv2_hub.train/1"


class NonFiniteLossError(RuntimeError):
    """The loss, the weights or the evaluation loss became NaN or inf; the run stopped without
    writing a checkpoint over the last good one."""


def find_resume(run: Run) -> Optional[Path]:
    if not run.resume:
        return None
    if run.resume == "auto":
        p = Path(run.output_dir or "runs/" + run.mode) / STATE_FILE
        return p if p.is_file() else None
    p = Path(run.resume)
    if not p.is_file():
        raise TrainingInputError(f"--resume {run.resume}: no such file (give a {STATE_FILE}, or 'auto')")
    return p


def _last_good(out: Path, ckpt_info: Optional[str]) -> str:
    """The sentence naming the last good checkpoint of this run, or saying that there is none."""
    if ckpt_info is not None:
        return f"the last good checkpoint is {out / STATE_FILE} ({ckpt_info}); after the fix, continue with --resume auto"
    if (out / STATE_FILE).is_file():
        return f"this run saved no checkpoint; {out / STATE_FILE} is an earlier run's, left untouched"
    return "no good checkpoint exists: this run saved none"


def _nonfinite_message(what: str, out: Path, ckpt_info: Optional[str]) -> str:
    return (
        f"{what}: stopping. Nothing was saved after this point; {_last_good(out, ckpt_info)}. "
        "Lower the lr (blr), set clip_grad, or use amp_dtype=bfloat16 / use_amp=false."
    )


def _loss_message(loss: float, epoch: int, micro: int, step: int, out: Path, ckpt_info: Optional[str]) -> str:
    return _nonfinite_message(f"loss is {loss} at epoch {epoch}, iteration {micro}, optimiser step {step}", out, ckpt_info)


# ------------------------------------------------------------------------------------------------
# The pieces of a run
# ------------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    """What is fixed for the whole run: flags, config, processes, output folder, log, batch and lr."""

    run: Run
    cfg: Dict[str, Any]
    env: DistEnv
    out: Path
    logger: Logger
    resolved: Dict[str, Any]  # cfg with update_freq and lr as run: config.json and the training state
    # Set once the data set's size is known (``_fit_batch``):
    update_freq: int = 0
    eff_batch: int = 0
    lr: float = 0.0
    adapted: List[str] = field(default_factory=list)  # notices of the recipe values adapted to this run

    @property
    def mode(self) -> str:
        return self.run.mode


@dataclass
class _Data:
    """The training set and its loader (sampler, generator), the evaluation loader, the epoch's length."""

    train_ds: Any
    sampler: TrainSampler
    loader: Any
    loader_gen: torch.Generator
    val_loader: Any
    val_shard: bool
    num_classes: int
    # uint8 batches are normalised on the device by these (``preprocessing.transforms.normalize_images``);
    # None: the loader's batches are normalised float32 already (fine-tuning with random erasing).
    train_normalize: Optional[Callable]
    eval_normalize: Optional[Callable]
    batch_size: int
    micro_per_epoch: int  # forward passes per epoch, a multiple of update_freq
    steps_per_epoch: int  # optimiser steps per epoch
    prep: Any = None  # the evaluation preprocessing (``data.EvalPreprocessing``), which the weights files record


@dataclass
class _Model:
    """The trained model, its EMA, optimiser and grad scaler; after ``_wrap_model`` also the module the
    forward pass goes through (compiled, DDP), the one evaluation uses, and mixup/cutmix."""

    raw: nn.Module
    ema: Optional[ModelEma]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Optional[torch.dtype]
    fwd: Optional[nn.Module] = None
    eval_model: Optional[nn.Module] = None
    mixer: Optional[MixupCutmix] = None


def _zero_sums() -> Dict[str, float]:
    return {"loss": 0.0, "count": 0.0, "skipped": 0.0}


@dataclass
class _Progress:
    """Where the run is: the position it (re)starts at, the optimiser step count, the current epoch's
    loss sums, the best evaluation, the last checkpoint written and the RNG states to restore."""

    epoch: int = 0
    micro: int = 0
    global_step: int = 0
    sums: Dict[str, float] = field(default_factory=_zero_sums)
    best: Dict[str, Any] = field(default_factory=dict)
    ckpt_info: Optional[str] = None  # where the last checkpoint this run wrote or resumed from stands
    rng: Optional[Dict[str, Any]] = None


@dataclass
class _LogWindow:
    """Loss and images since the last step line of ``log.jsonl``. The micro-steps' losses wait on the
    device (``pending``, with their (micro-step, optimiser step)) until ``_read_losses``: reading each
    one back would make the host wait for the device at every micro-step."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    loss: float = 0.0
    n: int = 0
    pending: List[torch.Tensor] = field(default_factory=list)
    where: List[Tuple[int, int]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train(run: Run) -> Dict[str, Any]:
    """Pre-train (``run.mode == 'pretrain'``) or fine-tune; returns a summary dict."""
    env = init_distributed(run.device, run.cfg["dist_timeout_min"])
    out = Path(run.output_dir or "runs/" + run.mode)
    try:
        _refuse_earlier_run(run, env, out)
        s = _setup(run, env, out)
        state = _decide_resume(s)
        data = _build_data(s)
        model = _build_model(s, data, state)
        progress = _resume(s, data, model, state)
        _make_output(s)  # only now: everything the run reads has been checked
        _write_config(s, data)
        _wrap_model(s, data, model)
        if progress.rng is not None:
            restore_rng(progress.rng, env.device)  # last: nothing above may draw from it
            progress.rng = None  # the last piece of the loaded checkpoint (rank 0: a view of the mapped file)
        model.fwd.train()
        model.optimizer.zero_grad(set_to_none=True)
        last_eval: Dict[str, Any] = {}
        start_epoch = progress.epoch
        for epoch in range(start_epoch, s.cfg["epochs"]):
            first = progress.micro if epoch == start_epoch else 0
            started = time.perf_counter()
            _train_epoch(s, data, model, progress, epoch, first)
            last_eval = _end_epoch(s, data, model, progress, epoch, started)
        s.logger.close()
        return {"output_dir": str(out), "global_step": progress.global_step, "eval": last_eval,
                "weights": str(out / WEIGHTS_FILE), "state": str(out / STATE_FILE)}
    finally:
        shutdown(env)


RUN_FILES = (STATE_FILE, WEIGHTS_FILE, EMA_WEIGHTS_FILE)
# What an earlier run leaves that describes it, not the new one: removed when ``--overwrite`` starts
# over (``log.jsonl`` is appended to, so it would mix the two runs).
STALE_WITH_OVERWRITE = ("log.jsonl", "eval.json")


def _refuse_earlier_run(run: Run, env: DistEnv, out: Path) -> None:
    """Stop, before anything is read or written, when ``out`` holds an earlier run's checkpoint and
    neither ``--resume`` nor ``--overwrite`` says what to do with it: a restart that forgot
    ``--resume auto`` would otherwise train from scratch over the earlier run's checkpoints. Rank 0
    looks and every process stops with it."""
    if run.resume or run.overwrite:
        return
    found = [name for name in RUN_FILES if (out / name).is_file()] if env.is_main else []
    if all_sum([float(len(found))], env)[0]:
        where = ", ".join(found) if found else ", ".join(RUN_FILES)
        raise TrainingInputError(f"{out} already holds a run ({where}): use --resume auto to continue it, "
                                 "or --overwrite to start over in it (or choose another --output)")


def _setup(run: Run, env: DistEnv, out: Path) -> _Setup:
    """The log and the seeds (the output folder is made later, by ``_make_output``; the batch and lr once the
    data set's size is known, by ``_fit_batch``)."""
    cfg = C.device_defaults(run.cfg, env.device.type)
    logger = Logger(out, env, cfg["tensorboard"])
    set_backends(cfg, env, logger)
    seed_all(cfg["seed"] + env.rank)
    for notice in run.adapted:
        logger.info(f"adapted {notice}")
    return _Setup(run, cfg, env, out, logger, dict(cfg), adapted=list(run.adapted))


def _fit_batch(s: _Setup, samples: int) -> None:
    """The effective batch and the lr, once the training images per process (``samples``) are known: a
    recipe batch larger than the data set is adapted (``config.fit_batch``) unless the user fixed it."""
    cfg, logger = s.cfg, s.logger
    notice = C.fit_batch(cfg, s.env.world_size, samples, s.run.fixed, s.run.strict_recipe)
    if notice is not None:
        logger.info(f"adapted {notice}")
        s.adapted.append(notice)
    s.update_freq, s.eff_batch = C.effective_batch(cfg, s.env.world_size)
    s.lr = absolute_lr(cfg, s.eff_batch)
    if s.lr > C.MAX_LR:
        raise C.ConfigError(f"lr = blr * {s.eff_batch} / 256 = {s.lr:.3g} is above {C.MAX_LR:g}: lower blr or the batch")
    if cfg["eff_batch_size"] and s.eff_batch != cfg["eff_batch_size"] and cfg["lr"] is None:
        logger.info(f"note: effective batch {s.eff_batch} differs from the recipe's {cfg['eff_batch_size']}; "
                    f"lr = blr * {s.eff_batch} / 256 = {s.lr:.3g}")
    s.resolved = dict(cfg, update_freq=s.update_freq, lr=s.lr)


def set_backends(cfg: Dict[str, Any], env: DistEnv, logger: Logger) -> None:
    """TF32 and cuDNN's algorithm search on CUDA devices, as ``tf32`` / ``cudnn_benchmark`` say (other
    devices have neither). TF32 keeps float32's range with a 10-bit mantissa in matmuls and
    convolutions: said in the log when the recipe is otherwise float32, so the choice is visible."""
    if env.device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
    torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
    if cfg["tf32"] and amp_dtype(cfg) is None:
        logger.info("note: a float32 recipe (use_amp=false) with TF32 matmuls and convolutions on this GPU "
                    "(tf32=true); --set tf32=false for full float32")


def _datasets(s: _Setup) -> Tuple[Any, Any, int, Any, Optional[Callable], Callable]:
    """(training set, validation set or None, class count (0 for pre-training), evaluation preprocessing,
    the device-side normalisation of training batches (None: they come normalised) and of evaluation batches).
    Images travel to the device as uint8 and are normalised there, a quarter of the bytes through the
    loader's queues and pinned memory, except when fine-tuning with random erasing: its noise is drawn
    in normalised units inside the per-sample seeded transform."""
    run, cfg = s.run, s.cfg
    uint8 = s.mode == "pretrain" or cfg["reprob"] == 0
    train_loc = find_split(run.data_path, "train")
    if train_loc is None:
        raise TrainingInputError(f"no training data: expected {run.data_path}/train/ (ImageFolder) or {run.data_path}/train.txt")
    prep = eval_preprocessing(run.model, cfg["input_size"], cfg["crop_pct"], cfg["imagenet_default_mean_and_std"])
    if s.mode == "pretrain":
        tf = fcmae_train_transform(cfg["input_size"], prep.mean, prep.std, cfg["train_interpolation"], cfg["train_crop_scale"] or (0.2, 1.0),
                                   uint8=True)
    else:
        tf = finetune_train_transform(cfg["input_size"], prep.mean, prep.std, cfg["aa"], cfg["reprob"], cfg["remode"],
                                      cfg["train_interpolation"], cfg["train_crop_scale"] or (0.08, 1.0), uint8=uint8)
    train_ds = build_dataset(train_loc, tf)
    val_ds = None
    num_classes = 0
    if s.mode == "finetune":
        num_classes = cfg["nb_classes"] or len(train_ds.classes)
        if min(lab for _, lab in train_ds.samples) < 0:
            raise TrainingInputError(f"{train_loc}: fine-tuning needs a label for every image")
        _check_classes(train_loc, train_ds)
        val_loc = find_split(run.data_path, "val")
        if val_loc is not None:
            val_ds = build_dataset(val_loc, eval_transform(prep, uint8=True))
            if not val_loc.is_file() and not train_loc.is_file() and val_ds.classes != train_ds.classes:
                raise TrainingInputError(f"train/ and val/ have different class folders ({len(train_ds.classes)} vs {len(val_ds.classes)})")
        else:
            s.logger.info(f"note: no {run.data_path}/val: no evaluation during training")
    normalize = normalize_images(prep.mean, prep.std)
    return train_ds, val_ds, num_classes, prep, normalize if uint8 else None, normalize


def _check_classes(train_loc: Path, train_ds: Any) -> None:
    """Fine-tuning needs two classes at least: with one, the loss is 0 and top-1 100 % from the first
    step, and the classifier learns nothing."""
    present = sorted({lab for _, lab in train_ds.samples})
    if len(present) < 2:
        name = train_ds.classes[present[0]] if present and present[0] < len(train_ds.classes) else present
        raise TrainingInputError(
            f"{train_loc} has images of one class only ({name!s}): fine-tuning a classifier needs at least two "
            "classes (with one it reaches loss 0 and 100 % top-1 without learning anything)"
        )


def _build_data(s: _Setup) -> _Data:
    """Datasets, the resumable training sampler and loader (its own seeded generator), the eval loader."""
    cfg, env = s.cfg, s.env
    train_ds, val_ds, num_classes, prep, train_normalize, eval_normalize = _datasets(s)
    sampler = TrainSampler(len(train_ds), env.world_size, env.rank, seed=cfg["seed"])
    _fit_batch(s, sampler.num_samples)
    bs = cfg["batch_size"]
    micro_per_epoch = (sampler.num_samples // bs) // s.update_freq * s.update_freq
    num_workers = cfg["num_workers"] if cfg["num_workers"] is not None else default_num_workers()
    loader_gen = torch.Generator()
    loader_gen.manual_seed(cfg["seed"] + env.rank)
    loader = make_loader(train_ds, bs, sampler, num_workers, cfg["pin_mem"] and env.device.type == "cuda", loader_gen,
                         drop_last=True)
    val_loader, val_shard = eval_loader(val_ds, cfg, env, num_workers) if val_ds is not None else (None, False)
    return _Data(train_ds, sampler, loader, loader_gen, val_loader, val_shard, num_classes, train_normalize,
                 eval_normalize, bs, micro_per_epoch, micro_per_epoch // s.update_freq, prep)


def _build_model(s: _Setup, data: _Data, state: Optional[Dict[str, Any]]) -> _Model:
    """The model on its device (memory format, grad checkpointing), EMA, AdamW and the grad scaler.
    Resuming, the model is the checkpoint's (``C.MODEL_KEYS`` from its config)."""
    cfg, env = s.cfg, s.env
    if state is not None:
        _set_model_keys(s, state["config"], "the checkpoint being resumed")
    start_of(s.run)  # resolved once, before the run is copied with its final config
    run = replace(s.run, cfg=cfg)
    if s.mode == "pretrain":
        s.logger.info(start_of(run).describe(s.mode))
        raw: nn.Module = build_pretrain_model(run)
        _set_model_keys(s, pretrain_model_keys(raw), f"the --init file {s.run.init}")
    else:
        raw = build_finetune_model(run, data.num_classes, s.logger)
    raw.to(env.device)
    if cfg["channels_last"]:
        raw.to(memory_format=torch.channels_last)
    # Decided before the first step, from the memory estimate (``memory.plan_grad_checkpointing``).
    ckpt, lines = plan_grad_checkpointing(raw, cfg, s.mode, env.device)
    for line in lines:
        s.logger.info(line)
    cfg["grad_checkpointing"] = s.resolved["grad_checkpointing"] = ckpt
    if ckpt:
        (raw.encoder if s.mode == "pretrain" else raw).set_grad_checkpointing(True)
    # Every process starts from rank 0's weights (the seeds are per process, and a --init file may
    # differ between nodes), and the EMA is copied from them: DDP's own broadcast comes later, after
    # the EMA copy, and would leave each process averaging a different model.
    raw.load_state_dict(broadcast_state(raw.state_dict(), env))
    ema = ModelEma(raw, cfg["model_ema_decay"]) if (s.mode == "finetune" and cfg["model_ema"]) else None
    optimizer = build_optimizer(raw, cfg, s.mode, s.lr)
    amp = amp_dtype(cfg)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    return _Model(raw, ema, optimizer, scaler, amp)


def _set_model_keys(s: _Setup, values: Dict[str, Any], where: str) -> None:
    """``C.MODEL_KEYS`` of ``values`` (those it has) into the run's config, with a note for each that
    differs from what the recipe and ``--set`` said: the model is what ``where`` holds."""
    for k in C.MODEL_KEYS:
        if k in values and values[k] != s.cfg.get(k):
            s.logger.info(f"note: {k} = {values[k]!r} from {where} (the config said {s.cfg.get(k)!r})")
            s.cfg[k] = s.resolved[k] = values[k]


def _decide_resume(s: _Setup) -> Optional[Dict[str, Any]]:
    """The training state of ``--resume`` on every process, None when there is none to continue.

    Decided once for the whole run: rank 0 looks for the file (``--resume auto``: in its own ``--output``),
    reads and checks it, and sends every process its decision and then the state itself, so all start
    from rank 0's weights, EMA, optimiser state and position, whether the others see the same file (a
    shared file system), none (separate disks) or another one. When rank 0 cannot use the file, every
    process stops with rank 0's message. Read before the model is built: the model is the checkpoint's
    (``C.MODEL_KEYS`` of its config)."""
    env = s.env
    ckpt_path, state, failure = None, None, None
    if env.is_main:
        try:
            ckpt_path, state = _read_resume_state(s)
        except Exception as e:  # noqa: BLE001 (sent to the others first: they must not wait for a state that never comes)
            failure = e
    decision = broadcast_object(_resume_decision(ckpt_path, failure), env)
    if failure is not None:
        raise failure
    if "error" in decision:
        raise _ERRORS.get(decision["error"], RuntimeError)(decision["message"])
    if decision["path"] is None:
        return None
    state = broadcast_state(state, env)
    state["path"] = decision["path"]
    return state


# The errors rank 0 may meet reading --resume's file, by name: the other processes raise the same.
_ERRORS = {"TrainingInputError": TrainingInputError, "CheckpointError": CheckpointError}


def _resume_decision(ckpt_path: Optional[Path], failure: Optional[BaseException]) -> Dict[str, Any]:
    if failure is None:
        return {"path": str(ckpt_path) if ckpt_path is not None else None}
    kind = next((name for name, cls in _ERRORS.items() if isinstance(failure, cls)), None)
    if kind is None:  # a bug: rank 0 keeps its traceback, the others say where it happened
        return {"error": "RuntimeError", "message": f"rank 0 failed while reading --resume's checkpoint: "
                                                    f"{type(failure).__name__}: {failure}"}
    return {"error": kind, "message": str(failure)}


def _read_resume_state(s: _Setup) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, training state) of ``--resume`` (rank 0), or (None, None) when there is none to continue."""
    ckpt_path = find_resume(s.run)
    if ckpt_path is None:
        return None, None
    # The package's safe reader: weights only, nothing in the file runs, and one clear
    # CheckpointError for an empty, truncated or code-carrying file. Memory-mapped: the tensors are
    # read from disk as they are copied into the model, never all held at once.
    try:
        state = read_checkpoint_file(ckpt_path, mmap=True)
    except CheckpointError as e:  # the reader's message, said to be about --resume
        raise CheckpointError(f"--resume {s.run.resume}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("mode") != s.mode:
        raise TrainingInputError(f"{ckpt_path} is not a {s.mode} training state of this trainer ({STATE_FILE}); "
                                 "to start from weights, use --init")
    return ckpt_path, state


def _resume(s: _Setup, data: _Data, model: _Model, state: Optional[Dict[str, Any]]) -> _Progress:
    """The training state of ``--resume`` (``_decide_resume``, the same on every process) loaded into
    the model, EMA, optimiser, scaler, loader generator and the returned progress: where to continue.
    The RNG states are returned, not restored: that happens last, just before the loop."""
    progress = _Progress()
    if state is None:
        return progress
    env, logger = s.env, s.logger
    ckpt_path = state["path"]
    model.raw.load_state_dict(state["model"])
    if model.ema is not None and state.get("ema") is not None:
        model.ema.load_state_dict(state["ema"])
    model.optimizer.load_state_dict(state["optimizer"])
    model.scaler.load_state_dict(state["scaler"])
    progress.epoch, progress.micro, progress.global_step = state["epoch"], state["micro"], state["global_step"]
    progress.sums = dict(state["epoch_sums"])
    progress.best = dict(state.get("best", {}))
    if state["world_size"] == env.world_size and state["micro_per_epoch"] == data.micro_per_epoch:
        progress.rng = state["rng"][env.rank]
        data.loader_gen.set_state(state["loader_generator"][env.rank].cpu())
    else:
        logger.info("warning: world size or batch layout changed since the checkpoint; continuing with fresh RNG "
                    "streams at the next epoch boundary (not bit-exact)")
        if progress.micro:
            progress.epoch, progress.micro = progress.epoch + 1, 0
            progress.sums = _zero_sums()
    changed = {k: (state["config"].get(k), v) for k, v in s.resolved.items() if state["config"].get(k) != v}
    if changed:
        logger.info(f"note: config differs from the checkpoint's: {changed}")
    logger.truncate_after(progress.epoch, progress.global_step)
    progress.ckpt_info = f"epoch {progress.epoch}, iteration {progress.micro}, step {progress.global_step}"
    logger.info(f"resumed from {ckpt_path}: {progress.ckpt_info}")
    return progress


def _make_output(s: _Setup) -> None:
    """The output folder (rank 0; the others wait for it); with ``--overwrite``, without the earlier
    run's log and evaluation."""
    if s.env.is_main:
        s.out.mkdir(parents=True, exist_ok=True)
        if s.run.overwrite:
            for name in STALE_WITH_OVERWRITE:
                (s.out / name).unlink(missing_ok=True)
    barrier(s.env)


def _write_config(s: _Setup, data: _Data) -> None:
    """``config.json`` (the run, the resolved config, the recipe's source notes) and its console echo."""
    run, env = s.run, s.env
    meta = {
        "mode": s.mode, "model": run.model, "data_path": run.data_path, "output_dir": str(s.out), "recipe": run.recipe,
        "finetune": run.init, "pretrained": run.pretrained, "start": start_of(run).as_dict(), "device": str(env.device),
        "world_size": env.world_size, "effective_batch": s.eff_batch, "num_classes": data.num_classes,
        "train_images": len(data.train_ds), "steps_per_epoch": data.steps_per_epoch, "adapted": s.adapted,
        "strict_recipe": run.strict_recipe,
    }
    if env.is_main:
        atomic_write_json(s.out / "config.json", {"run": meta, "config": s.resolved, "sources": run.notes})
    s.logger.info(json.dumps({"run": meta, "config": s.resolved}, indent=1, default=str))


def _wrap_model(s: _Setup, data: _Data, model: _Model) -> None:
    """torch.compile and DDP around the loaded model (DDP broadcasts rank 0's weights); mixup/cutmix."""
    cfg, env = s.cfg, s.env
    fwd: nn.Module = torch.compile(model.raw) if cfg["compile"] else model.raw
    model.eval_model = fwd
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    model.fwd = fwd
    if s.mode == "finetune" and (cfg["mixup"] > 0 or cfg["cutmix"] > 0):
        model.mixer = MixupCutmix(cfg["mixup"], cfg["cutmix"], cfg["mixup_prob"], cfg["mixup_switch_prob"], cfg["smoothing"],
                                  data.num_classes)


def _train_epoch(s: _Setup, data: _Data, model: _Model, progress: _Progress, epoch: int, first: int) -> None:
    """Micro-steps ``first`` .. the end of ``epoch``: forward/backward, an optimiser step every
    ``update_freq``, step lines, the ``save_ckpt_steps`` checkpoints. A non-finite loss stops the run
    when the losses are read back (every ``log_interval`` steps, before a save, at the epoch's end),
    on every process together."""
    cfg, env = s.cfg, s.env
    if first == 0:
        progress.sums = _zero_sums()
    data.sampler.set_epoch(epoch)
    data.sampler.set_start(first * data.batch_size)
    gen_at_epoch_start = data.loader_gen.get_state()
    window = _LogWindow()
    bar = _progress(env, data.micro_per_epoch, first, f"{s.mode} {epoch + 1}/{cfg['epochs']}")
    for i, (images, labels, skipped) in zip(range(first, data.micro_per_epoch), data.loader):
        if i % s.update_freq == 0:
            set_lr(model.optimizer, lr_at(epoch + i / data.micro_per_epoch, s.lr, cfg["min_lr"], cfg["warmup_epochs"], cfg["epochs"]))
        images = images.to(env.device, non_blocking=True)
        if data.train_normalize is not None:
            images = data.train_normalize(images)
        if cfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(env.device, non_blocking=True)
        boundary = (i + 1) % s.update_freq == 0
        window.pending.append(_forward_backward(s, model, images, labels, sync=boundary))
        window.where.append((i, progress.global_step))
        progress.sums["skipped"] += skipped
        window.images += images.shape[0] * env.world_size
        if not boundary:
            continue
        _optimizer_step(s, model)
        progress.global_step += 1
        if bar is not None:
            bar.update(s.update_freq)
        if progress.global_step % cfg["log_interval"] == 0:
            _read_losses(s, progress, window, epoch)
            _log_step(s, model, progress, window, bar, epoch, i)
            window = _LogWindow()
        if cfg["save_ckpt_steps"] and progress.global_step % cfg["save_ckpt_steps"] == 0 and i + 1 < data.micro_per_epoch:
            _read_losses(s, progress, window, epoch)
            _check_weights(s, model, progress, f"epoch {epoch}, iteration {i + 1}, optimiser step {progress.global_step}")
            _save_state(s, data, model, progress, epoch, i + 1, gen_at_epoch_start)
            progress.ckpt_info = f"epoch {epoch}, iteration {i + 1}, step {progress.global_step}"
    _read_losses(s, progress, window, epoch)
    if bar is not None:
        bar.close()


def _forward_backward(s: _Setup, model: _Model, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
    """One micro-step's loss, backward into the accumulated gradients; returns the loss, detached, as
    float32 on the device. With DDP, ``sync`` is the micro-step whose backward all-reduces the gradients.
    A non-finite loss is backpropagated too: with DDP every process must run backward for the gradient
    all-reduce, and in any case ``_read_losses`` stops the run before a save."""
    no_sync = s.env.distributed and not sync
    with model.fwd.no_sync() if no_sync else contextlib.nullcontext():
        with torch.autocast(s.env.device.type, dtype=model.amp or torch.float32, enabled=model.amp is not None):
            loss = _train_loss(s, model, images, labels)
        model.scaler.scale(loss / s.update_freq).backward()
    return loss.detach().float()


def _read_losses(s: _Setup, progress: _Progress, window: _LogWindow, epoch: int) -> None:
    """The losses waiting on the device, read back at once (one host-device sync) into the window and
    the epoch's sums. A non-finite one stops the run, on every process together (they all read back at
    the same optimiser steps), naming the first: called before every save and log line, so no
    checkpoint is written after it, whatever the steps since did to the weights."""
    bad: Optional[Tuple[float, int, int]] = None
    if window.pending:
        for v, (i, step) in zip(torch.stack(window.pending).tolist(), window.where):
            if not math.isfinite(v) and bad is None:
                bad = (v, i, step)
            progress.sums["loss"] += v if math.isfinite(v) else 0.0
            progress.sums["count"] += 1
            window.loss += v
            window.n += 1
        window.pending, window.where = [], []
    if s.env.distributed and all_sum([1.0 if bad else 0.0], s.env)[0] and bad is None:
        raise NonFiniteLossError(_nonfinite_message(
            f"the loss is not finite on another process in epoch {epoch} (by optimiser step {progress.global_step})",
            s.out, progress.ckpt_info))
    if bad is not None:
        raise NonFiniteLossError(_loss_message(bad[0], epoch, bad[1], bad[2], s.out, progress.ckpt_info))


def _train_loss(s: _Setup, model: _Model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """FCMAE's reconstruction loss, or cross-entropy on (mixed, smoothed) targets."""
    if s.mode == "pretrain":
        return model.fwd(images)[0]
    if model.mixer is not None:
        images, target = model.mixer(images, labels)
        return F.cross_entropy(model.fwd(images).float(), target)
    return F.cross_entropy(model.fwd(images).float(), labels, label_smoothing=s.cfg["smoothing"])


def _optimizer_step(s: _Setup, model: _Model) -> None:
    """Gradient clipping, the (scaled) AdamW step, zeroed gradients, the EMA update."""
    if s.cfg["clip_grad"] is not None:
        model.scaler.unscale_(model.optimizer)
        torch.nn.utils.clip_grad_norm_(model.raw.parameters(), s.cfg["clip_grad"])
    model.scaler.step(model.optimizer)
    model.scaler.update()
    model.optimizer.zero_grad(set_to_none=True)
    if model.ema is not None:
        model.ema.update(model.raw)


def _log_step(s: _Setup, model: _Model, progress: _Progress, window: _LogWindow, bar, epoch: int, i: int) -> None:
    """A step line in ``log.jsonl``: mean loss over processes since the last one, lr, images/s; the
    progress bar's postfix or, without a bar, a console line."""
    env = s.env
    elapsed = time.perf_counter() - window.start
    mean_loss = all_sum([window.loss, float(window.n)], env)
    entry = {
        "type": "step", "epoch": epoch, "micro": i + 1, "global_step": progress.global_step,
        "loss": mean_loss[0] / max(mean_loss[1], 1), "lr": max(g["lr"] for g in model.optimizer.param_groups),
        "img_s": window.images / max(elapsed, 1e-9),
    }
    s.logger.record(entry)
    if bar is not None:
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.3g}", img_s=f"{entry['img_s']:.1f}")
    elif env.is_main:
        s.logger.info(f"epoch {epoch} step {progress.global_step} loss {entry['loss']:.4f} lr {entry['lr']:.3g} {entry['img_s']:.1f} img/s")


def _end_epoch(s: _Setup, data: _Data, model: _Model, progress: _Progress, epoch: int, started: float) -> Dict[str, Any]:
    """Evaluation (model, EMA), the epoch line, ``eval.json``, the ``save_ckpt_freq`` checkpoint and
    weights; returns the epoch's evaluation (empty without a validation set)."""
    cfg, env = s.cfg, s.env
    loss_sum, count, skipped_sum = all_sum([progress.sums["loss"], progress.sums["count"], progress.sums["skipped"]], env)
    entry: Dict[str, Any] = {
        "type": "epoch", "epoch": epoch, "global_step": progress.global_step, "train_loss": loss_sum / max(count, 1),
        "lr": max(g["lr"] for g in model.optimizer.param_groups), "skipped_images": int(skipped_sum),
        "time_s": time.perf_counter() - started,
    }
    if env.distributed:
        entry["weights_digest"] = _check_ranks_agree(s, model, progress, f"the end of epoch {epoch}")
    last_eval = _evaluate_epoch(s, data, model, progress, epoch, entry) if data.val_loader is not None else {}
    s.logger.record(entry)
    s.logger.info(
        f"epoch {epoch}: train loss {entry['train_loss']:.4f}"
        + (f", val top-1 {entry['val']['top1']:.2f} top-5 {entry['val']['top5']:.2f}" if "val" in entry else "")
        + (f", EMA top-1 {entry['val_ema']['top1']:.2f}" if "val_ema" in entry else "")
        + (f", skipped {entry['skipped_images']} unreadable images" if entry["skipped_images"] else "")
    )
    _check_eval(s, progress, epoch, last_eval)
    _check_weights(s, model, progress, f"the end of epoch {epoch} (optimiser step {progress.global_step})")
    if (epoch + 1) % cfg["save_ckpt_freq"] == 0 or epoch + 1 == cfg["epochs"]:
        _save_state(s, data, model, progress, epoch + 1, 0, data.loader_gen.get_state())
        _save_weights(s, data, model, progress, epoch + 1)
        progress.ckpt_info = f"epoch {epoch + 1}, iteration 0, step {progress.global_step}"
    if env.is_main and last_eval:  # after the weights it describes: a failed save leaves the old pair
        atomic_write_json(s.out / "eval.json", dict(last_eval, model=s.run.model, weights=str(s.out / WEIGHTS_FILE)))
    barrier(env)
    return last_eval


def _evaluate_epoch(s: _Setup, data: _Data, model: _Model, progress: _Progress, epoch: int, entry: Dict[str, Any]) -> Dict[str, Any]:
    """Top-1/top-5 of the model (and the EMA with ``model_ema_eval``) into the epoch line ``entry``;
    the best top-1 so far. Returns what ``eval.json`` gets."""
    cfg = s.cfg
    result = {"epoch": epoch, **evaluate(model.eval_model, data.val_loader, s.env, model.amp, cfg["channels_last"], reduce=data.val_shard,
                                         normalize=data.eval_normalize)}
    entry["val"] = {k: result[k] for k in ("top1", "top5", "loss")}
    if model.ema is not None and cfg["model_ema_eval"]:
        result["ema"] = evaluate(model.ema.module, data.val_loader, s.env, model.amp, cfg["channels_last"], reduce=data.val_shard,
                                 normalize=data.eval_normalize)
        entry["val_ema"] = {k: result["ema"][k] for k in ("top1", "top5", "loss")}
    if result["top1"] >= progress.best.get("top1", -1.0):
        progress.best = {"top1": result["top1"], "epoch": epoch}
    result["best"] = progress.best
    return result


def _nonfinite_tensors(model: _Model) -> List[str]:
    """Names of the weights, EMA weights and optimiser moments holding a NaN or inf."""
    named = [(f"model {k}", v) for k, v in model.raw.state_dict().items()]
    if model.ema is not None:
        named += [(f"EMA {k}", v) for k, v in model.ema.state_dict().items()]
    for index, state in model.optimizer.state_dict()["state"].items():
        named += [(f"optimiser state {index}.{k}", v) for k, v in state.items()]
    return [k for k, v in named if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _check_weights(s: _Setup, model: _Model, progress: _Progress, where: str) -> None:
    """Stop before a save when the training state is not finite: a loss checked before the step cannot
    see what the step did. Every process holds the same weights, so all stop together."""
    bad = _nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLossError(_nonfinite_message(f"non-finite values in {shown} at {where}", s.out, progress.ckpt_info))


def _check_ranks_agree(s: _Setup, model: _Model, progress: _Progress, where: str) -> List[str]:
    """Stop, on every process together, when the processes' weights or EMA differ (a process started
    from another state or with other settings, or drifted): evaluation would mix different models and
    only rank 0's would be saved. Returns each rank's digest of its weights and EMA, for the log."""
    parts = [("model", fingerprint(model.raw.state_dict().values()))]
    if model.ema is not None:
        parts.append(("EMA", fingerprint(model.ema.state_dict().values())))
    gathered = all_gather_tensor(torch.cat([fp for _, fp in parts]), s.env)
    sizes = [fp.shape[0] for _, fp in parts]
    differ: Dict[str, List[int]] = {}
    for rank, g in enumerate(gathered):
        for (name, _), mine, rank0 in zip(parts, g.split(sizes), gathered[0].split(sizes)):
            if not torch.equal(mine, rank0):
                differ.setdefault(name, []).append(rank)
    if differ:
        what = ", ".join(f"the {name} of rank(s) {', '.join(map(str, ranks))}" for name, ranks in differ.items())
        raise RanksDifferError(
            f"the processes hold different weights at {where}: {what} differ from rank 0's. Every process must "
            "run with the same flags and --set values; stopping. Nothing was saved after this point; "
            f"{_last_good(s.out, progress.ckpt_info)}")
    return [digest(g) for g in gathered]


def _check_eval(s: _Setup, progress: _Progress, epoch: int, last_eval: Dict[str, Any]) -> None:
    """A NaN or inf evaluation loss: the weights have blown up (finite but huge, or NaN); stop before
    they are saved or described in ``eval.json``."""
    for name, res in (("model", last_eval), ("EMA", last_eval.get("ema") or {})):
        loss = res.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(_nonfinite_message(
                f"the {name}'s evaluation loss is {loss} after epoch {epoch}", s.out, progress.ckpt_info))


def _save_state(s: _Setup, data: _Data, model: _Model, progress: _Progress, epoch: int, micro: int, gen_state: torch.Tensor) -> None:
    """``checkpoint-last.pt``: everything ``--resume`` needs to continue at (``epoch``, ``micro``)
    bit-exactly, every process's RNG and loader generator states included (gathered to rank 0)."""
    env = s.env
    rng = capture_rng(env.device)
    rngs: List[Any] = [rng]
    gens: List[Any] = [gen_state]
    if env.distributed:
        rngs = [None] * env.world_size
        gens = [None] * env.world_size
        dist.all_gather_object(rngs, rng)
        dist.all_gather_object(gens, gen_state)
    if env.is_main:
        atomic_torch_save(s.out / STATE_FILE, {
            "format": STATE_FORMAT, "mode": s.mode, "model": model.raw.state_dict(),
            "ema": model.ema.state_dict() if model.ema is not None else None,
            "optimizer": model.optimizer.state_dict(), "scaler": model.scaler.state_dict(),
            "epoch": epoch, "micro": micro, "global_step": progress.global_step, "micro_per_epoch": data.micro_per_epoch,
            "epoch_sums": dict(progress.sums), "best": progress.best, "rng": rngs, "loader_generator": gens,
            "world_size": env.world_size, "config": s.resolved,
        })


def _save_weights(s: _Setup, data: _Data, model: _Model, progress: _Progress, epoch: int) -> None:
    """The weights as safetensors (rank 0): the whole FCMAE, or the classifier and its EMA, which
    ``save_checkpoint`` describes with the ImageFolder's class names (``model.label_names``), the
    preprocessing the run evaluated with and the released checkpoint it started from (if any). Every file
    names the run's start (``start``: a checkpoint name, a path, or ``random``)."""
    if not s.env.is_main:
        return
    info = {"epoch": str(epoch), "global_step": str(progress.global_step), "recipe": str(s.run.recipe),
            "start": start_of(s.run).label()}
    if s.mode == "pretrain":
        model.raw.save(s.out / WEIGHTS_FILE, metadata=dict(info, input_size=str(s.cfg["input_size"])))
    else:
        from ..checkpoints.io import save_checkpoint

        names = _class_names(s, data)
        for m in (model.raw, model.ema.module if model.ema is not None else None):
            if m is not None:
                _describe_trained(m, data, names)
        save_checkpoint(model.raw, s.out / WEIGHTS_FILE, metadata=info)
        if model.ema is not None:
            save_checkpoint(model.ema.module, s.out / EMA_WEIGHTS_FILE, metadata=dict(info, ema="true"))


def _describe_trained(m: nn.Module, data: _Data, names: Optional[List[str]]) -> None:
    """What ``save_checkpoint`` writes about a trained classifier: its class names, and its checkpoint entry
    with the preprocessing the run evaluated with (the run's ``input_size``, not the base checkpoint's)."""
    import dataclasses

    from ..checkpoints.io import preprocessing_of

    if names is not None:
        m.label_names = names
    p = data.prep
    m.checkpoint = dataclasses.replace(preprocessing_of(m), num_classes=data.num_classes, resolution=p.resolution,
                                       crop_pct=p.crop_pct, crop_mode=p.crop_mode, interpolation=p.interpolation,
                                       mean=tuple(p.mean), std=tuple(p.std))


def _class_names(s: _Setup, data: _Data) -> Optional[List[str]]:
    """The class folders' names, when the training set is an ImageFolder whose classes are the head's. A
    file list's classes are only its label numbers, and ``nb_classes`` may ask for a larger head: neither
    gives one real name per output, so then the checkpoint records none rather than made-up ones."""
    train_loc = find_split(s.run.data_path, "train")
    classes = list(data.train_ds.classes)
    if train_loc is None or not train_loc.is_dir() or len(classes) != data.num_classes:
        return None
    return classes


def _progress(env: DistEnv, total: int, initial: int, desc: str):
    """tqdm on rank 0 when stderr is a terminal; otherwise None (log lines are printed instead)."""
    if not env.is_main or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, leave=False)
