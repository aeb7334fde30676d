"""Downloads against a misbehaving server (conftest's FaultyResponder, loopback only): every fault gives a
clear error and leaves nothing in the Hub cache (blobs/, snapshots/) or the fallback cache that a later run
would take as good, and once the server is fixed the next call succeeds. Also the repairs: a cached file
that fails verification or cannot be read is removed and fetched again; ``force_download`` re-fetches."""
from __future__ import annotations

import hashlib
import io
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import save

import convnextv2_hub as cvh
import convnextv2_hub.models.factory as factory
from convnextv2_hub.checkpoints import download as dl
from convnextv2_hub.checkpoints.download import CheckpointDownloadError, download_checkpoint
from convnextv2_hub.checkpoints.reading import CheckpointError
from convnextv2_hub.cli.export import build_parser as export_parser
from convnextv2_hub.cli.main import build_parser as main_parser

BASE = cvh.get_checkpoint("atto.fcmae_ft_in1k")
REPO_ID, FILENAME = BASE.hf_hub_id, BASE.hf_hub_filename
AUTHORS_PATH = urllib.parse.urlsplit(BASE.url).path
HUB_FOLDER = "models--" + REPO_ID.replace("/", "--")


def noise(n: int) -> bytes:
    """Bytes that are no checkpoint of any kind (deterministic: random bytes start with a pickle opcode 1/256)."""
    return bytes((i * 97 + 13) % 256 for i in range(n))


def closed_port_url() -> str:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def atto_bytes(seed: int, variant: str = "atto") -> bytes:
    """A complete safetensors checkpoint of ``variant`` (our key layout), random weights."""
    torch.manual_seed(seed)
    return save(cvh.create(variant).state_dict())


@pytest.fixture(scope="module")
def good() -> bytes:
    return atto_bytes(0)


@pytest.fixture(scope="module")
def other_variant() -> bytes:
    return atto_bytes(1, "femto")  # another variant's (valid) weights


@pytest.fixture(scope="module")
def authors_good() -> bytes:
    torch.manual_seed(2)
    buf = io.BytesIO()
    torch.save({"model": cvh.create("atto").state_dict()}, buf)  # a torch zip file, like the authors' .pt
    return buf.getvalue()


def ckpt_for(url: str, sha256: Optional[str] = None) -> Any:
    return replace(BASE, url=url, sha256=sha256)


