"""Push a model to the Hugging Face Hub and pull it back (``convnextv2 push``, ``create("hf-hub:OWNER/NAME")``,
``ConvNeXtV2.save_pretrained / from_pretrained / push_to_hub``).

Push: the repo folder (``checkpoints.hub_folder``) is written to a temporary folder, then uploaded with
huggingface_hub as **one commit** (``create_repo(exist_ok=True)``, ``create_commit`` with every file, and the
deletion of peer files an earlier push left that this one does not write). A push that fails before the
commit changes nothing on the Hub: an earlier version stays whole, a new repo stays empty. The token is
huggingface_hub's (``HF_TOKEN`` or ``hf auth login``); ``HF_ENDPOINT`` is read when the push runs.

Pull: ``config.json`` first, then the weights *at the commit that config.json came from* (so a push landing
in between cannot pair files of two versions), through ``download.download_hub_file``: the Hub cache,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` exactly as for the released checkpoints, every file verified, and the
weights checked against the sha256 config.json states. A repo without config.json (a push that never
completed, or not a repo of ours) is refused with a message that says so.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch

from .download import (
    CheckpointDownloadError,
    HubFileNotFoundError,
    download_hub_file,
    hub_endpoint,
    offline_mode,
)
from .hub_folder import CONFIG_FILE, HubConfig, check_weights, read_hub_config, write_hub_folder
from .io import load_checkpoint
from .model_card import CardInfo, choose_license
from .reading import CheckpointError

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
M = TypeVar("M", bound=torch.nn.Module)


def hub_repo_id(name: str) -> Optional[str]:
    """``OWNER/NAME`` when ``name`` is ``hf-hub:OWNER/NAME`` naming a repo other than a released checkpoint
    (``hf-hub:timm/convnextv2_tiny.fcmae`` stays the released checkpoint); None for every other name."""
    if not isinstance(name, str):
        return None
    key = name.strip()
    prefix = next((p for p in HUB_PREFIXES if key.lower().startswith(p)), None)
    if prefix is None:
        return None
    from .registry import parse_model_name

    try:
        parse_model_name(key)
        return None  # a released checkpoint under its timm name
    except ValueError:
        pass
    repo = key[len(prefix):].strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r}: expected hf-hub:OWNER/NAME (a Hub model repo pushed with `convnextv2 push`)")
    return repo


# ------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------
def upload_folder(folder: Union[str, os.PathLike], repo_id: str, *, private: Optional[bool] = None,
                  token: Optional[str] = None, commit_message: str = "Upload model with convnextv2-hub") -> str:
    """Upload ``folder`` (a repo folder of ours) to ``repo_id`` as one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    if offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (or set it to 0) to push")
    if token is None and get_token() is None:
        raise RuntimeError("no Hugging Face token: set HF_TOKEN to a token with write access, or run "
                           "`hf auth login` once")
    folder = Path(folder)
    api = HfApi(endpoint=hub_endpoint(), token=token, library_name="convnextv2-hub")
    api.create_repo(repo_id, private=private, exist_ok=True)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    # A peer subfolder an earlier push wrote and this one does not would hold other weights: removed in the
    # same commit. Nothing else of the repo is touched.
    stale = [f for f in api.list_repo_files(repo_id) if f.startswith(("timm/", "hf/")) and f not in files]
    operations = [CommitOperationDelete(path_in_repo=f) for f in stale]
    operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    try:
        return str(api.create_commit(repo_id, operations=operations, commit_message=commit_message).commit_url)
    except OSError as exc:  # huggingface_hub's HTTP and connection errors
        raise RuntimeError(
            f"the upload to {repo_id} did not complete ({str(exc).splitlines()[0]}). The Hub shows a commit whole or "
            "not at all, so the repo holds its previous version (or nothing, if it is new), which a pull either "
            "loads complete or refuses; run the push again") from exc


def push_model(model: torch.nn.Module, repo_id: str, *, info: Optional[CardInfo] = None,
               formats: Sequence[str] = ("ours",), private: Optional[bool] = None, token: Optional[str] = None,
               base_checkpoint: Optional[str] = None, commit_message: str = "Upload model with convnextv2-hub") -> str:
    """Write ``model``'s repo folder in a temporary folder and upload it (``upload_folder``); returns the
    commit URL. ``info`` defaults to a card that records nothing about training (licence: ``choose_license``)."""
    info = info or default_card_info(repo_id)
    with tempfile.TemporaryDirectory(prefix="convnextv2-push-") as tmp:
        folder = write_hub_folder(model, Path(tmp) / "repo", info, formats, base_checkpoint=base_checkpoint)
        return upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


def default_card_info(repo_id: str, license: Optional[str] = None) -> CardInfo:
    """The card of a model whose training this package did not see: the licence of ``choose_license(None, ...)``."""
    chosen, note = choose_license(None, license)
    return CardInfo(repo_id=repo_id, license=chosen, license_note=note)


