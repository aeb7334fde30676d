"""An output folder holding an earlier run is never trained over by accident: without --resume or
--overwrite the run stops before reading or writing anything, and says which flag to use."""
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_finetune_argv

from convnextv2_hub.cli.train import main

import sklearn  # noqa: F401,E402  (test extra: the data set comes from it)

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune(data: Path, out: Path, *more: str) -> list:
    """One epoch at lr 1e-3 unless ``more`` says otherwise."""
    return tiny_finetune_argv(data, out, "--set", "epochs=1", "--set", "lr=1e-3", *more)


def snapshot(out: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}


def test_a_restart_without_a_flag_is_refused_and_touches_nothing(tmp_path, capsys, two_digit_classes):
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(finetune(two_digit_classes, out, "--set", "epochs=2")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{out} already holds a run (checkpoint-last.pt, checkpoint-last.safetensors" in err[0]
    assert "use --resume auto to continue it, or --overwrite to start over" in err[0]
    assert snapshot(out) == before


def test_only_a_checkpoint_makes_a_folder_a_run(tmp_path, two_digit_classes):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(finetune(two_digit_classes, out)) == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_starts_over_with_a_fresh_log(tmp_path, two_digit_classes):
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out)) == 0
    assert main(finetune(two_digit_classes, out, "--overwrite", "--set", "lr=5e-4")) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["type"] == "epoch"] == [0]  # the earlier run's lines are gone
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 5e-4
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["global_step"] == 2


def test_resume_auto_continues_without_overwrite(tmp_path, two_digit_classes):
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out)) == 0
    assert main(finetune(two_digit_classes, out, "--resume", "auto", "--set", "epochs=2")) == 0
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["global_step"] == 4


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys, two_digit_classes):
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out, "--overwrite", "--resume", "auto")) == 2
    assert "--overwrite starts over and --resume continues: give one of them" in capsys.readouterr().err
    assert not out.exists()
