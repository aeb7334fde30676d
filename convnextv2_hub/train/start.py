"""Where a training run starts: ``--init`` (a checkpoint name, a path, or ``none``), ``--pretrained``, or the
default. Imports nothing heavy: the CLI resolves the start (and refuses a bad one) before torch is loaded.

The default start of a fine-tune is the released FCMAE encoder of the variant (``tiny.fcmae``), as in the
paper, which fine-tunes every model from its FCMAE pre-training; a ``--model`` that names a checkpoint
(``tiny.fcmae_ft_in22k_in1k``) starts from that one. Random weights only when asked (``--init none``).
FCMAE pre-training starts from random weights unless ``--init`` continues an earlier pre-training file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from .config import ConfigError

RANDOM_WORDS = ("none", "random", "scratch")


@dataclass(frozen=True)
class Start:
    """``kind``: "checkpoint" (a released checkpoint, downloaded or from the cache), "file" or "random";
    ``source``: the checkpoint's name or the file's path (None for random); ``default``: chosen by the
    trainer, not by a flag."""

    kind: str
    source: Optional[str]
    default: bool = False

    def as_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "source": self.source, "default": self.default}

    def label(self) -> str:
        """What the run started from, in one word or name: the checkpoint metadata's ``start``."""
        return self.source or "random"

    def describe(self, mode: str) -> str:
        """The log line that names the start."""
        if self.kind == "random":
            if mode == "pretrain":
                return "start: random weights (FCMAE pre-training starts from scratch; --init PATH continues an earlier one)"
            return "start: RANDOM WEIGHTS (--init none): nothing pre-trained; expect far lower accuracy on a small data set"
        if self.kind == "file":
            return f"start: {self.source} (--init)"
        if self.default:
            return (f"start: {self.source}, the default (the paper fine-tunes from the variant's FCMAE weights; "
                    "--init NAME|PATH to choose another start, --init none for random weights)")
        return f"start: {self.source} (released weights)"

    def download_advice(self) -> str:
        """What to do when this start's download fails."""
        why = "the default start of a fine-tune" if self.default else "the start asked for"
        return (f"{self.source} is {why} and could not be downloaded. Pass --init PATH with a local copy of it (or any "
                "weights of this size), --init none to start from random weights, or retry online (HF_ENDPOINT "
                "for a mirror)")


def resolve_start(mode: str, model: str, init: Optional[str], pretrained: bool) -> Start:
    """The start of a ``mode`` run of ``model`` from the flags; ``ConfigError`` names a bad one and the fix.

    ``init``: ``none`` (random weights), an existing file or folder, or a checkpoint name of the same
    variant (``tiny.fcmae``, ``convnextv2_tiny.fcmae_ft_in22k_in1k``)."""
    from ..checkpoints.registry import get_checkpoint, parse_model_name

    variant, tag = parse_model_name(model)
    if init is not None and pretrained:
        raise ConfigError("--init and --pretrained both say where to start: give one of them")
    if pretrained:
        return Start("checkpoint", get_checkpoint(model).name)
    if init is None:
        if mode == "pretrain":
            return Start("random", None, default=True)
        return Start("checkpoint", get_checkpoint(model if tag else f"{variant}.fcmae").name, default=True)
    if init.strip().lower() in RANDOM_WORDS:
        return Start("random", None)
    if Path(init).exists():
        return Start("file", init)
    try:
        named = get_checkpoint(init)
    except (KeyError, ValueError):
        raise ConfigError(f"--init {init}: no such file, and not a checkpoint name (convnextv2 list {variant} lists "
                          f"them, e.g. {variant}.fcmae); --init none starts from random weights") from None
    if named.variant != variant:
        raise ConfigError(f"--init {init} is a {named.variant} checkpoint but --model is {model!r}: use a {variant} "
                          f"checkpoint (e.g. {variant}.fcmae) or --model {named.variant}")
    if mode == "pretrain":
        raise ConfigError(f"--init {init}: released checkpoints hold the encoder only (no FCMAE decoder), so "
                          "pre-training cannot continue from them; fine-tune from them instead (convnextv2-train "
                          "finetune --init ...), or give --init PATH of an earlier pre-training run")
    return Start("checkpoint", named.name)