def cache_files(home: Path) -> list[str]:
    """Every file or link a later run could take from the caches (Hub blobs and snapshots, fallback)."""
    found = []
    for folder in (home / "hub" / HUB_FOLDER / "blobs", home / "hub" / HUB_FOLDER / "snapshots",
                   home / "convnextv2_hub"):
        if folder.exists():
            found += [str(p.relative_to(home)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(found)


def hub_setup(faulty_server, monkeypatch, body: bytes, **kwargs: Any) -> tuple[Any, Any]:
    server, responder = faulty_server({(REPO_ID, FILENAME): body}, hub=True, **kwargs)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    return server, responder


def expect_failure(ckpt: Any, home: Path, *needles: str) -> str:
    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(ckpt, progress=False)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert cache_files(home) == [], message  # nothing a later run could take as good
    return message


def gets(server: Any) -> int:
    return [method for method, _ in server.requests].count("GET")


# ----------------------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alt", ["random", "other_variant"])
def test_hub_body_not_matching_its_etag(hf_env, faulty_server, monkeypatch, good, other_variant, alt):
    alt_body = noise(len(good)) if alt == "random" else other_variant
    _, responder = hub_setup(faulty_server, monkeypatch, good, mode="etag_mismatch", alt_body=alt_body)
    ckpt = ckpt_for(closed_port_url() + AUTHORS_PATH)

    expect_failure(ckpt, hf_env, "sha256 mismatch", f"expected {hashlib.sha256(good).hexdigest()}",
                   f"got {hashlib.sha256(alt_body).hexdigest()}", "its ETag", "removed from the Hub cache")

    responder.mode = None  # server fixed
    path = download_checkpoint(ckpt, progress=False)
    assert path.read_bytes() == good


def test_hub_wrong_body_under_its_own_etag_is_refused(hf_env, faulty_server, monkeypatch, good):
    _, responder = hub_setup(faulty_server, monkeypatch, good, mode="wrong_body", alt_body=noise(4096))
    ckpt = ckpt_for(closed_port_url() + AUTHORS_PATH)
    expect_failure(ckpt, hf_env, "not a complete checkpoint", "safetensors header", "removed from the Hub cache")
    responder.mode = None
    assert download_checkpoint(ckpt, progress=False).read_bytes() == good


@pytest.mark.parametrize("mode", ["truncated", "truncated_no_length", "killed", "http_500"])
def test_hub_transfer_faults(hf_env, faulty_server, monkeypatch, good, mode):
    # huggingface_hub resumes a cut transfer after 1 s; the server then answers 500 so the test ends.
    server, responder = hub_setup(faulty_server, monkeypatch, good, mode=mode, next_mode="http_500")
    ckpt = ckpt_for(closed_port_url() + AUTHORS_PATH)
    message = expect_failure(ckpt, hf_env, ckpt.name, "connection refused")
    hub_reason = message.split("Hugging Face Hub:", 1)[1].split("\n")[1]
    assert any(word in hub_reason for word in ("HTTP 500", "size", "reset", "closed")), message
    assert not list((hf_env / "hub" / HUB_FOLDER / "blobs").glob("*.incomplete"))

    responder.mode = None
    assert download_checkpoint(ckpt, progress=False).read_bytes() == good
    assert gets(server) >= 2


def test_hub_slow_but_complete_download_is_used(hf_env, faulty_server, monkeypatch, good):
    hub_setup(faulty_server, monkeypatch, good, mode="slow", slow_s=0.05)
    path = download_checkpoint(ckpt_for(closed_port_url() + AUTHORS_PATH), progress=False)
    assert path.read_bytes() == good


def test_tampered_hub_cache_is_fetched_again(hf_env, faulty_server, monkeypatch, good):
    server, _ = hub_setup(faulty_server, monkeypatch, good)
    ckpt = ckpt_for(closed_port_url() + AUTHORS_PATH)
    path = download_checkpoint(ckpt, progress=False)
    blob = path.resolve()
    blob.write_bytes(noise(len(good)))  # damaged on disk, or stored by a version that did not verify

    with pytest.warns(RuntimeWarning, match="cached file: sha256 mismatch"):
        assert download_checkpoint(ckpt, progress=False) == path
    assert path.read_bytes() == good and gets(server) == 2

    blob.write_bytes(good[:-10])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: removed, and the error says why
    message = expect_failure(ckpt, hf_env, "HF_HUB_OFFLINE", "sha256 mismatch", "removed from the Hub cache")
    assert "failed verification" in message


# ----------------------------------------------------------------------------------------------------------
# The authors' URL
# ----------------------------------------------------------------------------------------------------------


def fallback_setup(faulty_server, monkeypatch, body: bytes, **kwargs: Any) -> tuple[Any, Any, Any]:
    server, responder = faulty_server({AUTHORS_PATH: body}, hub=False, **kwargs)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    return server, responder, server.url + AUTHORS_PATH


@pytest.mark.parametrize("alt", ["random", "other_variant"])
def test_fallback_wrong_body(hf_env, faulty_server, monkeypatch, authors_good, other_variant, alt):
    alt_body = noise(5000) if alt == "random" else other_variant
    _, responder, url = fallback_setup(faulty_server, monkeypatch, authors_good, mode="wrong_body",
                                       alt_body=alt_body)
    want = hashlib.sha256(authors_good).hexdigest()
    expect_failure(ckpt_for(url, want), hf_env, "sha256 mismatch", f"expected {want}",
                   f"got {hashlib.sha256(alt_body).hexdigest()}", "the manifest's sha256")
    if alt == "random":  # no sha256 known: random bytes are still not a checkpoint
        expect_failure(ckpt_for(url), hf_env, "are not a checkpoint", "neither a PyTorch file")
    responder.mode = None
    assert download_checkpoint(ckpt_for(url, want), progress=False).read_bytes() == authors_good


def test_fallback_truncated_without_content_length(hf_env, faulty_server, monkeypatch, authors_good):
    _, responder, url = fallback_setup(faulty_server, monkeypatch, authors_good, mode="truncated_no_length")
    expect_failure(ckpt_for(url), hf_env, "no Content-Length", "not a complete checkpoint", "zip", "was cut short")
    want = hashlib.sha256(authors_good).hexdigest()
    expect_failure(ckpt_for(url, want), hf_env, "sha256 mismatch", f"expected {want}")
    responder.mode = None
    assert download_checkpoint(ckpt_for(url), progress=False).read_bytes() == authors_good


@pytest.mark.parametrize("mode,reason", [("truncated", "incomplete download"), ("killed", ""),
                                         ("http_500", "HTTP 500")])
def test_fallback_transfer_faults(hf_env, faulty_server, monkeypatch, authors_good, mode, reason):
    _, responder, url = fallback_setup(faulty_server, monkeypatch, authors_good, mode=mode)
    message = expect_failure(ckpt_for(url), hf_env, reason)
    if mode == "killed":
        assert "reset" in message.lower() or "incomplete" in message, message
    responder.mode = None
    assert download_checkpoint(ckpt_for(url), progress=False).read_bytes() == authors_good


def test_fallback_slow_server_times_out(hf_env, faulty_server, monkeypatch, authors_good):
    monkeypatch.setenv(dl.TIMEOUT_ENV, "0.3")
    _, responder, url = fallback_setup(faulty_server, monkeypatch, authors_good, mode="slow", slow_s=0.6)
    expect_failure(ckpt_for(url), hf_env, "timed out")
    responder.mode = None
    assert download_checkpoint(ckpt_for(url), progress=False).read_bytes() == authors_good


def test_truncated_fallback_copy_from_before_is_replaced(hf_env, faulty_server, monkeypatch, authors_good):
    server, _, url = fallback_setup(faulty_server, monkeypatch, authors_good)
    stale = hf_env / "convnextv2_hub" / AUTHORS_PATH.rsplit("/", 1)[-1]
    stale.parent.mkdir(parents=True)
    stale.write_bytes(authors_good[: len(authors_good) // 2])  # what an older version renamed into place

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_failure(ckpt_for(url), hf_env, "failed verification", "was removed", "HF_HUB_OFFLINE")
    stale.write_bytes(authors_good[: len(authors_good) // 2])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert download_checkpoint(ckpt_for(url), progress=False).read_bytes() == authors_good
    assert gets(server) == 1


# ----------------------------------------------------------------------------------------------------------
# create(pretrained=True): an unreadable cached file is fetched again once; force_download
# ----------------------------------------------------------------------------------------------------------


def unreadable(body: bytes) -> bytes:
    """Same length and a consistent header, but a dtype no reader knows: passes every check but reading."""
    assert body.count(b'"F32"') > 0
    return body.replace(b'"F32"', b'"Z32"', 1)


@pytest.fixture
def git_etag_hub(faulty_server, monkeypatch, good):
    """A Hub whose ETag is a git sha1 (no sha256 to check against) and an entry pointing at it."""
    server, responder = hub_setup(faulty_server, monkeypatch, good, git_etag=True)
    entry = ckpt_for(closed_port_url() + AUTHORS_PATH)
    monkeypatch.setattr(factory, "get_checkpoint", lambda name: entry)
    return server, responder


def test_create_refetches_an_unreadable_cached_file_once(hf_env, git_etag_hub, good):
    server, _ = git_etag_hub
    path = download_checkpoint(ckpt_for(closed_port_url() + AUTHORS_PATH), progress=False)
    path.resolve().write_bytes(unreadable(good))

    with pytest.warns(RuntimeWarning, match="unreadable, so it was removed and is being downloaded again"):
        model = cvh.create("atto", pretrained=True, progress=False)
    torch.manual_seed(0)
    reference = cvh.create("atto").state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert path.read_bytes() == good and gets(server) == 2


def test_create_gives_up_after_one_refetch(hf_env, git_etag_hub, good):
    server, responder = git_etag_hub
    responder.mode, responder.alt_body = "wrong_body", unreadable(good)
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="still unreadable; it was removed"):
        cvh.create("atto", pretrained=True, progress=False)
    assert cache_files(hf_env) == [] and gets(server) == 2

    responder.mode = None
    cvh.create("atto", pretrained=True, progress=False)


def test_create_offline_removes_unreadable_file(hf_env, git_etag_hub, good, monkeypatch):
    path = download_checkpoint(ckpt_for(closed_port_url() + AUTHORS_PATH), progress=False)
    path.resolve().write_bytes(unreadable(good))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="removed from the cache; HF_HUB_OFFLINE is set"):
        cvh.create("atto", pretrained=True, progress=False)
    assert cache_files(hf_env) == []


def test_force_download_fetches_again(hf_env, git_etag_hub):
    server, _ = git_etag_hub
    cvh.create("atto", pretrained=True, progress=False)
    cvh.create("atto", pretrained=True, progress=False)
    assert gets(server) == 1  # cached
    cvh.create("atto", pretrained=True, progress=False, force_download=True)
    assert gets(server) == 2


def test_mismatching_weights_are_not_deleted(hf_env, git_etag_hub):
    cvh.create("atto", pretrained=True, progress=False)
    with pytest.raises(CheckpointError):  # readable weights that do not fit: the caller's mismatch
        cvh.create("atto", pretrained=True, progress=False, in_chans=1)
    assert any("snapshots" in f for f in cache_files(hf_env))


def test_clis_have_force_download():
    assert main_parser().parse_args(["predict", "--force-download"]).force_download is True
    assert main_parser().parse_args(["predict"]).force_download is False
    assert export_parser().parse_args(["tiny", "--onnx", "x.onnx", "--force-download"]).force_download is True


def test_discard_cached_file_refuses_other_paths(hf_env, tmp_path):
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"x")
    with pytest.raises(ValueError, match="not in the checkpoint caches"):
        dl.discard_cached_file(mine)
    assert mine.exists()
