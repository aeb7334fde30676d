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

ConvNeXt V1 weights load into ``block="v1"`` models through the same converters: the ConvNeXt
repository's ``{'model': sd}`` files are our layout with LayerScale ``stages.s.b.gamma`` (C,) and no
GRN, timm's ``convnext_*`` files its V2 layout with ``gamma`` (atto..nano's 1x1-conv MLP weights
are reshaped to Linear ones, as for V2).

Safety: pickled files are only ever read with ``torch.load(weights_only=True)``; a file that holds
Python objects other than tensors and plain containers is refused with an explanation, never run.
The one exception to the default allowlist is ``argparse.Namespace``, which the authors' training
checkpoints store under ``'args'`` (a plain attribute bag: rebuilding it runs no user code).

Loading never silently skips a tensor: the authors' fine-tuning loader leaves GRN at its zero init
(the identity) when shapes differ; here every GRN tensor is reshaped to (1, 1, 1, C) or the load fails.

The code: ``checkpoints.reading`` reads files safely, ``checkpoints.formats`` recognises and converts
layouts, and this module loads into a model and saves it (re-exporting the converters of ``formats``):
``save_checkpoint(format=...)`` writes ours, or a file the peers' own loaders read (timm's safetensors,
an HF ``from_pretrained`` folder, the authors' ``{'model': sd}`` ``.pt``).
"""
from __future__ import annotations

import dataclasses
import contextlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import safetensors.torch
import torch
from torch import Tensor

from ..files import PathLike, atomic_folder, atomic_path, atomic_torch_save
# Reading and layout conversion are part of this module's public API (``__all__``): re-exported here.
from .formats import (
    FORMATS,
    SAVE_FORMATS,
    detect_format,
    hf_model_config,
    hf_preprocessor_config,
    is_v1_layout,
    split_fcmae_sparse,
    to_authors_sparse,
    to_hf,
    to_ours,
    to_timm,
)
from .reading import (
    MAX_LISTED,
    CheckpointError,
    CheckpointNotFoundError,
    Source,
    describe_source,
    is_safetensors,
    read_metadata,
    read_state_dict,
)
from .registry import Checkpoint, get_checkpoint, label_names
from ..models.variants import VARIANTS, variant_of

if TYPE_CHECKING:
    # Only named in annotations: ``models.convnextv2`` imports the Hub code, which imports this module.
    from ..models.convnextv2 import ConvNeXtV2


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did.

    ``reinitialized``: key prefixes (``'head'``, ``'norm'``) the checkpoint did not provide, left at
    the model's own values (``'grn'``: every block's GRN, under ``grn_transfer="fresh"``).
    ``dropped``: the checkpoint's tensors left unloaded on purpose (GRN under ``grn_transfer="drop"``).
    ``missing``/``unexpected``: only non-empty with ``strict=False``.
    """

    format: str
    source: str
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    reinitialized: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Loading into a model
# ------------------------------------------------------------------------------------------------
def load_checkpoint(model: ConvNeXtV2, source: Source, strict: bool = True, *,
                    grn_transfer: Optional[str] = None) -> LoadReport:
    """Load weights of any recognised format into ``model`` (copied into its dtype and device).

    * A head with a different class count, or no head in the checkpoint (FCMAE files), keeps the
      model's own head, with a warning naming both counts.
    * FCMAE files have no final ``norm``: the model's own LayerNorm is kept, with a warning (as timm).
    * ``features_only`` models ignore ``norm.*``/``head.*`` silently; a ``num_classes=0`` model
      ignores ``head.*`` silently.
    * Any other missing or unexpected key raises ``CheckpointError`` listing them and guessing the
      variant the checkpoint was made for; ``strict=False`` reports them instead. Shape mismatches
      always raise.
    * A file of ours that describes itself (``read_description``) also sets ``model.label_names`` (when
      its head was loaded) and ``model.checkpoint`` (its stored preprocessing): see ``apply_description``.
    * A file of ours (or an FCMAE file) stores its architecture switches (``read_arch``); switches that
      differ from ``model.arch_options()`` raise ``CheckpointError`` naming both.
    * ``grn_transfer`` (paper Table 2f) is the one way GRN weights may go unloaded, and only when asked:
      ``"drop"`` removes the file's GRN tensors for a model without GRN (``grn="none"``), ``"fresh"``
      keeps the model's freshly initialised GRN where the file has none; ``LoadReport.reinitialized``
      says which happened. By default every GRN tensor loads or the load fails.
    """
    if grn_transfer not in (None, "drop", "fresh"):
        raise ValueError(f"grn_transfer must be None, 'drop' or 'fresh', got {grn_transfer!r}")
    where = describe_source(source)
    sd = read_state_dict(source)
    fmt = detect_format(sd)
    ckpt = to_ours(sd, fmt)
    _check_arch(model, source, where, grn_transfer)
    target = model.state_dict()
    report = LoadReport(format=fmt, source=where)
    ckpt = _transfer_grn(ckpt, target, grn_transfer, report)

    ckpt = _keep_own_head_and_norm(ckpt, target, where, fmt, report)

    kept = tuple(p + "." for p in report.reinitialized)
    missing = [k for k in target if k not in ckpt and not k.startswith(kept) and not _fresh_grn(k, report)]
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
    if not isinstance(source, Mapping):
        # Where the weights came from, for what describes them later (export metadata, a re-save);
        # ``create(pretrained=True)`` clears it: there the manifest entry names them.
        model.weights_file = str(source)
    description = read_description(source)
    if description is not None:
        apply_description(model, description, head_kept="head" in report.reinitialized)
    return report


