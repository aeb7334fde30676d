"""ConvNeXt V2 in Python: every variant and checkpoint, export, FCMAE and a reproduction trainer.

>>> import convnextv2_hub as cvh
>>> model = cvh.create("tiny", pretrained=True)
>>> cvh.predict(model, ["cat.jpg"], topk=5)

Most attributes are imported on first use, so ``import convnextv2_hub`` stays cheap (no torchvision,
onnxruntime or huggingface_hub until a function needs them) and never touches the network.
"""
from importlib import import_module
from typing import Any

# Eager on purpose: the function ``predict`` shares its name with the submodule ``predict``, and importing
# that submodule later (the CLI does) would rebind ``convnextv2_hub.predict`` to the module.
from .predict import Predictor, predict  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "create": "hub",
    "ConvNeXtV2": "model",
    "convnextv2": "model",
    "Checkpoint": "manifest",
    "get_checkpoint": "manifest",
    "list_checkpoints": "manifest",
    "list_models": "manifest",
    "load_checkpoint": "convert",
    "save_checkpoint": "convert",
    "create_transform": "transforms",
    "export_onnx": "export",
    "export_torchscript": "export",
}

__all__ = sorted([*_EXPORTS, "predict", "Predictor"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later lookups skip this function
        return value
    raise AttributeError(f"module 'convnextv2_hub' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
