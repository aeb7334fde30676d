"""Two "nodes" on this machine, one training process each (gloo), that share no output folder or share
one. A run stopped after an epoch and resumed with ``--resume auto`` continues from rank 0's checkpoint
on both ranks (equal weights and EMA, checked by the trainer's per-epoch fingerprints of every rank,
which land in rank 0's log), and a checkpoint rank 0 cannot read stops both ranks with the same
message. Every launch has a time limit: a hang fails the test.

How the nodes start: ``CONVNEXTV2_HUB_TEST_TORCHRUN=1`` launches each as ``torchrun --nnodes 2
--nproc-per-node 1 --node-rank r --master-addr 127.0.0.1 --master-port P`` (four Python processes per
launch that each import torch: ~20 s a launch on a busy 2-core machine, ~100 s for the file). By
default each node is a fork of this test process given the environment torchrun gives its worker
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT), which is all the
trainer reads of torchrun, running the same command line through ``convnextv2_hub.cli.train.main``:
no interpreter start, no imports, so a launch costs what the training costs."""
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import List

import pytest
import torch
from conftest import tiny_finetune_argv, write_digits
from safetensors.torch import load_file

import convnextv2_hub.train.engine  # noqa: F401  (imported once here, not in every forked node)
from convnextv2_hub.train.distributed import fingerprint

import sklearn  # noqa: F401,E402  (test extra: the data set comes from it)

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TORCHRUN = os.environ.get("CONVNEXTV2_HUB_TEST_TORCHRUN") == "1"
LAUNCH_TIMEOUT_S = 150 if TORCHRUN else 60  # far above a launch's time on a busy machine: only a hang reaches it
EMA = ["--set", "model_ema=true", "--set", "model_ema_eval=true", "--set", "model_ema_decay=0.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forked_node(rank: int, port: int, argv: List[str], log: str) -> None:
    """A node's training process: torchrun's worker environment for node ``rank`` of 2, then the CLI."""
    os.environ.update(RANK=str(rank), GROUP_RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        sys.stdout, sys.stderr = out, err
        from convnextv2_hub.cli.train import main

        try:
            code = main(argv)
        except BaseException:  # a bug: its traceback goes to the node's log, for the failing assert to show
            traceback.print_exc()
            code = 70
        out.flush()
        err.flush()
    os._exit(code)


def two_nodes(data: Path, outputs: List[Path], *more: str, per_node=((), ())) -> List[subprocess.CompletedProcess]:
    """Fine-tune atto on two one-process "nodes" (node r writes to ``outputs[r]`` and adds ``per_node[r]``
    to the flags); both results (exit code, stdout, stderr), or a failed test when they do not end
    within ``LAUNCH_TIMEOUT_S``."""
    port = free_port()
    argvs = [tiny_finetune_argv(data, out, *EMA, *more, *extra) for out, extra in zip(outputs, per_node)]
    if TORCHRUN:
        return _torchrun_nodes(port, argvs)
    logs = [str(out.parent / f"node{rank}-{port}") for rank, out in enumerate(outputs)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_node, args=(rank, port, argv, log)) for rank, (argv, log) in enumerate(zip(argvs, logs))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(LAUNCH_TIMEOUT_S)
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
            p.join()
        pytest.fail(f"the two nodes did not finish within {LAUNCH_TIMEOUT_S} s: a hang")
    return [subprocess.CompletedProcess(argv, p.exitcode, Path(log + ".out").read_text(), Path(log + ".err").read_text())
            for argv, p, log in zip(argvs, procs, logs)]


def _torchrun_nodes(port: int, argvs: List[List[str]]) -> List[subprocess.CompletedProcess]:
    procs = []
    for rank, argv in enumerate(argvs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "convnextv2_hub.train", *argv]
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))  # its own group: a hang is killed whole
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=LAUNCH_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        pytest.fail(f"the two nodes did not finish within {LAUNCH_TIMEOUT_S} s: a hang")
    return results


