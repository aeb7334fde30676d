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
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .atomic import atomic_path
from .model import ConvNeXtV2
from .variants import VARIANTS, get_variant

PathLike = Union[str, os.PathLike]
Source = Union[str, os.PathLike, Mapping[str, Tensor]]

FORMATS = ("convnextv2_hub", "fcmae_dense", "fcmae_sparse", "timm", "hf")

# Wrapper keys of training checkpoints, in the order they win. EMA first: the authors' released
# numbers are EMA weights and timm's ``load_checkpoint(use_ema=True)`` prefers them too. To load the
# raw weights of a file that has both, pass ``torch.load(...)['model']`` (a Mapping) instead.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")

# Top-level names of the FCMAE decoder side (authors' fcmae.py); never part of the encoder.
FCMAE_DECODER_NAMES = ("proj", "mask_token", "decoder", "pred")

_CONV_MLP_VARIANTS = ("atto", "femto", "pico", "nano")  # timm builds these with 1x1-conv MLPs
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path that does not exist (catchable as CheckpointError and as FileNotFoundError)."""


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
# Reading
# ------------------------------------------------------------------------------------------------
def read_state_dict(source: Source) -> Dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` dict from a file, a folder or a Mapping.

    * ``.safetensors`` (or any file with a safetensors header): ``safetensors.torch.load_file``.
    * anything else: ``torch.load(weights_only=True, map_location='cpu')`` (zip or legacy pickle).
    * a folder: an HF ``save_pretrained`` folder (``model.safetensors`` preferred over
      ``pytorch_model.bin``, sharded ``*.index.json`` too), else the single checkpoint file in it.
    * a Mapping: used as is.

    Wrappers are unwrapped, EMA first: ``state_dict_ema`` > ``model_ema`` > ``state_dict`` > ``model``;
    a ``module.`` prefix on every key (DistributedDataParallel) is removed. The input is not modified.
    """
    if isinstance(source, Mapping):
        obj: object = source
        where = _describe(source)
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
        if path.is_dir():
            return _read_dir(path)
        obj = _read_file(path)
        where = str(path)
    return _unwrap(obj, where)


def _describe(source: Source) -> str:
    if isinstance(source, Mapping):
        return f"<in-memory dict with {len(source)} entries>"
    return str(source)


def _read_dir(path: Path) -> Dict[str, Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            return _read_sharded(index)
    for name in ("model.safetensors", "pytorch_model.bin"):  # HF's own preference order
        if (path / name).is_file():
            return _unwrap(_read_file(path / name), str(path / name))
    candidates = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
    )
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise CheckpointError(
            f"folder {str(path)!r} holds {len(candidates)} checkpoint files ({found}); expected an HF "
            "save_pretrained folder (model.safetensors or pytorch_model.bin) or exactly one "
            ".safetensors/.pt/.pth/.bin file: pass the file path itself"
        )
    return _unwrap(_read_file(candidates[0]), str(candidates[0]))


def _read_sharded(index: Path) -> Dict[str, Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(index)!r} is not a valid sharded-checkpoint index ({e}); re-download it") from e
    out: Dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointNotFoundError(f"shard {shard!r} listed in {str(index)!r} is missing; re-download it")
        out.update(_unwrap(_read_file(shard_path), str(shard_path)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"shards of {str(index)!r} lack {len(missing)} indexed tensors, e.g. {missing[:_MAX_LISTED]}")
    return out


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= size - 8


def _read_file(path: Path) -> object:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the download or save was interrupted; fetch or save it again")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError has no public base class to catch
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); it is truncated or "
                "corrupt: download or save it again"
            ) from e
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":  # torch zip format or a protocol>=2 pickle
        return _torch_load(path)
    raise CheckpointError(
        f"checkpoint {str(path)!r} is neither a PyTorch file (zip or pickle) nor a safetensors file "
        f"(it starts with {head[:8]!r}); it is corrupt or not a checkpoint: download or save it again"
    )


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # Raw protocol-4 pickles make torch warn before refusing them; our error says more.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        objects = _pickle_globals(path)
        if objects:
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it contains pickled Python code/objects that are not tensors "
                f"({', '.join(objects[:_MAX_LISTED])}). Checkpoints are read with torch.load(weights_only=True): "
                "only tensors and plain containers are loaded, nothing in the file is executed. If you trust "
                "the file, re-save its state dict as plain tensors (e.g. safetensors.torch.save_file) where it "
                "was made."
            ) from e
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a corrupt or unsupported pickle ({_first_line(e)}); download or save it again"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({_first_line(e)}); it is truncated or corrupt: "
            "download or save it again"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "error:" in line.lower() or "unsupported" in line.lower():
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


# Globals that torch's weights-only unpickler accepts; anything else named in a pickle is an object
# (or code) it refuses. Used only to word the error; the refusal itself is torch's.
_PLAIN_GLOBAL = re.compile(r"^(torch(\.|$)|collections OrderedDict$|collections\.OrderedDict$|argparse Namespace$)")


