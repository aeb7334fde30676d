"""The trainer's JSON and ``torch.save`` files (config.json, eval.json, the training state), written
atomically: temporary file, fsync, rename."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write


def atomic_write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
