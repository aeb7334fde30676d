"""Read, recognise, convert, load and save ConvNeXt V2 checkpoints.

Our state dict uses the authors' dense key names and shapes (``downsample_layers.*``,
``stages.s.b.{dwconv,norm,pwconv1,grn,pwconv2}``, GRN (1, 1, 1, 4C), ``norm.*``, ``head.*``).
Five layouts are recognised and converted to it:

==================  ==========================================================================
``convnextv2_hub``  ours == the authors' fine-tuned ``*_ema.pt`` files (``{'model': sd}``)
``fcmae_dense``     the authors' ``pt_only/*_fcmae.pt`` files: our keys without ``norm.*``/``head.*``
``fcmae_sparse``    the authors' ``main_pretrain.py`` checkpoint: ``encoder.*`` with Minkowski
                    ``kernel``/``.ln.``/``.linear.`` names, plus ``proj``/``mask_token``/
                    ``decoder``/``pred``
``timm``            ``stem.*``, ``stages.N.blocks.M.*``, ``mlp.fc1`` (1x1 conv for atto-nano),
                    GRN ``mlp.grn.weight``/``bias`` (C,), ``head.norm``/``head.fc``
``hf``              transformers ``ConvNextV2ForImageClassification``/``ConvNextV2Model``
==================  ==========================================================================

Safety: pickled files are only ever read with ``torch.load(weights_only=True)``; a file that holds
Python objects other than tensors and plain containers is refused with an explanation, never run.
The one exception to the default allowlist is ``argparse.Namespace``, which the authors' training
checkpoints store under ``'args'`` (a plain attribute bag: rebuilding it runs no user code).

Loading never silently skips a tensor: the authors' fine-tuning loader leaves GRN at its zero init
(the identity) when shapes differ; here every GRN tensor is reshaped to (1, 1, 1, C) or the load fails.

The code: ``checkpoints.reading`` reads files safely, ``checkpoints.formats`` recognises and converts
layouts, and this module loads into a model and saves ours (re-exporting the converters of ``formats``).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import safetensors.torch
import torch
from torch import Tensor

from ..files import PathLike, atomic_path
# Reading and layout conversion are part of this module's public API (``__all__``): re-exported here.
from .formats import FORMATS, detect_format, split_fcmae_sparse, to_authors_sparse, to_hf, to_ours, to_timm
from .reading import (
    MAX_LISTED,
    CheckpointError,
    CheckpointNotFoundError,
    Source,
    describe_source,
    read_metadata,
    read_state_dict,
)
from ..models.convnextv2 import ConvNeXtV2
from ..models.variants import VARIANTS


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did.

    ``reinitialized``: key prefixes (``'head'``, ``'norm'``) the checkpoint did not provide, left at
    the model's own values. ``missing``/``unexpected``: only non-empty with ``strict=False``.
    """

    format: str
    source: str
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    reinitialized: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Loading into a model
# ------------------------------------------------------------------------------------------------
def load_checkpoint(model: ConvNeXtV2, source: Source, strict: bool = True) -> LoadReport:
    """Load weights of any recognised format into ``model`` (copied into its dtype and device).

    * A head with a different class count, or no head in the checkpoint (FCMAE files), keeps the
      model's own head, with a warning naming both counts.
    * FCMAE files have no final ``norm``: the model's own LayerNorm is kept, with a warning (as timm).
    * ``features_only`` models ignore ``norm.*``/``head.*`` silently; a ``num_classes=0`` model
      ignores ``head.*`` silently.
    * Any other missing or unexpected key raises ``CheckpointError`` listing them and guessing the
      variant the checkpoint was made for; ``strict=False`` reports them instead. Shape mismatches
      always raise.
    """
    where = describe_source(source)
    sd = read_state_dict(source)
    fmt = detect_format(sd)
    ckpt = to_ours(sd, fmt)
    target = model.state_dict()
    report = LoadReport(format=fmt, source=where)

    has_norm = "norm.weight" in target
    has_head = "head.weight" in target
    if not has_norm:  # features_only: neither norm nor head exist in the model
        ckpt = {k: v for k, v in ckpt.items() if not k.startswith("norm.")}
    if not has_head:
        ckpt = {k: v for k, v in ckpt.items() if not k.startswith("head.")}
    if has_head:
        n_model = target["head.weight"].shape[0]
        ck_w = ckpt.get("head.weight")
        if ck_w is None and "head.bias" not in ckpt:
            warnings.warn(
                f"checkpoint {where} ({fmt}) has no classifier head; keeping the model's own head "
                f"({n_model} classes), which still needs training",
                stacklevel=2,
            )
            report.reinitialized.append("head")
        elif ck_w is not None and ck_w.ndim == 2 and ck_w.shape[1] == target["head.weight"].shape[1] and ck_w.shape[0] != n_model:
            warnings.warn(
                f"checkpoint {where} has a {ck_w.shape[0]}-class head but the model has {n_model} classes; "
                "keeping the model's own head, which still needs training",
                stacklevel=2,
            )
            ckpt = {k: v for k, v in ckpt.items() if not k.startswith("head.")}
            report.reinitialized.append("head")
    if has_norm and fmt in ("fcmae_dense", "fcmae_sparse") and not any(k.startswith("norm.") for k in ckpt):
        warnings.warn(
            f"checkpoint {where} is an FCMAE encoder without the final LayerNorm; keeping the model's own "
            "'norm' (weight 1, bias 0 at init)",
            stacklevel=2,
        )
        report.reinitialized.append("norm")

    kept = tuple(p + "." for p in report.reinitialized)
    missing = [k for k in target if k not in ckpt and not k.startswith(kept)]
    unexpected = [k for k in ckpt if k not in target]
    mismatched = [k for k in ckpt if k in target and ckpt[k].shape != target[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(model, ckpt, target, where, fmt, missing, unexpected, mismatched))
    report.missing, report.unexpected = missing, unexpected

    adapted = dict(target)  # the model's own tensors for whatever the checkpoint does not provide
    for k, v in ckpt.items():
        if k in target:
            t = target[k]
            adapted[k] = v.to(device=t.device, dtype=t.dtype) if t.is_floating_point() else v.to(t.device)
    model.load_state_dict(adapted, strict=True)
    return report


def stage_layout(sd: Mapping[str, Tensor]) -> Tuple[Optional[Tuple[int, ...]], Optional[Tuple[int, ...]]]:
    """(dims, depths) of a state dict in our layout, None where it cannot tell."""
    dims: List[int] = []
    for i in range(4):
        w = sd.get(f"downsample_layers.{i}.{0 if i == 0 else 1}.weight")
        if w is None or w.ndim != 4:
            dims = []
            break
        dims.append(int(w.shape[0]))
    counts = [0, 0, 0, 0]
    for k in sd:
        m = re.match(r"^stages\.([0-3])\.(\d+)\.", k)
        if m:
            counts[int(m.group(1))] = max(counts[int(m.group(1))], int(m.group(2)) + 1)
    return (tuple(dims) if dims else None), (tuple(counts) if any(counts) else None)


def _variant_hint(model: ConvNeXtV2, ckpt: Mapping[str, Tensor]) -> str:
    dims, depths = stage_layout(ckpt)
    stem = ckpt.get("downsample_layers.0.0.weight")
    model_name = getattr(model, "variant", None)
    for v in VARIANTS.values():
        if (dims == v.dims or (dims is None and stem is not None and stem.shape[0] == v.dims[0])) and (
            depths is None or depths == v.depths
        ):
            if v.dims == tuple(model.dims) and v.depths == tuple(model.depths):
                return ""
            return (
                f"\nThis looks like {'an' if v.name[0] in 'aeiou' else 'a'} {v.name!r} checkpoint (dims {v.dims}, depths {v.depths}) but the model is "
                f"{model_name or 'custom'!r} (dims {tuple(model.dims)}, depths {tuple(model.depths)}); "
                f"create the model for it: convnextv2({v.name!r}, ...)."
            )
    if dims is not None or depths is not None:
        return (
            f"\nThe checkpoint has dims {dims}, depths {depths}; the model has dims {tuple(model.dims)}, "
            f"depths {tuple(model.depths)}: build ConvNeXtV2(depths=..., dims=...) to match."
        )
    return ""


def _mismatch_message(model, ckpt, target, where, fmt, missing, unexpected, mismatched) -> str:
    def shape(t: Tensor) -> Tuple[int, ...]:
        return tuple(t.shape)

    lines = [f"checkpoint {where} (format {fmt!r}) does not fit the model:"]
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatches (checkpoint vs model):")
        lines += [f"    {k}: {shape(ckpt[k])} vs {shape(target[k])}" for k in mismatched[:MAX_LISTED]]
    if missing:
        lines.append(f"  {len(missing)} missing from the checkpoint:")
        lines += [f"    {k}: model {shape(target[k])}" for k in missing[:MAX_LISTED]]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected in the checkpoint:")
        lines += [f"    {k}: checkpoint {shape(ckpt[k])}" for k in unexpected[:MAX_LISTED]]
    for kind, ks in (("mismatches", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if len(ks) > MAX_LISTED:
            lines.append(f"  ({len(ks) - MAX_LISTED} more {kind} not listed)")
    hint = _variant_hint(model, ckpt)
    if hint:
        lines.append(hint.strip("\n"))
    elif not mismatched:
        lines.append("Pass strict=False to load the matching keys and get the rest in the returned LoadReport.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_checkpoint(model: ConvNeXtV2, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``model``'s state dict to a safetensors file, atomically, and return its path.

    Metadata: ``format='convnextv2_hub'``, ``variant``, ``tag`` (when ``model.checkpoint.tag`` exists),
    ``num_classes`` (0 without a head), then the user's entries (which may not change ``format``).
    The file is written to a temporary name in the same folder, fsynced and renamed over ``path``,
    so ``path`` is either the old file or the complete new one; the temporary file never remains.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointNotFoundError(f"cannot save to {str(path)!r}: folder {str(parent)!r} does not exist; create it first")
    meta: Dict[str, str] = {"format": "convnextv2_hub"}
    variant = getattr(model, "variant", None)
    if variant:
        meta["variant"] = str(variant)
    tag = getattr(getattr(model, "checkpoint", None), "tag", None)
    if tag:
        meta["tag"] = str(tag)
    head = getattr(model, "head", None)
    meta["num_classes"] = str(head.out_features if isinstance(head, torch.nn.Linear) else 0)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
        if k == "format" and v != meta["format"]:
            raise ValueError("metadata key 'format' is reserved: it marks files written by convnextv2_hub")
        meta[k] = v
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "FORMATS",
    "LoadReport",
    "detect_format",
    "load_checkpoint",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
    "split_fcmae_sparse",
    "to_authors_sparse",
    "to_hf",
    "to_ours",
    "to_timm",
]
