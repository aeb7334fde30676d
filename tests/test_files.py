"""The one atomic-write helper every output (checkpoint, export, log, figure) goes through: atomic
replacement, temporary files of killed writers cleaned (never a live writer's), a full disk reported
with the old file kept, strict JSON."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FullAfter
import torch

from convnextv2_hub.files import DiskFullError, atomic_folder, atomic_path, atomic_torch_save, atomic_write, atomic_write_json, temp_path


def test_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "log.jsonl"
    target.write_text("old\n")
    atomic_write(target, lambda f: f.write("a,b\r\n"), text=True)
    assert target.read_bytes() == b"a,b\r\n"  # text mode does no newline translation (csv needs that)
    atomic_write(target, lambda f: f.write(b"\x00\x01"))
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


def test_failure_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError, match="verification failed"):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_bytes(b"half-written")  # any library may write the path
            raise RuntimeError("verification failed")
    assert target.read_bytes() == b"old"
    assert not seen[0].exists() and seen[0].parent == tmp_path and seen[0].name.startswith(".model.safetensors.")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_missing_folder_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "x.json", lambda f: f.write(b"{}"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# Temporary files left by killed writers
# ----------------------------------------------------------------------------------------------------------
def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.onnx"
    code = ("import os, signal, sys\nfrom convnextv2_hub.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'x' * 250_000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".model.onnx.") and not target.exists()
    with pytest.warns(UserWarning, match=r"removed 1 temporary file\(s\) .* of model\.onnx: \.model\.onnx\..*\(250\.0 KB\)"):
        atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and _temps(tmp_path) == []


def test_a_killed_folder_writers_temporary_folder_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "hf-model"
    code = ("import os, signal, sys\nfrom convnextv2_hub.files import atomic_folder\n"
            "with atomic_folder(sys.argv[1]) as tmp:\n    (tmp / 'sub').mkdir()\n"
            "    (tmp / 'sub' / 'model.safetensors').write_bytes(b'x' * 100_000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert len(_temps(tmp_path)) == 1 and not target.exists()
    with pytest.warns(UserWarning, match=r"removed 1 temporary file\(s\) .* of hf-model: \.hf-model\..*\(100\.0 KB\)"):
        with atomic_folder(target) as tmp:
            (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}" and _temps(tmp_path) == []


def test_live_writers_and_other_files_are_kept(tmp_path):
    target = tmp_path / "ckpt.pt"
    # A concurrent writer in another live process: its file must survive our write.
    code = "import sys, time\nfrom convnextv2_hub.files import temp_path\np = temp_path(sys.argv[1])\np.write_bytes(b'x')\nprint(p, flush=True)\ntime.sleep(60)\n"
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        live = Path(writer.stdout.readline().strip())
        mine = temp_path(target)  # this process: alive
        mine.write_bytes(b"x")
        day_old = time.time() - 2 * 24 * 3600
        names = {
            ".ckpt.pt.0123456789ab.tmp": None,  # older form, fresh: maybe a live writer of an older version
            ".ckpt.pt.abcdef012345.tmp": time.time() - 2 * 3600,  # older form, untouched for 2 h: stale
            ".ckpt.pt.some-other-host-7.0123456789ab.tmp": None,  # another host, fresh: cannot tell, kept
            ".ckpt.pt.some-other-host-8.0123456789ab.tmp": day_old,  # another host, 2 days: stale
            ".other.pt.0123456789ab.tmp": day_old,  # another target's: not this write's business
            ".ckpt.pt.notours.tmp": day_old,  # not our naming
        }
        for name, mtime in names.items():
            (tmp_path / name).write_bytes(b"x" * 10)
            if mtime is not None:
                os.utime(tmp_path / name, (mtime, mtime))
        with pytest.warns(UserWarning, match="removed 2 temporary file") as caught:
            atomic_write(target, lambda f: f.write(b"new"))
        text = str(caught[0].message)
        assert ".ckpt.pt.abcdef012345.tmp (10 bytes)" in text and "some-other-host-8" in text
        assert live.exists() and mine.exists()
        assert _temps(tmp_path) == sorted([live.name, mine.name, ".ckpt.pt.0123456789ab.tmp", ".ckpt.pt.notours.tmp",
                                           ".ckpt.pt.some-other-host-7.0123456789ab.tmp", ".other.pt.0123456789ab.tmp"])
    finally:
        writer.kill()
        writer.wait()
    with pytest.warns(UserWarning, match=f"removed 1 temporary file.*{live.name}"):  # its writer is dead now
        atomic_write(target, lambda f: f.write(b"newer"))
    assert not live.exists() and mine.exists()


# ----------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------


def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "eval.json"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError, match=rf"the disk is full: could not write {re.escape(str(target))} "
                                            r"\(the previous eval.json is unchanged\)") as info:
        atomic_write(target, lambda f: FullAfter(f, 5).write(b"a longer new content"))
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


def test_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    # atomic_torch_save hands torch a Python file object: the OSError of its write comes through.
    target = tmp_path / "checkpoint-last.pt"
    torch.save({"w": torch.zeros(4)}, target)
    before = target.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FullAfter(f, 200)))
    with pytest.raises(DiskFullError, match=rf"could not write {re.escape(str(target))} \(the previous checkpoint-last.pt is unchanged\)"):
        atomic_torch_save(target, {"w": torch.ones(10_000)})
    assert target.read_bytes() == before and _temps(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: ENOSPC)")
def test_torch_writing_a_path_on_a_full_disk(tmp_path):
    # Given a path (as some libraries do inside atomic_path), torch's C++ writer fails with
    # "[enforce fail at inline_container.cc ...] ... file write failed / unexpected pos": recognised too.
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError, match=rf"could not write {re.escape(str(target))}"):
        with atomic_path(target):
            torch.save({"w": torch.ones(10_000)}, "/dev/full")
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


def test_json_is_strict_and_says_what_was_not_finite(tmp_path):
    target = tmp_path / "eval.json"
    atomic_write_json(target, {"loss": float("nan"), "top1": 50.0, "per_class": [1.0, float("inf")]})

    def refuse(name):
        raise AssertionError(f"bare {name} in the JSON")

    data = json.loads(target.read_text(), parse_constant=refuse)
    assert data == {"loss": None, "top1": 50.0, "per_class": [1.0, None], "non_finite_as_null": ["loss", "per_class[1]"]}
