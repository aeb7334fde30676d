"""Tests for convnextv2_hub.checkpoints.download against loopback HTTP servers (no real network).

The mock Hub implements what huggingface_hub's ``hf_hub_download`` needs (read from its source):
``HEAD`` and ``GET`` on ``/{repo_id}/resolve/{revision}/{filename}`` answering ``X-Repo-Commit`` (40 hex),
``ETag`` and ``Content-Length``; unknown repos/files get 404 with ``X-Error-Code`` like the real Hub.
No ``/api/models`` call is made by ``hf_hub_download``, so none is served.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from convnextv2_hub.checkpoints import download as dl
from convnextv2_hub.checkpoints.download import CheckpointDownloadError, download_checkpoint
from convnextv2_hub.checkpoints.registry import get_checkpoint
from conftest import COMMIT, SCRUBBED_ENV, file_responder, hub_responder

BASE_CKPT = get_checkpoint("atto.fcmae_ft_in1k")

REPO_ID = BASE_CKPT.hf_hub_id
FILENAME = BASE_CKPT.hf_hub_filename
AUTHORS_PATH = urllib.parse.urlsplit(BASE_CKPT.url).path  # served by the loopback "authors" server
AUTHORS_BASENAME = AUTHORS_PATH.rsplit("/", 1)[-1]
HUB_FOLDER = "models--" + REPO_ID.replace("/", "--")  # huggingface_hub's cache folder name


def make_ckpt(url: str, sha256: Optional[str] = None) -> Any:
    """The atto checkpoint with its authors' URL pointed at a loopback server."""
    return replace(BASE_CKPT, url=url, sha256=sha256)


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more: connections are refused
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------------------------
# Payloads and environment
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def safetensors_payload(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"stem.0.weight": torch.randn(40, 3, 4, 4, generator=gen),
               "head.fc.bias": torch.randn(1000, generator=gen),
               "stages.0.blocks.0.mlp.grn.gamma": torch.randn(1, 1, 1, 160, generator=gen)}
    path = tmp_path_factory.mktemp("payload") / FILENAME
    save_file(tensors, str(path))
    return path.read_bytes(), tensors


