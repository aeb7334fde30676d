"""Checkpoint layouts: recognising which of ``FORMATS`` a state dict is in, converting it to our keys and
shapes, and converting ours to timm, HF transformers and the authors' sparse FCMAE encoder (the layouts
are described in ``checkpoints.io``)."""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from .reading import CheckpointError
from ..models.variants import get_variant

FORMATS = ("convnextv2_hub", "fcmae_dense", "fcmae_sparse", "timm", "hf")
# What ``save_checkpoint`` writes: ours, or one a peer library loads with its own code.
SAVE_FORMATS = ("ours", "timm", "hf", "authors")

# transformers' ConvNextImageProcessor resizes shortest_edge / crop_pct then centre-crops below this size,
# and warps straight to (size, size) at and above it: the only two pipelines an HF folder can describe.
HF_WARP_FROM = 384
# PIL's resampling filters by number (``PIL.Image.Resampling``), which HF's ``resample`` key holds.
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

_CONV_MLP_VARIANTS = ("atto", "femto", "pico", "nano")  # timm builds these with 1x1-conv MLPs


# ------------------------------------------------------------------------------------------------
# Format detection and conversion to our layout
# ------------------------------------------------------------------------------------------------
def detect_format(sd: Mapping[str, Tensor]) -> str:
    """One of ``FORMATS``; raises ``CheckpointError`` listing a few keys when none fits."""
    keys = list(sd)
    if any(k.startswith(("convnextv2.", "embeddings.patch_embeddings.")) for k in keys) or "classifier.weight" in sd:
        return "hf"  # checked before fcmae: HF's base model also has encoder.stages.* keys
    if any(k.startswith(("encoder.downsample_layers.", "encoder.stages.")) for k in keys):
        return "fcmae_sparse"
    if "stem.0.weight" in sd or any(re.match(r"stages\.\d+\.blocks\.\d+\.", k) for k in keys):
        return "timm"
    if "downsample_layers.0.0.weight" in sd or any(re.match(r"stages\.\d+\.\d+\.dwconv\.", k) for k in keys):
        if any(k.startswith(("norm.", "head.")) for k in keys):
            return "convnextv2_hub"
        return "fcmae_dense"
    raise CheckpointError(
        f"unrecognised checkpoint layout ({len(keys)} tensors, e.g. {keys[:8]}); expected one of {list(FORMATS)}: "
        "ConvNeXt V2 weights from the authors, timm or HF transformers"
    )


def is_v1_layout(sd_ours: Mapping[str, Tensor]) -> bool:
    """Whether a state dict in our layout holds ConvNeXt V1 blocks (LayerScale ``stages.s.b.gamma``)."""
    return any(re.match(r"^stages\.\d+\.\d+\.gamma$", k) for k in sd_ours)


def to_ours(sd: Mapping[str, Tensor], fmt: Optional[str] = None) -> Dict[str, Tensor]:
    """Convert a state dict of any of ``FORMATS`` to our key layout and shapes (new dict; input untouched).

    Keys a format does not know are passed through unchanged, so a load reports them as unexpected.
    For ``fcmae_sparse`` the decoder side is dropped (``split_fcmae_sparse`` returns it).
    """
    fmt = fmt or detect_format(sd)
    if fmt in ("convnextv2_hub", "fcmae_dense"):
        out = dict(sd)
    elif fmt == "timm":
        out = {_timm_key(k): v for k, v in sd.items()}
    elif fmt == "hf":
        out = {_hf_key(k): v for k, v in sd.items()}
    elif fmt == "fcmae_sparse":
        return split_fcmae_sparse(sd)[0]
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    return _normalise_shapes(out)


