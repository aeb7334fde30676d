"""Fixtures and helpers shared by several test files: thread count, real photos, loopback HTTP servers
(a mock Hugging Face Hub and a static file server) and a clean Hugging Face environment."""
from __future__ import annotations

import errno
import hashlib
import http.server
import socket
import threading
from pathlib import Path
from typing import Callable, List, Sequence

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from convnextv2_hub.checkpoints.download import TIMEOUT_ENV

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SERVER_LIFETIME_S = 60.0  # every server stops by itself after this, even if a test forgets to


@pytest.fixture(scope="session", autouse=True)
def compiled_store_of_the_session(tmp_path_factory):
    """Compiled graphs the tests build go to a store of this session, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CONVNEXTV2_HUB_COMPILED_DIR", str(tmp_path_factory.mktemp("compiled")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small-tensor tests on one intra-op thread, restored afterwards.

    On the 2 shared cores of the test machine a second OpenMP thread only spins at barriers against
    other jobs: small ops ran 10-20x slower with 2 threads than with 1 under load.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_skimage_photos(folder: Path, names: Sequence[str]) -> List[str]:
    """scikit-image's sample photos saved as PNG files in ``folder`` (real images, not noise)."""
    from skimage import data as skimage_data

    paths = []
    for name in names:
        p = folder / f"{name}.png"
        Image.fromarray(getattr(skimage_data, name)()).save(p)
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------------------------------------
# Loopback HTTP servers
# ----------------------------------------------------------------------------------------------------------


