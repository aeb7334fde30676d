"""Fetch ConvNeXt V2 checkpoint files: the Hugging Face Hub first, the authors' URL as fallback.

Order of sources for ``download_checkpoint(ckpt)``:

1. **Hugging Face Hub** (``ckpt.hf_hub_id`` / ``ckpt.hf_hub_filename``, timm's safetensors files) through
   ``huggingface_hub.hf_hub_download``, so its cache, mirrors and offline mode behave exactly as for any other
   Hub download. The returned path is the snapshot file inside the Hub cache::

       <hub cache>/models--timm--convnextv2_<variant>.<tag>/snapshots/<commit>/model.safetensors

2. **Authors' URL** (``ckpt.url``, dl.fbaipublicfiles.com ``.pt`` files), downloaded with plain ``urllib``
   when the Hub fails or the file is not there. Stored at::

       <HF_HOME>/convnextv2_hub/<basename of ckpt.url>

   i.e. next to the Hub cache under the same Hugging Face root, the way huggingface_hub keeps its own
   non-repo files (``<HF_HOME>/assets``). ``HF_HUB_CACHE`` relocates only the Hub cache, not this folder.
   ``ckpt.sha256``, when set, is the SHA-256 of *this* file and is checked while streaming and again when
   a cached copy is reused.

Every file is verified before it is returned, freshly downloaded or cached: a Hub file against the sha256
the Hub stated for it (the LFS ETag / ``X-Linked-Etag``, which huggingface_hub uses as the blob's name), the
authors' file against ``ckpt.sha256``. Where no sha256 is known (a git-sha1 ETag, ``sha256: null``) the file
must at least be a complete checkpoint: a safetensors header that ends where the file ends, a zip whose
central directory and CRCs are intact, or what the package's safe reader accepts. A file that fails is
removed from its cache (snapshot link and blob), never left under the expected name.

The suffix of the returned path tells the format: ``.safetensors`` (timm key layout, from the Hub) or the
authors' ``.pt`` checkpoint (needs key conversion by the loader).

Environment, read at call time (not only when huggingface_hub was imported):

- ``HF_HOME``, ``HF_HUB_CACHE`` (and legacy ``HUGGINGFACE_HUB_CACHE``), ``XDG_CACHE_HOME``: cache locations.
- ``HF_ENDPOINT``: Hub mirror.
- ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``): no request at all; only cached files are returned.
- ``CONVNEXTV2_HUB_TIMEOUT``: seconds for connecting and for each read (default 10).

Importing this module performs no network access.
"""

from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

from tqdm import tqdm

from ..files import atomic_path, user_cache_dir

__all__ = [
    "CheckpointDownloadError",
    "DownloadAttempt",
    "discard_cached_file",
    "download_checkpoint",
    "HubFileNotFoundError",
    "download_hub_file",
    "fallback_cache_dir",
    "hub_cache_dir",
    "hub_endpoint",
    "offline_mode",
    "sha256_file",
]

TIMEOUT_ENV = "CONVNEXTV2_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0  # seconds; same default as huggingface_hub's HEAD/GET timeouts
_CHUNK_SIZE = 1 << 20
_FALLBACK_SUBDIR = "convnextv2_hub"
_HUB_SOURCE = "Hugging Face Hub"
_URL_SOURCE = "authors' URL"
# Same truthy spellings huggingface_hub accepts for its boolean env vars.
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
# An LFS file's ETag (and X-Linked-Etag) is the sha256 of its content; a git blob's is a 40-hex sha1.
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ZIP_MAGIC = b"PK\x03\x04"
# A safetensors header larger than this is not one: refuse it rather than read gigabytes as JSON.
_MAX_SAFETENSORS_HEADER = 100 << 20
# (path, size, mtime, inode) of files verified in this process: a second create() of the same checkpoint
# does not hash gigabytes again, while a file replaced or rewritten since is checked anew.
_VERIFIED: set[tuple[str, int, int, int]] = set()


class _CheckpointLike(Protocol):
    """The attributes of ``convnextv2_hub.checkpoints.registry.Checkpoint`` this module uses."""

    name: str
    hf_hub_id: str
    hf_hub_filename: str
    url: str
    sha256: Optional[str]


@dataclass(frozen=True)
class DownloadAttempt:
    """One source that was tried: where, and why it did not give us the file."""

    source: str
    url: str
    reason: str