def _keep_own_head_and_norm(ckpt: Dict[str, Tensor], target: Mapping[str, Tensor], where: str, fmt: str,
                            report: LoadReport) -> Dict[str, Tensor]:
    """``ckpt`` without what the model keeps its own of: a head or final norm the model does not have, a
    head of another class count, or (FCMAE files) a head and norm the file lacks; warned and reported."""
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
                stacklevel=3,  # the caller of load_checkpoint
            )
            report.reinitialized.append("head")
        elif ck_w is not None and ck_w.ndim == 2 and ck_w.shape[1] == target["head.weight"].shape[1] and ck_w.shape[0] != n_model:
            warnings.warn(
                f"checkpoint {where} has a {ck_w.shape[0]}-class head but the model has {n_model} classes; "
                "keeping the model's own head, which still needs training",
                stacklevel=3,  # the caller of load_checkpoint
            )
            ckpt = {k: v for k, v in ckpt.items() if not k.startswith("head.")}
            report.reinitialized.append("head")
    if has_norm and fmt in ("fcmae_dense", "fcmae_sparse") and not any(k.startswith("norm.") for k in ckpt):
        warnings.warn(
            f"checkpoint {where} is an FCMAE encoder without the final LayerNorm; keeping the model's own "
            "'norm' (weight 1, bias 0 at init)",
            stacklevel=3,  # the caller of load_checkpoint
        )
        report.reinitialized.append("norm")
    return ckpt


_GRN_KEY = re.compile(r"^stages\.\d+\.\d+\.grn\.")


def _fresh_grn(key: str, report: LoadReport) -> bool:
    return "grn" in report.reinitialized and bool(_GRN_KEY.match(key))


def _transfer_grn(ckpt: Dict[str, Tensor], target: Mapping[str, Tensor], grn_transfer: Optional[str],
                  report: LoadReport) -> Dict[str, Tensor]:
    """``ckpt`` without its GRN tensors for ``grn_transfer="drop"``; for ``"fresh"`` the model's GRN is
    marked as kept (``report.reinitialized``). Each refuses a pair it does not describe."""
    own = [k for k in target if _GRN_KEY.match(k)]
    theirs = [k for k in ckpt if _GRN_KEY.match(k)]
    if grn_transfer == "drop":
        if own:
            raise CheckpointError("grn_transfer='drop' is for a model without GRN (grn='none'), but this model has "
                                  f"{len(own)} GRN tensors ({own[0]}, ...)")
        report.dropped = theirs
        return {k: v for k, v in ckpt.items() if k not in set(theirs)}
    if grn_transfer == "fresh":
        if theirs:
            raise CheckpointError(f"grn_transfer='fresh' is for a checkpoint without GRN, but it has {len(theirs)} GRN "
                                  f"tensors ({theirs[0]}, ...): load it without grn_transfer")
        report.reinitialized.append("grn")
    return ckpt


