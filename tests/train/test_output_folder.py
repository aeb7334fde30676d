"""An output folder holding an earlier run is never trained over by accident: without --resume or
--overwrite the run stops before reading or writing anything, and says which flag to use."""
import json
from pathlib import Path

import pytest
import torch
from conftest import write_digits

from convnextv2_hub.cli.train import main

import sklearn  # noqa: F401,E402  (test extra: the data set comes from it)

COMMON = ["--num-workers", "0", "--set", "update_freq=1", "--set", "warmup_epochs=0", "--set", "use_amp=false",
          "--set", "log_interval=1", "--set", "batch_size=8", "--set", "input_size=32", "--set", "model_ema=false",
          "--set", "aa=none", "--set", "reprob=0", "--set", "tensorboard=false", "--set", "epochs=1", "--set", "lr=1e-3"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("data") / "digits", [0, 1], 8, 4)


def finetune(data: Path, out: Path, *more: str) -> list:
    return ["finetune", "--model", "atto", "--data", str(data), "--output", str(out), *COMMON, *more]


def snapshot(out: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}


def test_a_restart_without_a_flag_is_refused_and_touches_nothing(tmp_path, capsys, digits):
    out = tmp_path / "run"
    assert main(finetune(digits, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(finetune(digits, out, "--set", "epochs=2")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{out} already holds a run (checkpoint-last.pt, checkpoint-last.safetensors" in err[0]
    assert "use --resume auto to continue it, or --overwrite to start over" in err[0]
    assert snapshot(out) == before


def test_only_a_checkpoint_makes_a_folder_a_run(tmp_path, digits):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(finetune(digits, out)) == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_starts_over_with_a_fresh_log(tmp_path, digits):
    out = tmp_path / "run"
    assert main(finetune(digits, out)) == 0
    assert main(finetune(digits, out, "--overwrite", "--set", "lr=5e-4")) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["type"] == "epoch"] == [0]  # the earlier run's lines are gone
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 5e-4
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["global_step"] == 2


def test_resume_auto_continues_without_overwrite(tmp_path, digits):
    out = tmp_path / "run"
    assert main(finetune(digits, out)) == 0
    assert main(finetune(digits, out, "--resume", "auto", "--set", "epochs=2")) == 0
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["global_step"] == 4


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys, digits):
    out = tmp_path / "run"
    assert main(finetune(digits, out, "--overwrite", "--resume", "auto")) == 2
    assert "--overwrite starts over and --resume continues: give one of them" in capsys.readouterr().err
    assert not out.exists()