@pytest.fixture(scope="module")
def authors_payload() -> tuple[bytes, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    state = {"model": {"downsample_layers.0.0.weight": torch.randn(40, 3, 4, 4, generator=gen),
                       "head.bias": torch.randn(1000, generator=gen)}}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue(), state["model"]


def run_child(ckpt: Any, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Call download_checkpoint in a fresh interpreter, so huggingface_hub reads ``env`` at its import."""
    code = (
        "import json, sys, types\n"
        "from convnextv2_hub.checkpoints.download import download_checkpoint, CheckpointDownloadError\n"
        "ckpt = types.SimpleNamespace(**json.loads(sys.argv[1]))\n"
        "try:\n"
        "    print(json.dumps({'path': str(download_checkpoint(ckpt, progress=False))}))\n"
        "except CheckpointDownloadError as e:\n"
        "    print(json.dumps({'error': str(e)}))\n"
    )
    fields = {k: getattr(ckpt, k) for k in ("name", "hf_hub_id", "hf_hub_filename", "url", "sha256")}
    return subprocess.run([sys.executable, "-c", code, json.dumps(fields)], env=env, capture_output=True,
                          text=True, timeout=60)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def leftover_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


def test_import_makes_no_network_access():
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('network access at import time')\n"
        "socket.socket.connect = refuse\n"
        "socket.socket.connect_ex = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import convnextv2_hub.checkpoints.download\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_hub_download_then_offline_from_cache(hf_env, servers, safetensors_payload, monkeypatch):
    body, tensors = safetensors_payload
    hub = servers(hub_responder({(REPO_ID, FILENAME): body}))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # set after huggingface_hub's import: must still be used
    ckpt = make_ckpt(url=closed_port_url() + AUTHORS_PATH)

    path = download_checkpoint(ckpt)  # progress bars on (tqdm hides them off a TTY)

    assert path == hf_env / "hub" / HUB_FOLDER / "snapshots" / COMMIT / FILENAME
    assert path.resolve().parent.name == "blobs"
    assert (hf_env / "hub" / HUB_FOLDER / "refs" / "main").read_text() == COMMIT
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    resolve = f"/{REPO_ID}/resolve/main/{FILENAME}"
    assert hub.requests == [("HEAD", resolve), ("GET", resolve)]

    # Offline in a fresh interpreter (huggingface_hub reads HF_HUB_OFFLINE at import): cache hit, no request.
    result = run_child(ckpt, child_env(HF_HOME=str(hf_env), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"path": str(path)}
    # Offline set after import, in this process: same answer, still no request.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_checkpoint(ckpt, progress=False) == path
    assert len(hub.requests) == 2


def test_hub_cache_dir_follows_hf_hub_cache(hf_env, tmp_path, servers, safetensors_payload, monkeypatch):
    hub = servers(hub_responder({(REPO_ID, FILENAME): safetensors_payload[0]}))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    path = download_checkpoint(make_ckpt(url=closed_port_url() + AUTHORS_PATH), progress=False)
    assert path.is_relative_to(tmp_path / "elsewhere" / HUB_FOLDER)
    assert not (hf_env / "hub").exists()


def test_fallback_when_hub_returns_404(hf_env, servers, authors_payload, monkeypatch):
    body, state = authors_payload
    hub = servers(hub_responder({}))  # the mirror does not have the repo
    authors = servers(file_responder({AUTHORS_PATH: body}))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    ckpt = make_ckpt(url=authors.url + AUTHORS_PATH)

    path = download_checkpoint(ckpt, progress=False)

    assert path == hf_env / "convnextv2_hub" / AUTHORS_BASENAME
    assert path.read_bytes() == body
    loaded = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert leftover_files(path.parent) == [path.name]  # no temp file left behind
    assert authors.requests == [("GET", AUTHORS_PATH)]
    assert hub.requests == [("HEAD", f"/{REPO_ID}/resolve/main/{FILENAME}")]

    assert download_checkpoint(ckpt, progress=False) == path  # cached copy: the authors' server is not asked
    assert len(authors.requests) == 1

    assert download_checkpoint(ckpt, force=True) == path  # force downloads again (progress bar code path)
    assert len(authors.requests) == 2


def test_fallback_when_hub_port_closed_is_fast_and_cached(hf_env, servers, authors_payload, monkeypatch):
    body, _ = authors_payload
    authors = servers(file_responder({AUTHORS_PATH: body}))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    ckpt = make_ckpt(url=authors.url + AUTHORS_PATH, sha256=hashlib.sha256(body).hexdigest())

    start = time.monotonic()
    path = download_checkpoint(ckpt, progress=False)
    # huggingface_hub alone would spend ~25 s retrying a refused connection before giving up.
    assert time.monotonic() - start < 5
    assert path.read_bytes() == body
    assert len(authors.requests) == 1

    assert download_checkpoint(ckpt, progress=False) == path  # re-verified against sha256, no request
    assert len(authors.requests) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the fallback cache also serves offline mode
    assert download_checkpoint(ckpt, progress=False) == path
    assert len(authors.requests) == 1


def test_corrupted_cached_fallback_is_downloaded_again(hf_env, servers, authors_payload, monkeypatch):
    body, _ = authors_payload
    authors = servers(file_responder({AUTHORS_PATH: body}))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    ckpt = make_ckpt(url=authors.url + AUTHORS_PATH, sha256=hashlib.sha256(body).hexdigest())
    path = download_checkpoint(ckpt, progress=False)
    path.write_bytes(b"garbage")

    assert download_checkpoint(ckpt, progress=False) == path
    assert path.read_bytes() == body
    assert len(authors.requests) == 2


def test_sha256_mismatch_leaves_nothing_in_cache(hf_env, servers, authors_payload, monkeypatch):
    body, _ = authors_payload
    authors = servers(file_responder({AUTHORS_PATH: body}))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    wrong = "0" * 64
    actual = hashlib.sha256(body).hexdigest()

    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(make_ckpt(url=authors.url + AUTHORS_PATH, sha256=wrong), progress=False)
    message = str(info.value)
    assert wrong in message and actual in message and "sha256" in message
    assert leftover_files(hf_env / "convnextv2_hub") == []

    path = download_checkpoint(make_ckpt(url=authors.url + AUTHORS_PATH, sha256=actual.upper()), progress=False)
    assert path.read_bytes() == body


def test_everything_unreachable_names_all_places(hf_env, monkeypatch):
    hub_url = closed_port_url()
    authors_url = closed_port_url() + AUTHORS_PATH
    monkeypatch.setenv("HF_ENDPOINT", hub_url)
    ckpt = make_ckpt(url=authors_url)

    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(ckpt, progress=False)

    message = str(info.value)
    assert ckpt.name in message
    assert f"{hub_url}/{REPO_ID}/resolve/main/{FILENAME}" in message
    assert authors_url in message
    assert "connection refused" in message
    assert "HF_ENDPOINT" in message and "checkpoint_path=" in message
    assert [a.url for a in info.value.attempts] == [f"{hub_url}/{REPO_ID}/resolve/main/{FILENAME}", authors_url]
    assert info.value.checkpoint == ckpt.name


def test_http_errors_are_reported_with_status(hf_env, servers, monkeypatch):
    hub = servers(hub_responder({}))
    authors = servers(file_responder({}))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(make_ckpt(url=authors.url + AUTHORS_PATH), progress=False)
    reasons = [a.reason for a in info.value.attempts]
    assert reasons[0].startswith("HTTP 404") and reasons[1].startswith("HTTP 404")


def test_offline_and_not_cached(hf_env, servers, monkeypatch):
    hub = servers(hub_responder({}))
    authors = servers(file_responder({}))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(make_ckpt(url=authors.url + AUTHORS_PATH), progress=False)
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert hub.requests == [] and authors.requests == []


def test_interrupted_download_leaves_no_partial_file(hf_env, servers, authors_payload, monkeypatch):
    body, _ = authors_payload
    authors = servers(file_responder({AUTHORS_PATH: body}, truncate=True))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())

    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(make_ckpt(url=authors.url + AUTHORS_PATH), progress=False)
    assert "incomplete" in str(info.value)
    assert leftover_files(hf_env / "convnextv2_hub") == []
    assert len(authors.requests) == 1


def test_timeout_env_makes_silent_host_fail_fast(hf_env, monkeypatch):
    silent = socket.socket()  # listens (the kernel completes connects) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
        monkeypatch.setenv(dl.TIMEOUT_ENV, "0.5")
        ckpt = make_ckpt(url=f"http://127.0.0.1:{silent.getsockname()[1]}{AUTHORS_PATH}")
        start = time.monotonic()
        with pytest.raises(CheckpointDownloadError) as info:
            download_checkpoint(ckpt, progress=False)
        assert time.monotonic() - start < 4
        assert "timed out" in info.value.attempts[-1].reason
    finally:
        silent.close()

    monkeypatch.setenv(dl.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=dl.TIMEOUT_ENV):
        download_checkpoint(ckpt, progress=False)
