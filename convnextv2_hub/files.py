"""The package's files on disk: where its caches live, and atomic output files.

Whatever we write for a user (checkpoint, export, log, figure) is either the old file or the complete
new one, never half of it, even when the process is killed mid-write.

The data goes to a hidden temporary name in the target's folder (same filesystem, so the rename is
atomic), is fsynced, then renamed over the target; on any error the temporary file is removed.

A process killed with SIGKILL cannot remove its temporary file, which can be as large as a model. The
name says who wrote it: ``.NAME.<host>-<pid>.<hex>.tmp``. The next atomic write of the same target
removes such files whose writer is no longer alive on this host (and, from other hosts of a shared
file system or where a process cannot be asked, those untouched for a day), with a warning naming
each and its size; a live writer's file is never touched. Files of the older ``.NAME.<hex>.tmp``
form carry no writer, so they count as stale once untouched for an hour.

A full disk (or quota) while writing raises ``DiskFullError`` naming the file; the previous file is
left as it was.

The one exception is a results file appended to while a long run goes on (``LineAppender``): it is
flushed after every write and fsynced every few seconds, so a crash can at worst tear its last line,
which ``drop_torn_tail`` removes before the run is resumed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import socket
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

# A temporary file of the older form (no writer in its name) untouched this long is taken as left by a
# killed writer: every writer of ours writes its temporary file in one go, in well under an hour.
LEGACY_STALE_AGE_S = 3600.0
# Another host's writer cannot be asked whether it is alive: only a day without change counts as dead.
FOREIGN_STALE_AGE_S = 24 * 3600.0

_NEW_FORM = re.compile(r"(?P<host>[A-Za-z0-9-]*)-(?P<pid>[0-9]+)\.[0-9a-f]{12}\.tmp")
_OLD_FORM = re.compile(r"[0-9a-f]{12}\.tmp")
# torch.save reports a failed write of its zip writer as a RuntimeError, not as the OSError beneath it.
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


class DiskFullError(OSError):
    """No space (or quota) left to write a file; the previous file at that path is unchanged."""


def user_cache_dir() -> Path:
    """``XDG_CACHE_HOME``, else ``~/.cache``: the root the Hugging Face and torch caches default to."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def _host_tag() -> str:
    # Only characters that cannot be mistaken for the name's separators ('.', '-' before the pid).
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32] or "host"


def temp_path(path: PathLike) -> Path:
    """An unused hidden name next to ``path``, naming this host and process (so a later write can tell
    whether its writer is still alive); random, so concurrent writers never share one."""
    path = Path(path)
    return path.parent / f".{path.name}.{_host_tag()}-{os.getpid()}.{secrets.token_hex(6)}.tmp"


def _pid_alive(pid: int) -> Optional[bool]:
    """Whether process ``pid`` of this host exists; None where it cannot be asked safely."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return None  # on Windows os.kill(pid, 0) sends CTRL_C_EVENT: never used to ask
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is another user's (EPERM), or cannot be asked: assume alive
    return True


def _is_stale(tmp: Path, rest: str, now: float) -> bool:
    """Whether ``tmp`` (``rest``: its name after ``.NAME.``) is a temporary file whose writer is gone."""
    try:
        age = now - tmp.stat().st_mtime
    except OSError:
        return False
    m = _NEW_FORM.fullmatch(rest)
    if m is not None:
        alive = _pid_alive(int(m.group("pid"))) if m.group("host") == _host_tag() else None
        return not alive if alive is not None else age > FOREIGN_STALE_AGE_S
    return _OLD_FORM.fullmatch(rest) is not None and age > LEGACY_STALE_AGE_S


def remove_stale_temp_files(path: PathLike) -> List[Tuple[Path, int]]:
    """Remove the temporary files and folders of ``path`` (our naming only) left by dead writers, with a warning
    naming each and its size; returns ``[(file, size in bytes), ...]`` of those removed."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return []  # no folder (the write itself will say so) or not listable: nothing to clean
    removed: List[Tuple[Path, int]] = []
    now = time.time()
    for p in candidates:
        if not _is_stale(p, p.name[len(prefix):], now):
            continue
        try:
            if p.is_dir() and not p.is_symlink():  # a killed atomic_folder writer's folder
                import shutil

                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                shutil.rmtree(p)
            else:
                size = p.stat().st_size
                p.unlink()
        except OSError:
            continue  # gone already (another writer cleaned it) or not ours to remove
        removed.append((p, size))
    if removed:
        listed = ", ".join(f"{p.name} ({_size_text(n)})" for p, n in removed)
        warnings.warn(f"removed {len(removed)} temporary file(s) left in {path.parent} by an interrupted write "
                      f"of {path.name}: {listed}", stacklevel=2)
    return removed


def _size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for want of space: ENOSPC / EDQUOT, or torch.save's
    ``[enforce fail at inline_container.cc ...] ... file write failed``."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no EDQUOT on Windows
    if isinstance(e, RuntimeError):
        text = str(e)
        return "inline_container" in text and any(s in text for s in _TORCH_WRITE_FAILED)
    return False


