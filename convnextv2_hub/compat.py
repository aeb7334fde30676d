"""The module paths of convnextv2-hub 0.1.0 (``convnextv2_hub.fcmae``, ``.predict``, ``.export``, ...),
which moved into subpackages: importing an old path returns the module at its new place, with a
``FutureWarning`` naming that place (CHANGELOG.md lists every move).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Mapping, Optional, Sequence

MOVED = {
    "analysis_blocks": "analysis.hooks",
    "analysis_cli": "cli.analyze",
    "analysis_figures": "analysis.figures",
    "atomic": "files",
    "checkpoint_formats": "checkpoints.formats",
    "checkpoint_reading": "checkpoints.reading",
    "compiled": "inference.compile_backend",
    "convert": "checkpoints.io",
    "download": "checkpoints.download",
    "export": "inference.export",
    "fcmae": "models.fcmae",
    "fcmae_show": "analysis.reconstruction",
    "hub": "models.factory",
    "image_folder": "preprocessing.image_folder",
    "layers": "models.layers",
    "manifest": "checkpoints.registry",
    "model": "models.convnextv2",
    "native": "inference.cpp_kernel",
    "predict": "inference.predictor",
    "transforms": "preprocessing.transforms",
    "variants": "models.variants",
    "train.atomic_files": "files",
    "train.cli": "cli.train",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module at its new path (the same object)."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: object = None):
        prefix = self.package + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = f"{self.package}.{MOVED[spec.name[len(self.package) + 1:]]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", FutureWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: types.ModuleType) -> None:
        """The module was executed when it was imported at its new path."""


class _Package(types.ModuleType):
    """The package module's type: a public name (``predict``, the function) is never replaced by the
    old submodule of the same name, which Python's import system assigns after loading it."""

    exports: Mapping[str, str] = {}

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.exports and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def install(package: str, exports: Mapping[str, str]) -> None:
    """Make the old module paths of ``package`` importable (called once by the package itself)."""
    module = sys.modules[package]
    _Package.exports = exports
    module.__class__ = _Package
    if not any(isinstance(f, _Alias) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_Alias(package))
