"""``Run``: one trainer invocation (the mode, what the flags gave, the resolved config), the input of
``engine.train`` and ``evaluation.run_eval``. Imports nothing heavy, so any module can name it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .start import Start


class TrainingInputError(ValueError):
    """What the user gave cannot be trained or evaluated (data, flags, files); the message says what
    and how to fix it. The CLI prints it as one line, without a traceback."""


@dataclass
class Run:
    """One invocation: the mode, what the flags gave, and the resolved config."""

    mode: str
    model: str
    data_path: str
    output_dir: Optional[str]
    cfg: Dict[str, Any]
    init: Optional[str] = None
    pretrained: bool = False
    resume: Optional[str] = None
    overwrite: bool = False  # start over in an output folder that holds an earlier run's checkpoint
    device: str = "auto"
    recipe: Optional[str] = None
    notes: Dict[str, str] = field(default_factory=dict)
    # Where the weights start (``start.resolve_start``); None: resolved from init / pretrained when the run begins.
    start: Optional[Start] = None
    # Config keys the user set (``--set``, ``--batch-size``, ...): never adapted to the data set.
    fixed: Tuple[str, ...] = ()
    # Refuse, instead of adapting, recipe values that do not fit the data set (``--strict-recipe``).
    strict_recipe: bool = False
    # Notices of the recipe values already adapted when the config was resolved (``config.fit_schedule``).
    adapted: List[str] = field(default_factory=list)
