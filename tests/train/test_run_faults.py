"""The trainer meeting faults as a user would: absurd config values, bad data, unreadable or hostile
``--init`` / ``--resume`` files, weights that blow up, a full disk, temporary files of a killed run.
Each test asserts the one-line message and that nothing is left that a later run would take as good."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FullAfter, tiny_finetune_argv as finetune, write_digits
from safetensors.torch import load_file

import convnextv2_hub.train.engine as engine
from convnextv2_hub.cli.train import main

import sklearn  # noqa: F401,E402  (test extra: the data set comes from it)

pytestmark = pytest.mark.usefixtures("one_thread")



def one_line(err: str) -> str:
    """The single error line of stderr (no traceback, nothing else)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convnextv2-train: error: "), err
    return lines[0]


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"bare {name} in strict JSON")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------------------------------------
# Refused before anything is made
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, says", [
    ("lr=1e40", "lr must be in (0, 10]"),
    ("lr=-0.001", "lr must be in (0, 10]"),
    ("lr=NaN", "lr must be a finite number"),
    ("blr=Infinity", "blr must be a finite number"),
    ("batch_size=0", "batch_size must be positive"),
    ("min_lr=-1", "min_lr must be in [0, 10]"),
    ("nb_classes=1", "nb_classes must be >= 2"),
])
def test_absurd_config_values_are_refused_when_resolved(tmp_path, capsys, setting, says):
    out = tmp_path / "run"
    assert main(finetune(tmp_path / "nodata", out, "--set", setting)) == 2
    assert says in one_line(capsys.readouterr().err)
    assert not out.exists()


def _no_train(root: Path, digits: Path) -> list:
    root.mkdir()
    return []


def _no_class_folders(root: Path, digits: Path) -> list:
    (root / "train").mkdir(parents=True)
    for p in sorted((digits / "train" / "0").iterdir())[:3]:
        shutil.copy(p, root / "train" / p.name)
    return []


def _unreadable(root: Path, digits: Path) -> list:
    for c in ("0", "1"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            (root / "train" / c / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return []


def _one_class(root: Path, digits: Path) -> list:
    write_digits(root, [3], 8, 2)
    return []


def _bad_init(root: Path, digits: Path) -> list:
    bad = root.parent / "weights.pt"
    bad.write_bytes(b"<html>502 Bad Gateway</html>")
    return ["--init", str(bad)]


CASES = {
    "no train folder": (_no_train, False, "no training data: expected"),
    "no class folders": (_no_class_folders, False, "has no class folders"),
    "all images unreadable": (_unreadable, False, "none of the first 6 images can be read"),
    "one class": (_one_class, False, "images of one class only (3): fine-tuning a classifier needs at least two"),
    "unreadable --init": (_bad_init, True, "is neither a PyTorch file"),
    "missing --init": (lambda root, digits: ["--init", str(root / "nope.pt")], True, "nope.pt: no such file, and not a checkpoint name"),
    "missing --resume": (lambda root, digits: ["--resume", str(root / "nope.pt")], True, "nope.pt: no such file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_input_errors_are_one_line_and_leave_no_run_folder(tmp_path, capsys, two_digit_classes, case):
    make, use_digits, says = CASES[case]
    root = tmp_path / "data"
    more = make(root, two_digit_classes)
    out = tmp_path / "run"
    # A --init that is neither a file nor a checkpoint name is a bad flag value, refused before anything is read: 2.
    assert main(finetune(two_digit_classes if use_digits else root, out, *more)) == (2 if case == "missing --init" else 1)
    assert says in one_line(capsys.readouterr().err)
    assert not out.exists()  # no empty folder, no config.json of a run that never started


def test_eval_input_errors_are_one_line_too(tmp_path, capsys, two_digit_classes):
    out = tmp_path / "ev"
    assert main(["eval", "--model", "atto", "--data", str(two_digit_classes), "--output", str(out), "--num-workers", "0"]) == 1
    assert "eval needs --pretrained or --init PATH" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_bug_keeps_its_traceback(tmp_path, two_digit_classes, monkeypatch):
    def broken(run):
        raise KeyError("a bug in the trainer")

    monkeypatch.setattr(engine, "train", broken)
    with pytest.raises(KeyError, match="a bug in the trainer"):
        main(finetune(two_digit_classes, tmp_path / "run"))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["runs code", "empty", "truncated", "weights only"])
def test_resume_reads_through_the_safe_reader(tmp_path, capsys, two_digit_classes, kind):
    state = tmp_path / "checkpoint-last.pt"
    marker = tmp_path / "pwned"
    if kind == "runs code":
        torch.save({"format": engine.STATE_FORMAT, "mode": "finetune", "x": _RunsCode(marker)}, state)
    elif kind == "empty":
        state.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"format": engine.STATE_FORMAT, "model": {"w": torch.randn(20_000)}}, state)
        state.write_bytes(state.read_bytes()[:40_000])
    else:
        from safetensors.torch import save_file

        state = tmp_path / "weights.safetensors"
        save_file({"w": torch.zeros(2)}, str(state))
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out, "--resume", str(state))) == 1
    line = one_line(capsys.readouterr().err)
    says = {"runs code": "refusing to load", "empty": "is empty (0 bytes)", "truncated": "truncated or corrupt",
            "weights only": "is not a finetune training state of this trainer"}[kind]
    assert says in line and "weights_only=False" not in line
    assert not marker.exists() and not out.exists()


