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


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """How a command runs the model: ``--backend`` and ``--batch-size``."""
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "compile", "onnxruntime"],
                   help="inference backend (default auto: fastest safe path; compiles only when it pays off)")


def add_file_job_arguments(p: argparse.ArgumentParser) -> None:
    """How a job over many files reads them: ``--workers`` and ``--no-progress``."""
    p.add_argument("--workers", type=int,
                   help="processes that decode and preprocess images while the model runs "
                        "(default: the CPUs this process may use, less one, at most 8; 0: none)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal anyway)")
