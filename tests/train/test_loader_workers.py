"""Data loader workers: sized per node (LOCAL_WORLD_SIZE and this process's CPUs), never by the global
world size; persistent across epochs; and the same training with workers as without."""
import os
from pathlib import Path

import pytest
import torch
from conftest import write_digits
from safetensors.torch import load_file

import convnextv2_hub.train.data as data
from convnextv2_hub.cli.train import main


def cpus(monkeypatch, n: int) -> None:
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    else:
        monkeypatch.setattr(os, "cpu_count", lambda: n)


@pytest.mark.parametrize("node_cpus, local, world, workers", [
    (96, 8, 8, 8),     # 12 CPUs per process: 11, capped at 8
    (96, 8, 16, 8),    # 2 nodes: the same per node
    (96, 8, 64, 8),    # 8 nodes: the same (the old rule, CPUs / global world, gave 0)
    (32, 8, 32, 3),    # 4 CPUs per process: 3 workers and the process itself
    (8, 8, 8, 0),      # one CPU per process: loading in the training process
    (2, 1, 1, 1),      # no torchrun, a small machine
    (4, None, 1, 3),   # LOCAL_WORLD_SIZE unset: one process on the node
])
def test_workers_are_sized_per_node(monkeypatch, node_cpus, local, world, workers):
    cpus(monkeypatch, node_cpus)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert data.default_num_workers() == workers


def test_affinity_is_what_counts_not_the_machine(monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity masks on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data.default_num_workers() == 1


def test_workers_persist_across_epochs_and_zero_workers_do_not_ask_for_it():
    ds = torch.utils.data.TensorDataset(torch.arange(4))
    sampler = data.ShardSampler(4)
    with_workers = data.make_loader(ds, 2, sampler, 2, False, torch.Generator())
    assert with_workers.persistent_workers and with_workers.num_workers == 2
    assert not data.make_loader(ds, 2, sampler, 0, False, torch.Generator()).persistent_workers


COMMON = ["--set", "update_freq=1", "--set", "warmup_epochs=0", "--set", "use_amp=false", "--set", "batch_size=8",
          "--set", "input_size=32", "--set", "model_ema=false", "--set", "tensorboard=false", "--set", "epochs=2",
          "--set", "lr=1e-3", "--set", "drop_path=0", "--set", "mixup=0", "--set", "cutmix=0"]


def test_persistent_workers_train_as_the_training_process_does(tmp_path):
    # RandAugment and random erasing on: their draws are seeded per sample, wherever they run. Two
    # epochs, so the second runs on the persistent workers of the first.
    digits: Path = write_digits(tmp_path / "digits", [0, 1], 8, 2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for workers in ("0", "1"):
            assert main(["finetune", "--model", "atto", "--data", str(digits), "--output", str(tmp_path / workers), "--init", "none",
                         "--num-workers", workers, *COMMON]) == 0
    finally:
        torch.set_num_threads(n)
    a, b = load_file(str(tmp_path / "0" / "checkpoint-last.safetensors")), load_file(str(tmp_path / "1" / "checkpoint-last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
