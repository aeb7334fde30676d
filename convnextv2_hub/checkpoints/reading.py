"""Reading checkpoint files safely: a flat ``{name: tensor}`` dict from safetensors, weights-only
``torch.load`` (pickles holding Python objects are refused, never run), HF folders and shards, training
wrappers; and a safetensors file's metadata. ``checkpoints.io`` loads and saves models."""
from __future__ import annotations

import argparse
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Union

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ..files import PathLike

Source = Union[PathLike, Mapping[str, Tensor]]

# Wrapper keys of training checkpoints, in the order they win. EMA first: the authors' released
# numbers are EMA weights and timm's ``load_checkpoint(use_ema=True)`` prefers them too. To load the
# raw weights of a file that has both, pass ``torch.load(...)['model']`` (a Mapping) instead.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")

_ZIP_MAGIC = b"PK\x03\x04"
MAX_LISTED = 10  # keys named in an error message, at most, per kind of mismatch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path that does not exist (catchable as CheckpointError and as FileNotFoundError)."""


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
        where = describe_source(source)
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
        if path.is_dir():
            return _read_dir(path)
        obj = _read_file(path)
        where = str(path)
    return _unwrap(obj, where)


def describe_source(source: Source) -> str:
    """How an error message names a checkpoint source: its path, or a summary of an in-memory dict."""
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
        raise CheckpointError(f"shards of {str(index)!r} lack {len(missing)} indexed tensors, e.g. {missing[:MAX_LISTED]}")
    return out


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= size - 8


def _read_file(path: Path, mmap: bool = False) -> object:
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
        return _torch_load(path, mmap=mmap and head.startswith(_ZIP_MAGIC))  # mmap needs the zip format
    raise CheckpointError(
        f"checkpoint {str(path)!r} is neither a PyTorch file (zip or pickle) nor a safetensors file "
        f"(it starts with {head[:8]!r}); it is corrupt or not a checkpoint: download or save it again"
    )


def _torch_load(path: Path, mmap: bool = False) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # Raw protocol-4 pickles make torch warn before refusing them; our error says more.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        objects = _pickle_globals(path)
        if objects:
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it contains pickled Python code/objects that are not tensors "
                f"({', '.join(objects[:MAX_LISTED])}). Checkpoints are read with torch.load(weights_only=True): "
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
        keys = [str(k) for k in list(obj)[:MAX_LISTED]]
        raise CheckpointError(
            f"checkpoint {where} contains no tensors (top-level keys: {keys}); expected a state dict, "
            f"optionally wrapped under one of {list(WRAPPER_KEYS)}"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


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


def is_safetensors(path: PathLike) -> bool:
    """Whether the file ``path`` is a safetensors file: by its suffix, else by its header (as ``read_state_dict``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(16)
    return _looks_like_safetensors(head, path.stat().st_size)


def read_checkpoint_file(path: PathLike, mmap: bool = False) -> object:
    """What the checkpoint file ``path`` holds, not unwrapped: a safetensors file's tensors, or what
    ``torch.load(weights_only=True)`` gives (a training checkpoint keeps its ``args``, ``epoch``, ...).
    Read as ``read_state_dict`` reads a file, with its errors; ``read_state_dict`` of the result is its
    state dict. ``mmap``: a PyTorch zip file's tensors are mapped from the file (copy-on-write) and read
    from disk when used, rather than all read into memory at once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file; check the path")
    return _read_file(path, mmap)


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "WRAPPER_KEYS",
    "is_safetensors",
    "read_checkpoint_file",
    "read_metadata",
    "read_state_dict",
]