class CheckpointDownloadError(RuntimeError):
    """No source could provide the checkpoint file.

    ``checkpoint`` is the checkpoint name and ``attempts`` lists every place tried with the reason it failed.
    """

    def __init__(self, message: str, *, checkpoint: str = "", attempts: Sequence[DownloadAttempt] = ()) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.attempts = tuple(attempts)


class _FallbackFailed(Exception):
    """Internal: the authors' URL did not give a usable file; ``reason`` goes into the final error."""

    def __init__(self, reason: str, *, headline: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        # A bad file is not a connectivity problem: it must surface on its own headline, not as "try a mirror".
        self.headline = headline


class _VerificationFailed(Exception):
    """Internal: a file from the Hub (or its cache) failed verification and was removed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# Environment, read at call time
# --------------------------------------------------------------------------------------------------------------


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _hf_home() -> Path:
    """``HF_HOME`` resolved the way huggingface_hub.constants does it, but from the current environment."""
    return Path(_expand(os.environ.get("HF_HOME") or str(user_cache_dir() / "huggingface")))


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache directory for the current environment (``HF_HUB_CACHE`` or ``HF_HOME/hub``)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(_expand(explicit)) if explicit else _hf_home() / "hub"


def fallback_cache_dir() -> Path:
    """Where files from the authors' URLs are cached: ``<HF_HOME>/convnextv2_hub``."""
    return _hf_home() / _FALLBACK_SUBDIR


def offline_mode() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``): only cached files can be used."""
    # Either the current environment or huggingface_hub's import-time snapshot: if the latter says offline,
    # huggingface_hub refuses every request anyway, so treating it as offline gives the clearer error.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.upper() in _TRUE_VALUES:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_endpoint() -> Optional[str]:
    """``HF_ENDPOINT`` from the current environment; None lets huggingface_hub use its own default."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("convnextv2-hub")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# --------------------------------------------------------------------------------------------------------------