def split_fcmae_sparse(sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Split an authors' FCMAE pre-training state dict into (encoder in our layout, everything else).

    The encoder follows the authors' ``remap_checkpoint_keys``: strip ``encoder.``, turn
    Minkowski ``kernel`` tensors into conv weights, drop the ``.ln.``/``.linear.`` wrappers, flatten
    (1, C) biases, GRN to (1, 1, 1, C). Dense encoder tensors pass through the same rules unchanged.
    The rest (``proj.*``, ``mask_token``, ``decoder.*``, ``pred.*``) is returned untouched.
    """
    enc: Dict[str, Tensor] = {}
    rest: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("encoder."):
            rest[k] = v
            continue
        parts = k[len("encoder."):].split(".")
        if parts[-1] == "kernel":
            parts[-1] = "weight"
            v = _kernel_to_weight(k, v)
        if len(parts) >= 2 and parts[-2] in ("ln", "linear"):
            del parts[-2]
        enc[".".join(parts)] = v
    return _normalise_shapes(enc), rest


def _kernel_to_weight(key: str, v: Tensor) -> Tensor:
    # Minkowski kernels are (kernel_volume, in, out) or depthwise (kernel_volume, C), with the first
    # spatial offset varying fastest: hence the final swap of the two spatial axes (authors' remap).
    kv = v.shape[0]
    k = int(round(kv**0.5))
    if k * k != kv or v.ndim not in (2, 3):
        raise CheckpointError(f"sparse kernel {key!r} has shape {tuple(v.shape)}; expected (k*k, in, out) or (k*k, C)")
    if v.ndim == 3:
        _, c_in, c_out = v.shape
        return v.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(3, 2)
    return v.permute(1, 0).reshape(v.shape[1], 1, k, k).transpose(3, 2)


def _weight_to_kernel(w: Tensor) -> Tensor:
    c_out, c_in, k, _ = w.shape
    t = w.transpose(3, 2).reshape(c_out, c_in, k * k)
    if c_in == 1:  # depthwise: (C, 1, k, k) -> (k*k, C)
        return t[:, 0, :].permute(1, 0).contiguous()
    return t.permute(2, 1, 0).contiguous()


_PW_KEY = re.compile(r"^stages\.\d+\.\d+\.pwconv[12]\.weight$")


def _normalise_shapes(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """GRN -> (1, 1, 1, C); 1x1-conv MLP weights -> Linear (out, in); (1, C) biases -> (C,)."""
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.endswith(("grn.gamma", "grn.beta")):
            if v.ndim == 0 or any(d != 1 for d in v.shape[:-1]):
                raise CheckpointError(
                    f"GRN tensor {k!r} has shape {tuple(v.shape)}; expected (C,), (1, C) or (1, 1, 1, C) "
                    "with the channels last. It is not skipped (that would leave GRN at its zero init)."
                )
            v = v.reshape(1, 1, 1, v.shape[-1])
        elif _PW_KEY.match(k) and v.ndim == 4 and v.shape[2:] == (1, 1):
            v = v.reshape(v.shape[0], v.shape[1])
        elif k.endswith(".bias") and v.ndim > 1 and all(d == 1 for d in v.shape[:-1]):
            v = v.reshape(v.shape[-1])
        out[k] = v
    return out


def _timm_key(k: str) -> str:
    m = re.match(r"^stem\.([01])\.(.*)$", k)
    if m:
        return f"downsample_layers.0.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^stages\.(\d+)\.downsample\.(\d+)\.(.*)$", k)
    if m:
        return f"downsample_layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k)
    if m:
        rest = {
            "conv_dw.weight": "dwconv.weight", "conv_dw.bias": "dwconv.bias",
            "mlp.fc1.weight": "pwconv1.weight", "mlp.fc1.bias": "pwconv1.bias",
            "mlp.fc2.weight": "pwconv2.weight", "mlp.fc2.bias": "pwconv2.bias",
            "mlp.grn.weight": "grn.gamma", "mlp.grn.bias": "grn.beta",
            "norm.weight": "norm.weight", "norm.bias": "norm.bias",
            "gamma": "gamma",  # ConvNeXt V1's LayerScale (timm ``convnext_*``): our block='v1' models
        }.get(m.group(3))
        return f"stages.{m.group(1)}.{m.group(2)}.{rest}" if rest else k
    m = re.match(r"^head\.(norm|fc)\.(weight|bias)$", k)
    if m:
        return f"{'norm' if m.group(1) == 'norm' else 'head'}.{m.group(2)}"
    return k


def _hf_key(k: str) -> str:
    if k.startswith("convnextv2."):
        k = k[len("convnextv2."):]
    m = re.match(r"^embeddings\.(patch_embeddings|layernorm)\.(weight|bias)$", k)
    if m:
        return f"downsample_layers.0.{0 if m.group(1) == 'patch_embeddings' else 1}.{m.group(2)}"
    m = re.match(r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d+)\.(weight|bias)$", k)
    if m:
        return f"downsample_layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(\w+)\.(weight|bias)$", k)
    if m:
        mod, p = m.group(3), m.group(4)
        if mod == "grn":
            return f"stages.{m.group(1)}.{m.group(2)}.grn.{'gamma' if p == 'weight' else 'beta'}"
        mod = {"layernorm": "norm"}.get(mod, mod)
        return f"stages.{m.group(1)}.{m.group(2)}.{mod}.{p}"
    m = re.match(r"^layernorm\.(weight|bias)$", k)
    if m:
        return f"norm.{m.group(1)}"
    m = re.match(r"^classifier\.(weight|bias)$", k)
    if m:
        return f"head.{m.group(1)}"
    return k


# ------------------------------------------------------------------------------------------------
# Inverse converters
# ------------------------------------------------------------------------------------------------
_OURS_DOWNSAMPLE = re.compile(r"^downsample_layers\.(\d+)\.(\d+)\.(.*)$")
_OURS_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)$")


def _from_ours(
    sd_ours: Mapping[str, Tensor],
    downsample: Callable[[str, str, str], str],
    block: Callable[[str, str, str, str, Tensor], Tuple[str, Tensor]],
    norm_prefix: str,
    head_prefix: str,
) -> Dict[str, Tensor]:
    """Our layout -> a foreign one: our keys parsed once here, named by the format's callbacks
    (``downsample(stage, index, param)``, ``block(stage, block, module, param, value)``)."""
    out: Dict[str, Tensor] = {}
    for k, v in sd_ours.items():
        if m := _OURS_DOWNSAMPLE.match(k):
            nk = downsample(*m.groups())
        elif m := _OURS_BLOCK.match(k):
            nk, v = block(*m.groups(), v)
        elif k.startswith("norm."):
            nk = norm_prefix + k[len("norm."):]
        elif k.startswith("head."):
            nk = head_prefix + k[len("head."):]
        else:
            nk = k
        out[nk] = v
    return out


def to_timm(sd_ours: Mapping[str, Tensor], variant: str) -> Dict[str, Tensor]:
    """Our layout -> timm ``convnextv2_<variant>`` (1x1-conv MLP weights for atto..nano, GRN (C,))."""
    conv_mlp = get_variant(variant).name in _CONV_MLP_VARIANTS

    def block(s: str, i: str, mod: str, p: str, v: Tensor) -> Tuple[str, Tensor]:
        if mod == "grn":
            return f"stages.{s}.blocks.{i}.mlp.grn.{'weight' if p == 'gamma' else 'bias'}", v.reshape(-1)
        if conv_mlp and mod.startswith("pwconv") and p == "weight":
            v = v.reshape(*v.shape, 1, 1)
        name = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}.get(mod, mod)
        return f"stages.{s}.blocks.{i}.{name}.{p}", v

    return _from_ours(
        sd_ours,
        downsample=lambda s, j, p: f"stem.{j}.{p}" if s == "0" else f"stages.{s}.downsample.{j}.{p}",
        block=block, norm_prefix="head.norm.", head_prefix="head.fc.",
    )


def to_hf(sd_ours: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our layout -> transformers ``ConvNextV2ForImageClassification`` (GRN kept (1, 1, 1, C))."""

    def downsample(s: str, j: str, p: str) -> str:
        if s == "0":
            return f"convnextv2.embeddings.{'patch_embeddings' if j == '0' else 'layernorm'}.{p}"
        return f"convnextv2.encoder.stages.{s}.downsampling_layer.{j}.{p}"

    def block(s: str, i: str, mod: str, p: str, v: Tensor) -> Tuple[str, Tensor]:
        if mod == "grn":
            p = "weight" if p == "gamma" else "bias"
        mod = {"norm": "layernorm"}.get(mod, mod)
        return f"convnextv2.encoder.stages.{s}.layers.{i}.{mod}.{p}", v

    return _from_ours(sd_ours, downsample, block, norm_prefix="convnextv2.layernorm.", head_prefix="classifier.")


def to_authors_sparse(sd_ours: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our layout -> the encoder part of the authors' sparse FCMAE state dict (``encoder.*``).

    Inverse of ``split_fcmae_sparse``'s encoder half; ``norm.*``/``head.*`` are dropped because the
    FCMAE encoder has none.
    """
    out: Dict[str, Tensor] = {}
    for k, v in sd_ours.items():
        if k.startswith(("norm.", "head.")):
            continue
        parts = k.split(".")
        down = re.match(r"^downsample_layers\.([123])\.([01])\.(weight|bias)$", k)
        block = re.match(r"^stages\.\d+\.\d+\.(\w+)\.(\w+)$", k)
        if down and down.group(2) == "0":  # LN before a downsampling conv: MinkowskiLayerNorm.ln
            parts.insert(-1, "ln")
        elif down:  # MinkowskiConvolution: kernel (4, in, out), bias (1, out)
            if parts[-1] == "weight":
                parts[-1], v = "kernel", _weight_to_kernel(v)
            else:
                v = v.reshape(1, -1)
        elif block:
            mod = block.group(1)
            if mod == "dwconv":
                if parts[-1] == "weight":
                    parts[-1], v = "kernel", _weight_to_kernel(v)
                else:
                    v = v.reshape(1, -1)
            elif mod == "norm":
                parts.insert(-1, "ln")
            elif mod in ("pwconv1", "pwconv2"):
                parts.insert(-1, "linear")
            elif mod == "grn":
                v = v.reshape(1, -1)
        out["encoder." + ".".join(parts)] = v
    return out


# ------------------------------------------------------------------------------------------------
# HF transformers folder: config.json and preprocessor_config.json
# ------------------------------------------------------------------------------------------------
def hf_model_config(
    depths: Sequence[int],
    dims: Sequence[int],
    label_names: Optional[List[str]],
    in_chans: int = 3,
    image_size: int = 224,
) -> Dict[str, Any]:
    """``config.json`` of a transformers ConvNeXt V2: ``ConvNextV2ForImageClassification`` with
    ``label_names``' classes, or the headless ``ConvNextV2Model`` when ``label_names`` is None.

    ``layer_norm_eps`` is 1e-6, every LayerNorm of ours: HF's default 1e-12 would change the outputs.
    """
    cfg: Dict[str, Any] = {
        "architectures": ["ConvNextV2ForImageClassification" if label_names is not None else "ConvNextV2Model"],
        "model_type": "convnextv2",
        "depths": [int(d) for d in depths],
        "hidden_sizes": [int(d) for d in dims],
        "num_stages": len(depths),
        "num_channels": int(in_chans),
        "patch_size": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "image_size": int(image_size),
        "dtype": "float32",
    }
    if label_names is not None:
        cfg["id2label"] = {str(i): name for i, name in enumerate(label_names)}
        # ImageNet repeats a few names ("crane", "maillot"): the first index wins, as in HF's own configs.
        label2id: Dict[str, int] = {}
        for i, name in enumerate(label_names):
            label2id.setdefault(name, i)
        cfg["label2id"] = label2id
    return cfg


def hf_preprocessor_config(
    resolution: int,
    crop_pct: float,
    crop_mode: str,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> Dict[str, Any]:
    """``preprocessor_config.json`` for transformers' ``ConvNextImageProcessor`` doing what our
    ``eval_transform`` does with the same settings. Raises ValueError for a pipeline it cannot express:
    below ``HF_WARP_FROM`` it always centre-crops, at and above it always warps without a crop."""
    if crop_mode == "center" and resolution >= HF_WARP_FROM:
        raise ValueError(
            f"HF's ConvNextImageProcessor cannot centre-crop at {resolution} px (it warps to the square from "
            f"{HF_WARP_FROM} px on), so this checkpoint's preprocessing (crop_mode 'center') has no HF equivalent")
    if crop_mode == "squash" and (resolution < HF_WARP_FROM or crop_pct != 1.0):
        raise ValueError(
            f"HF's ConvNextImageProcessor warps without a crop only from {HF_WARP_FROM} px on, so this checkpoint's "
            f"preprocessing (crop_mode 'squash', {resolution} px, crop_pct {crop_pct}) has no HF equivalent")
    if interpolation.lower() not in _PIL_RESAMPLE:
        raise ValueError(f"interpolation {interpolation!r} has no PIL filter number for HF's 'resample'; "
                         f"expected one of {sorted(_PIL_RESAMPLE)}")
    return {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(resolution)},
        "crop_pct": float(crop_pct),
        "resample": _PIL_RESAMPLE[interpolation.lower()],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in mean],
        "image_std": [float(x) for x in std],
    }


__all__ = [
    "FORMATS", "HF_WARP_FROM", "SAVE_FORMATS", "detect_format", "is_v1_layout", "hf_model_config", "hf_preprocessor_config", "split_fcmae_sparse", "to_authors_sparse", "to_hf",
    "to_ours", "to_timm",
]
