"""A Hub model repo of this package, as a folder: what ``convnextv2 push`` uploads and ``create("hf-hub:...")``
reads back.

::

    model.safetensors              our weights, self-described (variant, head, labels, preprocessing)
    config.json                    the model (variant, sizes, head, labels, preprocessing) and the weights' sha256
    README.md                      the model card (``checkpoints.model_card``)
    timm/model.safetensors         (format "timm") timm's layout: timm.create_model(..., pretrained_cfg_overlay=dict(file=...))
    hf/{config.json, model.safetensors, preprocessor_config.json}
                                   (format "hf") transformers' from_pretrained(repo, subfolder="hf")

The peers' files live in subfolders because each wants its own ``config.json`` / ``model.safetensors`` at
its root. ``write_hub_folder`` writes everything into a temporary folder that is renamed into place when
complete; ``read_hub_config`` and ``check_weights`` refuse a config.json that is not ours or weights that
are not the ones it states.
"""
from __future__ import annotations

import json
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..files import PathLike, atomic_folder
from .download import sha256_file
from .io import PREPROCESSING_FIELDS, preprocessing_of, read_description, real_label_names, save_checkpoint
from .model_card import LIBRARY_NAME, CardInfo, render_card
from .reading import CheckpointError, read_metadata
from .registry import Checkpoint, get_checkpoint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
CONFIG_FORMAT = "convnextv2_hub.hub/1"
PUSH_FORMATS = ("ours", "timm", "hf")
PEER_PATHS = {"timm": "timm/model.safetensors", "hf": "hf"}  # where each peer's files go in the repo


@dataclass(frozen=True)
class HubConfig:
    """A repo's ``config.json``, checked: what to build and which weights belong to it."""

    variant: str
    depths: List[int]
    dims: List[int]
    in_chans: int
    num_classes: int
    label_names: Optional[List[str]]
    preprocessing: Dict[str, Any]
    weights_file: str
    weights_sha256: str
    raw: Dict[str, Any]
    arch: Dict[str, Any] = field(default_factory=dict)  # the model's ablation switches ({}: released architecture)

    def entry(self, name: str, repo_id: Optional[str] = None) -> Checkpoint:
        """A checkpoint entry for ``model.checkpoint``: this repo's name, head and preprocessing (no published
        numbers: those of the base entry describe other weights)."""
        prep = dict(self.preprocessing)
        prep["mean"], prep["std"] = tuple(prep["mean"]), tuple(prep["std"])
        meta = {k: self.raw[k] for k in ("license", "base_checkpoint") if self.raw.get(k)}
        return replace(get_checkpoint(self.variant), name=name, tag="", num_classes=self.num_classes,
                       hf_hub_id=repo_id or "", hf_hub_filename=self.weights_file, url="",
                       sha256=self.weights_sha256, meta=types.MappingProxyType(meta), **prep)


def hub_config(model: torch.nn.Module, weights: Path, peers: Sequence[str], license: str,
               base_checkpoint: Optional[str]) -> Dict[str, Any]:
    """``config.json`` of a repo holding ``model`` whose weights file is ``weights``."""
    variant = getattr(model, "variant", None)
    if not variant:
        raise ValueError("the Hub layout holds the named ConvNeXt V2 sizes (atto ... huge); this model has none "
                         f"(depths {list(model.depths)}, dims {list(model.dims)})")
    ck = preprocessing_of(model)
    head = getattr(model, "head", None)
    return {
        "library_name": LIBRARY_NAME,
        "format": CONFIG_FORMAT,
        "variant": variant,
        "depths": [int(d) for d in model.depths],
        "dims": [int(d) for d in model.dims],
        "in_chans": int(model.downsample_layers[0][0].in_channels),
        "arch": model.arch_options(),
        "num_classes": head.out_features if isinstance(head, torch.nn.Linear) else 0,
        "label_names": real_label_names(model),
        "preprocessing": {k: getattr(ck, k) for k in PREPROCESSING_FIELDS},
        "license": license,
        "base_checkpoint": base_checkpoint,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), "size": weights.stat().st_size},
        "peer_formats": {fmt: PEER_PATHS[fmt] for fmt in peers},
    }