# Error descriptions
# --------------------------------------------------------------------------------------------------------------


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _describe(exc: BaseException) -> str:
    """A short reason for a failed request: HTTP status, connection refused, timeout, offline, ..."""
    chain: list[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and len(chain) < 8 and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for err in chain:
        if isinstance(err, urllib.error.HTTPError):
            return f"HTTP {err.code} {err.reason}".rstrip()
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            phrase = getattr(response, "reason_phrase", "") or ""
            return f"HTTP {status} {phrase}".rstrip()
    for err in chain:
        name = type(err).__name__
        text = str(err)
        if name == "OfflineModeIsEnabled":
            return "offline mode (HF_HUB_OFFLINE is set)"
        if isinstance(err, ConnectionRefusedError) or "refused" in text.lower():
            return "connection refused"
        if isinstance(err, socket.gaierror) or "name or service not known" in text.lower():
            return f"host name could not be resolved ({_first_line(text)})"
        if isinstance(err, (TimeoutError, socket.timeout)) or "timeout" in name.lower() or "timed out" in text:
            detail = _first_line(text)
            return "timed out" if detail in ("", "timed out") else f"timed out ({detail})"
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


def _advice(ckpt: _CheckpointLike, fallback_path: Path) -> str:
    return (
        "What to do:\n"
        "  - set HF_ENDPOINT to a reachable Hugging Face mirror (e.g. HF_ENDPOINT=https://<mirror>), or check "
        "your proxy/firewall;\n"
        f"  - or pre-download where the Hub is reachable (`hf download {ckpt.hf_hub_id} {ckpt.hf_hub_filename}`) "
        f"and copy the cache to {hub_cache_dir()}, or put the file from {ckpt.url} at {fallback_path};\n"
        f"  - or pass a local file: convnextv2_hub.create({ckpt.name!r}, checkpoint_path='/path/to/checkpoint')."
    )


def _failure(ckpt: _CheckpointLike, attempts: list[DownloadAttempt], fallback_path: Path, headline: str = "") -> (
        CheckpointDownloadError):
    tried = "\n".join(f"  - {a.source}: {a.url}\n      -> {a.reason}" for a in attempts)
    headline = headline or f"Could not get checkpoint {ckpt.name!r}."
    message = f"{headline}\nTried:\n{tried}\n{_advice(ckpt, fallback_path)}"
    return CheckpointDownloadError(message, checkpoint=ckpt.name, attempts=attempts)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------------------------


def _hub_url(repo_id: str, filename: str, endpoint: Optional[str], revision: Optional[str] = None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, endpoint=endpoint, revision=revision)


def _proxy_configured(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parsed.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parsed.hostname or "")


def _unreachable(url: str, timeout: float) -> Optional[str]:
    """Reason why a TCP connection to ``url``'s host cannot be opened, or None if it can (or we cannot tell).

    huggingface_hub retries a refused or timed-out HEAD with exponential backoff (about 25 s in total) before
    giving up, so an unreachable Hub would delay the fallback. One plain connect tells us quickly. Behind a
    proxy the direct connect means nothing, so it is skipped and huggingface_hub decides.
    """
    if _proxy_configured(url):
        return None
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname
    if not host:
        return None
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return _describe(exc)
    except ValueError:  # malformed port in HF_ENDPOINT: let huggingface_hub report it
        return None


class _SilentTqdm(tqdm):
    """Progress bar class handed to huggingface_hub for ``progress=False``: never displays anything.

    A plain tqdm subclass (not huggingface_hub's), so huggingface_hub passes only standard tqdm arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _hub_download(repo_id: str, filename: str, *, endpoint: Optional[str], local_only: bool, force: bool,
                  progress: bool, timeout: float, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = dict(
        repo_id=repo_id,
        filename=filename,
        revision=revision,
        token=token,
        cache_dir=str(hub_cache_dir()),
        endpoint=endpoint,
        local_files_only=local_only,
        force_download=force,
        etag_timeout=timeout,
        library_name="convnextv2-hub",
        library_version=_package_version(),
    )
    if not progress and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _SilentTqdm
    return Path(hf_hub_download(**kwargs))


# --------------------------------------------------------------------------------------------------------------
# Verification: nothing is handed to the loader (or left in a cache) unchecked
# --------------------------------------------------------------------------------------------------------------


def sha256_file(path: Union[str, "os.PathLike[str]"]) -> str:
    """The hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _safetensors_problem(path: Path, size: int) -> Optional[str]:
    """Why ``path`` is not a complete safetensors file (header and tensor data must end where the file ends)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                return f"its safetensors header claims {n} bytes but the file has only {size}"
            header = json.loads(f.read(n))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        needed = 8 + n + max(ends, default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"its safetensors header is unreadable ({type(exc).__name__})"
    if needed != size:
        return f"its safetensors header describes {needed} bytes but the file has {size} (truncated or padded)"
    return None


def _zip_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete zip (torch.save) file: end-of-central-directory record and member CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        return f"it is not a complete zip/torch file ({_first_line(str(exc)) or type(exc).__name__})"
    return f"member {bad!r} of the zip/torch file fails its CRC check" if bad else None


def _checkpoint_problem(path: Path, *, cheap_only: bool = False, suffix: str = "") -> Optional[str]:
    """Why the file at ``path`` is not a complete checkpoint, or None when it is one.

    Safetensors files are checked through their header (cheap, always done); zip (torch.save) files through
    their central directory and CRCs; anything else with the package's safe reader. ``cheap_only`` skips
    the checks that read the whole file, for callers that have already matched a sha256. ``suffix`` is the
    file's real suffix when ``path`` has none of its own (a Hub blob is named by its ETag).
    """
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
    if (suffix or path.suffix) == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return _safetensors_problem(path, size)
    if cheap_only:
        return None
    if head.startswith(_ZIP_MAGIC):
        return _zip_problem(path)
    from .reading import CheckpointError, read_checkpoint_file  # torch is imported only when needed

    try:
        read_checkpoint_file(path)
    except CheckpointError as exc:
        return _first_line(str(exc))
    return None


def _file_problem(path: Path, expected_sha256: Optional[str], stated_by: str, suffix: str = "",
                  checkpoint: bool = True) -> Optional[str]:
    """Why ``path`` fails verification (sha256 against ``expected_sha256`` stated by ``stated_by``, else, for
    a ``checkpoint``, a completeness check), or None. Results are remembered for unchanged files within this
    process."""
    key = _file_key(path)
    if key in _VERIFIED:
        return None
    if expected_sha256:
        actual = sha256_file(path)
        if actual != expected_sha256.lower():
            return f"sha256 mismatch: expected {expected_sha256.lower()} ({stated_by}), got {actual}"
    problem = _checkpoint_problem(path, cheap_only=bool(expected_sha256), suffix=suffix) if checkpoint else None
    if problem:
        return f"not a complete checkpoint: {problem}"
    _VERIFIED.add(key)
    return None


def _remove(path: Path) -> None:
    """Remove ``path`` and, when it is a link (a Hub snapshot entry), the blob it points to."""
    target = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    if target != path:
        target.unlink(missing_ok=True)
    _VERIFIED.difference_update({k for k in _VERIFIED if k[0] in (str(path), str(target))})


def discard_cached_file(path: Union[str, "os.PathLike[str]"]) -> None:
    """Remove a file that ``download_checkpoint`` returned from its cache, so the next call fetches it again.

    For a Hub file both the snapshot entry and its blob go; huggingface_hub would otherwise re-link the
    same broken blob. Paths outside the Hub cache and the fallback cache are refused (ValueError): this
    never deletes a user's own file.
    """
    path = Path(path)
    inside = [d.resolve() for d in (hub_cache_dir(), fallback_cache_dir())]
    if not any(path.resolve(strict=False).is_relative_to(d) or path.absolute().is_relative_to(d) for d in inside):
        raise ValueError(f"{str(path)!r} is not in the checkpoint caches ({', '.join(map(str, inside))})")
    _remove(path)


def _check_hub_file(path: Path, stated: Optional[tuple[str, str]] = None, checkpoint: bool = True) -> None:
    """Verify a file returned by ``hf_hub_download``; on failure remove it from the Hub cache and raise.

    The blob's name is the ETag the Hub stated when it was downloaded: for LFS files (all weights) that is
    the sha256 of the content. A 40-hex git sha1 ETag, or a cache without symlinks (no blob name to read),
    leaves the completeness check (for a ``checkpoint``). ``stated``: (sha256, who states it), a hash another
    file of the repo gives for this one, checked as well.
    """
    blob = Path(os.path.realpath(path))
    etag = blob.name.lower() if blob.parent.name == "blobs" else ""
    expected = etag if _SHA256_RE.fullmatch(etag) else None
    problem = _file_problem(blob, expected, "the sha256 the Hub states for it, its ETag", suffix=path.suffix,
                            checkpoint=checkpoint)
    if problem is None and stated is not None and stated[0].lower() != expected:
        actual = sha256_file(blob)
        if actual != stated[0].lower():
            problem = f"sha256 mismatch: expected {stated[0].lower()} ({stated[1]}), got {actual}"
    if problem is None:
        return
    _remove(path)
    raise _VerificationFailed(
        f"{problem}; the file was removed from the Hub cache ({path} -> {blob}). If this repeats, the server, "
        "a proxy or the mirror in HF_ENDPOINT sends a wrong file: retry later or use another mirror"
    )


# --------------------------------------------------------------------------------------------------------------
# Authors' URL
# --------------------------------------------------------------------------------------------------------------


def _fallback_path(ckpt: _CheckpointLike) -> Path:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(ckpt.url).path))
    if not name or name in {".", ".."}:
        # No usable file name in the URL: derive a stable one so distinct URLs never collide.
        name = hashlib.sha256(ckpt.url.encode()).hexdigest()[:16] + ".pt"
    return fallback_cache_dir() / name


def _cached_fallback(ckpt: _CheckpointLike, path: Path) -> tuple[Optional[Path], Optional[str]]:
    """Look for a cached authors' file, verified against ``ckpt.sha256`` (else checked to be complete).

    Returns (path, None) for a usable copy, (None, reason) for a copy that failed and was removed,
    (None, None) for none.
    """
    if not path.is_file():
        return None, None
    problem = _file_problem(path, ckpt.sha256, "the manifest's sha256")
    if problem is None:
        return path, None
    _remove(path)  # a copy from before verification existed, or damaged since: never reuse it
    return None, f"cached file {path} failed verification ({problem}) and was removed"


def _stream_to_file(url: str, dest: Path, *, expected_sha256: Optional[str], progress: bool,
                    timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically (``files.atomic_path``): a failed, short or unverifiable download
    leaves ``dest`` as it was and no partial file behind."""
    request = urllib.request.Request(url, headers={"User-Agent": f"convnextv2-hub/{_package_version()}"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        try:
            # "xb" rather than mkstemp: the file gets the umask's permissions, not 0600, in a shared cache.
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "xb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                digest, received = _copy_with_progress(response, out, total, dest.name, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise _FallbackFailed(_describe(exc)) from exc
        # http.client returns a short body without error when the server closes early, so check the length.
        if total is not None and received != total:
            raise _FallbackFailed(f"incomplete download: connection closed after {received} of {total} bytes")
        _check_download(url, tmp, digest.hexdigest(), received, expected_sha256, total is not None)
    _VERIFIED.add(_file_key(dest))


def _check_download(url: str, tmp: Path, actual: str, received: int, expected_sha256: Optional[str],
                    length_stated: bool) -> None:
    """Raise ``_FallbackFailed`` unless the body just received is the file: its sha256 when the manifest
    knows it, else a complete checkpoint (without a Content-Length, a connection closed early looks exactly
    like a clean end of the body, so only the file's own structure can tell)."""
    if expected_sha256:
        if actual != expected_sha256.lower():
            raise _FallbackFailed(
                f"sha256 mismatch for {url}: expected {expected_sha256.lower()} (the manifest's sha256), got "
                f"{actual} (downloaded file discarded)",
                headline="failed its sha256 check (hashes below)",
            )
        return
    problem = _checkpoint_problem(tmp)
    if problem is None:
        return
    if not length_stated:
        raise _FallbackFailed(
            f"incomplete download: the server sent no Content-Length and the {received} bytes received are not "
            f"a complete checkpoint ({problem}); downloaded file discarded",
            headline="was cut short (details below)",
        )
    raise _FallbackFailed(f"the {received} bytes received are not a checkpoint ({problem}); downloaded file "
                          "discarded", headline="is not a valid checkpoint (details below)")


def _copy_with_progress(response: Any, out: Any, total: Optional[int], desc: str, progress: bool) -> tuple[Any, int]:
    """Copy the response body to ``out`` in chunks; return its sha256 object and its length."""
    digest = hashlib.sha256()
    received = 0
    # disable=None: tqdm shows the bar only on a TTY, so logs and CI stay clean.
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=None if progress else True, leave=False) as bar:
        while True:
            chunk = response.read(_CHUNK_SIZE)
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return digest, received


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def download_checkpoint(ckpt: _CheckpointLike, *, progress: bool = True, force: bool = False) -> Path:
    """Return a local path to ``ckpt``'s weights, downloading them if needed; the file is always verified.

    Tries the Hugging Face Hub (``ckpt.hf_hub_id``/``ckpt.hf_hub_filename``, honouring its cache, ``HF_HOME``,
    ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` as set at call time), then the authors' URL
    (``ckpt.url``) cached under ``<HF_HOME>/convnextv2_hub/``.

    Verification, for fresh downloads and cached copies alike: a Hub file against the sha256 the Hub states
    for it (its LFS ETag, which names the blob), the authors' file against ``ckpt.sha256``; where no sha256
    is known, the file must be a complete checkpoint. A file that fails is removed from its cache and the
    next source is tried; the error lists what failed, with expected and actual hashes.

    Args:
        ckpt: a ``convnextv2_hub.checkpoints.registry.Checkpoint`` (or any object with the same attributes).
        progress: show download progress bars (only on a TTY).
        force: download again even if a cached copy exists (needs network; refused in offline mode).

    Raises:
        CheckpointDownloadError: no source gave a verified file; the message names the checkpoint, each URL
            tried with its reason, and what to do about it.
    """
    timeout = _timeout()
    fallback_path = _fallback_path(ckpt)
    hub_url = _hub_url(ckpt.hf_hub_id, ckpt.hf_hub_filename, hub_endpoint())
    if offline_mode():
        return _from_caches_offline(ckpt, hub_url, fallback_path, force=force, progress=progress, timeout=timeout)

    attempts: list[DownloadAttempt] = []
    # 1. The Hub. If its host refuses connections, only the local Hub cache is consulted (what
    #    huggingface_hub itself does on connection errors, minus its ~25 s of retries).
    unreachable = _unreachable(hub_url, timeout)
    path = _try_hub(ckpt.hf_hub_id, ckpt.hf_hub_filename, hub_url, attempts, unreachable=unreachable, force=force,
                    progress=progress, timeout=timeout)
    if path is not None:
        return path

    # 2. The authors' URL, cached copy first (a copy that fails verification is removed by the lookup).
    if not force:
        cached, _ = _cached_fallback(ckpt, fallback_path)
        if cached is not None:
            return cached
    try:
        _stream_to_file(ckpt.url, fallback_path, expected_sha256=ckpt.sha256, progress=progress, timeout=timeout)
    except _FallbackFailed as exc:
        attempts.append(DownloadAttempt(_URL_SOURCE, ckpt.url, exc.reason))
        headline = ""
        if exc.headline:
            headline = (f"Checkpoint {ckpt.name!r} downloaded from {ckpt.url} {exc.headline}; the download was "
                        "discarded and nothing was stored in the cache.")
        raise _failure(ckpt, attempts, fallback_path, headline) from exc
    _warn_if_hub_file_was_bad(attempts, ckpt)
    return fallback_path


def _try_hub(repo_id: str, filename: str, hub_url: str, attempts: list[DownloadAttempt], *,
             unreachable: Optional[str], force: bool, progress: bool, timeout: float, revision: Optional[str] = None,
             token: Optional[str] = None, check: Any = _check_hub_file, reraise: tuple = ()) -> Optional[Path]:
    """The Hub's file, verified; None, with the reason added to ``attempts``, when the Hub cannot give one
    (the exceptions of ``reraise`` propagate instead: a caller without a fallback tells them apart).

    A *cached* copy that fails verification is removed and downloaded once more when the Hub is reachable:
    the damage may be local (or from a download before files were verified) and the server fine. A fresh
    download that fails is not repeated; the same server would most likely send the same file again.
    """
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir()), revision=revision)
    tries = 2 if isinstance(cached, str) and not force and unreachable is None else 1
    for attempt in range(tries):
        try:
            path = _hub_download(repo_id, filename, endpoint=hub_endpoint(), local_only=unreachable is not None,
                                 force=force, progress=progress, timeout=timeout, revision=revision, token=token)
            check(path)
            if attempt:
                warnings.warn(f"{attempts[-1].reason}: done, the new copy is verified", RuntimeWarning, stacklevel=3)
            return path
        except _VerificationFailed as exc:
            again = "; downloading it again" if attempt + 1 < tries else ""
            prefix = "cached file: " if attempt == 0 and tries == 2 else ""
            attempts.append(DownloadAttempt(_HUB_SOURCE, hub_url, f"{prefix}{exc.reason}{again}"))
        except reraise:
            raise
        except Exception as exc:  # any Hub failure (HTTP error, network, bad mirror response): use the fallback
            attempts.append(DownloadAttempt(_HUB_SOURCE, hub_url, unreachable or _describe(exc)))
            return None
    return None


