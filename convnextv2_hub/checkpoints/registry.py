"""The checkpoint registry: every released ConvNeXt V2 checkpoint, how to fetch it, how to feed it.

One JSON file (``weights_manifest.json``) is the single source of truth, so the download code, the
converter, the CLI and the docs never disagree about a URL, a resolution or a crop. It is read lazily
and once (``functools.lru_cache``); importing this module needs neither torch nor the network.

Names are ``"<variant>.<tag>"`` (``"tiny.fcmae_ft_in1k"``), the same tags as timm. ``get_checkpoint``
also accepts the spellings users bring from elsewhere: a bare variant (its default tag), timm names
(``convnextv2_tiny.fcmae``, ``timm/convnextv2_tiny.fcmae``), HF transformers repo ids
(``facebook/convnextv2-tiny-22k-384``) and the authors' file names (``convnextv2_tiny_1k_224_ema.pt``).
"""
from __future__ import annotations

import difflib
import functools
import json
import re
import types
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..models.variants import VARIANTS

_MANIFEST_NAME = "weights_manifest.json"
_CLASSES_RESOURCE = ("data", "imagenet_classes.txt")
_WNIDS_RESOURCE = ("data", "imagenet_wnids.txt")

# Listing order of tags within a variant: pre-training first, then fine-tunes by data and resolution.
_TAG_ORDER = (
    "fcmae",
    "fcmae_ft_in1k",
    "fcmae_ft_in22k_in1k",
    "fcmae_ft_in22k_in1k_384",
    "fcmae_ft_in22k_in1k_512",
)
# Top-level manifest keys that are not checkpoints.
_RESERVED_KEYS = ("_comment", "defaults")

# HF transformers ids: their converter names im22k files "-22k-" although their heads are IN-1K,
# so "-22k-<res>" means tag fcmae_ft_in22k_in1k[_<res>].
_HF_RE = re.compile(r"^(?:facebook/)?convnextv2-([a-z]+)-(1k|22k)-(\d+)$")
# The authors' release file names (pt_only/..._1k_224_fcmae.pt, im1k/..._1k_224_ema.pt, im22k/..._22k_384_ema.pt).
_AUTHORS_RE = re.compile(r"^(?:.*/)?convnextv2_([a-z]+)_(1k|22k)_(\d+)_(ema|fcmae)(?:\.pt|\.pth)?$")
_TIMM_PREFIXES = ("hf-hub:", "hf_hub:", "timm/", "convnextv2_", "convnextv2-")


@dataclass(frozen=True)
class Checkpoint:
    """One released checkpoint: where its weights live and the exact preprocessing it was evaluated with.

    The preprocessing fields are part of the checkpoint, not of the architecture, because the same
    variant is published at 224 (resize 256 + centre crop) and at 384/512 (squash resize): feeding a
    384 checkpoint a 224 centre crop silently costs accuracy.
    """

    name: str
    variant: str
    tag: str
    resolution: int
    num_classes: int
    hf_hub_id: str
    hf_hub_filename: str
    hf_format: str
    url: str
    sha256: Optional[str]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    # top1, top5, top1_paper, params, gmacs, gmacs_paper, license, paper_table, pretraining, timm_name,
    # hf_transformers_id. Read-only so that one caller cannot change what the next one sees.
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    # A frozen entry is a value: copies share it, and pickling stores a plain dict for ``meta``
    # (a MappingProxyType cannot be pickled), so models holding one can be deep-copied and saved.
    def __deepcopy__(self, memo: Dict[int, Any]) -> "Checkpoint":
        return self

    def __reduce__(self) -> Tuple[Any, ...]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["meta"] = dict(self.meta)
        return (_rebuild_checkpoint, (values,))

    @property
    def timm_name(self) -> str:
        """The same checkpoint's timm model name (``convnextv2_<variant>.<tag>``)."""
        return f"convnextv2_{self.variant}.{self.tag}"

    def transforms(self, train: bool = False) -> Callable[[Any], Any]:
        """The image -> tensor transform this checkpoint expects (eval by default)."""
        from ..preprocessing import transforms  # torchvision is imported only when a transform is needed

        if train:
            return transforms.train_transform(self.resolution, self.interpolation, self.mean, self.std)
        return transforms.eval_transform(self.resolution, self.crop_pct, self.crop_mode, self.interpolation,
                                         self.mean, self.std)

    @property
    def label_names(self) -> Optional[List[str]]:
        """ImageNet-1K class names for 1000-class heads; None for encoders (no head) and other heads."""
        return imagenet_class_names() if self.num_classes == 1000 else None