def _pickle_globals(path: Path) -> List[str]:
    """Names of the non-tensor globals a pickle would import, found by reading its opcodes.

    ``pickletools.genops`` only parses the byte stream; nothing is imported or called.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return []
                data = z.read(name)
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found: List[str] = []
    strings: List[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                found.append(arg)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]} {strings[-1]}")
    except Exception:  # a damaged stream: report what was seen before the damage
        pass
    objects = [g.replace(" ", ".") for g in dict.fromkeys(found) if not _PLAIN_GLOBAL.match(g)]
    return objects


def _unwrap(obj: object, where: str) -> Dict[str, Tensor]:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {where} holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict()"
        )
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not sd:
        keys = [str(k) for k in list(obj)[:_MAX_LISTED]]
        raise CheckpointError(
            f"checkpoint {where} contains no tensors (top-level keys: {keys}); expected a state dict, "
            f"optionally wrapped under one of {list(WRAPPER_KEYS)}"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


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

    The encoder follows the authors' ``remap_checkpoint_keys`` (§4.4): strip ``encoder.``, turn
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
def to_timm(sd_ours: Mapping[str, Tensor], variant: str) -> Dict[str, Tensor]:
    """Our layout -> timm ``convnextv2_<variant>`` (1x1-conv MLP weights for atto..nano, GRN (C,))."""
    conv_mlp = get_variant(variant).name in _CONV_MLP_VARIANTS
    out: Dict[str, Tensor] = {}
    for k, v in sd_ours.items():
        m = re.match(r"^downsample_layers\.(\d+)\.(\d+)\.(.*)$", k)
        b = re.match(r"^stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            s, j, p = m.groups()
            nk = f"stem.{j}.{p}" if s == "0" else f"stages.{s}.downsample.{j}.{p}"
        elif b:
            s, i, mod, p = b.groups()
            if mod == "grn":
                nk, v = f"stages.{s}.blocks.{i}.mlp.grn.{'weight' if p == 'gamma' else 'bias'}", v.reshape(-1)
            else:
                name = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}.get(mod, mod)
                nk = f"stages.{s}.blocks.{i}.{name}.{p}"
                if conv_mlp and mod.startswith("pwconv") and p == "weight":
                    v = v.reshape(*v.shape, 1, 1)
        elif k.startswith("norm."):
            nk = "head.norm." + k[len("norm."):]
        elif k.startswith("head."):
            nk = "head.fc." + k[len("head."):]
        else:
            nk = k
        out[nk] = v
    return out


def to_hf(sd_ours: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our layout -> transformers ``ConvNextV2ForImageClassification`` (GRN kept (1, 1, 1, C))."""
    out: Dict[str, Tensor] = {}
    for k, v in sd_ours.items():
        m = re.match(r"^downsample_layers\.(\d+)\.(\d+)\.(.*)$", k)
        b = re.match(r"^stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            s, j, p = m.groups()
            if s == "0":
                nk = f"convnextv2.embeddings.{'patch_embeddings' if j == '0' else 'layernorm'}.{p}"
            else:
                nk = f"convnextv2.encoder.stages.{s}.downsampling_layer.{j}.{p}"
        elif b:
            s, i, mod, p = b.groups()
            if mod == "grn":
                p = "weight" if p == "gamma" else "bias"
            mod = {"norm": "layernorm"}.get(mod, mod)
            nk = f"convnextv2.encoder.stages.{s}.layers.{i}.{mod}.{p}"
        elif k.startswith("norm."):
            nk = "convnextv2.layernorm." + k[len("norm."):]
        elif k.startswith("head."):
            nk = "classifier." + k[len("head."):]
        else:
            nk = k
        out[nk] = v
    return out


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
    where = _describe(source)
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


def _stage_layout(sd: Mapping[str, Tensor]) -> Tuple[Optional[Tuple[int, ...]], Optional[Tuple[int, ...]]]:
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
    dims, depths = _stage_layout(ckpt)
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
        lines += [f"    {k}: {shape(ckpt[k])} vs {shape(target[k])}" for k in mismatched[:_MAX_LISTED]]
    if missing:
        lines.append(f"  {len(missing)} missing from the checkpoint:")
        lines += [f"    {k}: model {shape(target[k])}" for k in missing[:_MAX_LISTED]]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected in the checkpoint:")
        lines += [f"    {k}: checkpoint {shape(ckpt[k])}" for k in unexpected[:_MAX_LISTED]]
    for kind, ks in (("mismatches", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if len(ks) > _MAX_LISTED:
            lines.append(f"  ({len(ks) - _MAX_LISTED} more {kind} not listed)")
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


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The safetensors metadata of ``path`` (``{}`` when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); save or download it again")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); save or download it again") from e


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
