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
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from tqdm import tqdm

from ..files import atomic_path, user_cache_dir

__all__ = [
    "CheckpointDownloadError",
    "DownloadAttempt",
    "download_checkpoint",
    "fallback_cache_dir",
    "hub_cache_dir",
]

TIMEOUT_ENV = "CONVNEXTV2_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0  # seconds; same default as huggingface_hub's HEAD/GET timeouts
_CHUNK_SIZE = 1 << 20
_FALLBACK_SUBDIR = "convnextv2_hub"
_HUB_SOURCE = "Hugging Face Hub"
_URL_SOURCE = "authors' URL"
# Same truthy spellings huggingface_hub accepts for its boolean env vars.
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


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

    def __init__(self, reason: str, *, hard: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        # A hash mismatch is not a connectivity problem: it must surface on its own, not as "try a mirror".
        self.hard = hard


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


def _offline() -> bool:
    # Either the current environment or huggingface_hub's import-time snapshot: if the latter says offline,
    # huggingface_hub refuses every request anyway, so treating it as offline gives the clearer error.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.upper() in _TRUE_VALUES:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _endpoint() -> Optional[str]:
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


def _hub_url(ckpt: _CheckpointLike, endpoint: Optional[str]) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(ckpt.hf_hub_id, ckpt.hf_hub_filename, endpoint=endpoint)


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


def _hub_download(ckpt: _CheckpointLike, *, endpoint: Optional[str], local_only: bool, force: bool,
                  progress: bool, timeout: float) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = dict(
        repo_id=ckpt.hf_hub_id,
        filename=ckpt.hf_hub_filename,
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
# Authors' URL
# --------------------------------------------------------------------------------------------------------------


def _fallback_path(ckpt: _CheckpointLike) -> Path:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(ckpt.url).path))
    if not name or name in {".", ".."}:
        # No usable file name in the URL: derive a stable one so distinct URLs never collide.
        name = hashlib.sha256(ckpt.url.encode()).hexdigest()[:16] + ".pt"
    return fallback_cache_dir() / name


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_fallback(ckpt: _CheckpointLike, path: Path) -> tuple[Optional[Path], Optional[str]]:
    """Look for a cached authors' file.

    Returns (path, None) for a usable copy, (None, reason) for a copy that fails its sha256, (None, None) for none.
    """
    if not path.is_file():
        return None, None
    if ckpt.sha256:
        actual = _sha256_file(path)
        if actual != ckpt.sha256.lower():
            return None, f"cached file {path} has sha256 {actual}, expected {ckpt.sha256.lower()}"
    return path, None


def _stream_to_file(url: str, dest: Path, *, expected_sha256: Optional[str], progress: bool,
                    timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically (``files.atomic_path``): a failed or short download, or a
    checksum mismatch, leaves ``dest`` as it was and no partial file behind."""
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
        actual = digest.hexdigest()
        if expected_sha256 and actual != expected_sha256.lower():
            raise _FallbackFailed(
                f"sha256 mismatch for {url}: expected {expected_sha256.lower()}, got {actual} "
                "(downloaded file discarded)",
                hard=True,
            )


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
    """Return a local path to ``ckpt``'s weights, downloading them if needed.

    Tries the Hugging Face Hub (``ckpt.hf_hub_id``/``ckpt.hf_hub_filename``, honouring its cache, ``HF_HOME``,
    ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` as set at call time), then the authors' URL
    (``ckpt.url``) cached under ``<HF_HOME>/convnextv2_hub/`` and checked against ``ckpt.sha256`` when known.

    Args:
        ckpt: a ``convnextv2_hub.checkpoints.registry.Checkpoint`` (or any object with the same attributes).
        progress: show download progress bars (only on a TTY).
        force: download again even if a cached copy exists (needs network; refused in offline mode).

    Raises:
        CheckpointDownloadError: no source worked; the message names the checkpoint, each URL tried with
            its reason, and what to do about it.
    """
    endpoint = _endpoint()
    offline = _offline()
    timeout = _timeout()
    fallback_path = _fallback_path(ckpt)
    hub_url = _hub_url(ckpt, endpoint)
    attempts: list[DownloadAttempt] = []

    if offline:
        if force:
            raise _failure(
                ckpt,
                [DownloadAttempt(_HUB_SOURCE, hub_url, "offline mode (HF_HUB_OFFLINE is set)")],
                fallback_path,
                f"Cannot re-download checkpoint {ckpt.name!r} with force=True: HF_HUB_OFFLINE is set. "
                "Unset HF_HUB_OFFLINE (or set it to 0) to allow downloads.",
            )
        try:
            return _hub_download(ckpt, endpoint=endpoint, local_only=True, force=False, progress=progress,
                                 timeout=timeout)
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
            f"Checkpoint {ckpt.name!r} is not cached and HF_HUB_OFFLINE is set, so nothing was downloaded. "
            "Unset HF_HUB_OFFLINE (or set it to 0) to download it.",
        )

    # 1. The Hub. If its host refuses connections, only the local Hub cache is consulted (what
    #    huggingface_hub itself does on connection errors, minus its ~25 s of retries).
    unreachable = _unreachable(hub_url, timeout)
    try:
        return _hub_download(ckpt, endpoint=endpoint, local_only=unreachable is not None, force=force,
                             progress=progress, timeout=timeout)
    except Exception as exc:  # any Hub failure (HTTP error, network, bad mirror response) means: use the fallback
        attempts.append(DownloadAttempt(_HUB_SOURCE, hub_url, unreachable or _describe(exc)))

    # 2. The authors' URL, cached copy first.
    if not force:
        cached, bad = _cached_fallback(ckpt, fallback_path)
        if cached is not None:
            return cached
        if bad is not None:  # corrupted or tampered copy: replace it by downloading again
            fallback_path.unlink(missing_ok=True)
    try:
        _stream_to_file(ckpt.url, fallback_path, expected_sha256=ckpt.sha256, progress=progress, timeout=timeout)
    except _FallbackFailed as exc:
        attempts.append(DownloadAttempt(_URL_SOURCE, ckpt.url, exc.reason))
        headline = ""
        if exc.hard:
            headline = (f"Checkpoint {ckpt.name!r} downloaded from {ckpt.url} failed its sha256 check (hashes "
                        "below); the download was discarded and nothing was stored in the cache.")
        raise _failure(ckpt, attempts, fallback_path, headline) from exc
    return fallback_path
