"""The one atomic-write helper every output (checkpoint, export, log, figure) goes through."""
import pytest

from convnextv2_hub.files import atomic_path, atomic_write


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