def _check_arch(model: torch.nn.Module, source: Source, where: str, grn_transfer: Optional[str]) -> None:
    """Refuse a file whose stored architecture switches differ from the model's (GRN's place may
    differ under ``grn_transfer``, which is what it is for)."""
    stored = read_arch(source)
    if stored is None or not hasattr(model, "arch_options"):
        return
    own = model.arch_options()

    def relevant(options: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in options.items() if grn_transfer is None or not k.startswith("grn")}

    if relevant(stored) != relevant(own):
        args = ", ".join(f"{k}={v!r}" for k, v in stored.items()) or "no switches (the released ConvNeXt V2)"
        raise CheckpointError(
            f"checkpoint {where} was saved from a model with architecture switches {stored or '{}'}, but this model "
            f"has {own or '{}'}: build the model for it (convnextv2_hub.create(..., checkpoint_path=...) does that by "
            f"itself; by hand: {args})")


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
    same = (dims is None or dims == tuple(model.dims)) and (depths is None or depths == tuple(model.depths))
    if (dims is not None or depths is not None) and not same:
        return (
            f"\nThe checkpoint has dims {dims}, depths {depths}; the model has dims {tuple(model.dims)}, "
            f"depths {tuple(model.depths)}: build ConvNeXtV2(depths=..., dims=...) to match."
        )
    return ""


