"""AdamW parameter groups with the authors' layer-wise lr decay and no-weight-decay rules, and the
per-step lr schedule (the authors' ``adjust_learning_rate``).

Layer ids, ``single`` (``get_num_layer_for_convnext_single``), num_layers = sum(depths):
    ``downsample_layers.i`` -> sum(depths[:i]) + 1 (the stem shares id 1 with block 0.0),
    ``stages.s.b`` -> sum(depths[:s]) + b + 1, anything else (norm, head) -> num_layers + 1.
Layer ids, ``group`` (``get_num_layer_for_convnext``, written for [3, 3, 27, 3]), num_layers = 12:
    stem 0, downsample 1/2 -> 2/3, downsample 3 -> 12, stages.0 -> 1, stages.1 -> 2,
    stages.2.b -> 3 + b // 3, stages.3 -> 12, anything else -> 13.
Scale of id i: layer_decay ** (num_layers + 1 - i), so norm and head always train at the full lr.

No weight decay: fine-tuning (since the authors' commit 2553895): 1-D params, names ending in
``.bias``, ``.gamma`` or ``.beta`` (GRN). Pre-training (timm ``add_weight_decay``): 1-D params and
``.bias`` only, so GRN gamma/beta (shape (1, 1, 1, C)) and ``mask_token`` *are* decayed there.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn


def layer_id_single(name: str, depths: Sequence[int]) -> int:
    """The authors' per-block layer id of parameter ``name`` (model-relative name)."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return sum(depths[: int(parts[1])]) + 1
    if parts[0] == "stages":
        s, b = int(parts[1]), int(parts[2])
        return sum(depths[:s]) + b + 1
    return sum(depths) + 1


def layer_id_group(name: str, depths: Sequence[int]) -> int:
    """The authors' grouped layer id (three stage-2 blocks per id; 12 layers hard-coded as theirs)."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        i = int(parts[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[i]
    if parts[0] == "stages":
        s, b = int(parts[1]), int(parts[2])
        if s in (0, 1):
            return s + 1
        if s == 2:
            return 3 + b // 3
        return 12
    return 13


def num_layers(depths: Sequence[int], layer_decay_type: str) -> int:
    return sum(depths) if layer_decay_type == "single" else 12


def layer_scales(layer_decay: float, n_layers: int) -> List[float]:
    """lr multiplier per layer id 0 .. n_layers + 1."""
    return [layer_decay ** (n_layers + 1 - i) for i in range(n_layers + 2)]


def layer_id(name: str, depths: Sequence[int], layer_decay_type: str) -> int:
    if layer_decay_type == "single":
        return layer_id_single(name, depths)
    if layer_decay_type == "group":
        return layer_id_group(name, depths)
    raise ValueError(f"layer_decay_type must be 'single' or 'group', got {layer_decay_type!r}")


def no_weight_decay(name: str, param: torch.Tensor, mode: str) -> bool:
    """True when the authors' code gives ``name`` weight decay 0 in ``mode`` ('finetune'/'pretrain')."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return mode == "finetune" and (name.endswith(".gamma") or name.endswith(".beta"))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    layer_decay_type: str = "single",
    mode: str = "finetune",
) -> List[Dict]:
    """AdamW groups named as the authors' (``layer_{id}_decay`` / ``layer_{id}_no_decay``), each with
    ``weight_decay`` and ``lr_scale``. Frozen parameters are left out.

    Layer decay needs a ConvNeXtV2 (its ``depths`` and the authors' key names); with
    ``layer_decay == 1`` there are just two groups, as in the authors' code without an assigner.
    """
    use_ld = layer_decay != 1.0
    if use_ld:
        depths = getattr(model, "depths", None)
        if depths is None:
            raise ValueError("layer-wise lr decay needs a ConvNeXtV2 model (with .depths)")
        scales = layer_scales(layer_decay, num_layers(depths, layer_decay_type))
    groups: Dict[str, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = no_weight_decay(name, p, mode)
        if use_ld:
            lid = layer_id(name, depths, layer_decay_type)
            key, scale = f"layer_{lid}_{'no_decay' if nd else 'decay'}", scales[lid]
        else:
            key, scale = ("no_decay" if nd else "decay"), 1.0
        if key not in groups:
            groups[key] = {"name": key, "params": [], "param_names": [], "weight_decay": 0.0 if nd else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: Dict, mode: str, lr: float
) -> torch.optim.Optimizer:
    """torch AdamW over :func:`param_groups`; betas from ``opt_betas`` (torch's default when null);
    the fused kernel with ``fused_adamw`` (else torch's choice of implementation)."""
    groups = param_groups(model, cfg["weight_decay"], cfg["layer_decay"], cfg["layer_decay_type"], mode)
    betas: Tuple[float, float] = tuple(cfg["opt_betas"]) if cfg["opt_betas"] else (0.9, 0.999)  # type: ignore[assignment]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    fused = True if cfg.get("fused_adamw") else None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg["opt_eps"], fused=fused)


def absolute_lr(cfg: Dict, eff_batch: int) -> float:
    """``lr`` if set, else ``blr * eff_batch / 256`` (the authors' linear scaling rule)."""
    return cfg["lr"] if cfg["lr"] is not None else cfg["blr"] * eff_batch / 256


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The authors' ``adjust_learning_rate``: linear warmup from 0, then half-cycle cosine to min_lr.
    ``epoch`` is fractional (iteration / iterations_per_epoch + epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0:
        return lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets ``lr * lr_scale`` (min_lr part included, as the authors')."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
