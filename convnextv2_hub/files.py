"""The package's files on disk: where its caches live, and atomic output files.

Whatever we write for a user (checkpoint, export, log, figure) is either the old file or the complete
new one, never half of it, even when the process is killed mid-write.

The data goes to a hidden temporary name in the target's folder (same filesystem, so the rename is
atomic), is fsynced, then renamed over the target; on any error the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def user_cache_dir() -> Path:
    """``XDG_CACHE_HOME``, else ``~/.cache``: the root the Hugging Face and torch caches default to."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def temp_path(path: PathLike) -> Path:
    """An unused hidden name next to ``path``; random, so concurrent writers never share one."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path for the caller (or any library) to write; on success it replaces ``path``.

    An exception inside the block removes the temporary file and leaves ``path`` untouched, which is
    how a failed export verification discards its artefact.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp, directory=False)  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)  # persist the rename itself


def atomic_write(path: PathLike, write: Callable[[IO[Any]], Any], text: bool = False) -> None:
    """``write(f)`` into a new file at ``path`` atomically; ``text=True`` opens it as UTF-8 text
    without newline translation (what the csv module wants)."""
    with atomic_path(path) as tmp:
        with open(tmp, "x", newline="", encoding="utf-8") if text else open(tmp, "xb") as f:
            write(f)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (non-JSON values through ``str``), written atomically."""
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` into ``path`` atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync(p: Path, directory: bool) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        if directory:  # opening a folder is not possible everywhere (Windows): skip, as git does
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)
