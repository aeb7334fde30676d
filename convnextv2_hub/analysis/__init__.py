"""The paper's feature analyses: ``measures`` (cosine distance, class selectivity, activation maps),
``hooks`` (finding blocks and reading their features), ``figures`` (plots with their CSV/JSON) and
``reconstruction`` (what an FCMAE rebuilds). The names of ``measures`` are importable from here."""
from importlib import import_module
from typing import Any


def __getattr__(name: str) -> Any:
    measures = import_module(".measures", __name__)
    if name in measures.__all__:
        return getattr(measures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