def epoch_lines(out: Path) -> list:
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["type"] == "epoch"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Data, and a two-node run stopped after its first epoch (``epochs=1``), each node with its own
    output folder: rank 0's holds the checkpoint, rank 1's nothing."""
    root = tmp_path_factory.mktemp("multinode")
    data = write_digits(root / "digits", [0, 1], 8, 2)  # 16 images: one step of 2 x 8 per epoch
    node0, node1 = root / "node0", root / "node1"
    r0, r1 = two_nodes(data, [node0, node1], "--set", "epochs=1")
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-3000:], r1.stderr[-3000:])
    assert not (node1 / "checkpoint-last.pt").exists()  # rank 1 writes nothing
    (line,) = epoch_lines(node0)
    assert len(set(line["weights_digest"])) == 1 and len(line["weights_digest"]) == 2
    return data, node0, node1


def test_resume_without_a_shared_folder_continues_rank_0s_state_on_both(tmp_path, stopped_run):
    # Rank 1 sees no checkpoint: it must still start at epoch 1 with rank 0's weights, EMA and optimiser
    # state (before, it started over at epoch 0, ran a longer loop and hung the run).
    data, node0, node1 = stopped_run
    shared = tmp_path / "shared"
    shutil.copytree(node0, shared)  # the same stopped run, for the shared-folder test below
    r0, r1 = two_nodes(data, [node0, node1], "--resume", "auto", "--set", "epochs=2")
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-3000:], r1.stderr[-3000:])
    assert "resumed from" in r0.stdout and "epoch 1, iteration 0, step 1" in r0.stdout
    first, second = epoch_lines(node0)
    assert (first["epoch"], second["epoch"], second["global_step"]) == (0, 1, 2)
    digests = second["weights_digest"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # both ranks: the same weights and EMA
    assert not (node1 / "checkpoint-last.pt").exists()

    # The shared folder: both ranks see the same file; the result equals the run above bit for bit.
    r0, r1 = two_nodes(data, [shared, shared], "--resume", "auto", "--set", "epochs=2")
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-3000:], r1.stderr[-3000:])
    assert epoch_lines(shared)[-1]["weights_digest"] == digests
    for name in ("checkpoint-last.safetensors", "checkpoint-last-ema.safetensors"):
        a, b = load_file(str(node0 / name)), load_file(str(shared / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_checkpoint_rank_0_cannot_read_stops_both_ranks_with_its_message(tmp_path, stopped_run):
    # Rank 0's checkpoint is cut short, rank 1's folder holds a good one: rank 0 decides, both stop.
    data, node0, _ = stopped_run
    bad, good = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(node0, good)
    bad.mkdir()
    state = (node0 / "checkpoint-last.pt").read_bytes()
    (bad / "checkpoint-last.pt").write_bytes(state[: len(state) // 2])
    results = two_nodes(data, [bad, good], "--resume", "auto", "--set", "epochs=2")
    for r in results:
        assert r.returncode != 0
        errors = [line for line in r.stderr.splitlines() if line.startswith("convnextv2-train: error: ")]
        assert len(errors) == 1 and f"{bad / 'checkpoint-last.pt'}" in errors[0] and "truncated or corrupt" in errors[0], r.stderr[-2000:]
    assert sorted(os.listdir(bad)) == ["checkpoint-last.pt"]  # rank 0 wrote nothing: no config, no log
    assert (good / "log.jsonl").read_bytes() == (node0 / "log.jsonl").read_bytes()  # nor did rank 1


def test_ranks_that_drift_apart_stop_together_before_anything_is_saved(tmp_path, stopped_run):
    # Started with another lr, rank 1's weights leave rank 0's after the first step: the end-of-epoch
    # check stops both, rather than evaluating a mix of models and saving rank 0's alone.
    data = stopped_run[0]
    outs = [tmp_path / "node0", tmp_path / "node1"]
    results = two_nodes(data, outs, "--set", "epochs=1", per_node=((), ("--set", "lr=1e-2")))
    for r in results:
        assert r.returncode == 1
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("convnextv2-train: error: ")]
        assert "the processes hold different weights at the end of epoch 0: the model of rank(s) 1, the EMA of " \
               "rank(s) 1 differ from rank 0's" in error, r.stderr[-2000:]
    assert not (outs[0] / "checkpoint-last.pt").exists()


def test_fingerprints_see_one_bit_and_not_the_memory_layout():
    w = torch.randn(8, 3, 7, 7)
    same = w.clone().contiguous(memory_format=torch.channels_last)
    assert torch.equal(fingerprint([w, torch.tensor(3)]), fingerprint([same, torch.tensor(3)]))
    flipped = w.clone()
    flipped.view(-1).view(torch.int32)[17] ^= 1  # the last bit of one float
    assert not torch.equal(fingerprint([w]), fingerprint([flipped]))
    assert fingerprint([w.bfloat16(), torch.ones(3, dtype=torch.bool), w.double()]).shape == (4, 2)  # any dtype
