"""Compiled CPU graphs kept across processes: AOTInductor packages in a store on disk.

A graph compiled by ``torch.compile`` lives only as long as the process that compiled it, and
inductor's own on-disk caches bypass our frozen graphs, so every new process paid the whole compile
again (minutes for Tiny on a CPU). Here the compiled CPU path (``CompiledConvNeXtV2``) has each of
its segments exported with ``torch.export`` and compiled ahead of time by AOTInductor, with the same
inductor options, into a ``.pt2`` package (the generated C++ library and the folded weights). A later
process with the same key loads the packages in about a second.

An entry is one folder per key: ``manifest.json`` and the packages, under
``$CONVNEXTV2_HUB_COMPILED_DIR`` (default ``~/.cache/convnextv2_hub/compiled``). Its name is the hash
of the key, which holds everything the generated code depends on: the weights' sha256 and the model's
structure, the input's shape and layout, the sources of the compiled forms, torch's version, the CPU's
flags and the thread count (inductor's GEMM kernels are blocked for it), plus the caller's fields
(segments, precision, options). An entry is written whole (a temporary folder renamed into place);
one whose manifest does not match its key (stale), whose packages do not match their sha256
(corrupt) or that fails to load is removed, said in a warning, and built again.

Builds run in a child process (``WORKER``, ``inference.compile_worker``): tracing for export patches
``nn.Module.__call__`` and ``__getattr__`` for a whole process, which would break the eager path that
``Predictor(backend="auto")`` keeps serving from on another thread meanwhile, and a crash inside the
compiler cannot take the caller down with it. This module knows nothing of ConvNeXt V2: the compiled
path makes the keys, the worker the modules to compile.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..files import atomic_folder, atomic_write_json, remove_stale_temp_files, temp_path, user_cache_dir

FORMAT = 1
MANIFEST = "manifest.json"
# The module run as the process that builds an entry (named, not imported: it imports this one).
WORKER = "convnextv2_hub.inference.compile_worker"
Runner = Callable[[torch.Tensor], torch.Tensor]

_PACKAGE = Path(__file__).resolve().parent.parent
# The files whose code ends up in the compiled graphs: a change in any of them makes new keys.
_GRAPH_SOURCES = ("models", "inference/compile_backend.py", "inference/compiled_store.py",
                  "inference/compile_worker.py", "inference/cpp_kernel.py", "inference/csrc")


def store_dir() -> Path:
    """Where entries live: ``$CONVNEXTV2_HUB_COMPILED_DIR``, else ``~/.cache/convnextv2_hub/compiled``."""
    return Path(os.environ.get("CONVNEXTV2_HUB_COMPILED_DIR") or user_cache_dir() / "convnextv2_hub" / "compiled")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of every parameter and buffer: name, dtype, shape and bytes, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)  # the code a process runs does not change while it runs
def _sources_sha256() -> str:
    h = hashlib.sha256()
    for rel in _GRAPH_SOURCES:
        root = _PACKAGE / rel
        for f in sorted(root.rglob("*") if root.is_dir() else [root]):
            if f.is_file() and f.suffix in (".py", ".cpp", ".h"):
                h.update(f.relative_to(_PACKAGE).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def cpu_signature() -> str:
    """The machine's architecture and CPU flags (Linux), else its processor string; and torch's ISA level."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()} {flags or platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def machine_key() -> Dict[str, Any]:
    """The part of every key that says where packages can run: torch, the CPU, the thread count."""
    return {"torch": f"{torch.__version__} {torch.version.git_version}", "cpu": cpu_signature(),
            "threads": torch.get_num_threads()}


def entry_key(model: nn.Module, weights: str, example: torch.Tensor, **fields: Any) -> Dict[str, Any]:
    """What compiled code for ``model`` on inputs like ``example`` depends on: its weights (``weights``,
    from ``weights_sha256``) and structure, the input, ``machine_key()``, the compiled forms' sources,
    and the caller's ``fields`` (JSON values: how it splits and compiles the model)."""
    structure = repr(model) + json.dumps(getattr(model, "arch_options", dict)(), sort_keys=True, default=str)
    return {"format": FORMAT, **machine_key(), "sources": _sources_sha256(),
            "structure": hashlib.sha256(structure.encode()).hexdigest(), "weights": weights,
            "input": {"shape": list(example.shape), "stride": list(example.stride()), "dtype": str(example.dtype)},
            **fields}


