"""Writing the peers' formats: files from ``save_checkpoint(format=...)`` load in the real timm and
transformers (and back into ours) with the same logits; what a format cannot hold is refused; writes
are atomic and do not overwrite unless told.

Every parameter is randomised first, GRN included: at its zero init GRN is the identity, and a
conversion bug in it would go unnoticed.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from skimage import data as skimage_data
from transformers import AutoImageProcessor, ConvNextV2ForImageClassification, ConvNextV2Model

import convnextv2_hub as cvh
from convnextv2_hub.checkpoints.io import load_checkpoint, save_checkpoint, timm_load_hint
from convnextv2_hub.checkpoints.registry import get_checkpoint, imagenet_class_names
from convnextv2_hub.models.convnextv2 import ConvNeXtV2, convnextv2
from convnextv2_hub.models.fcmae import FCMAE

TOL = 1e-5
X = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(5))  # non-square, batch 2

# (name, num_classes): the ImageNet classifier, a fresh 10-class head, an FCMAE encoder (no head).
CASES = [("atto.fcmae_ft_in1k", 1000), ("atto", 10), ("atto.fcmae", 0)]
CASE_IDS = ["in1k_head", "fresh_10", "fcmae_encoder"]


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter: GRN gamma/beta clearly non-zero, LayerNorm weights ~1, conv and
    Linear weights scaled by 1/sqrt(fan_in) so activations stay O(1) and 1e-5 is a meaningful tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "grn" in name:
                p.copy_(0.2 * r if name.endswith("gamma") else 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))


def make(name: str, num_classes: int) -> ConvNeXtV2:
    model = cvh.create(name, num_classes=num_classes).eval()
    randomise_(model)
    grn = [p for n, p in model.named_parameters() if "grn" in n]
    assert grn and all(p.abs().min() > 0 for p in grn), "GRN left at zero: the comparison would prove nothing"
    return model


def logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Round trips through the real peers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,num_classes", CASES, ids=CASE_IDS)
def test_timm_roundtrip(tmp_path, name, num_classes):
    model = make(name, num_classes)
    path = save_checkpoint(model, tmp_path / "timm.safetensors", format="timm")
    hint = timm_load_hint(path, "atto", num_classes)
    peer = eval(hint, {"timm": timm}).eval()  # exactly the line users are given
    d = maxdiff(logits(peer), logits(model))
    print(f"\n[peer] timm {name} ({num_classes} classes): max|Δlogits|={d:.2e}")
    assert d <= TOL
    back = cvh.create("atto", num_classes=num_classes, checkpoint_path=path).eval()
    assert maxdiff(logits(back), logits(model)) <= TOL


def test_timm_default_overlay_without_num_classes_keeps_the_imagenet_head(tmp_path):
    # The issue's own line (no num_classes in the overlay) loads a 1000-class file with its head.
    model = make("atto.fcmae_ft_in1k", 1000)
    path = save_checkpoint(model, tmp_path / "timm.safetensors", format="timm")
    peer = timm.create_model("convnextv2_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             num_classes=1000).eval()
    assert maxdiff(logits(peer), logits(model)) <= TOL


@pytest.mark.parametrize("name,num_classes", CASES, ids=CASE_IDS)
def test_hf_roundtrip(tmp_path, name, num_classes):
    model = make(name, num_classes)
    folder = save_checkpoint(model, tmp_path / "hf", format="hf")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    cls = ConvNextV2ForImageClassification if num_classes else ConvNextV2Model
    peer = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        out = peer(pixel_values=X)
    got = out.logits if num_classes else out.pooler_output  # pooled + final LayerNorm == our num_classes=0 output
    d = maxdiff(got, logits(model))
    print(f"\n[peer] hf {name} ({num_classes} classes): max|Δlogits|={d:.2e}")
    assert d <= TOL
    back = cvh.create("atto", num_classes=num_classes, checkpoint_path=folder).eval()
    assert maxdiff(logits(back), logits(model)) <= TOL


@pytest.mark.parametrize("name,num_classes", CASES, ids=CASE_IDS)
def test_authors_roundtrip(tmp_path, name, num_classes):
    model = make(name, num_classes)
    path = save_checkpoint(model, tmp_path / "atto.pt", format="authors")
    obj = torch.load(path, weights_only=True)
    assert list(obj) == ["model"] and set(obj["model"]) == set(model.state_dict())
    back = cvh.create("atto", num_classes=num_classes, checkpoint_path=path).eval()
    assert maxdiff(logits(back), logits(model)) <= TOL


def test_hf_config_fields(tmp_path):
    model = make("atto.fcmae_ft_in1k", 1000)
    cfg = json.loads((save_checkpoint(model, tmp_path / "hf", format="hf") / "config.json").read_text())
    assert cfg["model_type"] == "convnextv2" and cfg["architectures"] == ["ConvNextV2ForImageClassification"]
    assert cfg["depths"] == [2, 2, 6, 2] and cfg["hidden_sizes"] == [40, 80, 160, 320]
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["num_channels"] == 3
    names = imagenet_class_names()
    assert len(cfg["id2label"]) == 1000 and cfg["id2label"]["0"] == names[0] and cfg["id2label"]["999"] == names[999]
    assert all(cfg["id2label"][str(i)] == n for n, i in cfg["label2id"].items())
    ten = json.loads((save_checkpoint(make("atto", 10), tmp_path / "hf10", format="hf") / "config.json").read_text())
    assert ten["id2label"] == {str(i): f"class_{i}" for i in range(10)}
    enc = json.loads((save_checkpoint(make("atto.fcmae", 0), tmp_path / "enc", format="hf") / "config.json").read_text())
    assert enc["architectures"] == ["ConvNextV2Model"] and "id2label" not in enc


def test_hf_labels_follow_the_model(tmp_path):
    model = make("atto", 3)
    model.label_names = ["cat", "dog", "fox"]
    peer = ConvNextV2ForImageClassification.from_pretrained(save_checkpoint(model, tmp_path / "hf", format="hf"))
    assert peer.config.id2label == {0: "cat", 1: "dog", 2: "fox"} and peer.config.label2id["fox"] == 2


# ------------------------------------------------------------------------------------------------
# HF preprocessing equals ours on real photos
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ckpt_name", ["atto.fcmae_ft_in1k", "nano.fcmae_ft_in22k_in1k_384"])
def test_hf_preprocessor_matches_ours(tmp_path, ckpt_name):
    model = cvh.create(ckpt_name)
    folder = save_checkpoint(model, tmp_path / "hf", format="hf")
    ours_tf = get_checkpoint(ckpt_name).transforms()
    pil = AutoImageProcessor.from_pretrained(folder, backend="pil")
    default = AutoImageProcessor.from_pretrained(folder)  # torchvision backend: resizes tensors, not PIL images
    for photo in ("astronaut", "coffee", "chelsea"):
        img = Image.fromarray(getattr(skimage_data, photo)())
        ours = ours_tf(img)
        d = maxdiff(pil(img, return_tensors="pt")["pixel_values"][0], ours)
        d_default = maxdiff(default(img, return_tensors="pt")["pixel_values"][0], ours)
        print(f"\n[peer] hf processor {ckpt_name} {photo}: pil max|Δ|={d:.2e}, default backend max|Δ|={d_default:.2e}")
        assert d <= TOL
        assert d_default <= 0.1  # a grey level or two of tensor-side bicubic (1/255/std ~ 0.0175 per level)


def test_hf_refuses_preprocessing_it_cannot_express(tmp_path):
    import dataclasses

    model = make("atto", 10)
    model.checkpoint = dataclasses.replace(get_checkpoint("atto"), resolution=288, crop_mode="squash", crop_pct=1.0)
    with pytest.raises(ValueError, match="warps without a crop only from 384"):
        save_checkpoint(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists() and not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# Refusals and atomic writes
# ------------------------------------------------------------------------------------------------
def test_refusals(tmp_path):
    fcmae = FCMAE("atto")
    for fmt in ("timm", "hf", "authors"):
        with pytest.raises(ValueError, match="decoder.*save model.encoder"):
            save_checkpoint(fcmae, tmp_path / f"x.{fmt}", format=fmt)
    feats = convnextv2("atto", features_only=True)
    for fmt in ("timm", "hf"):
        with pytest.raises(ValueError, match="features_only model has no final LayerNorm"):
            save_checkpoint(feats, tmp_path / f"f.{fmt}", format=fmt)
    odd = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5)
    with pytest.raises(ValueError, match="named sizes"):
        save_checkpoint(odd, tmp_path / "odd.safetensors", format="timm")
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        save_checkpoint(odd, tmp_path / "odd.onnx", format="onnx")
    with pytest.raises(ValueError, match="metadata is written to format 'ours' only"):
        save_checkpoint(odd, tmp_path / "odd.pt", format="authors", metadata={"a": "b"})
    assert not os.listdir(tmp_path)


def test_custom_sizes_in_hf_and_authors(tmp_path):
    odd = ConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=5).eval()
    randomise_(odd)
    peer = ConvNextV2ForImageClassification.from_pretrained(save_checkpoint(odd, tmp_path / "hf", format="hf")).eval()
    with torch.no_grad():
        assert maxdiff(peer(pixel_values=X).logits, logits(odd)) <= TOL
    back = ConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=5).eval()
    load_checkpoint(back, save_checkpoint(odd, tmp_path / "odd.pt", format="authors"))
    assert maxdiff(logits(back), logits(odd)) <= TOL


@pytest.mark.parametrize("fmt,name", [("timm", "m.safetensors"), ("authors", "m.pt"), ("hf", "m")])
def test_no_overwrite_unless_asked(tmp_path, fmt, name):
    first, second = make("atto", 10), make("atto", 10)
    randomise_(second, seed=9)
    target = save_checkpoint(first, tmp_path / name, format=fmt)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(second, target, format=fmt)
    back = cvh.create("atto", num_classes=10, checkpoint_path=target).eval()
    assert maxdiff(logits(back), logits(first)) <= TOL
    save_checkpoint(second, target, format=fmt, overwrite=True)
    back = cvh.create("atto", num_classes=10, checkpoint_path=target).eval()
    assert maxdiff(logits(back), logits(second)) <= TOL
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file or folder left beside it


def test_ours_still_replaces_by_default(tmp_path):
    target = save_checkpoint(make("atto", 10), tmp_path / "m.safetensors")
    save_checkpoint(make("atto", 10), target)  # the trainer rewrites its checkpoint every epoch
    with pytest.raises(FileExistsError):
        save_checkpoint(make("atto", 10), target, overwrite=False)


def test_hf_folder_failure_leaves_nothing_and_keeps_the_old(tmp_path, monkeypatch):
    old = make("atto", 10)
    target = save_checkpoint(old, tmp_path / "hf", format="hf")

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(make("atto", 10), target, format="hf", overwrite=True)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(make("atto", 10), tmp_path / "new", format="hf")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    back = cvh.create("atto", num_classes=10, checkpoint_path=target).eval()
    assert maxdiff(logits(back), logits(old)) <= TOL