class LoopbackServer:
    """http.server on 127.0.0.1:0 in a daemon thread; records (method, path) of every request it handles."""

    def __init__(self, respond: Callable[[http.server.BaseHTTPRequestHandler, str], None]) -> None:
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self, method: str) -> None:
                owner.requests.append((method, self.path))
                respond(self, method)

            def do_HEAD(self) -> None:
                self._handle("HEAD")

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self._timer = threading.Timer(SERVER_LIFETIME_S, self.httpd.shutdown)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_responder(files: dict[tuple[str, str], bytes]) -> Callable[[http.server.BaseHTTPRequestHandler, str], None]:
    """Answer like huggingface.co's /resolve endpoint for small (non-LFS-redirected) files."""
    repos = {repo for repo, _ in files}

    def respond(handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        body = files.get((repo, filename)) if sep and revision in ("main", COMMIT) else None
        if body is None:
            code = "EntryNotFound" if repo in repos else "RepoNotFound"
            handler.send_response(404)
            handler.send_header("X-Error-Code", code)
            handler.send_header("X-Error-Message", f"{code} (mock hub)")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(body)

    return respond


Responder = Callable[[http.server.BaseHTTPRequestHandler, str], None]


def file_responder(routes: dict[str, bytes], truncate: bool = False) -> Responder:
    """Plain static-file server (like dl.fbaipublicfiles.com); ``truncate`` drops the connection mid-body."""

    def respond(handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        body = routes.get(handler.path)
        if body is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(body[: len(body) // 2] if truncate else body)
            if truncate:
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)

    return respond


@pytest.fixture
def servers():
    started: list[LoopbackServer] = []

    def start(respond: Callable[[http.server.BaseHTTPRequestHandler, str], None]) -> LoopbackServer:
        server = LoopbackServer(respond)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


SCRUBBED_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
             "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_ETAG_TIMEOUT", "XDG_CACHE_HOME", TIMEOUT_ENV,
             "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture
def hf_env(tmp_path, monkeypatch) -> Path:
    """A fresh HF_HOME, set *after* huggingface_hub was imported (as a user would), loopback never proxied."""
    for name in SCRUBBED_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv(TIMEOUT_ENV, "5")
    # The runner's own HF_HUB_OFFLINE, captured by huggingface_hub at import, must not leak into these tests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return home


# ----------------------------------------------------------------------------------------------------------
# FCMAE trained on real photos (tests/models/test_fcmae.py, tests/analysis/test_reconstruction.py)
# ----------------------------------------------------------------------------------------------------------


def normalised_photos(size: int) -> torch.Tensor:
    """Four of scikit-image's photos at ``size`` x ``size``, normalised with the ImageNet mean and std."""
    import numpy as np
    from skimage import data

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for f in (data.chelsea, data.astronaut, data.coffee, data.rocket):
        img = Image.fromarray(f()).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return (torch.stack(out) - mean) / std


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """atto FCMAE trained 50 AdamW steps on 4 real photos at 96 px with one fixed mask, saved."""
    from convnextv2_hub.models.fcmae import FCMAE

    torch.manual_seed(0)
    x = normalised_photos(96)
    m = FCMAE("atto", mask_ratio=0.6, decoder_dim=512, norm_pix_loss=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    mask = m.gen_random_mask(x, generator=torch.Generator().manual_seed(0))
    losses = []
    m.train()
    for _ in range(50):
        loss, _, _ = m(x, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    path = m.save(tmp_path_factory.mktemp("fcmae") / "overfit.safetensors")
    return m, losses, path


# ----------------------------------------------------------------------------------------------------------
# Fault injection: a loopback Hub or file server that misbehaves on demand (tests/checkpoints/test_download_faults.py)
# ----------------------------------------------------------------------------------------------------------

import struct  # noqa: E402  (imported here: this block is appended to a file others edit too)
import time  # noqa: E402


FAULT_MODES = ("wrong_body", "etag_mismatch", "truncated", "truncated_no_length", "http_500", "killed", "slow")
SLOW_PIECES = 8  # a slow body comes in at most this many pieces: a slow server still ends by itself


class FaultyResponder:
    """Serves ``routes`` like ``hub_responder`` (``hub=True``: keys are (repo, filename)) or ``file_responder``
    (keys are URL paths), with the fault named by ``mode``; ``mode = None`` serves correctly, so a test
    "fixes the server" by setting it. ``next_mode`` replaces ``mode`` after the first faulty GET.

    - ``wrong_body``: ``alt_body`` instead of the file, with an ETag and length that match ``alt_body``.
    - ``etag_mismatch``: ``alt_body`` under the real file's sha256 ETag (its own length).
    - ``truncated``: the full Content-Length, half of the body, then a clean close.
    - ``truncated_no_length``: no Content-Length, half of the body, then a clean close: to the client this
      looks like a complete body.
    - ``http_500``: GET answers 500. A Hub HEAD still answers, because a HEAD 500 makes huggingface_hub back
      off ~25 s before it gives up (its behaviour, not ours, and too slow for a test).
    - ``killed``: the full Content-Length, part of the body, then a connection reset, as when the server dies.
    - ``slow``: the body in ``SLOW_PIECES`` pieces, ``slow_s`` seconds apart.

    ``git_etag=True`` sends the ETag the Hub sends for a file kept in git rather than LFS: the git blob sha1
    (40 hex), which is not the content's sha256.
    """

    def __init__(self, routes: dict, *, hub: bool, mode: str | None = None, alt_body: bytes = b"",
                 next_mode: str | None = None, slow_s: float = 0.1, git_etag: bool = False) -> None:
        assert mode is None or mode in FAULT_MODES, mode
        self.routes, self.hub, self.mode, self.alt_body = routes, hub, mode, alt_body
        self.next_mode, self.slow_s, self.git_etag = next_mode, slow_s, git_etag

    def _etag(self, body: bytes) -> str:
        if self.git_etag:
            return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
        return hashlib.sha256(body).hexdigest()

    def _lookup(self, path: str) -> bytes | None:
        path = path.split("?", 1)[0]
        if not self.hub:
            return self.routes.get(path)
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        return self.routes.get((repo, filename)) if sep and revision in ("main", COMMIT) else None

    def __call__(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        body = self._lookup(handler.path)
        mode = self.mode
        # The next mode is set before this answer goes out: a test that fixes the server (mode = None) once
        # it has seen the fault must not have its fix overwritten by this thread afterwards.
        self._after_fault(method, mode)
        if body is None or (mode == "http_500" and method == "GET"):
            code = 404 if body is None else 500
            handler.send_response(code)
            if code == 404 and self.hub:
                handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        etag = self._etag(body)  # the real file's: what the Hub states for it
        if mode in ("wrong_body", "etag_mismatch"):
            body = self.alt_body
            etag = self._etag(body) if mode == "wrong_body" else etag
        handler.send_response(200)
        if self.hub:
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("ETag", f'"{etag}"')
        if mode != "truncated_no_length" or method == "HEAD":  # a Hub HEAD states the size regardless
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method == "GET":
            self._send_body(handler, body, mode)

    def _after_fault(self, method: str, mode: str | None) -> None:
        if method == "GET" and mode is not None and self.next_mode is not None:
            self.mode, self.next_mode = self.next_mode, None

    def _send_body(self, handler: http.server.BaseHTTPRequestHandler, body: bytes, mode: str | None) -> None:
        if mode == "slow":
            step = -(-len(body) // SLOW_PIECES)
            for start in range(0, len(body), step):
                time.sleep(self.slow_s)
                try:
                    handler.wfile.write(body[start:start + step])
                except OSError:  # the client gave up (timed out): stop, as a real server would
                    handler.close_connection = True
                    return
            return
        if mode not in ("truncated", "truncated_no_length", "killed"):
            handler.wfile.write(body)
            return
        handler.wfile.write(body[: len(body) // 2 if mode != "killed" else len(body) // 3])
        handler.wfile.flush()
        handler.close_connection = True
        if mode == "killed":  # SO_LINGER 0: close() sends RST, not FIN, like a process killed mid-transfer
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
        else:
            handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def faulty_server(servers) -> Callable[..., tuple[LoopbackServer, FaultyResponder]]:
    """``faulty_server(routes, hub=..., mode=..., ...)`` -> (server, responder); stopped after the test."""

    def start(routes: dict, **kwargs: object) -> tuple[LoopbackServer, FaultyResponder]:
        responder = FaultyResponder(routes, **kwargs)  # type: ignore[arg-type]
        return servers(responder), responder

    return start
# A tiny real image data set for the trainer (tests/train/test_run.py, tests/train/test_run_faults.py)
# ----------------------------------------------------------------------------------------------------------


def write_digits(root: Path, classes, n_train: int, n_val: int, corrupt: bool = False) -> Path:
    """scikit-learn's digits of ``classes`` as 32x32 RGB PNGs in ``root/train/<c>/`` and ``root/val/<c>/``;
    ``corrupt`` adds one truncated PNG to the first training class."""
    from convnextv2_hub.train.digits import write_digits as write

    write(root, classes, n_train, n_val, size=32)
    if corrupt:
        (root / "train" / str(classes[0]) / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root
# Decompression bombs (tests/preprocessing/test_images.py, tests/inference/test_predictor.py, tests/cli)
# ----------------------------------------------------------------------------------------------------------


def write_bomb_png(path: Path, width: int = 14000, height: int = 14000) -> str:
    """A valid all-black 1-bit greyscale PNG of ``width`` x ``height`` pixels: a decompression bomb of a few
    tens of KB. Written chunk by chunk with zlib, so making it never holds the image in memory (PIL would)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the row's pixels packed 8 to a byte
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> str:
    """A 14000 x 14000 PNG (196 M pixels, above twice PIL's default MAX_IMAGE_PIXELS), made once per module."""
    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


# Arguments of a fine-tuning run small enough for a test: atto on 32 px digits from random weights (no download),
# one process, no augmentation that needs many images, nothing left running.
TINY_FINETUNE_ARGS = ["--init", "none", "--num-workers", "0", "--set", "update_freq=1", "--set", "warmup_epochs=0",
                      "--set", "use_amp=false", "--set", "log_interval=1", "--set", "batch_size=8",
                      "--set", "input_size=32", "--set", "model_ema=false", "--set", "aa=none", "--set", "reprob=0",
                      "--set", "tensorboard=false"]


def tiny_finetune_argv(data: Path, out: Path, *more: str) -> list:
    """``convnextv2-train`` arguments: fine-tune atto on ``data`` into ``out`` (``more`` appended)."""
    return ["finetune", "--model", "atto", "--data", str(data), "--output", str(out), *TINY_FINETUNE_ARGS, *more]


@pytest.fixture(scope="module")
def two_digit_classes(tmp_path_factory) -> Path:
    """Two classes of 8 training images (2 optimiser steps of 8 per epoch) and 4 validation images."""
    return write_digits(tmp_path_factory.mktemp("data") / "digits", [0, 1], 8, 4)


class FullAfter:
    """A file object that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()



# ----------------------------------------------------------------------------------------------------------
# A loopback Hub that takes pushes (tests/checkpoints/test_hub.py, tests/test_whole_loop.py)
# ----------------------------------------------------------------------------------------------------------

import base64  # noqa: E402
import json  # noqa: E402


class PushableHub:
    """The Hub endpoints huggingface_hub calls for ``create_repo``, ``create_commit`` / ``upload_folder`` and
    ``hf_hub_download`` (their requests as huggingface_hub 2.4 sends them):

    - ``POST /api/repos/create``: a new repo gets a first commit holding ``.gitattributes``; an existing one
      answers 409 with the same JSON (what ``exist_ok=True`` expects).
    - ``POST /api/validate-yaml``: accepted.
    - ``POST /api/models/R/preupload/REV``: every file ``regular`` (so no Xet or LFS transfer is needed).
    - ``POST /api/models/R/commit/REV``: ndjson (header, ``file`` with base64 content, ``deletedFile``); a new
      commit holds the previous files with these changes. ``fail_commits`` > 0 answers 500 that many times.
    - ``GET /api/models/R/tree/REV``: the files of a revision (``list_repo_files``).
    - ``HEAD``/``GET /R/resolve/REV/FILE``: ``X-Repo-Commit``, ``ETag`` (the sha256 for ``.safetensors``, as for
      LFS files; the git blob sha1 otherwise), ``Content-Length``; 404 with ``X-Error-Code`` EntryNotFound,
      RevisionNotFound or RepoNotFound.

    ``commits[repo]`` lists the commit ids in order, ``files[commit]`` maps path -> bytes; ``tokens`` collects
    the Authorization headers seen.
    """

    def __init__(self) -> None:
        self.commits: dict[str, list[str]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.fail_commits = 0
        self.tokens: list[str] = []
        self.url = ""
        self.server: LoopbackServer | None = None

    # -- repo state ------------------------------------------------------------------------------------
    def head(self, repo: str) -> dict[str, bytes]:
        return self.files[self.commits[repo][-1]]

    def _commit(self, repo: str, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(f"{repo}@{len(self.commits.get(repo, []))}".encode()).hexdigest()
        self.commits.setdefault(repo, []).append(oid)
        self.files[oid] = files
        return oid

    # -- HTTP ------------------------------------------------------------------------------------------
    def __call__(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        self.tokens.append(handler.headers.get("authorization", ""))
        path = handler.path.split("?", 1)[0]
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0)) if method == "POST" else b""
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            exists = repo in self.commits
            if not exists:
                self._commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            return self._json(handler, 409 if exists else 200, {"url": f"{self.url}/{repo}", "name": repo})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(handler, 200, {})
        if path.startswith("/api/models/"):
            return self._api(handler, method, path[len("/api/models/"):], body)
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        if sep and method in ("HEAD", "GET"):
            revision, _, filename = rest.partition("/")
            return self._resolve(handler, method, repo, revision, filename)
        self._json(handler, 404, {"error": f"not served by the mock hub: {method} {path}"})

    def _api(self, handler, method: str, rest: str, body: bytes) -> None:
        parts = rest.split("/")
        repo, action = "/".join(parts[:2]), parts[2] if len(parts) > 2 else ""
        if repo not in self.commits:
            return self._json(handler, 404, {"error": "Repository not found"}, code="RepoNotFound")
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return self._json(handler, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        if method == "POST" and action == "commit":
            if self.fail_commits > 0:
                self.fail_commits -= 1
                return self._json(handler, 500, {"error": "Internal Error (mock hub: commit refused)"})
            files = dict(self.head(repo))
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                elif op["key"] == "deletedFile":
                    files.pop(op["value"]["path"], None)
            oid = self._commit(repo, files)
            return self._json(handler, 200, {"commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"})
        if method == "GET" and action == "tree":
            files = self.head(repo)
            return self._json(handler, 200, [{"type": "file", "path": k, "size": len(v),
                                              "oid": hashlib.sha1(v).hexdigest()} for k, v in sorted(files.items())])
        return self._json(handler, 404, {"error": f"not served by the mock hub: {action}"})

    def _resolve(self, handler, method: str, repo: str, revision: str, filename: str) -> None:
        if repo not in self.commits:
            return self._json(handler, 404, {}, code="RepoNotFound", body=False)
        commit = self.commits[repo][-1] if revision == "main" else revision
        if commit not in self.files:
            return self._json(handler, 404, {}, code="RevisionNotFound", body=False)
        data = self.files[commit].get(filename)
        if data is None:
            return self._json(handler, 404, {}, code="EntryNotFound", body=False)
        etag = (hashlib.sha256(data).hexdigest() if filename.endswith(".safetensors")
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(data)

    @staticmethod
    def _json(handler, status: int, obj, code: str = "", body: bool = True) -> None:
        data = json.dumps(obj).encode() if body else b""
        handler.send_response(status)
        if code:
            handler.send_header("X-Error-Code", code)
            handler.send_header("X-Error-Message", f"{code} (mock hub)")
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if data and handler.command != "HEAD":
            handler.wfile.write(data)


@pytest.fixture
def pushable_hub(servers, hf_env, monkeypatch) -> PushableHub:
    """A ``PushableHub`` on loopback, with HF_ENDPOINT pointing at it and a dummy HF_TOKEN (fresh HF_HOME)."""
    hub = PushableHub()
    hub.server = servers(hub)
    hub.url = hub.server.url
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    return hub