def _block_hint(model: ConvNeXtV2, ckpt: Mapping[str, Tensor]) -> str:
    """A hint when the checkpoint's blocks are the other ConvNeXt generation than the model's."""
    v1_file = is_v1_layout(ckpt)
    v2_file = any(_GRN_KEY.match(k) for k in ckpt)
    block = getattr(model, "options", None) and model.options.block
    if v1_file and block != "v1":
        return ("This is a ConvNeXt V1 checkpoint (LayerScale 'gamma', no GRN): build the model with block='v1', "
                "e.g. convnextv2_hub.create(..., block='v1').")
    if v2_file and block == "v1":
        return "This is a ConvNeXt V2 checkpoint (GRN): build the model without block='v1'."
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
    hint = _variant_hint(model, ckpt) or _block_hint(model, ckpt)
    if hint:
        lines.append(hint.strip("\n"))
    elif not mismatched:
        lines.append("Pass strict=False to load the matching keys and get the rest in the returned LoadReport.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_checkpoint(
    model: torch.nn.Module,
    path: PathLike,
    metadata: Optional[Dict[str, str]] = None,
    *,
    format: str = "ours",
    overwrite: Optional[bool] = None,
) -> Path:
    """Write ``model``'s weights in one of ``SAVE_FORMATS``, atomically, and return the path.

    * ``"ours"``: a safetensors file, described by its metadata (below).
    * ``"timm"``: a safetensors file for ``timm.create_model("convnextv2_<variant>", pretrained=True,
      pretrained_cfg_overlay=dict(file=path, num_classes=N), num_classes=N)`` (``timm_load_hint``).
    * ``"hf"``: a folder for transformers' ``from_pretrained``: ``config.json`` (sizes, labels),
      ``model.safetensors`` and ``preprocessor_config.json`` (the checkpoint's own preprocessing).
      Written into a temporary folder beside ``path`` and renamed into place when complete.
    * ``"authors"``: a ``{"model": state_dict}`` ``.pt`` file, the layout of the authors' releases.

    ``overwrite``: replace an existing ``path``; by default only ``"ours"`` replaces (a trainer rewrites
    its checkpoint every epoch), the peer formats refuse. A format that cannot hold the model (an FCMAE
    decoder, a ``features_only`` model for timm/HF, sizes timm has no name for) raises ValueError.

    Metadata of ``"ours"``: ``format='convnextv2_hub'``, ``variant``, ``tag`` (when
    ``model.checkpoint.tag`` exists), ``num_classes`` (0 without a head), the description ``read_description`` reads back
    (``label_names`` as a JSON list when the model has real names, ``preprocessing`` as a JSON object and
    ``base_checkpoint``, both when ``model.checkpoint`` is set), then the user's entries (which may not
    change ``format``). The peer formats take no metadata: their loaders would not read it.
    The file is written to a temporary name in the same folder, fsynced and renamed over ``path``,
    so ``path`` is either the old file or the complete new one; the temporary file never remains.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {list(SAVE_FORMATS)}")
    path = Path(path)
    _check_target(path, format == "ours" if overwrite is None else overwrite)
    if format == "ours":
        return _save_ours(model, path, metadata)
    if metadata:
        raise ValueError(f"metadata is written to format 'ours' only; a {format} file has no place its loader reads it")
    _check_writable(model, format)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if format == "timm":
        tensors = to_timm(sd, _variant_name(model, format))
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    elif format == "authors":
        atomic_torch_save(path, {"model": sd})
    else:
        _save_hf_folder(model, sd, path)
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointNotFoundError(f"cannot save to {str(path)!r}: folder {str(parent)!r} does not exist; create it first")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True (convnextv2 convert: --overwrite) "
                              "to replace it")


def _save_ours(model: torch.nn.Module, path: Path, metadata: Optional[Dict[str, str]]) -> Path:
    meta: Dict[str, str] = {"format": "convnextv2_hub"}
    variant = getattr(model, "variant", None)
    if variant:
        meta["variant"] = str(variant)
    tag = getattr(getattr(model, "checkpoint", None), "tag", None)
    if tag:
        meta["tag"] = str(tag)
    head = getattr(model, "head", None)
    meta["num_classes"] = str(head.out_features if isinstance(head, torch.nn.Linear) else 0)
    meta.update(describe_model(model))
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
        if k == "format" and v != meta["format"]:
            raise ValueError("metadata key 'format' is reserved: it marks files written by convnextv2_hub")
        if k in DESCRIPTION_KEYS and v != meta.get(k):
            raise ValueError(f"metadata key {k!r} is reserved: it is written from the model (set model.label_names, model.base_checkpoint "
                             "or model.checkpoint instead)")
        meta[k] = v
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path

# ------------------------------------------------------------------------------------------------
# Self-description: what a file of ours says about its head, labels and preprocessing
# ------------------------------------------------------------------------------------------------
PREPROCESSING_FIELDS = ("resolution", "crop_pct", "crop_mode", "interpolation", "mean", "std")
DESCRIPTION_KEYS = ("label_names", "preprocessing", "base_checkpoint", "arch")
# The metadata entry that holds a model's non-default architecture switches (``arch_options()``) as a
# JSON object; files of ours and FCMAE files write it, absent means the released ConvNeXt V2.
ARCH_KEY = "arch"


@dataclass(frozen=True)
class CheckpointDescription:
    """What a file written by ``save_checkpoint`` (format ``"ours"``) says about the model it holds.

    ``num_classes``: the head's class count (None when the file has no head). ``label_names``: one name
    per class, None when the saved model had none of its own. ``preprocessing``: the fields of
    ``PREPROCESSING_FIELDS``, None for older files. ``base_checkpoint``: the released checkpoint the
    weights started from, None when unknown.
    """

    num_classes: Optional[int]
    label_names: Optional[List[str]]
    preprocessing: Optional[Dict[str, Any]]
    base_checkpoint: Optional[str]


def real_label_names(model: torch.nn.Module) -> Optional[List[str]]:
    """``label_names(model)`` when they are real names (the model's own, or its checkpoint's for a
    matching head); None where ``label_names`` would make up ``class_0``, ``class_1``, ..."""
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Linear):
        return None
    own = getattr(model, "label_names", None)
    ckpt = getattr(model, "checkpoint", None)
    # Any entry-like object may be attached (``create`` attaches a Checkpoint); only a matching head inherits.
    matches = getattr(ckpt, "num_classes", None) == head.out_features
    inherited = getattr(ckpt, "label_names", None) if matches else None
    names = own if own is not None else inherited
    if names is None or len(names) != head.out_features:
        return None
    return [str(x) for x in names]


def describe_model(model: torch.nn.Module) -> Dict[str, str]:
    """The description metadata ``save_checkpoint`` writes for ``model`` (safetensors metadata is str -> str,
    so lists and objects are JSON). Preprocessing is written only for a model that carries its checkpoint
    entry: for a bare ``ConvNeXtV2`` it would be a guess, and a guess read back later looks like a fact."""
    meta: Dict[str, str] = arch_metadata(model)
    names = real_label_names(model)
    if names is not None:
        meta["label_names"] = json.dumps(names)
    ckpt = getattr(model, "checkpoint", None)
    if isinstance(ckpt, Checkpoint):
        meta["preprocessing"] = json.dumps({k: getattr(ckpt, k) for k in PREPROCESSING_FIELDS})
    base = base_checkpoint_of(model)
    if base:
        meta["base_checkpoint"] = base
    return meta


def arch_metadata(model: torch.nn.Module) -> Dict[str, str]:
    """``{"arch": JSON}`` for a model (or an FCMAE's encoder) with non-default architecture switches, else {}."""
    options = model.arch_options() if hasattr(model, "arch_options") else {}
    return {ARCH_KEY: json.dumps(options, sort_keys=True)} if options else {}


def read_arch(source: Source) -> Optional[Dict[str, Any]]:
    """The architecture switches a safetensors file of ours (or an FCMAE file) was saved with: {} for the
    released architecture; None for anything else (other formats do not say, and load by their keys)."""
    if isinstance(source, Mapping) or not Path(source).is_file() or not is_safetensors(source):
        return None
    meta = read_metadata(source)
    if not str(meta.get("format", "")).startswith("convnextv2_hub"):
        return None
    if ARCH_KEY not in meta:
        return {}
    try:
        options = json.loads(meta[ARCH_KEY])
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise CheckpointError(f"checkpoint {describe_source(source)}: metadata {ARCH_KEY!r} is not a JSON object "
                              f"({meta[ARCH_KEY][:80]!r}); it must hold the model's architecture switches")
    return options


def base_checkpoint_of(model: torch.nn.Module) -> Optional[str]:
    """The released checkpoint ``model``'s weights descend from, None when there is none or it is unknown.

    ``model.base_checkpoint`` when set (by the file it was loaded from, or by the trainer, which knows where a
    run started: None for random weights); else None for weights read from a file that does not say
    (``model.weights_file``: a timm or authors' file, an older file of ours); else the name of the checkpoint
    entry ``create`` attached."""
    if hasattr(model, "base_checkpoint"):
        return model.base_checkpoint
    if getattr(model, "weights_file", None):
        return None
    ckpt = getattr(model, "checkpoint", None)
    return ckpt.name if isinstance(ckpt, Checkpoint) else None


def checkpoint_variant(source: Source, from_tensors: bool = True) -> Optional[str]:
    """The variant (atto ... huge) a checkpoint holds: the one a file of ours states (a classifier's
    ``variant``, an FCMAE file's ``config``), else (``from_tensors``: which reads every tensor) the one its
    stage widths and depths match; None when neither tells (a custom size). Raises ``CheckpointError`` for
    a file that cannot be read."""
    if not isinstance(source, Mapping) and Path(source).is_file() and is_safetensors(source):
        meta = read_metadata(source)
        stated = meta.get("variant")
        if stated is None and "config" in meta:  # FCMAE.save: the hyper-parameters as one JSON object
            with contextlib.suppress(ValueError, AttributeError):
                stated = json.loads(meta["config"]).get("variant")
        if stated in VARIANTS:
            return str(stated)
    if not from_tensors:
        return None
    dims, depths = stage_layout(to_ours(read_state_dict(source)))
    return variant_of(depths, dims) if dims and depths else None


def read_description(source: Source) -> Optional[CheckpointDescription]:
    """The description a safetensors file of ours holds; None for anything else (a folder, a ``.pt`` file,
    a state dict, timm's or HF's files), which then loads exactly as a plain state dict."""
    if isinstance(source, Mapping) or not Path(source).is_file() or not is_safetensors(source):
        return None
    meta = read_metadata(source)
    if meta.get("format") != "convnextv2_hub":
        return None
    n = int(meta["num_classes"]) if meta.get("num_classes", "").isdigit() else 0
    names = _json_entry(meta, "label_names", list, source)
    if names is not None and len(names) != n:
        _ignored(source, "label_names", f"{len(names)} names for a {n}-class head")
        names = None
    prep = _json_entry(meta, "preprocessing", dict, source)
    if prep is not None and set(prep) != set(PREPROCESSING_FIELDS):
        _ignored(source, "preprocessing", f"it must hold exactly {list(PREPROCESSING_FIELDS)}")
        prep = None
    return CheckpointDescription(n if n > 0 else None, [str(x) for x in names] if names is not None else None,
                                 prep, meta.get("base_checkpoint"))


def _json_entry(meta: Mapping[str, str], key: str, kind: type, source: Source) -> Any:
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = None
    if not isinstance(value, kind):
        _ignored(source, key, f"not a JSON {kind.__name__}")
        return None
    return value


def _ignored(source: Source, key: str, why: str) -> None:
    # Files written before the description may hold a user's entry of that name: they keep loading as they
    # did (weights only), and the warning says why the entry did not describe the model.
    warnings.warn(f"checkpoint {describe_source(source)}: metadata {key!r} is ignored ({why})", stacklevel=3)


def described_num_classes(source: Source) -> Optional[int]:
    """The head size ``source`` says it has, when it is a file of ours with a head; None otherwise."""
    description = read_description(source)
    return description.num_classes if description is not None else None


def apply_description(model: torch.nn.Module, description: CheckpointDescription, head_kept: bool = False) -> None:
    """Give ``model`` what ``description`` says about the weights just loaded into it.

    ``label_names`` only when the file's head was loaded (``head_kept`` False and the sizes agree): a
    fresh head has no classes yet. ``model.checkpoint``: the base entry (``base_checkpoint`` when the
    manifest knows it, else the model's own entry) with the stored preprocessing and the model's class
    count, so ``model.checkpoint.transforms()`` prepares images as the weights expect.
    """
    head = getattr(model, "head", None)
    n = head.out_features if isinstance(head, torch.nn.Linear) else 0
    model.base_checkpoint = description.base_checkpoint  # None: the file names none (random start, or unknown)
    if description.label_names is not None and not head_kept and len(description.label_names) == n:
        model.label_names = list(description.label_names)
    if description.preprocessing is None:
        return
    base = _known_checkpoint(description.base_checkpoint)
    if base is None or base.variant != getattr(model, "variant", None):
        # An entry of another size would misdescribe the model (its variant, its download): keep the model's.
        base = preprocessing_of(model)
    prep = dict(description.preprocessing)
    prep["mean"], prep["std"] = tuple(prep["mean"]), tuple(prep["std"])
    model.checkpoint = dataclasses.replace(base, num_classes=n, **prep)


def _known_checkpoint(name: Optional[str]) -> Optional[Checkpoint]:
    if not name:
        return None
    try:
        return get_checkpoint(name)
    except (KeyError, ValueError):  # a name from a newer manifest, or edited by hand: fall back to the model's
        return None


def is_convnextv2(model: Any) -> bool:
    """Whether ``model`` is a ``ConvNeXtV2`` (or a subclass), told by its class's lineage: this module cannot
    import the class (``models.convnextv2`` reaches this module through its Hub methods)."""
    return any(c.__name__ == "ConvNeXtV2" and c.__module__ == "convnextv2_hub.models.convnextv2"
               for c in type(model).__mro__)


def _check_writable(model: torch.nn.Module, fmt: str) -> None:
    """Refuse, saying what and why, a model the peer format ``fmt`` cannot hold."""
    if not is_convnextv2(model):
        if hasattr(model, "encoder") and hasattr(model, "decoder"):
            raise ValueError(
                f"an FCMAE model cannot be saved as {fmt}: its decoder, projection and mask token exist only in "
                f"our format (format='ours' keeps them). The {fmt} format holds the encoder: save model.encoder")
        raise TypeError(f"save_checkpoint writes a ConvNeXtV2, got {type(model).__name__}")
    options = model.arch_options()
    if options and not (fmt == "authors" and options == {"block": "v1"}):
        # The authors' {"model": sd} layout of a V1 model is exactly the ConvNeXt V1 repository's files.
        raise ValueError(
            f"a model with architecture switches {options} cannot be saved as {fmt}: that format's loaders build the "
            "released ConvNeXt V2 and have no place for the switches. Save it with format='ours', which stores them"
            + (" (format='authors' writes a block='v1' model as the ConvNeXt V1 repository's files)" if "block" in options else ""))
    if model.features_only and fmt in ("timm", "hf"):
        raise ValueError(
            f"a features_only model has no final LayerNorm, which every {fmt} ConvNeXt V2 has: create the model "
            f"without features_only (the same weights) and save that; {fmt} gives the stage maps itself "
            "(timm: features_only=True, transformers: output_hidden_states=True)")


def _variant_name(model: ConvNeXtV2, fmt: str) -> str:
    name = getattr(model, "variant", None) or variant_of(model.depths, model.dims)
    if name is None:
        raise ValueError(
            f"{fmt} builds ConvNeXt V2 only in its named sizes (atto ... huge) and this model's (depths "
            f"{list(model.depths)}, dims {list(model.dims)}) is none of them; format 'hf' or 'authors' holds any size")
    return name


def preprocessing_of(model: torch.nn.Module) -> Checkpoint:
    """The checkpoint entry whose preprocessing ``model`` expects: ``model.checkpoint``, else its
    variant's default checkpoint (what ``create`` attaches), else the 224-px default ``atto`` entry's."""
    ckpt = getattr(model, "checkpoint", None)
    if ckpt is not None:
        return ckpt
    name = getattr(model, "variant", None) or variant_of(getattr(model, "depths", ()), getattr(model, "dims", ()))
    return get_checkpoint(name or "atto")


def _save_hf_folder(model: ConvNeXtV2, sd: Dict[str, Tensor], path: Path) -> None:
    ck = preprocessing_of(model)
    # Built before anything is written: a preprocessing HF cannot express refuses the save, not half of it.
    processor = hf_preprocessor_config(ck.resolution, ck.crop_pct, ck.crop_mode, ck.interpolation, ck.mean, ck.std)
    has_head = isinstance(model.head, torch.nn.Linear)
    in_chans = int(sd["downsample_layers.0.0.weight"].shape[1])
    config = hf_model_config(model.depths, model.dims, label_names(model) if has_head else None, in_chans,
                             ck.resolution)
    tensors = to_hf(sd)
    if not has_head:  # ConvNextV2Model's own keys, as its save_pretrained writes them
        tensors = {k[len("convnextv2."):] if k.startswith("convnextv2.") else k: v for k, v in tensors.items()}
    with atomic_folder(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, obj in (("config.json", config), ("preprocessor_config.json", processor)):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def timm_load_hint(path: PathLike, variant: str, num_classes: int) -> str:
    """The timm call that loads a ``format='timm'`` file with its head. ``num_classes`` goes into the
    overlay too: timm drops a file's classifier whose size differs from its default config's (1000)."""
    return (f"timm.create_model('convnextv2_{variant}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes={num_classes}), num_classes={num_classes})")


__all__ = [
    "CheckpointDescription",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DESCRIPTION_KEYS",
    "FORMATS",
    "LoadReport",
    "SAVE_FORMATS",
    "PREPROCESSING_FIELDS",
    "ARCH_KEY",
    "apply_description",
    "arch_metadata",
    "base_checkpoint_of",
    "checkpoint_variant",
    "describe_model",
    "described_num_classes",
    "detect_format",
    "load_checkpoint",
    "preprocessing_of",
    "read_arch",
    "read_description",
    "read_metadata",
    "real_label_names",
    "read_state_dict",
    "save_checkpoint",
    "split_fcmae_sparse",
    "timm_load_hint",
    "to_authors_sparse",
    "to_hf",
    "to_ours",
    "to_timm",
]