def parse_formats(formats: Sequence[str]) -> List[str]:
    """The peer formats of a push (``"ours"`` is always written); unknown names are refused."""
    unknown = [f for f in formats if f not in PUSH_FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; a push writes {list(PUSH_FORMATS)} (ours always)")
    return [f for f in PUSH_FORMATS if f != "ours" and f in formats]


def write_hub_folder(model: torch.nn.Module, out: PathLike, info: CardInfo, formats: Sequence[str] = ("ours",),
                     base_checkpoint: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the repo folder for ``model`` at ``out`` (atomically: a temporary folder renamed when complete).

    ``formats``: ``"ours"`` (always) plus ``"timm"`` and ``"hf"`` in their subfolders. An existing ``out`` is
    refused unless ``overwrite``, and even then unless it is empty or a repo folder of ours (its other files
    would be lost). Everything that can fail (a format that cannot hold the model) fails before ``out`` is
    touched.
    """
    out = Path(out)
    peers = parse_formats(formats)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} already exists; choose a new folder or remove it first")
        if not (_is_ours(out / CONFIG_FILE) or (out.is_dir() and not any(out.iterdir()))):
            raise FileExistsError(f"{str(out)!r} holds files other than a model of ours, which replacing it would "
                                  "lose; choose a new folder")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist; create it first")
    model = model.eval()
    with atomic_folder(out) as tmp:
        weights = save_checkpoint(model, tmp / WEIGHTS_FILE)
        if "timm" in peers:
            (tmp / "timm").mkdir()
            save_checkpoint(model, tmp / PEER_PATHS["timm"], format="timm")
        if "hf" in peers:
            save_checkpoint(model, tmp / PEER_PATHS["hf"], format="hf")
        config = hub_config(model, weights, peers, info.license, base_checkpoint)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(render_card(config, info), encoding="utf-8")
    return out


def _is_ours(config: Path) -> bool:
    """Whether ``config`` is the config.json of a repo folder of ours."""
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == CONFIG_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_hub_config(path: PathLike, where: str) -> HubConfig:
    """The checked ``config.json`` at ``path`` (``where``: the repo or folder, for messages)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: config.json is unreadable ({exc}); push the model again") from exc
    if not isinstance(raw, dict) or raw.get("format") != CONFIG_FORMAT:
        found = (raw.get("format") or raw.get("model_type") or "no 'format'") if isinstance(raw, dict) else raw
        raise CheckpointError(
            f"{where} is not a model repo of convnextv2-hub (its config.json says {found!r}, expected format "
            f"{CONFIG_FORMAT!r}). Models published with `convnextv2 push` load this way; for timm or transformers "
            "repos use those libraries, or download the weights and pass checkpoint_path=")
    try:
        weights = raw["weights"]
        prep = raw["preprocessing"]
        if set(prep) != set(PREPROCESSING_FIELDS):
            raise KeyError(f"preprocessing {sorted(prep)}")
        return HubConfig(str(raw["variant"]), [int(d) for d in raw["depths"]], [int(d) for d in raw["dims"]],
                         int(raw["in_chans"]), int(raw["num_classes"]), raw.get("label_names"), dict(prep),
                         str(weights["file"]), str(weights["sha256"]).lower(), raw, dict(raw.get("arch") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: config.json lacks or mangles {exc}; push the model again") from exc


def check_weights(config: HubConfig, weights: PathLike, where: str, hashed: bool = False) -> None:
    """Refuse weights that are not the ones ``config`` states: another sha256 (unless ``hashed``: already
    checked against it), or a description (variant, head, labels) that disagrees with it."""
    if not hashed:
        actual = sha256_file(weights)
        if actual != config.weights_sha256:
            raise CheckpointError(
                f"{where}: {config.weights_file} is not the file its config.json states (sha256 {actual}, config.json: "
                f"{config.weights_sha256}); the two come from different pushes, or one was edited. Push the model again")
    description = read_description(weights)
    disagree = []
    if description is None:
        disagree.append("the weights do not describe themselves (not written by convnextv2-hub)")
    else:
        variant = read_metadata(weights).get("variant")
        if variant != config.variant:
            disagree.append(f"variant {variant!r} vs {config.variant!r}")
        if (description.num_classes or 0) != config.num_classes:
            disagree.append(f"{description.num_classes or 0} classes vs {config.num_classes}")
        if description.label_names != config.label_names:
            disagree.append("label names")
    if disagree:
        raise CheckpointError(f"{where}: config.json and {config.weights_file} disagree ({'; '.join(disagree)}); "
                              "push the model again")


__all__ = ["CARD_FILE", "CONFIG_FILE", "CONFIG_FORMAT", "PEER_PATHS", "PUSH_FORMATS", "WEIGHTS_FILE", "HubConfig",
           "check_weights", "hub_config", "parse_formats", "read_hub_config", "write_hub_folder"]