# ----------------------------------------------------------------------------------------------------------
# Weights that blow up: no checkpoint written over a good one
# ----------------------------------------------------------------------------------------------------------
def poison_after_step(monkeypatch, step: int) -> None:
    """After the ``step``-th optimiser step of the next run, the head's weights are inf: what an absurd
    lr does to them, at a chosen moment (the loss is checked before a step, never after it)."""
    real = engine._optimizer_step
    done = {"steps": 0}

    def step_then_poison(s, model):
        real(s, model)
        done["steps"] += 1
        if done["steps"] == step:
            with torch.no_grad():
                model.raw.head.weight.fill_(float("inf"))

    monkeypatch.setattr(engine, "_optimizer_step", step_then_poison)


def test_weights_ruined_at_an_epoch_boundary_keep_the_good_checkpoint(tmp_path, capsys, two_digit_classes, monkeypatch):
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out, "--set", "epochs=1", "--set", "lr=1e-3")) == 0
    good_state = (out / "checkpoint-last.pt").read_bytes()
    good_weights = load_file(str(out / "checkpoint-last.safetensors"))
    good_eval = (out / "eval.json").read_text()
    capsys.readouterr()
    poison_after_step(monkeypatch, 2)  # the resumed run's last step of epoch 1
    assert main(finetune(two_digit_classes, out, "--set", "epochs=3", "--set", "lr=1e-3", "--resume", "auto")) == 1
    line = one_line(capsys.readouterr().err)
    assert "evaluation loss is nan after epoch 1" in line
    assert f"the last good checkpoint is {out / 'checkpoint-last.pt'} (epoch 1, iteration 0, step 2)" in line
    assert (out / "checkpoint-last.pt").read_bytes() == good_state
    now = load_file(str(out / "checkpoint-last.safetensors"))
    assert all(torch.equal(now[k], good_weights[k]) for k in good_weights)
    assert (out / "eval.json").read_text() == good_eval  # still describes the good weights
    log = [strict_json(x) for x in (out / "log.jsonl").read_text().splitlines()]
    last = [e for e in log if e["type"] == "epoch"][-1]
    assert last["epoch"] == 1 and last["val"]["loss"] is None and "val.loss" in last["non_finite_as_null"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("step, more, says", [
    (1, [], "loss is nan at epoch 0, iteration 1"),  # the next forward pass sees it
    (2, [], "non-finite values in model head.weight at the end of epoch 0"),  # last step: only the weights show it
    (1, ["--set", "save_ckpt_steps=1"], "non-finite values in model head.weight at epoch 0, iteration 1"),  # mid-epoch save
])
def test_a_run_ruined_before_its_first_checkpoint_says_none_is_good(tmp_path, capsys, two_digit_classes, monkeypatch, step, more, says):
    data = tmp_path / "digits"
    shutil.copytree(two_digit_classes / "train", data / "train")  # no val/: no evaluation loss to see it
    out = tmp_path / "run"
    poison_after_step(monkeypatch, step)
    assert main(finetune(data, out, "--set", "epochs=2", "--set", "lr=1e-3", *more)) == 1
    line = one_line(capsys.readouterr().err)
    assert says in line and "no good checkpoint exists: this run saved none" in line
    assert not list(out.glob("checkpoint-last*"))


# ----------------------------------------------------------------------------------------------------------
# A full disk; temporary files of a killed run
# ----------------------------------------------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, two_digit_classes, monkeypatch):
    out = tmp_path / "run"
    assert main(finetune(two_digit_classes, out, "--set", "epochs=1", "--set", "lr=1e-3")) == 0
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint-last*")}
    capsys.readouterr()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FullAfter(f, 100_000)))
    assert main(finetune(two_digit_classes, out, "--set", "epochs=2", "--set", "lr=1e-3", "--resume", "auto")) == 1
    line = one_line(capsys.readouterr().err)
    assert f"the disk is full: could not write {out / 'checkpoint-last.pt'} (the previous checkpoint-last.pt is unchanged)" in line
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint-last*")} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_temporary_files_of_a_killed_run_are_cleaned_with_a_warning(tmp_path, two_digit_classes):
    out = tmp_path / "run"
    out.mkdir()
    # What a SIGKILL mid-save leaves: the dead writer's hidden temporary file (written by a process
    # that has exited), and one of the older naming, untouched for two hours.
    code = "import sys\nfrom convnextv2_hub.files import temp_path\np = temp_path(sys.argv[1])\np.write_bytes(b'x' * 3000)\nprint(p)"
    r = subprocess.run([sys.executable, "-c", code, str(out / "checkpoint-last.pt")], capture_output=True, text=True, timeout=120)
    dead = Path(r.stdout.strip())
    old = out / ".checkpoint-last.safetensors.0123456789ab.tmp"
    old.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with pytest.warns(UserWarning) as caught:
        assert main(finetune(two_digit_classes, out, "--set", "epochs=1", "--set", "lr=1e-3")) == 0
    removed = [str(w.message) for w in caught if "temporary file" in str(w.message)]
    assert any(dead.name in m and "(3.0 KB)" in m for m in removed), removed
    assert any(old.name in m and "(10 bytes)" in m for m in removed), removed
    assert not dead.exists() and not old.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
