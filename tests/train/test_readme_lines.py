"""Every ``convnextv2-train`` line of README.md runs as written on a small folder of real images.

The lines are read from the README itself, so a line added there is run here too. Each is run as written
except for the data and output paths and these budget overrides, which keep the whole file within a few
seconds on two CPU cores:
- ``--model atto`` for a bigger variant (a Tiny or Base step costs 10-40x an Atto one; the recipe row then is
  Atto's, whose warm-up fits: the Tiny warm-up adaptation is pinned by test_start.py's dry runs);
- ``--set epochs=1``, a small ``input_size`` (32 px, 64 for FCMAE, whose 32-px patches need a few per
  image), ``use_amp=false`` (bf16 is emulated, and slow, on CPUs without AMX), ``tensorboard=false`` and
  ``--num-workers 0``.
Nothing else is added: no ``--init``, batch or warm-up settings. So the runs show that a fine-tune starts from
the variant's released FCMAE weights by default (served with generated weights by the conftest loopback Hub)
and that the recipes' ImageNet batch adapts to a folder of 16 images with a notice.
"""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import hub_responder, write_digits, write_skimage_photos
from safetensors.torch import save

from convnextv2_hub.checkpoints.io import read_metadata, to_timm
from convnextv2_hub.checkpoints.registry import get_checkpoint
from convnextv2_hub.cli.main import main as convnextv2_main
from convnextv2_hub.cli.train import main
from convnextv2_hub.models.convnextv2 import convnextv2

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[2] / "README.md"
BUDGET = {"pretrain": ["--set", "input_size=64"], "finetune": ["--set", "input_size=32"], "eval": []}
COMMON_BUDGET = ["--num-workers", "0", "--set", "use_amp=false"]
TRAIN_BUDGET = ["--set", "epochs=1", "--set", "tensorboard=false"]


def readme_train_lines():
    """The ``convnextv2-train`` command lines in the code blocks of README.md's training section, comments
    removed. (The ablation and ``reproduce`` sections' lines are run by test_train_ablations.py and
    test_reproduce.py, the ``hf-hub:`` eval of the usage section by test_whole_loop.py.)"""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Training: `convnextv2-train`\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section is not None, "README.md has no '## Training: `convnextv2-train`' section"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section.group(1), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("convnextv2-train ")]


def _timm_file(name: str, num_classes: int) -> bytes:
    """Generated weights for a released checkpoint, in the timm layout its Hub repository holds."""
    torch.manual_seed(0)
    model = convnextv2(get_checkpoint(name).variant, num_classes=num_classes)
    return save(to_timm({k: v.contiguous() for k, v in model.state_dict().items()}, model.variant))


@pytest.fixture
def loopback_hub(hf_env, servers, monkeypatch):
    files = {}
    for name in ("atto.fcmae", "atto.fcmae_ft_in1k"):
        ckpt = get_checkpoint(name)
        files[(ckpt.hf_hub_id, ckpt.hf_hub_filename)] = _timm_file(name, ckpt.num_classes)
    hub = servers(hub_responder(files))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


def _as_run_here(argv, paths):
    """The README line with the test's paths and the budget overrides (see the module docstring)."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("/"):
            assert arg in paths, f"README line {argv}: no test folder stands for {arg}; add one to the test's paths"
            out.append(str(paths[arg]))
        else:
            out.append("atto" if i > 0 and argv[i - 1] == "--model" else arg)
    if argv[0] in BUDGET:
        out += COMMON_BUDGET + BUDGET[argv[0]] + (TRAIN_BUDGET if argv[0] != "eval" else [])
    return out


def test_every_readme_training_line_runs_on_a_small_folder(tmp_path, monkeypatch, loopback_hub, capsys):
    lines = readme_train_lines()
    assert {line[0] for line in lines} >= {"pretrain", "finetune", "eval", "recipes"}, lines
    digits = write_digits(tmp_path / "digits", [0, 1], 8, 4)  # 16 training images in 2 classes
    in1k_val = tmp_path / "in1k_val"  # an ImageNet val folder: WordNet-id class folders
    for wnid, photo in (("n02123045", "chelsea"), ("n07920052", "coffee")):  # tabby, espresso
        (in1k_val / wnid).mkdir(parents=True)
        write_skimage_photos(in1k_val / wnid, [photo])
    paths = {"/imagenet": digits, "/imagenet/val": in1k_val, "/my_folder": digits, "/my_folder/val": digits / "val"}
    monkeypatch.chdir(tmp_path)  # the lines' relative run folders (runs/pt, runs/finetune) go here

    for argv in lines:
        run = _as_run_here(argv, paths)
        assert main(run) == 0, f"README line failed: convnextv2-train {shlex.join(argv)}\nrun as {run}"
        printed = capsys.readouterr().out
        if argv[0] == "eval":  # WordNet-id folders -> ImageNet labels; the digit folders -> the run's class names
            assert json.loads(printed[printed.index("{"):])["classes"] == "by name"

    # The fine-tune without --init started from the released FCMAE weights (fetched from the loopback Hub), and
    # the recipe's 1024-image batch was adapted to the 16 images, with a notice in config.json.
    default_run = json.loads(Path("runs/finetune/config.json").read_text())["run"]
    assert default_run["start"] == {"kind": "checkpoint", "source": "atto.fcmae", "default": True}
    assert len(default_run["adapted"]) == 1 and "effective batch 1024" in default_run["adapted"][0]
    fcmae_repo = get_checkpoint("atto.fcmae").hf_hub_id
    assert any(m == "GET" and fcmae_repo in p for m, p in loopback_hub.requests)
    meta = read_metadata("runs/finetune/checkpoint-last.safetensors")
    assert meta["start"] == "atto.fcmae" and meta["base_checkpoint"] == "atto.fcmae"
    assert json.loads(meta["label_names"]) == ["0", "1"] and json.loads(meta["preprocessing"])["resolution"] == 32
    # The fine-tune from the FCMAE pre-training run: its start is that file, with no released weights below it.
    from_pt = read_metadata("runs/ft/checkpoint-last.safetensors")
    assert from_pt["start"] == "runs/pt/checkpoint-last.safetensors" and "base_checkpoint" not in from_pt

    # The FCMAE file of the pre-training run describes itself: fcmae-show needs neither a model nor a size.
    pt = read_metadata("runs/pt/checkpoint-last.safetensors")
    assert json.loads(pt["config"])["variant"] == "atto" and pt["start"] == "random" and pt["input_size"] == "64"
    photo = write_skimage_photos(tmp_path, ["astronaut"])[0]
    assert convnextv2_main(["fcmae-show", photo, "--checkpoint", "runs/pt/checkpoint-last.safetensors",
                            "--out", "recon.png"]) == 0
    assert "atto FCMAE from runs/pt/checkpoint-last.safetensors: mask ratio 0.6, 64 px" in capsys.readouterr().out
