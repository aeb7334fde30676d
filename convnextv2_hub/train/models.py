"""The model a run trains: the classifier for fine-tuning (recipe drop path and head init, weights from its
start: ``start.Start``) or the FCMAE for pre-training."""
from __future__ import annotations

import warnings

from torch import nn

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
    kw = dict(num_classes=num_classes, drop_path_rate=cfg["drop_path"], head_init_scale=cfg["head_init_scale"])
    logger.info(start.describe(run.mode))
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

            report = load_checkpoint(model, start.source)
    for w in caught:
        logger.info(f"note: {w.message}")
    if report is not None:
        logger.info(f"loaded {start.source} ({report.format}); kept fresh: {report.reinitialized or 'nothing'}")
    return model


def build_pretrain_model(run: Run) -> nn.Module:
    from ..models.fcmae import FCMAE

    cfg = run.cfg
    kw = dict(mask_ratio=cfg["mask_ratio"], norm_pix_loss=cfg["norm_pix_loss"])
    start = start_of(run)
    if start.kind == "file":
        model = FCMAE.from_checkpoint(start.source, drop_path_rate=cfg["drop_path"], **kw)
    else:
        model = FCMAE(
            _variant(run.model),
            patch_size=cfg["patch_size"],
            decoder_dim=cfg["decoder_embed_dim"],
            decoder_depth=cfg["decoder_depth"],
            drop_path_rate=cfg["drop_path"],
            **kw,
        )
    # The encoder's final LayerNorm is not used by FCMAE (the decoder reads the last stage map):
    # frozen, so it is not in the optimiser and DDP needs no find_unused_parameters pass.
    model.encoder.norm.requires_grad_(False)
    return model
