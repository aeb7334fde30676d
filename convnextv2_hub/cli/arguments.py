"""Command-line flags that several commands share, defined once so they read and behave the same."""
from __future__ import annotations

import argparse


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """Where a command's weights come from: ``--checkpoint-path``, ``--num-classes``, ``--force-download``."""
    p.add_argument("--checkpoint-path", help="local weights instead of downloading the pretrained checkpoint")
    p.add_argument("--num-classes", type=int,
                   help="head size of --checkpoint-path weights (files written by this package state it)")
    p.add_argument("--force-download", action="store_true",
                   help="download the checkpoint again even if a cached copy exists")