def entry_dir(key: Dict[str, Any], root: Optional[Path] = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return (root or store_dir()) / digest


def between_segments(x: torch.Tensor) -> torch.Tensor:
    """The layout one package's output is handed to the next in (they are built for it)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class StoreEntryError(Exception):
    """An entry that cannot be used as it is: stale or corrupt."""


def _runner(package: Any) -> Runner:
    """One tensor in, one out, straight to the package's loader: the package's ``__call__`` parses its
    pytree specs from JSON on every call, a cost small batches notice."""
    loader = getattr(package, "loader", None)
    if loader is None or not hasattr(loader, "boxed_run"):
        return package
    return lambda x: loader.boxed_run([x])[0]


def load_entry(folder: Path, key: Dict[str, Any]) -> List[Runner]:
    """The entry's package runners, in order; ``StoreEntryError`` if it is stale or corrupt,
    ``FileNotFoundError`` if there is none."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise StoreEntryError(f"corrupt: unreadable manifest ({e})") from e
    stored = manifest.get("key") or {}
    if stored != key:
        changed = sorted(k for k in set(key) | set(stored) if stored.get(k) != key.get(k))
        raise StoreEntryError(f"stale: built for another {', '.join(changed)}")
    runners = []
    for name, sha256 in manifest.get("packages", []):
        path = folder / name
        if not path.exists() or _sha256_file(path) != sha256:
            raise StoreEntryError(f"corrupt: {name} is missing or does not match its sha256")
        try:
            runners.append(_runner(torch._inductor.aoti_load_package(str(path))))
        except Exception as e:  # noqa: BLE001  (whatever the loader raises, the package is unusable)
            raise StoreEntryError(f"corrupt: {name} does not load ({type(e).__name__}: {e})") from e
    return runners


def example_input(key: Dict[str, Any]) -> torch.Tensor:
    """A random input of the key's shape, layout and dtype (the values do not matter to the compiler)."""
    torch.manual_seed(0)
    spec = key["input"]
    x = torch.empty_strided(spec["shape"], spec["stride"], dtype=getattr(torch, spec["dtype"].split(".")[-1]))
    return x.copy_(torch.randn(spec["shape"]))


def build_entry(chain: Sequence[Tuple[nn.Module, int]], key: Dict[str, Any], folder: Path,
                inductor_options: Dict[str, Any], say: Callable[[str], Any] = print) -> None:
    """Export and AOT-compile each module of ``chain`` (module, micro-batch) in turn into ``folder``
    (written whole). Each is fed ``example_input(key)`` through the packages before it, in micro-batches.
    For the worker process: export's tracing patches ``nn.Module`` for the whole process."""
    x = example_input(key)
    packages: List[Tuple[str, str]] = []
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp, torch.no_grad():
        for i, (module, size) in enumerate(chain):
            t0 = time.perf_counter()
            program = torch.export.export(module, (x[:size],))
            name = f"segment{i}.pt2"
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / name),
                                                     inductor_configs=inductor_options)
            packages.append((name, _sha256_file(tmp / name)))
            run = _runner(torch._inductor.aoti_load_package(str(tmp / name)))
            x = between_segments(torch.cat([run(chunk) for chunk in x.split(size)]))
            say(f"compiled segment {i + 1} of {len(chain)} in {time.perf_counter() - t0:.1f} s")
        atomic_write_json(tmp / MANIFEST, {"key": key, "packages": packages, "created": time.time()})


def build_in_child(model: nn.Module, key: Dict[str, Any], folder: Path, say: Callable[[str], Any] = print) -> None:
    """Build the entry in a new Python process (``WORKER``, which calls ``build_entry``), relaying its
    progress lines to ``say``; its error output is raised as a RuntimeError if it fails."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder)  # the work folders of killed callers
    # A hidden work folder named after this process, beside the entry: entries() does not list it, and
    # remove_stale_temp_files knows it for garbage once this process is gone.
    work = temp_path(folder)
    work.mkdir()
    try:
        torch.save(model, work / "model.pt")
        (work / "spec.json").write_text(json.dumps({"model": str(work / "model.pt"), "key": key,
                                                    "folder": str(folder)}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(_PACKAGE.parent), os.environ.get("PYTHONPATH")) if p))
        with open(work / "stderr.txt", "w+") as err:
            child = subprocess.Popen([sys.executable, "-m", WORKER, str(work / "spec.json")],
                                     stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            assert child.stdout is not None
            for line in child.stdout:
                say(line.rstrip("\n"))
            if child.wait() != 0:
                err.seek(0)
                raise RuntimeError(f"compiling the model failed in the compiling process (exit {child.returncode}):"
                                   f"\n{err.read()[-3000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_spec(path: str) -> Tuple[nn.Module, Dict[str, Any], Path]:
    """The worker's side of ``build_in_child``: the model, the key and the entry's folder."""
    with open(path) as f:
        spec = json.load(f)
    model = torch.load(spec["model"], weights_only=False)  # our own file, written by build_in_child
    return model, spec["key"], Path(spec["folder"])


def load_or_build(model: nn.Module, key: Dict[str, Any], say: Callable[[str], Any] = print,
                  root: Optional[Path] = None) -> Tuple[List[Runner], str]:
    """The runners for ``key``: loaded from the store, else built (in a child process) and stored.
    Also returns what happened: ``"loaded"`` or ``"built"``."""
    folder = entry_dir(key, root)
    try:
        return load_entry(folder, key), "loaded"
    except FileNotFoundError:
        pass
    except StoreEntryError as e:
        warnings.warn(f"convnextv2_hub: the compiled graphs in {folder} are {e}; removing them and compiling "
                      "again", RuntimeWarning, stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
    build_in_child(model, key, folder, say)
    return load_entry(folder, key), "built"


def entries(root: Optional[Path] = None) -> List[Dict[str, Any]]:
    """The store's entries: folder, size in bytes, and the manifest (None when unreadable)."""
    root = root or store_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            manifest: Optional[Dict[str, Any]] = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append({"folder": folder, "bytes": size, "manifest": manifest})
    return found