def _warn_if_hub_file_was_bad(attempts: list[DownloadAttempt], ckpt: _CheckpointLike) -> None:
    # The fallback worked, but a Hub (or mirror) that serves wrong files is worth knowing about.
    bad = [a for a in attempts if a.source == _HUB_SOURCE and "removed from the Hub cache" in a.reason]
    if bad:
        warnings.warn(f"the Hugging Face Hub file of {ckpt.name!r} failed verification ({bad[0].reason}); "
                      f"using the verified file from {ckpt.url} instead", RuntimeWarning, stacklevel=3)


def _from_caches_offline(ckpt: _CheckpointLike, hub_url: str, fallback_path: Path, *, force: bool,
                         progress: bool, timeout: float) -> Path:
    """Offline mode: a verified file from the Hub cache or the fallback cache, else a clear error."""
    attempts: list[DownloadAttempt] = []
    if force:
        raise _failure(
            ckpt,
            [DownloadAttempt(_HUB_SOURCE, hub_url, "offline mode (HF_HUB_OFFLINE is set)")],
            fallback_path,
            f"Cannot re-download checkpoint {ckpt.name!r} with force=True: HF_HUB_OFFLINE is set. "
            "Unset HF_HUB_OFFLINE (or set it to 0) to allow downloads.",
        )
    try:
        path = _hub_download(ckpt.hf_hub_id, ckpt.hf_hub_filename, endpoint=hub_endpoint(), local_only=True,
                             force=False, progress=progress, timeout=timeout)
        _check_hub_file(path)
        return path
    except _VerificationFailed as exc:
        attempts.append(DownloadAttempt(_HUB_SOURCE, hub_url, f"offline mode (HF_HUB_OFFLINE is set); {exc.reason}"))
    except Exception as exc:  # not in the Hub cache: the fallback cache may still have the file
        reason = f"offline mode (HF_HUB_OFFLINE is set); not in the Hub cache {hub_cache_dir()}"
        if type(exc).__name__ != "LocalEntryNotFoundError":  # something other than a plain cache miss
            reason += f" ({_describe(exc)})"
        attempts.append(DownloadAttempt(_HUB_SOURCE, hub_url, reason))
    cached, bad = _cached_fallback(ckpt, fallback_path)
    if cached is not None:
        return cached
    attempts.append(DownloadAttempt(
        _URL_SOURCE, ckpt.url, bad or f"offline mode (HF_HUB_OFFLINE is set); not cached at {fallback_path}"))
    raise _failure(
        ckpt, attempts, fallback_path,
        f"Checkpoint {ckpt.name!r} is not cached (or its cached copy failed verification and was removed) and "
        "HF_HUB_OFFLINE is set, so nothing was downloaded. Unset HF_HUB_OFFLINE (or set it to 0) to download it.",
    )


