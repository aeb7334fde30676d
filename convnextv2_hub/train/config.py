"""Training configuration: the known keys, the recipe files, ``--set key=value`` parsing.

Keys carry the authors' argument names (``main_pretrain.py`` / ``main_finetune.py``), so one of their
commands translates one to one: ``--blr 6.25e-4`` becomes ``--set blr=6.25e-4``. Defaults are the
authors' argparse defaults; a recipe (one JSON file per paper table, in ``recipes/``) overrides
them per model size, and ``--set`` overrides both. A key nobody knows is an error that lists the
known ones: a silently ignored typo (``--set warmup_epoch=5``) would waste a whole run.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

# name -> (default, type, help). Types: float, int, bool, str, "float?" / "int?" / "str?" (may be
# null), "pair?" (two floats or null). Authors' defaults unless the help says otherwise.
KEYS: Dict[str, Tuple[Any, str, str]] = {
    # --- batch and schedule
    "batch_size": (64, "int", "images per process per forward (authors: per GPU)"),
    "eff_batch_size": (None, "int?", "target effective batch (the tables' batch size); sets update_freq when that is null [ours]"),
    "update_freq": (None, "int?", "gradient accumulation steps; null: eff_batch_size / (batch_size * world_size), else 1"),
    "epochs": (100, "int", "training epochs"),
    "warmup_epochs": (20, "float", "linear lr warmup from 0, in (fractional) epochs"),
    "blr": (5e-4, "float", "base lr: lr = blr * effective_batch / 256"),
    "lr": (None, "float?", "absolute lr; overrides blr when set"),
    "min_lr": (1e-6, "float", "floor of the cosine schedule"),
    # --- optimiser
    "opt": ("adamw", "str", "optimiser (adamw only, as the paper)"),
    "opt_eps": (1e-8, "float", "AdamW eps"),
    "opt_betas": (None, "pair?", "AdamW betas; null: torch's (0.9, 0.999)"),
    "weight_decay": (0.05, "float", "AdamW weight decay (never on 1-D params, biases; GRN gamma/beta in fine-tuning)"),
    "layer_decay": (1.0, "float", "layer-wise lr decay factor (1.0: off)"),
    "layer_decay_type": ("single", "str", "'single' (one id per block) or 'group' (three blocks per id, for [3,3,27,3])"),
    "clip_grad": (None, "float?", "max global grad norm (null: no clipping)"),
    # --- model
    "input_size": (224, "int", "training and eval resolution"),
    "drop_path": (0.0, "float", "stochastic depth rate (linear over blocks)"),
    "head_init_scale": (0.001, "float", "classifier head init is multiplied by this"),
    "nb_classes": (None, "int?", "number of classes; null: from the dataset"),
    "model_ema": (False, "bool", "keep an EMA of the weights"),
    "model_ema_decay": (0.9999, "float", "EMA decay per optimiser step"),
    "model_ema_eval": (False, "bool", "evaluate the EMA weights too each epoch"),
    # --- architecture ablations (paper Tables 2, 3, 16; models.ablations.ArchOptions) [ours]
    "block": ("v2", "str", "'v2' (ConvNeXt V2) or 'v1' (ConvNeXt V1 block: LayerScale, no GRN) [ours]"),
    "grn": ("grn", "str", "what sits in GRN's place: grn, none, lrn, bn, ln, se, cbam (Table 2d/2e) [ours]"),
    "grn_aggregation": ("l2", "str", "GRN's aggregation: l2, l1, mean (Table 2a) [ours]"),
    "grn_normalization": ("divisive", "str", "GRN's normalisation: divisive, standardize, inverse_sum (Table 2b) [ours]"),
    "grn_residual": (True, "bool", "GRN's residual connection (Table 2c) [ours]"),
    "grn_form": ("full", "str", "GRN's form: full X*N(G(X)), affine, x_g X*G(X), x_n X*N(X) (Table 16) [ours]"),
    "grn_at": ("both", "str", "where GRN is used: both, pretrain_only (dropped when fine-tuning), finetune_only (added fresh at fine-tuning) (Table 2f) [ours]"),
    # --- augmentation and loss (fine-tuning)
    "aa": ("rand-m9-mstd0.5-inc1", "str?", "RandAugment policy 'rand-mM[-mstdS][-nN]'; null/'none': off"),
    "train_interpolation": ("bicubic", "str", "interpolation of the training crop"),
    "train_crop_scale": (None, "pair?", "RandomResizedCrop area range [min, max]; null: [0.08, 1] fine-tuning (timm), [0.2, 1] FCMAE (authors) [ours]"),
    "reprob": (0.25, "float", "random erasing probability"),
    "remode": ("pixel", "str", "random erasing fill: 'pixel' (per-pixel normal noise) or 'const' (zeros)"),
    "recount": (1, "int", "random erasing count (1 only)"),
    "smoothing": (0.1, "float", "label smoothing"),
    "mixup": (0.0, "float", "mixup alpha (0: off)"),
    "cutmix": (0.0, "float", "cutmix alpha (0: off)"),
    "mixup_prob": (1.0, "float", "probability of applying mixup or cutmix to a batch"),
    "mixup_switch_prob": (0.5, "float", "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": ("batch", "str", "one lambda per batch ('batch' only)"),
    "crop_pct": (None, "float?", "eval crop fraction; null: the checkpoint's (0.875 below 384, squash at 384+)"),
    "imagenet_default_mean_and_std": (True, "bool", "ImageNet mean/std (false: 0.5/0.5)"),
    # --- FCMAE pre-training
    "mask_ratio": (0.6, "float", "fraction of 32x32 patches masked, in [0, 1) (Fig. 8 sweeps it)"),
    "norm_pix_loss": (True, "bool", "per-patch normalised reconstruction target"),
    "encoder_masking": ("sparse", "str", "'sparse' (masked computation, the method) or 'dense' (masked patches zeroed at the input only, plain dense convs: the paper's 'without sparse conv' row, section 3) [ours]"),
    "decoder": ("convnext", "str", "FCMAE decoder (Table 1a): 'convnext' (ConvNeXt V2 blocks), 'unet', 'unet_noskip' or 'transformer' (MAE-style) [ours]"),
    "decoder_depth": (1, "int", "decoder depth (Table 1b): ConvNeXt blocks, Transformer blocks, or conv units per UNet resolution"),
    "decoder_embed_dim": (512, "int", "decoder width (Table 1c)"),
    "patch_size": (32, "int", "mask patch size (32: the encoder stride)"),
    # --- runtime
    "seed": (0, "int", "seed; process r uses seed + r for its own randomness"),
    "use_amp": (False, "bool", "autocast mixed precision"),
    "amp_dtype": ("bfloat16", "str", "'bfloat16' (no scaler) or 'float16' (with GradScaler) [ours]"),
    "compile": (False, "bool", "torch.compile the model [ours]"),
    "channels_last": (None, "bool?", "channels_last memory format (cuDNN's fast depthwise kernels); null: on for CUDA devices, off elsewhere [ours]"),
    "tf32": (None, "bool?", "float32 matmuls and cuDNN convolutions in TF32 on CUDA (the log says so for a float32 recipe); null: on for CUDA devices [ours]"),
    "cudnn_benchmark": (None, "bool?", "cuDNN picks the fastest convolution algorithms for the run's shapes; null: on for CUDA devices [ours]"),
    "fused_adamw": (None, "bool?", "fused AdamW kernel (torch.optim.AdamW(fused=True)); null: on for CUDA devices [ours]"),
    "grad_checkpointing": (None, "bool?", "recompute blocks in backward to save memory; null: on when the memory estimate exceeds 90% of the CUDA device, off elsewhere [ours]"),
    "num_workers": (None, "int?", "data loader workers per process; null: this node's CPUs (this process's affinity) / LOCAL_WORLD_SIZE - 1, at most 8, at least 0; workers persist across epochs"),
    "pin_mem": (True, "bool", "pinned host memory for GPU copies"),
    "save_ckpt_freq": (1, "int", "save the training state every N epochs (and at the end)"),
    "save_ckpt_steps": (0, "int", "also save it every N optimiser steps (0: off) [ours]"),
    "log_interval": (20, "int", "optimiser steps between log.jsonl step lines; the losses stay on the device in between and are read back (and checked to be finite) then, and before every save [ours]"),
    "dist_eval": (True, "bool", "shard evaluation over processes (exact counts, no padding)"),
    "dist_timeout_min": (30.0, "float", "minutes a process waits in a collective for the others before the run stops: a lost or stuck peer ends the run instead of hanging it; long enough for rank 0 to read a large checkpoint or scan a large file list while the others wait [ours]"),
    "tensorboard": (True, "bool", "write TensorBoard events when tensorboard is installed [ours]"),
}

# Keys whose null means "the device's best": on for CUDA devices, off elsewhere (on CPUs, today's
# float32 numerics and memory layout stay as they were). ``device_defaults`` fills them in.
DEVICE_KEYS = ("channels_last", "tf32", "cudnn_benchmark", "fused_adamw")

# Keys that say what the trained model is (its weights' names and shapes, and the ablation it
# trains): a resumed run takes them from its checkpoint's config, whatever the command line says.
MODEL_KEYS = ("encoder_masking", "decoder", "decoder_depth", "decoder_embed_dim", "patch_size")

# Keys that come from command-line flags, not from recipes or --set.
FLAG_KEYS = ("model", "data_path", "output_dir", "finetune", "pretrained", "resume", "device", "recipe")

# The config keys that are ConvNeXtV2 keyword arguments (``models.ablations.ArchOptions``' fields).
ARCH_KEYS = ("block", "grn", "grn_aggregation", "grn_normalization", "grn_residual", "grn_form")

DEFAULT_RECIPE = {"pretrain": "fcmae_pretrain", "finetune": "finetune_in1k"}
# The key of a recipe row (``common`` or a size) that holds notes, not values: {config key: where its
# value comes from}. ``Recipe.row`` returns them next to the values; they go into config.json.
NOTES_KEY = "source"


# The largest lr (and blr) accepted; see ``_validate_numbers``.
MAX_LR = 10.0


class ConfigError(ValueError):
    """A bad key, value or recipe; the message says what is accepted."""


def defaults() -> Dict[str, Any]:
    return {k: v[0] for k, v in KEYS.items()}


def device_defaults(cfg: Mapping[str, Any], device_type: str) -> Dict[str, Any]:
    """``cfg`` with the null ``DEVICE_KEYS`` resolved for a device of type ``device_type`` ("cuda",
    "cpu", ...): true on CUDA, false elsewhere; values set by a recipe or ``--set`` are kept."""
    out = dict(cfg)
    for k in DEVICE_KEYS:
        if out.get(k) is None:
            out[k] = device_type == "cuda"
    return out


def known_keys_text() -> str:
    return "\n".join(f"  {k} (default {json.dumps(v[0])}): {v[2]}" for k, v in KEYS.items())


def _unknown_key(key: str, where: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(KEYS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    flag = f" '{key}' is set by a command-line flag, not by {where}." if key in FLAG_KEYS else ""
    return ConfigError(f"unknown config key {key!r} in {where}.{hint}{flag} Known keys:\n{known_keys_text()}")


def coerce(key: str, value: Any, where: str = "--set") -> Any:
    """Check ``value`` against the key's type; ints are accepted for floats, "a,b" for betas."""
    if key not in KEYS:
        raise _unknown_key(key, where)
    typ = KEYS[key][1]
    optional = typ.endswith("?")
    base = typ.rstrip("?")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null ({where})")
    bad = ConfigError(f"{key} must be {base}{' or null' if optional else ''}, got {value!r} ({where})")
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # JSON's NaN / Infinity parse as floats; no key takes them
            raise ConfigError(f"{key} must be a finite number, got {value!r} ({where})")
        return float(value)
    if base == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad
        return int(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if base == "pair":
        if isinstance(value, str):
            value = [float(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
            raise bad
        if not all(math.isfinite(v) for v in value):
            raise ConfigError(f"{key} must be two finite numbers, got {value!r} ({where})")
        return [float(v) for v in value]
    raise AssertionError(f"unhandled type {typ}")


def parse_set(items: Iterable[str]) -> Dict[str, Any]:
    """``["lr=1e-4", "model_ema=true", "aa=none"]`` -> typed dict. Values are JSON when they parse
    as JSON (numbers, true/false/null, lists), else plain strings; ``none``/``None`` mean null."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        raw = raw.strip()
        if raw in ("none", "None", "null"):
            value: Any = None
        elif raw in ("True", "False"):
            value = raw == "True"
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        out[key] = coerce(key, value)
    return out


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    name: str
    mode: str
    description: str
    common: Mapping[str, Any]
    sizes: Mapping[str, Mapping[str, Any]]  # empty: the same row for every variant
    path: str

    def row(self, variant: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """(values, source notes) for ``variant``: common values overlaid with its size row."""
        if self.sizes and variant not in self.sizes:
            raise ConfigError(
                f"recipe {self.name!r} has no row for {variant!r}; it covers {list(self.sizes)} "
                "(the paper gives no setting for the others). Pick another recipe or --set the values."
            )
        values: Dict[str, Any] = {}
        notes: Dict[str, str] = {}
        for part in (self.common, self.sizes.get(variant, {})):
            for k, v in part.items():
                if k == NOTES_KEY:
                    notes.update(v)
                else:
                    values[k] = coerce(k, v, where=f"recipe {self.name}")
        return values, notes


def list_recipes() -> List[str]:
    folder = resources.files(__package__).joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: str) -> Recipe:
    """A packaged recipe by name (``finetune_in1k``) or a JSON file of the same shape by path."""
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path!r} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        res = resources.files(__package__).joinpath("recipes", f"{name_or_path}.json")
        if not res.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; packaged recipes: {list_recipes()} (or pass a .json path)")
        path, text = Path(str(res)), res.read_text(encoding="utf-8")
    raw = json.loads(text)
    for section in [raw.get("common", {})] + list(raw.get("sizes", {}).values()):
        for k in section:
            if k != NOTES_KEY and k not in KEYS:
                raise _unknown_key(k, f"recipe {path}")
    if raw.get("mode") not in ("pretrain", "finetune"):
        raise ConfigError(f"recipe {path}: 'mode' must be 'pretrain' or 'finetune'")
    return Recipe(
        name=raw.get("name", path.stem),
        mode=raw["mode"],
        description=raw.get("description", ""),
        common=raw.get("common", {}),
        sizes=raw.get("sizes", {}),
        path=str(path),
    )


def resolve(
    mode: str, variant: str, recipe: Optional[str], overrides: Mapping[str, Any], base: Optional[Mapping[str, Any]] = None,
    adapted: Optional[List[str]] = None,
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """defaults <- ``base`` <- recipe row for ``variant`` <- overrides. Returns (config, source notes).

    ``adapted``: a list to adapt, in the config, the recipe's (or default) values that do not fit what the
    overrides set (``fit_schedule``), with one notice per change appended to it; None (strict): they stand,
    and a misfit is refused as any bad value is."""
    cfg = defaults()
    cfg.update(base or {})
    notes: Dict[str, str] = {}
    if recipe:
        r = load_recipe(recipe)
        if r.mode != mode:
            raise ConfigError(f"recipe {r.name!r} is a {r.mode} recipe; this is the {mode} command")
        values, notes = r.row(variant)
        cfg.update(values)
    before = dict(cfg)
    for k, v in overrides.items():
        cfg[k] = coerce(k, v)
    if adapted is not None:
        adapted += fit_schedule(cfg, before, set(overrides))
    validate(cfg)
    return cfg, notes


# How to keep a recipe's value instead of the adapted one; ends every adaptation notice.
KEEP_RECIPE = "--strict-recipe to refuse instead"


def fit_schedule(cfg: Dict[str, Any], recipe_values: Mapping[str, Any], fixed: Iterable[str]) -> List[str]:
    """Adapt, in ``cfg``, the epoch-based values the user did not set (not in ``fixed``) that do not fit the
    run's ``epochs``: a warm-up longer than the run keeps its share of the recipe's run (Tiny's 40 of 300
    epochs in a 30-epoch run: 4). Returns one notice per change. A recipe used as written fits by itself,
    so nothing changes for a paper reproduction."""
    fixed = set(fixed)
    notices: List[str] = []
    warmup, epochs = cfg["warmup_epochs"], cfg["epochs"]
    if warmup > epochs and "warmup_epochs" not in fixed and epochs > 0:
        planned = recipe_values["epochs"]
        new = round(min(epochs, warmup * epochs / planned), 3) if planned > 0 else float(epochs)
        cfg["warmup_epochs"] = new
        notices.append(f"warmup_epochs: the recipe's {warmup:g} is longer than epochs={epochs}, so {new:g} is used (the "
                       f"same share of the run as {warmup:g} of {planned}); --set warmup_epochs=N to choose, {KEEP_RECIPE}")
    return notices


def fit_batch(cfg: Dict[str, Any], world_size: int, samples: int, fixed: Iterable[str], strict: bool) -> Optional[str]:
    """Make one optimiser step fit into ``samples`` (training images per process) when the recipe's batch does
    not: a smaller ``update_freq`` (the recipe's ``eff_batch_size`` comes from ImageNet's size), then, when one
    batch is already too big, a smaller ``batch_size``; values in ``fixed`` (the user's) are never changed.
    Returns the notice of the change, None when the batch fits; raises ``ConfigError`` when it cannot fit
    without changing the user's values, or when ``strict`` forbids changing the recipe's."""
    fixed = set(fixed)
    bs = cfg["batch_size"]
    uf, eff = effective_batch(cfg, world_size)
    if samples >= bs * uf:
        return None
    can_bs = "batch_size" not in fixed and not strict
    can_uf = not strict and ("update_freq" not in fixed if cfg["update_freq"] is not None else "eff_batch_size" not in fixed)
    new_bs = bs if bs <= samples or not can_bs else samples
    new_uf = max(1, samples // new_bs) if can_uf else uf
    if samples < new_bs * new_uf:
        why = ("the recipe's batch is kept (--strict-recipe); drop --strict-recipe to let it adapt, or set "
               if strict else "set ")
        raise ConfigError(f"{samples} images are fewer than one optimiser step needs (batch_size {bs} x update_freq {uf} "
                          f"x {world_size} processes = {eff}): {why}a batch that fits, e.g. --set update_freq=1 "
                          f"(or eff_batch_size=null) and --set batch_size={min(bs, samples)}")
    cfg["batch_size"], cfg["update_freq"] = new_bs, new_uf
    source = f"eff_batch_size {cfg['eff_batch_size']}" if cfg["eff_batch_size"] else "its batch"
    return (f"batch: the recipe's effective batch {eff} ({source} = batch_size {bs} x update_freq {uf} x {world_size} "
            f"processes) is more than the {samples} training images per process hold, so batch_size {new_bs} x "
            f"update_freq {new_uf} = {new_bs * new_uf * world_size} is used (the lr follows: blr x batch / 256, unless lr "
            f"is set); --set batch_size=N / update_freq=N to choose, {KEEP_RECIPE}")


def validate(cfg: Mapping[str, Any]) -> None:
    """Value checks that do not need the data or the device."""
    choices = {
        "layer_decay_type": ("single", "group"),
        "amp_dtype": ("bfloat16", "float16"),
        "opt": ("adamw",),
        "mixup_mode": ("batch",),
        "remode": ("pixel", "const"),
        "encoder_masking": ("sparse", "dense"),
        "decoder": ("convnext", "unet", "unet_noskip", "transformer"),
        "grn_at": ("both", "pretrain_only", "finetune_only"),
    }
    for k, allowed in choices.items():
        if cfg[k] not in allowed:
            raise ConfigError(f"{k} must be one of {list(allowed)}, got {cfg[k]!r}")
    if cfg["recount"] != 1:
        raise ConfigError("recount must be 1 (one erased box per image, the authors' setting)")
    for k in ("batch_size", "epochs", "input_size", "save_ckpt_freq", "log_interval"):
        if cfg[k] <= 0:
            raise ConfigError(f"{k} must be positive, got {cfg[k]}")
    if cfg["update_freq"] is not None and cfg["update_freq"] <= 0:
        raise ConfigError(f"update_freq must be positive, got {cfg['update_freq']}")
    if not 0 <= cfg["warmup_epochs"] <= cfg["epochs"]:
        raise ConfigError(f"warmup_epochs must be in [0, epochs={cfg['epochs']}], got {cfg['warmup_epochs']:g}: "
                          f"--set warmup_epochs=N with N at most {cfg['epochs']}")
    scale = cfg["train_crop_scale"]
    if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"train_crop_scale must be [min, max] with 0 < min <= max <= 1, got {scale}")
    for k in ("reprob", "mixup_prob", "mixup_switch_prob", "smoothing", "drop_path"):
        if not 0 <= cfg[k] <= 1:
            raise ConfigError(f"{k} must be in [0, 1], got {cfg[k]}")
    if cfg["layer_decay"] <= 0:
        raise ConfigError(f"layer_decay must be > 0, got {cfg['layer_decay']}")
    if cfg["aa"] not in (None, "", "none"):
        parse_rand_augment(cfg["aa"])
    _validate_numbers(cfg)
    _validate_arch(cfg)


def _validate_arch(cfg: Mapping[str, Any]) -> None:
    """The architecture switches, checked by the model's own rules (``ArchOptions``) before any folder
    is made; ``grn_at`` other than ``both`` moves GRN itself, so it needs GRN in the config."""
    from ..models.ablations import ArchOptions  # torch: only when a command runs, never for --help

    try:
        ArchOptions.from_dict({k: cfg[k] for k in ARCH_KEYS})
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg["grn_at"] != "both" and (cfg["block"] != "v2" or cfg["grn"] != "grn"):
        raise ConfigError(f"grn_at={cfg['grn_at']!r} moves GRN between pre-training and fine-tuning, so it needs "
                          f"block='v2' and grn='grn' (got block={cfg['block']!r}, grn={cfg['grn']!r})")


def arch_switches(cfg: Mapping[str, Any], mode: str) -> Dict[str, Any]:
    """The model's architecture switches for ``mode`` ("pretrain" or "finetune"), non-default ones only,
    with ``grn_at`` applied: ``pretrain_only`` fine-tunes without GRN, ``finetune_only`` pre-trains
    without it."""
    switches = {k: cfg[k] for k in ARCH_KEYS}
    at = cfg.get("grn_at", "both")
    if (at == "pretrain_only" and mode == "finetune") or (at == "finetune_only" and mode == "pretrain"):
        switches = {"block": switches["block"], "grn": "none"}
    return {k: v for k, v in switches.items() if v != KEYS[k][0]}


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _validate_numbers(cfg: Mapping[str, Any]) -> None:
    """Ranges of the optimiser, model and runtime numbers. An lr above ``MAX_LR`` cannot train (AdamW
    moves every weight by about lr per step) and above float32's range torch fails with an overflow
    error deep in the optimiser step: both are refused here, before any folder is made."""
    for k in ("blr", "lr"):
        if cfg[k] is not None:
            _check(0 < cfg[k] <= MAX_LR, k, f"in (0, {MAX_LR:g}] (AdamW moves each weight by about lr per step)", cfg[k])
    _check(0 <= cfg["min_lr"] <= MAX_LR, "min_lr", f"in [0, {MAX_LR:g}]", cfg["min_lr"])
    _check(cfg["opt_eps"] > 0, "opt_eps", "> 0", cfg["opt_eps"])
    _check(cfg["weight_decay"] >= 0, "weight_decay", ">= 0", cfg["weight_decay"])
    betas = cfg["opt_betas"]
    _check(betas is None or all(0 <= b < 1 for b in betas), "opt_betas", "two numbers in [0, 1)", betas)
    _check(cfg["clip_grad"] is None or cfg["clip_grad"] > 0, "clip_grad", "> 0 or null", cfg["clip_grad"])
    _check(0 <= cfg["model_ema_decay"] <= 1, "model_ema_decay", "in [0, 1]", cfg["model_ema_decay"])
    _check(0 <= cfg["mask_ratio"] < 1, "mask_ratio", "in [0, 1)", cfg["mask_ratio"])
    _check(cfg["crop_pct"] is None or 0 < cfg["crop_pct"] <= 1, "crop_pct", "in (0, 1] or null", cfg["crop_pct"])
    _check(cfg["mixup"] >= 0 and cfg["cutmix"] >= 0, "mixup/cutmix", ">= 0", (cfg["mixup"], cfg["cutmix"]))
    _check(cfg["input_size"] >= 32, "input_size", ">= 32 (the network downsamples by 32)", cfg["input_size"])
    _check(cfg["nb_classes"] is None or cfg["nb_classes"] >= 2, "nb_classes", ">= 2 or null", cfg["nb_classes"])
    _check(cfg["eff_batch_size"] is None or cfg["eff_batch_size"] > 0, "eff_batch_size", "positive or null", cfg["eff_batch_size"])
    _check(cfg["num_workers"] is None or cfg["num_workers"] >= 0, "num_workers", ">= 0 or null", cfg["num_workers"])
    _check(cfg["save_ckpt_steps"] >= 0, "save_ckpt_steps", ">= 0 (0: off)", cfg["save_ckpt_steps"])
    for k in ("decoder_depth", "decoder_embed_dim", "patch_size"):
        _check(cfg[k] > 0, k, "positive", cfg[k])


def parse_rand_augment(policy: str) -> Tuple[int, float, float]:
    """timm's ``rand-m9-mstd0.5-inc1`` -> (num_ops, magnitude, magnitude_std). ``inc`` is accepted:
    torchvision's RandAugment ops already grow stronger with the magnitude (timm's 'increasing')."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"aa: only RandAugment policies 'rand-...' are supported, got {policy!r}")
    num_ops, magnitude, mstd = 2, 10.0, 0.0  # timm's defaults for a bare 'rand'
    for p in parts[1:]:
        if p.startswith("mstd"):
            mstd = float(p[4:])
        elif p.startswith("mmax"):
            raise ConfigError("aa: 'mmax' is not supported")
        elif p.startswith("m"):
            magnitude = float(p[1:])
        elif p.startswith("n"):
            num_ops = int(p[1:])
        elif p.startswith("inc"):
            pass
        elif p.startswith("w"):
            raise ConfigError("aa: weighted op choice ('w') is not supported")
        else:
            raise ConfigError(f"aa: unknown part {p!r} in {policy!r}")
    if not 0 <= magnitude <= 10:
        raise ConfigError(f"aa: magnitude must be in [0, 10] (timm's scale), got {magnitude}")
    return num_ops, magnitude, mstd


def effective_batch(cfg: Mapping[str, Any], world_size: int) -> Tuple[int, int]:
    """(update_freq, effective batch) for this world size.

    update_freq null: reach ``eff_batch_size`` by accumulation (rounded up when it does not divide;
    the lr follows the batch actually used, lr = blr * eff / 256, so the recipe stays consistent).
    """
    per_step = cfg["batch_size"] * world_size
    uf = cfg["update_freq"]
    if uf is None:
        target = cfg["eff_batch_size"]
        uf = max(1, -(-target // per_step)) if target else 1
    return uf, per_step * uf

