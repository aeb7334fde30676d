"""Trainer runs on a small real image data set (scikit-learn's digits, upscaled to 32x32 RGB PNGs):
pretrain -> fine-tune -> eval end to end, bit-exact resume after SIGKILL, 2-process DDP == 1 process.
Atto at 32-64 px, one thread per process (the tests may share few cores). Faults (NaN, bad input, a
full disk) are in test_run_faults.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_digits
from safetensors.torch import load_file

from convnextv2_hub.cli.train import main

import sklearn  # noqa: F401,E402  (test extra: the data set comes from it)


# Several processes share the cores; with several OpenMP threads each they spin against each other.
# This process runs on one thread (conftest's one_thread), subprocesses get OMP_NUM_THREADS=1 (see ENV).
pytestmark = pytest.mark.usefixtures("one_thread")


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def read_log(out: Path):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


COMMON = ["--num-workers", "0", "--set", "update_freq=1", "--set", "warmup_epochs=0", "--set", "use_amp=false", "--set", "log_interval=1"]


@pytest.mark.filterwarnings("ignore:skipping unreadable image")  # expected: the test plants a broken file
def test_pretrain_finetune_eval_end_to_end(tmp_path):
    data = write_digits(tmp_path / "digits", [0, 1, 2, 3], 96, 30, corrupt=True)
    pt, ft = tmp_path / "pt", tmp_path / "ft"
    assert main(["pretrain", "--model", "atto", "--data", str(data), "--output", str(pt), *COMMON,
                 "--set", "epochs=2", "--set", "batch_size=32", "--set", "input_size=64", "--set", "lr=2e-3",
                 "--set", "decoder_embed_dim=64"]) == 0
    log = read_log(pt)
    steps = [e["loss"] for e in log if e["type"] == "step"]
    assert np.mean(steps[-3:]) < np.mean(steps[:3])  # the reconstruction loss falls
    epochs = [e for e in log if e["type"] == "epoch"]
    assert [e["skipped_images"] for e in epochs] == [1, 1]  # the broken file: skipped, counted, not fatal
    assert (pt / "checkpoint-last.safetensors").is_file() and (pt / "config.json").is_file()

    assert main(["finetune", "--model", "atto", "--data", str(data), "--output", str(ft), *COMMON,
                 "--init", str(pt / "checkpoint-last.safetensors"), "--set", "epochs=2", "--set", "batch_size=16",
                 "--set", "input_size=32", "--set", "lr=7e-4", "--set", "head_init_scale=1.0", "--set", "layer_decay=1.0",
                 "--set", "train_crop_scale=[0.7,1.0]", "--set", "aa=none", "--set", "reprob=0", "--set", "smoothing=0",
                 "--set", "drop_path=0", "--set", "model_ema_decay=0.9"]) == 0
    log = read_log(ft)
    epochs = [e for e in log if e["type"] == "epoch"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    result = json.loads((ft / "eval.json").read_text())
    assert result["num_images"] == 120 and result["top1"] > 50.0  # chance is 25 %
    assert "ema" in result and result["top5"] == 100.0  # 4 classes: top-5 is every class
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["config"]["lr"] == 7e-4 and cfg["run"]["recipe"] == "finetune_in1k"

    # the eval command on the saved weights reproduces the training's last evaluation
    ev = tmp_path / "ev"
    assert main(["eval", "--model", "atto", "--data", str(data), "--init", str(ft / "checkpoint-last.safetensors"),
                 "--output", str(ev), "--num-workers", "0", "--set", "input_size=32"]) == 0
    again = json.loads((ev / "eval.json").read_text())
    assert again["top1"] == pytest.approx(result["top1"]) and again["num_images"] == 120

    # final weights load with create(..., checkpoint_path=)
    import convnextv2_hub.models.factory as hub

    m = hub.create("atto", num_classes=4, checkpoint_path=ft / "checkpoint-last.safetensors")
    ref = load_file(str(ft / "checkpoint-last.safetensors"))
    assert torch.equal(m.state_dict()["head.weight"], ref["head.weight"])


# Fine-tuning with every source of randomness on: RandAugment, random erasing, mixup/cutmix, drop
# path, EMA, label smoothing. 8 steps per epoch, a checkpoint every 3 steps.
RESUME_ARGS = ["--set", "epochs=4", "--set", "batch_size=8", "--set", "input_size=32", "--set", "lr=1e-3",
               "--set", "drop_path=0.1", "--set", "mixup=0.8", "--set", "cutmix=1.0", "--set", "reprob=0.25",
               "--set", "model_ema_decay=0.9", "--set", "save_ckpt_steps=3", "--set", "layer_decay=0.9"]


def test_exact_resume_after_sigkill_mid_epoch(tmp_path):
    data = write_digits(tmp_path / "digits", [0, 1], 32, 8)
    base = ["finetune", "--model", "atto", "--data", str(data), "--init", "none", *COMMON, *RESUME_ARGS]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*base, "--output", str(straight)]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "convnextv2_hub.train", *base, "--output", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill once epoch 2 (0-based; steps 17..24) has passed its step-18 checkpoint.
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            log = killed / "log.jsonl"
            if log.is_file() and any(json.loads(x).get("global_step", 0) >= 19 for x in log.read_text().splitlines() if x.endswith("}")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = torch.load(killed / "checkpoint-last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["micro"] in (2, 5)  # a mid-epoch checkpoint (steps 18 or 21)

    assert main([*base, "--output", str(killed), "--resume", "auto"]) == 0
    for name in ("checkpoint-last.safetensors", "checkpoint-last-ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"resume max |diff| {name}: {diff:.3g}")
        assert diff <= 1e-6, (name, diff)
    # the same loss curve, line for line
    la = [(e["global_step"], e.get("loss", e.get("train_loss"))) for e in read_log(straight)]
    lb = [(e["global_step"], e.get("loss", e.get("train_loss"))) for e in read_log(killed)]
    assert la == lb
    assert json.loads((straight / "eval.json").read_text())["top1"] == json.loads((killed / "eval.json").read_text())["top1"]


def test_torchrun_two_processes_equal_one_process(tmp_path):
    # Drop path and mixup draw per-process randomness (seed + rank): off. Crop, RandAugment and
    # erasing are seeded per sample, so they stay on and are the same in both layouts.
    data = write_digits(tmp_path / "digits", [0, 1, 2], 11, 5)  # 33 images: 2 steps of 16 (+1 dropped)
    args = ["finetune", "--model", "atto", "--data", str(data), "--init", "none", *COMMON, "--set", "epochs=1", "--set", "input_size=32",
            "--set", "lr=1e-3", "--set", "drop_path=0", "--set", "mixup=0", "--set", "cutmix=0", "--set", "model_ema=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--output", str(one), "--set", "batch_size=16"]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "convnextv2_hub.train", *args, "--output", str(two), "--set", "batch_size=8"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["run"]["world_size"] == 2
    a, b = load_file(str(one / "checkpoint-last.safetensors")), load_file(str(two / "checkpoint-last.safetensors"))
    init = torch.load(one / "checkpoint-last.pt", weights_only=True)["global_step"]
    assert init == 2
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"DDP 2x8 vs 1x16 max |diff| after 2 steps: {diff:.3g}")
    assert diff <= 1e-5, diff
    e1, e2 = json.loads((one / "eval.json").read_text()), json.loads((two / "eval.json").read_text())
    assert e1["num_images"] == e2["num_images"] == 15 and e1["top1"] == e2["top1"]


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    # update_freq=2 x batch 8 is one optimiser step over the same 16 images as batch 16 (per-sample
    # seeded augmentation; no drop path or mixup, whose per-batch draws differ by construction).
    data = write_digits(tmp_path / "digits", [0, 1], 16, 2)
    args = ["finetune", "--model", "atto", "--data", str(data), "--init", "none", *COMMON, "--set", "epochs=1", "--set", "input_size=32",
            "--set", "lr=1e-3", "--set", "drop_path=0", "--set", "model_ema=false"]
    assert main([*args, "--output", str(tmp_path / "big"), "--set", "batch_size=16"]) == 0
    assert main([*args, "--output", str(tmp_path / "acc"), "--set", "batch_size=8", "--set", "update_freq=2"]) == 0
    a = load_file(str(tmp_path / "big" / "checkpoint-last.safetensors"))
    b = load_file(str(tmp_path / "acc" / "checkpoint-last.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert torch.load(tmp_path / "acc" / "checkpoint-last.pt", weights_only=True)["global_step"] == 2