# --------------------------------------------------------------------------------------------------------------
# Any file of a Hub repo (models pushed with ``convnextv2 push``): the same cache, mirror, offline mode and
# verification, without an authors' URL to fall back on
# --------------------------------------------------------------------------------------------------------------


class HubFileNotFoundError(CheckpointDownloadError):
    """The Hub (or the cache, offline) answered that the repo, the revision or the file does not exist."""


def download_hub_file(repo_id: str, filename: str, *, revision: Optional[str] = None,
                      stated_sha256: Optional[tuple[str, str]] = None, checkpoint: bool = True, force: bool = False,
                      progress: bool = True, token: Optional[str] = None) -> Path:
    """A verified local copy of ``filename`` in the Hub repo ``repo_id`` (through the Hub cache, ``HF_ENDPOINT``
    and ``HF_HUB_OFFLINE`` exactly as ``download_checkpoint``), downloading it when needed.

    Verified like a released checkpoint: against the sha256 the Hub states (its LFS ETag), a ``checkpoint``
    also for completeness; ``stated_sha256`` = (sha256, who states it) is checked as well. A cached copy that
    fails is removed and fetched once more (online). Raises ``HubFileNotFoundError`` when the repo, revision
    or file does not exist (or, offline, is not cached), ``CheckpointDownloadError`` for anything else.
    """
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    timeout = _timeout()
    hub_url = _hub_url(repo_id, filename, hub_endpoint(), revision)
    where = f"{filename} of {repo_id}" + (f" at revision {revision}" if revision else "")
    offline = offline_mode()
    if offline and force:
        raise CheckpointDownloadError(f"Cannot download {where} again (force): HF_HUB_OFFLINE is set. Unset "
                                      "HF_HUB_OFFLINE (or set it to 0) to allow downloads.", checkpoint=repo_id)
    unreachable = "offline mode (HF_HUB_OFFLINE is set)" if offline else _unreachable(hub_url, timeout)
    attempts: list[DownloadAttempt] = []
    missing = (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    try:
        path = _try_hub(repo_id, filename, hub_url, attempts, unreachable=unreachable, force=force, progress=progress,
                        timeout=timeout, revision=revision, token=token, reraise=missing,
                        check=lambda f: _check_hub_file(f, stated_sha256, checkpoint))
    except missing as exc:
        raise HubFileNotFoundError(f"{where} does not exist on the Hub ({hub_url}): {_describe(exc)}",
                                   checkpoint=repo_id) from exc
    if path is not None:
        return path
    tried = "\n".join(f"  - {a.source}: {a.url}\n      -> {a.reason}" for a in attempts)
    cause = ("it is not in the Hub cache and downloads are off" if offline or unreachable else "the Hub failed")
    error = HubFileNotFoundError if offline else CheckpointDownloadError
    raise error(f"Could not get {where}: {cause}.\nTried:\n{tried}\nWhat to do: check the repo name and your "
                f"network, set HF_ENDPOINT to a reachable mirror, or unset HF_HUB_OFFLINE to download it "
                f"(cache: {hub_cache_dir()}).", checkpoint=repo_id, attempts=attempts)
