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
    """The model name a command builds: ``--model`` as given; without it, the variant ``--checkpoint-path``
    states (files written by this package) or its tensors show; else ``default``. A ``--model`` of another
    size than the file is refused here, before anything is built, with the fix in the message."""
    if checkpoint_path is not None:
        from ..checkpoints.io import checkpoint_variant
        from ..checkpoints.registry import parse_model_name

        # With a model named, only a file's stated size is checked: reading every tensor twice is not worth it,
        # and loading a foreign file of another size fails anyway, naming the size it looks like.
        held = checkpoint_variant(checkpoint_path, from_tensors=model is None)
        if model is None:
            if held is None:
                raise ValueError(f"{checkpoint_path} does not say which ConvNeXt V2 size it holds, and its tensors "
                                 "match none of atto ... huge: name the model (--model / the model argument)")
            return held
        if held is not None and parse_model_name(model)[0] != held:
            raise ValueError(f"{checkpoint_path} holds a ConvNeXt V2-{held.capitalize()}, not {model!r}: leave the model "
                             f"name out (the file says what it is) or give {held!r}")
        return model
    if model is None:
        if default is None:
            raise ValueError("name a model (e.g. tiny or tiny.fcmae_ft_in22k_in1k) or give --checkpoint-path")
        return default
    return model
