"""Command-line flags that several commands share, defined once so they read and behave the same."""
from __future__ import annotations

import argparse
from typing import Optional


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """Where a command's weights come from: ``--checkpoint-path``, ``--num-classes``, ``--force-download``."""
    p.add_argument("--checkpoint-path", help="local weights instead of downloading the pretrained checkpoint")
    p.add_argument("--num-classes", type=int,
                   help="head size of --checkpoint-path weights (files written by this package state it)")
    p.add_argument("--force-download", action="store_true",
                   help="download the checkpoint again even if a cached copy exists")


def model_for_weights(model: Optional[str], checkpoint_path: Optional[str], default: Optional[str] = None) -> str:
    """The model name a command builds (``models.factory.model_name_for``): ``--model`` as given, else the size
    ``--checkpoint-path`` holds, else ``default``."""
    from ..models.factory import model_name_for

    return model_name_for(model, checkpoint_path, default)