# ------------------------------------------------------------------------------------------------
# Pull
# ------------------------------------------------------------------------------------------------
def pull(repo_id: str, *, revision: Optional[str] = None, weights: bool = True, force: bool = False,
         progress: bool = True, token: Optional[str] = None) -> Tuple[HubConfig, Optional[Path]]:
    """(config, local weights file, verified against it) of the Hub repo ``repo_id``; weights None when not
    asked for. Raises ``CheckpointError`` for a repo that holds no complete model of ours, and
    ``CheckpointDownloadError`` when the Hub (or, offline, the cache) cannot give the files."""
    where = f"hf-hub:{repo_id}"
    try:
        path = download_hub_file(repo_id, CONFIG_FILE, revision=revision, checkpoint=False, force=force,
                                 progress=False, token=token)
    except HubFileNotFoundError as exc:
        raise CheckpointError(
            f"{where} holds no model of convnextv2-hub: {CONFIG_FILE} is missing.\n{exc}\nEither the name is wrong, "
            "or no push to it completed: `convnextv2 push` uploads every file in one commit, so an interrupted "
            "push leaves the repo as it was (empty, if it was new); push again.") from exc
    config = read_hub_config(path, where)
    if not weights:
        return config, None
    # The snapshot folder config.json sits in is named by its commit: the weights come from that commit too.
    commit = path.parent.name if path.parent.parent.name == "snapshots" else revision
    try:
        file = download_hub_file(repo_id, config.weights_file, revision=commit, force=force, progress=progress,
                                 stated_sha256=(config.weights_sha256, f"{where}'s {CONFIG_FILE}"), token=token)
    except HubFileNotFoundError as exc:
        raise CheckpointError(f"{where}: {CONFIG_FILE} names {config.weights_file}, which is missing ({exc}); "
                              "push the model again") from exc
    except CheckpointDownloadError as exc:
        if "sha256 mismatch" in str(exc) and CONFIG_FILE in str(exc):
            raise CheckpointError(f"{where}: {config.weights_file} is not the file its {CONFIG_FILE} states, so it "
                                  f"was refused (and removed from the cache); push the model again.\n{exc}") from exc
        raise
    check_weights(config, file, where, hashed=True)
    return config, file


def local_folder(folder: Union[str, os.PathLike]) -> Tuple[HubConfig, Path]:
    """(config, weights) of a repo folder on disk (``save_pretrained``'s, ``--dry-run``'s), checked."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: not a folder written by save_pretrained / convnextv2 push")
    config = read_hub_config(config_path, str(folder))
    weights = folder / config.weights_file
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {CONFIG_FILE} names {config.weights_file}, which is missing")
    check_weights(config, weights, str(folder))
    return config, weights


def load_pretrained(cls: Type[M], source: Union[str, os.PathLike], *, pretrained: bool = True,
                    num_classes: Optional[int] = None, revision: Optional[str] = None, force: bool = False,
                    progress: bool = True, token: Optional[str] = None, **model_kwargs: Any) -> M:
    """``cls`` built as a repo of ours describes it, its weights loaded (``pretrained``): ``source`` is a local
    repo folder, ``OWNER/NAME`` or ``hf-hub:OWNER/NAME``. The model gets the repo's label names and a
    ``model.checkpoint`` named after it with its preprocessing. ``num_classes`` other than the repo's keeps a
    fresh head (with load_checkpoint's warning), as ``create`` does for released checkpoints."""
    text = os.fspath(source)
    if Path(text).is_dir():
        config, weights = local_folder(text)
        name, repo = str(Path(text).resolve()), None
    elif not text.lower().startswith(HUB_PREFIXES) and (text.startswith((".", "~")) or os.path.isabs(text)
                                                         or text.count("/") > 1):
        raise FileNotFoundError(f"{text}: no such folder (a repo folder of save_pretrained, or a Hub repo OWNER/NAME)")
    else:
        repo = hub_repo_id(text if text.lower().startswith(HUB_PREFIXES) else f"hf-hub:{text}") or text
        config, weights = pull(repo, revision=revision, weights=pretrained, force=force, progress=progress,
                               token=token)
        name = f"hf-hub:{repo}"
    model = cls(depths=config.depths, dims=config.dims, in_chans=config.in_chans,
                num_classes=config.num_classes if num_classes is None else num_classes,
                **{**config.arch, **model_kwargs})
    model.variant = config.variant
    model.checkpoint = config.entry(name, repo)
    if weights is not None:
        load_checkpoint(model, weights)
        model.checkpoint = config.entry(name, repo)  # the repo's name, not the base entry the file records
    return model


__all__ = ["HUB_PREFIXES", "default_card_info", "hub_repo_id", "load_pretrained", "local_folder", "pull",
           "push_model", "upload_folder"]