def _disk_full_error(path: Path) -> DiskFullError:
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    err = DiskFullError(f"the disk is full: could not write {path} ({kept}); free some space on {path.parent} "
                        "and run again")
    err.errno = errno.ENOSPC  # set after: with it as an argument, str() would start with "[Errno 28]"
    return err


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path for the caller (or any library) to write; on success it replaces ``path``.

    An exception inside the block removes the temporary file and leaves ``path`` untouched, which is
    how a failed export verification discards its artefact. Temporary files of ``path`` left by
    killed writers are removed first (``remove_stale_temp_files``); a full disk raises ``DiskFullError``.
    """
    path = Path(path)
    remove_stale_temp_files(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp, directory=False)  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise _disk_full_error(path) from e
        raise
    _fsync(path.parent, directory=True)  # persist the rename itself


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; when the block succeeds, every file in it (subfolders
    too) is fsynced and it is renamed to ``path`` (replacing what was there), so ``path`` is never a
    half-written folder. On error the temporary folder is removed and ``path`` left as it was."""
    import shutil

    path = Path(path)
    remove_stale_temp_files(path)
    tmp = temp_path(path)
    tmp.mkdir()
    old: Optional[Path] = None
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            _fsync(f, directory=f.is_dir())
        if path.exists() or path.is_symlink():
            # A folder cannot be renamed over a non-empty one: move the old aside first, remove it after.
            old = temp_path(path)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # the rename into place failed: put the old one back
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise _disk_full_error(path) from e
        raise
    _fsync(path.parent, directory=True)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def atomic_write(path: PathLike, write: Callable[[IO[Any]], Any], text: bool = False) -> None:
    """``write(f)`` into a new file at ``path`` atomically; ``text=True`` opens it as UTF-8 text
    without newline translation (what the csv module wants)."""
    with atomic_path(path) as tmp:
        with open(tmp, "x", newline="", encoding="utf-8") if text else open(tmp, "xb") as f:
            write(f)


def strict_json(obj: Any) -> Tuple[Any, List[str]]:
    """``obj`` with every NaN / infinite float replaced by None (strict JSON has no such numbers), and
    the paths of those replaced (``"val.loss"``, ``"losses[3]"``)."""
    replaced: List[str] = []

    def clean(x: Any, where: str) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            replaced.append(where or "value")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    return clean(obj, ""), replaced


def json_text(obj: Any, indent: Union[int, None] = None) -> str:
    """Strict JSON of ``obj`` (non-JSON values through ``str``). A non-finite number becomes null, and a
    dict says so under ``"non_finite_as_null"`` (the paths of the values that were NaN or infinite)."""
    cleaned, replaced = strict_json(obj)
    if replaced and isinstance(cleaned, dict):
        cleaned["non_finite_as_null"] = replaced
    return json.dumps(cleaned, indent=indent, default=str, allow_nan=False)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as indented strict JSON (``json_text``), written atomically."""
    data = (json_text(obj, indent=2) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` into ``path`` atomically (a full disk: ``DiskFullError``, old file kept)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------------------------------------
# Files appended to during a long run (convnextv2 predict --output): they cannot be renamed into place
# at the end without losing every result of an interrupted run, so they are written line by line.
# ------------------------------------------------------------------------------------------------
# How often an appended file is fsynced: a kill loses nothing the OS already has (every batch is
# flushed), a power cut at most this many seconds of lines.
APPEND_FSYNC_S = 10.0


def drop_torn_tail(path: PathLike) -> int:
    """Cut ``path`` back to the end of its last complete line (the last ``\n``); returns the bytes cut.

    A process killed (or a disk that filled up) in the middle of appending a line leaves that line
    without its newline; this removes it, so the next append starts on a line of its own.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            found = f.read(end - start).rfind(b"\n")
            if found >= 0:
                end = start + found + 1
                break
            end = start
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return size - end


class LineAppender:
    """Append whole lines to ``path`` during a long run, so that a crash loses or tears at most the last.

    Each ``write`` hands its complete lines to the OS in one call (a killed process loses nothing
    written before); the file is fsynced every ``fsync_every_s`` seconds and on ``close``, which bounds
    what a power cut can lose. What a crash can leave is a torn last line: ``drop_torn_tail`` removes it
    before the next run appends. ``header`` is written first when the file is new or empty. A full disk
    raises ``DiskFullError``; the lines already written stay.
    """

    def __init__(self, path: PathLike, header: str = "", fsync_every_s: float = APPEND_FSYNC_S) -> None:
        self.path = Path(path)
        self.fsync_every_s = fsync_every_s
        # surrogateescape: a file name that is not valid UTF-8 (os.fsdecode gives it lone surrogates) is
        # written back as its own bytes instead of failing the job.
        self._file = open(self.path, "a", encoding="utf-8", errors="surrogateescape", newline="")
        self._synced = time.monotonic()
        if header and self._file.tell() == 0:
            self.write(header)

    def write(self, lines: str) -> None:
        """Append ``lines`` (complete lines, each ending in a newline) and pass them to the OS now."""
        try:
            self._file.write(lines)
            self._file.flush()
            if time.monotonic() - self._synced >= self.fsync_every_s:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(f"the disk is full: could not append to {self.path} (the lines written so far "
                                    f"are kept); free some space on {self.path.parent} and run the same command "
                                    "again to go on where it stopped") from e
            raise

    def close(self) -> None:
        """Flush and fsync the lines written; the file stays as it is."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> "LineAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
