"""``convnextv2 convert``: every target from our file and from a peer's, reloaded with the same logits;
refusals exit 1 with one line saying what and why; ``convert --help`` loads no torch."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import ConvNextV2ForImageClassification

import convnextv2_hub as cvh
from convnextv2_hub.checkpoints.formats import SAVE_FORMATS, to_authors_sparse
from convnextv2_hub.checkpoints.io import save_checkpoint
from convnextv2_hub.cli.convert import TARGETS
from convnextv2_hub.cli.main import main
from convnextv2_hub.models.convnextv2 import ConvNeXtV2

TOL = 1e-5
X = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))


def randomised(num_classes: int, name: str = "atto") -> torch.nn.Module:
    """Every parameter random (GRN's zero init would make it the identity and hide conversion bugs)."""
    model = cvh.create(name, num_classes=num_classes).eval()
    g = torch.Generator().manual_seed(num_classes)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "grn" in n or n.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:  # LayerNorm weight
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.fixture(scope="module")
def ours10(tmp_path_factory):
    model = randomised(10)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("src") / "atto10.safetensors")


def test_targets_are_the_save_formats():
    assert set(TARGETS) == set(SAVE_FORMATS)


@pytest.mark.parametrize("to,name", [("timm", "t.safetensors"), ("hf", "hf"), ("authors", "a.pt"), ("ours", "o.safetensors")])
def test_convert_ours_to_each_and_back(ours10, tmp_path, capsys, to, name):
    model, src = ours10
    dst = tmp_path / name
    assert main(["convert", str(src), "--to", to, "--out", str(dst)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {dst} ({to}: atto, 10 classes)" in printed and "load it with:" in printed
    back = cvh.create("atto", num_classes=10, checkpoint_path=dst).eval()
    assert (out(back) - out(model)).abs().max().item() <= TOL


def test_convert_timm_file_without_model_name_to_hf(ours10, tmp_path, capsys):
    model, src = ours10
    timm_file = tmp_path / "t.safetensors"
    assert main(["convert", str(src), "--to", "timm", "--out", str(timm_file)]) == 0
    assert main(["convert", str(timm_file), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0  # variant from the layout
    peer = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (peer(pixel_values=X).logits - out(model)).abs().max().item() <= TOL
    # An HF folder's class names travel on to the next conversion.
    peer.config.id2label = {i: f"kind_{i}" for i in range(10)}
    peer.save_pretrained(tmp_path / "hf_named")
    assert main(["convert", str(tmp_path / "hf_named"), "--to", "hf", "--out", str(tmp_path / "hf2")]) == 0
    again = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "hf2")
    assert again.config.id2label[3] == "kind_3"


def test_existing_out_is_refused_unless_overwrite(ours10, tmp_path, capsys):
    _, src = ours10
    dst = tmp_path / "t.safetensors"
    dst.write_bytes(b"keep me")
    assert main(["convert", str(src), "--to", "timm", "--out", str(dst)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert main(["convert", str(src), "--to", "timm", "--out", str(dst), "--overwrite"]) == 0
    assert dst.read_bytes() != b"keep me"


def test_fcmae_pretraining_checkpoint_needs_encoder_only(tmp_path, capsys):
    enc = randomised(0)
    sd = to_authors_sparse(enc.state_dict())
    sd.update({"mask_token": torch.zeros(1, 512, 1, 1), "decoder.0.weight": torch.randn(4, 4)})
    src = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd}, src)
    dst = tmp_path / "enc.safetensors"
    assert main(["convert", str(src), "--to", "timm", "--out", str(dst), "--model", "atto"]) == 1
    err = capsys.readouterr().err
    assert "FCMAE pre-training checkpoint with its decoder" in err and "--encoder-only" in err and not dst.exists()
    assert main(["convert", str(src), "--to", "timm", "--out", str(dst), "--model", "atto", "--encoder-only"]) == 0
    back = cvh.create("atto", num_classes=0, checkpoint_path=dst).eval()
    with torch.no_grad():
        assert (back.forward_features(X) - enc.forward_features(X)).abs().max().item() <= TOL


def test_refusals(ours10, tmp_path, capsys):
    _, src = ours10
    assert main(["convert", str(src), "--to", "hf", "--out", str(tmp_path / "x"), "--num-classes", "5"]) == 1
    assert "would write a new, untrained head" in capsys.readouterr().err
    odd = tmp_path / "odd.pt"
    save_checkpoint(ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=3), odd, format="authors")
    assert main(["convert", str(odd), "--to", "timm", "--out", str(tmp_path / "y")]) == 1
    assert "cannot tell the ConvNeXt V2 variant" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["odd.pt"]


def test_convert_help_loads_no_torch():
    code = ("import sys; from convnextv2_hub.cli.main import main\n"
            "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert "--to {timm,hf,authors,ours}" in res.stdout
