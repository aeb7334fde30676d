"""The model a run trains: the classifier for fine-tuning (recipe drop path and head init, weights from its
start: ``start.Start``) or the FCMAE for pre-training, both with the config's architecture switches
(``block``, ``grn``, ``grn_*``; ``grn_at`` decides where GRN is: paper Table 2f)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

from torch import nn

from ..files import PathLike
from .config import arch_switches
from .run import Run, TrainingInputError
from .runlog import Logger
from .start import Start, resolve_start


def _variant(model_name: str) -> str:
    from ..checkpoints.registry import parse_model_name

    return parse_model_name(model_name)[0]


def start_of(run: Run) -> Start:
    """``run.start``, resolved from its flags when the run was built without one (the Python API)."""
    if run.start is None:
        run.start = resolve_start(run.mode, run.model, run.init, run.pretrained)
    return run.start


def build_finetune_model(run: Run, num_classes: int, logger: Logger) -> nn.Module:
    """``create()`` with the recipe's drop path and head init scale, its weights from the run's start: a
    released checkpoint (downloaded), a file, or random weights. A head of another class count, or none (FCMAE
    weights), is replaced by a fresh, scaled one; an FCMAE file also keeps the fresh final norm. The model's
    ``base_checkpoint`` names the released weights it descends from (None for a random start), for the
    checkpoints the run writes."""
    from ..checkpoints.download import CheckpointDownloadError
    from ..models.factory import create

    cfg, start = run.cfg, start_of(run)
    switches = arch_switches(cfg, "finetune")
    kw = dict(num_classes=num_classes, drop_path_rate=cfg["drop_path"], head_init_scale=cfg["head_init_scale"], **switches)
    logger.info(start.describe(run.mode))
    if start.kind == "checkpoint" and switches:
        raise TrainingInputError(
            f"the architecture switches {switches} need weights made with them, and {start.source} is the released "
            "ConvNeXt V2: pass --init PATH (a pre-training of this architecture) or --init none (random weights)")
    # Table 2f: GRN pre-trained but not fine-tuned is dropped; fine-tuned but not pre-trained starts fresh.
    transfer = {"pretrain_only": "drop", "finetune_only": "fresh"}.get(cfg["grn_at"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if start.kind == "checkpoint":
            try:
                model = create(start.source, pretrained=True, **kw)
            except CheckpointDownloadError as e:
                raise TrainingInputError(f"{e}\n{start.download_advice()}") from e
            model.base_checkpoint = start.source
        else:
            model = create(run.model, **kw)
            model.base_checkpoint = None  # a file of ours states its own when it is loaded below
        report = None
        if start.kind == "file":
            from ..checkpoints.io import load_checkpoint

            _check_file_switches(start.source, arch_switches(cfg, "pretrain"), "--init")
            report = load_checkpoint(model, start.source, grn_transfer=transfer)
    for w in caught:
        logger.info(f"note: {w.message}")
    if report is not None:
        if report.dropped:
            logger.info(f"grn_at=pretrain_only: dropped the {len(report.dropped)} GRN tensors of {start.source} "
                        "(the fine-tuned model has no GRN)")
        if "grn" in report.reinitialized:
            logger.info(f"grn_at=finetune_only: GRN is freshly initialised ({start.source} has none)")
        logger.info(f"loaded {start.source} ({report.format}); kept fresh: {report.reinitialized or 'nothing'}")
    return model


def _check_file_switches(path: str, expected: Dict[str, Any], flag: str) -> None:
    """Refuse, naming the ``--set`` that fixes it, a file of ours made with other architecture switches."""
    from ..checkpoints.io import read_arch

    stored: Optional[Dict[str, Any]] = read_arch(path)
    if stored is not None and stored != expected:
        fix = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in stored.items())
        raise TrainingInputError(
            f"{flag} {path} was made with the architecture switches {stored or '{}'}, but this run builds {expected or '{}'}"
            f": pass {fix or 'no architecture --set'} (with grn_at, the switches of the pre-training side)")


def build_pretrain_model(run: Run) -> nn.Module:
    """The FCMAE of ``run.cfg`` (mask ratio, loss target, encoder masking, decoder type, depth and
    width, the encoder's architecture switches); with ``--init``, the file's decoder and weights
    (``FCMAE.from_checkpoint``)."""
    from ..models.convnextv2 import convnextv2
    from ..models.fcmae import FCMAE

    cfg = run.cfg
    kw = dict(mask_ratio=cfg["mask_ratio"], norm_pix_loss=cfg["norm_pix_loss"], encoder_masking=cfg["encoder_masking"])
    switches = arch_switches(cfg, "pretrain")
    start = start_of(run)
    if start.kind == "file":
        _check_file_switches(start.source, switches, "--init")
        model = FCMAE.from_checkpoint(start.source, drop_path_rate=cfg["drop_path"], **kw)
    else:
        model = FCMAE(
            convnextv2(_variant(run.model), num_classes=0, drop_path_rate=cfg["drop_path"], **switches),
            patch_size=cfg["patch_size"],
            decoder=cfg["decoder"],
            decoder_dim=cfg["decoder_embed_dim"],
            decoder_depth=cfg["decoder_depth"],
            drop_path_rate=cfg["drop_path"],
            **kw,
        )
    # The encoder's final LayerNorm is not used by FCMAE (the decoder reads the last stage map):
    # frozen, so it is not in the optimiser and DDP needs no find_unused_parameters pass.
    model.encoder.norm.requires_grad_(False)
    return model


def load_trained_model(folder: PathLike) -> nn.Module:
    """The model a finished run in ``folder`` trained: rebuilt from its ``config.json`` as the run built
    it (the same builder, so every model switch of the config applies), then loaded with its final
    weights, ``checkpoint-last.safetensors``. The FCMAE for a pre-training run, the classifier for
    fine-tuning."""
    import json
    from pathlib import Path

    import torch

    from .distributed import DistEnv

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    info = meta["run"]
    # Started "at random": the weights are the run's own, loaded below (its recorded start, e.g. a released
    # checkpoint, need not be fetched again, nor fit the run's architecture switches).
    run = Run(mode=info["mode"], model=info["model"], data_path=info["data_path"], output_dir=str(folder), cfg=meta["config"],
              start=Start("random", None))
    weights = folder / "checkpoint-last.safetensors"
    if run.mode == "pretrain":
        from safetensors.torch import load_file

        model = build_pretrain_model(run)
        model.load_state_dict(load_file(str(weights)))
        return model
    from ..checkpoints.io import load_checkpoint

    quiet = Logger(None, DistEnv(0, 1, 0, torch.device("cpu"), False), False)  # nothing to log: no --init
    model = build_finetune_model(run, info["num_classes"], quiet)
    load_checkpoint(model, weights)
    return model


def pretrain_model_keys(model: nn.Module) -> dict:
    """The ``MODEL_KEYS`` config values of a built FCMAE (an ``--init`` file's decoder may differ from
    the config's, and the run's config.json and checkpoints say what was trained)."""
    return dict(encoder_masking=model.encoder_masking, decoder=model.decoder_type, decoder_depth=model.decoder_depth,
                decoder_embed_dim=model.decoder_dim, patch_size=model.patch_size)
