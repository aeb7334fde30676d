"""ConvNeXt V2 in Python: every variant and checkpoint, export, FCMAE and a reproduction trainer.

>>> import convnextv2_hub as cvh
>>> model = cvh.create("tiny", pretrained=True)
>>> cvh.predict(model, ["cat.jpg"], topk=5)

Every attribute is imported on first use, so ``import convnextv2_hub`` loads neither torch nor anything
else heavy and never touches the network. The subpackages name the parts: ``models``, ``checkpoints``,
``preprocessing``, ``inference``, ``analysis``, ``train`` and ``cli``.
"""
from importlib import import_module
from typing import Any

from . import compat

__version__ = "0.1.0"

_EXPORTS = {
    "create": "models.factory",
    "ConvNeXtV2": "models.convnextv2",
    "convnextv2": "models.convnextv2",
    "Checkpoint": "checkpoints.registry",
    "get_checkpoint": "checkpoints.registry",
    "list_checkpoints": "checkpoints.registry",
    "list_models": "checkpoints.registry",
    "load_checkpoint": "checkpoints.io",
    "save_checkpoint": "checkpoints.io",
    "create_transform": "checkpoints.registry",
    "predict": "inference.predictor",
    "Predictor": "inference.predictor",
    "export_onnx": "inference.export",
    "export_torchscript": "inference.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later lookups skip this function
        return value
    raise AttributeError(f"module 'convnextv2_hub' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)


compat.install(__name__, _EXPORTS)
