"""``create()``: one call from a model or checkpoint name to a ready ConvNeXtV2.

Names resolve through the manifest (``weights_manifest.json``), so every model carries the checkpoint
entry it was built for (``model.checkpoint``): its preprocessing, labels and metadata are never guessed.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from ..checkpoints.hub import hub_repo_id, load_pretrained
from ..checkpoints.io import checkpoint_variant, described_num_classes, load_checkpoint, read_arch
from ..checkpoints.download import discard_cached_file, download_checkpoint, offline_mode
from ..checkpoints.reading import CheckpointError, read_checkpoint_file
from ..checkpoints.registry import Checkpoint, get_checkpoint, parse_model_name
from .convnextv2 import ConvNeXtV2, convnextv2


def model_name_for(name: Optional[str], checkpoint_path: Union[str, os.PathLike, None],
                   default: Optional[str] = "tiny") -> str:
    """The model name to build: ``name`` as given; without it, the variant ``checkpoint_path`` states (files
    written by this package) or its tensors show; else ``default``. A ``name`` of another size than the file
    states is refused here, before anything is built, with the fix in the message (ValueError)."""
    if checkpoint_path is not None:
        # With a name given, only a file's stated size is checked: reading every tensor twice is not worth it,
        # and loading a foreign file of another size fails anyway, naming the size it looks like.
        held = checkpoint_variant(checkpoint_path, from_tensors=name is None)
        if name is None:
            if held is None:
                raise ValueError(f"{checkpoint_path} does not say which ConvNeXt V2 size it holds, and its tensors "
                                 "match none of atto ... huge: name the model")
            return held
        if held is not None and parse_model_name(name)[0] != held:
            raise ValueError(f"{checkpoint_path} holds a ConvNeXt V2-{held.capitalize()}, not {name!r}: leave the model "
                             f"name out (the file says what it is) or give {held!r}")
        return name
    if name is None:
        if default is None:
            raise ValueError("name a model (e.g. tiny or tiny.fcmae_ft_in22k_in1k) or give a checkpoint path")
        return default
    return name


def create(
    name: Optional[str] = None,
    pretrained: bool = False,
    *,
    num_classes: Optional[int] = None,
    checkpoint_path: Union[str, os.PathLike, None] = None,
    drop_path_rate: float = 0.0,
    head_init_scale: float = 1.0,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    in_chans: int = 3,
    progress: bool = True,
    force_download: bool = False,
    **switches: Any,
) -> ConvNeXtV2:
    """Build a ConvNeXt V2 from a name such as ``"tiny"`` (the default), ``"tiny.fcmae_ft_in1k"`` or
    ``"convnextv2_tiny.fcmae_ft_in22k_in1k_384"``; with ``checkpoint_path`` and no name, the size the file holds
    (``model_name_for``).

    - ``pretrained=True`` downloads the named checkpoint (the variant's default tag when the name has
      none) through the Hugging Face Hub cache, falling back to the authors' URL.
    - ``checkpoint_path`` loads a local file or folder in any supported format (ours, the authors',
      timm, HF transformers, FCMAE) instead of downloading.
    - ``num_classes`` different from the checkpoint's keeps a freshly initialised head (with a warning),
      the usual start of a fine-tune. Default: the checkpoint's class count (0 for FCMAE encoders); for a
      ``checkpoint_path`` written by ``save_checkpoint``, the class count the file describes, and its
      label names and preprocessing are set on the model too (``model.label_names``, ``model.checkpoint``).
    - ``switches``: the architecture ablations (``block``, ``grn``, ``grn_aggregation``,
      ``grn_normalization``, ``grn_residual``, ``grn_form``; ``models.ablations.ArchOptions``). A
      ``checkpoint_path`` file of ours stores its switches and the model is built with them; a switch
      passed here that contradicts the file is an error. The released checkpoints are all the defaults.
    - ``"hf-hub:OWNER/NAME"`` names a model pushed with ``convnextv2 push``: its ``config.json`` says what to
      build; ``pretrained=True`` loads its weights, verified against it, with their head, label names and
      preprocessing (same Hub cache, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` as the released checkpoints).
    - Downloaded files are verified before use. A cached file that turns out unreadable is removed and
      downloaded once more (not in offline mode); ``force_download=True`` downloads it again regardless.
    """
    repo = hub_repo_id(name)
    if repo is not None:  # a model pushed with `convnextv2 push`: its repo says what to build
        arch = dict(drop_path_rate=drop_path_rate, head_init_scale=head_init_scale, features_only=features_only,
                    out_indices=out_indices)
        return _create_from_hub(repo, pretrained, num_classes, checkpoint_path, force_download, progress, arch)
    name = model_name_for(name, checkpoint_path)
    variant, tag = parse_model_name(name)
    ckpt: Checkpoint = get_checkpoint(name if tag else variant)
    if num_classes is None and checkpoint_path is not None:
        # A file of ours says how big its head is: build that head rather than a 1000-class one to discard.
        num_classes = described_num_classes(checkpoint_path)
    if num_classes is None:
        num_classes = ckpt.num_classes if (pretrained or tag) else 1000
    if checkpoint_path is not None:
        # The file's switches, then the caller's: load_checkpoint refuses them if they contradict the file.
        switches = {**(read_arch(checkpoint_path) or {}), **switches}
    model = convnextv2(
        variant,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        head_init_scale=head_init_scale,
        features_only=features_only,
        out_indices=out_indices,
        in_chans=in_chans,
        **switches,
    )
    model.checkpoint = ckpt
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        _load_pretrained(model, ckpt, progress=progress, force=force_download)
        model.weights_file = None  # the manifest entry names these weights, not the cache file they came from
    else:
        # Untrained: the entry gives the preprocessing, but no released weights are in it (a file of
        # ours saved from it must not claim to descend from them, nor carry their licence).
        model.base_checkpoint = None
    return model


def _create_from_hub(repo: str, pretrained: bool, num_classes: Optional[int],
                     checkpoint_path: Union[str, os.PathLike, None], force: bool, progress: bool,
                     arch: Dict[str, Any]) -> ConvNeXtV2:
    """``create("hf-hub:OWNER/NAME", ...)``: the repo's model; with ``checkpoint_path``, its architecture and
    that local file's weights."""
    if checkpoint_path is None:
        return load_pretrained(ConvNeXtV2, f"hf-hub:{repo}", pretrained=pretrained, num_classes=num_classes,
                               force=force, progress=progress, **arch)
    if num_classes is None:
        num_classes = described_num_classes(checkpoint_path)
    model = load_pretrained(ConvNeXtV2, f"hf-hub:{repo}", pretrained=False, num_classes=num_classes,
                            progress=progress, **arch)
    load_checkpoint(model, checkpoint_path)
    return model


def _unreadable(path: Path) -> bool:
    """Whether the file itself cannot be read (as opposed to read fine but not fitting the model)."""
    try:
        read_checkpoint_file(path)
    except CheckpointError:
        return True
    return False


def _load_pretrained(model: ConvNeXtV2, ckpt: Checkpoint, *, progress: bool, force: bool) -> None:
    """Load ``ckpt``'s downloaded weights; a cached file that cannot be read is removed and fetched again once.

    Only an unreadable file is replaced: weights that read fine but do not fit the model (another
    ``in_chans``, say) are the caller's mismatch, and downloading them again would change nothing.
    """
    path = download_checkpoint(ckpt, progress=progress, force=force)
    try:
        load_checkpoint(model, path)
        return
    except CheckpointError as exc:
        if not _unreadable(path):
            raise
        first = exc
    discard_cached_file(path)  # never leave it where the next run would take it again
    if force or offline_mode():
        why = ("it was just downloaded (force_download=True), so the server sends a broken file: retry later or "
               "set HF_ENDPOINT to another mirror" if force else
               "HF_HUB_OFFLINE is set, so it was not downloaded again: unset HF_HUB_OFFLINE to fetch a fresh copy")
        raise CheckpointError(f"{first}\nThe unreadable file was removed from the cache; {why}.") from first
    warnings.warn(f"cached checkpoint {path} of {ckpt.name!r} is unreadable, so it was removed and is being "
                  f"downloaded again ({str(first).splitlines()[0]})", RuntimeWarning, stacklevel=3)
    path = download_checkpoint(ckpt, progress=progress, force=True)
    try:
        load_checkpoint(model, path)
    except CheckpointError as exc:
        if not _unreadable(path):
            raise
        discard_cached_file(path)
        raise CheckpointError(
            f"{exc}\nDownloaded again, the file is still unreadable; it was removed from the cache. The server "
            "sends a broken file: retry later or set HF_ENDPOINT to another mirror.") from exc