def _rebuild_checkpoint(values: Dict[str, Any]) -> Checkpoint:
    return Checkpoint(**{**values, "meta": types.MappingProxyType(dict(values["meta"]))})


def _read_package_text(*parts: str) -> Optional[str]:
    try:
        return resources.files("convnextv2_hub").joinpath(*parts).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None


@functools.lru_cache(maxsize=None)
def _manifest_json() -> Dict[str, Any]:
    """Parse the manifest once.

    The package copy (``convnextv2_hub/weights_manifest.json``) is a symlink to the repo-top file in
    the source tree; setuptools dereferences it when it builds a wheel, so installed packages hold a
    real file. Where a checkout cannot create symlinks (git on Windows without ``core.symlinks``), the
    package copy is a one-line text file holding the link target, which is not JSON: then, and when the
    package copy is missing, read the repo-top file next to the package directory instead.
    """
    text = _read_package_text(_MANIFEST_NAME)
    if text is not None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    top = Path(__file__).resolve().parents[2] / _MANIFEST_NAME
    try:
        return json.loads(top.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeError(
            f"{_MANIFEST_NAME} is missing from the convnextv2_hub package and from {top.parent}; "
            "the installation is incomplete, reinstall convnextv2-hub"
        ) from None


def _tag_rank(tag: str) -> int:
    return _TAG_ORDER.index(tag) if tag in _TAG_ORDER else len(_TAG_ORDER)


@functools.lru_cache(maxsize=None)
def _registry() -> Tuple[Dict[str, Checkpoint], Dict[str, str]]:
    raw = _manifest_json()
    variant_rank = {v: i for i, v in enumerate(VARIANTS)}
    entries: List[Checkpoint] = []
    for key, e in raw.items():
        if key in _RESERVED_KEYS:
            continue
        # A hand-edited manifest must not yield a name that resolves to the wrong weights.
        if key != f"{e['variant']}.{e['tag']}" or e["variant"] not in VARIANTS:
            raise RuntimeError(f"{_MANIFEST_NAME}: entry {key!r} does not match its variant/tag or names no known variant")
        fields = {k: e[k] for k in Checkpoint.__dataclass_fields__ if k not in ("name", "meta", "mean", "std")}
        meta = {k: v for k, v in e.items() if k not in Checkpoint.__dataclass_fields__}
        entries.append(
            Checkpoint(
                name=key,
                mean=tuple(float(x) for x in e["mean"]),  # type: ignore[arg-type]
                std=tuple(float(x) for x in e["std"]),  # type: ignore[arg-type]
                meta=types.MappingProxyType(meta),
                **fields,
            )
        )
    entries.sort(key=lambda c: (variant_rank[c.variant], _tag_rank(c.tag), c.tag))
    checkpoints = {c.name: c for c in entries}
    defaults = dict(raw["defaults"])
    for variant, tag in defaults.items():
        if f"{variant}.{tag}" not in checkpoints:
            raise RuntimeError(f"{_MANIFEST_NAME}: default tag {tag!r} of {variant!r} has no entry")
    return checkpoints, defaults


def load_manifest() -> Dict[str, Checkpoint]:
    """All checkpoints by name, in listing order (variant size, then tag). A fresh dict per call."""
    return dict(_registry()[0])


def list_models() -> List[str]:
    """Variant names that have checkpoints, smallest first."""
    have = {c.variant for c in _registry()[0].values()}
    return [v for v in VARIANTS if v in have]


def list_checkpoints(variant: Optional[str] = None) -> List[str]:
    """Checkpoint names, all or one variant's (any accepted spelling of a variant works)."""
    checkpoints = _registry()[0]
    if variant is None:
        return list(checkpoints)
    v, tag = parse_model_name(variant)
    if tag is not None:
        raise ValueError(f"list_checkpoints() takes a variant name, got the checkpoint name {variant!r}")
    return [name for name, c in checkpoints.items() if c.variant == v]


def default_tag(variant: str) -> str:
    """The tag a bare variant name resolves to: the best 224-px classifier, or huge's 384 one (no huge 224 IN-22K release)."""
    v, tag = parse_model_name(variant)
    if tag is not None:
        raise ValueError(f"default_tag() takes a variant name, got the checkpoint name {variant!r}")
    return _registry()[1][v]


def _unknown(name: str, detail: str = "") -> ValueError:
    checkpoints = _registry()[0]
    candidates = list(list_models()) + list(checkpoints)
    key = _strip_prefixes(name.strip().lower())
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"unknown ConvNeXt V2 model name {name!r}.{detail}{hint} "
        "Call convnextv2_hub.list_checkpoints() for every checkpoint name."
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _TIMM_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _resolution_tag(name: str, variant: str, data: str, res: int) -> str:
    if data == "1k":
        tag = "fcmae_ft_in1k" if res == 224 else ""
    else:
        tag = "fcmae_ft_in22k_in1k" + ("" if res == 224 else f"_{res}")
    if not tag or f"{variant}.{tag}" not in _registry()[0]:
        raise _unknown(name, f" No {variant} checkpoint fine-tuned on ImageNet-{data.upper()} at {res} px was released.")
    return tag


def parse_model_name(name: str) -> Tuple[str, Optional[str]]:
    """Split any accepted spelling into ``(variant, tag)``; tag is None when the name gives none.

    Raises ValueError, with close names suggested, for anything that is not a released checkpoint,
    so that a typo fails here instead of as a 404 in the middle of a download.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    checkpoints = _registry()[0]
    key = name.strip().lower()

    m = _HF_RE.match(key)
    if m and m.group(1) in VARIANTS:
        variant, data, res = m.group(1), m.group(2), int(m.group(3))
        return variant, _resolution_tag(name, variant, data, res)
    m = _AUTHORS_RE.match(key)
    if m and m.group(1) in VARIANTS:
        variant, data, res, kind = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "fcmae":
            if (data, res) != ("1k", 224):
                raise _unknown(name, " FCMAE weights exist only as *_1k_224_fcmae.")
            return variant, "fcmae"
        return variant, _resolution_tag(name, variant, data, res)

    key = _strip_prefixes(key)
    variant, _, tag = key.partition(".")
    if variant not in VARIANTS:
        raise _unknown(name)
    if not tag:
        return variant, None
    if f"{variant}.{tag}" not in checkpoints:
        tags = [c.tag for c in checkpoints.values() if c.variant == variant]
        raise _unknown(name, f" {variant} has the tags {tags}.")
    return variant, tag


def get_checkpoint(name: Union[str, Checkpoint]) -> Checkpoint:
    """The manifest entry for a name in any accepted spelling; a bare variant gets its default tag."""
    if isinstance(name, Checkpoint):
        return name
    variant, tag = parse_model_name(name)
    checkpoints, defaults = _registry()
    return checkpoints[f"{variant}.{tag or defaults[variant]}"]


@functools.lru_cache(maxsize=None)
def _thousand_lines(resource: Tuple[str, str]) -> Tuple[str, ...]:
    text = _read_package_text(*resource)
    if text is None:
        raise RuntimeError(f"convnextv2_hub/{'/'.join(resource)} is missing; reinstall convnextv2-hub")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(lines) != 1000:
        raise RuntimeError(f"{resource[-1]} has {len(lines)} lines, expected 1000")
    return lines


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1K class names in class-index order (a fresh list: callers may edit it)."""
    return list(_thousand_lines(_CLASSES_RESOURCE))


def imagenet_wnids() -> List[str]:
    """The 1000 ImageNet-1K WordNet ids (``n01440764`` ...) in class-index order: the class folder names of
    an ImageNet train/val folder, whose sorted order is the class order."""
    return list(_thousand_lines(_WNIDS_RESOURCE))


def create_transform(name_or_checkpoint: Union[str, Checkpoint], train: bool = False) -> Callable[[Any], Any]:
    """The transform a checkpoint expects, from its manifest entry (a name in any accepted spelling, or the entry)."""
    return get_checkpoint(name_or_checkpoint).transforms(train=train)


def label_names(model: Any) -> List[str]:
    """Class names for a model's head: its own ``label_names``, else its checkpoint's when the head
    matches that checkpoint, else ``class_0``, ``class_1``, ..."""
    names = getattr(model, "label_names", None)
    if names is None:
        ckpt = getattr(model, "checkpoint", None)
        if ckpt is not None and ckpt.num_classes == model.num_classes:
            names = ckpt.label_names
    if names is None or len(names) != model.num_classes:
        names = [f"class_{i}" for i in range(model.num_classes)]
    return list(names)


__all__ = [
    "Checkpoint",
    "create_transform",
    "default_tag",
    "get_checkpoint",
    "imagenet_class_names",
    "imagenet_wnids",
    "label_names",
    "list_checkpoints",
    "list_models",
    "load_manifest",
    "parse_model_name",
]
