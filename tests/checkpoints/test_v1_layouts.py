"""ConvNeXt V1 weights in block='v1' models: timm's ``convnext_*`` layout (Linear MLP for tiny, 1x1-conv
MLP for atto) and the ConvNeXt repository's ``{"model": sd}`` layout give timm's logits with every
parameter randomised; GRN moves between V1-style and V2 models only when asked (paper Table 2f)."""
from __future__ import annotations

import math
import re

import pytest
import timm
import torch

from convnextv2_hub.checkpoints.io import CheckpointError, load_checkpoint, save_checkpoint
from convnextv2_hub.models.convnextv2 import ConvNeXtV2, convnextv2

SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=2)  # four blocks: all that is needed


def _randomise_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random and O(1)-preserving; LayerScale far from its 1e-6 init so it counts."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(generator=g)  # in place: tiny has 28.6M parameters
            if name.endswith("gamma"):
                p.mul_(0.2).add_(0.5)
            elif name.endswith("bias"):
                p.mul_(0.05)
            elif p.ndim == 1:
                p.mul_(0.1).add_(1.0)
            else:
                p.mul_(1 / math.sqrt(p[0].numel()))
    return model.eval()


def _empty(factory) -> torch.nn.Module:
    with torch.device("meta"):
        m = factory()
    return m.to_empty(device="cpu").eval()


def _timm_to_convnext_repo(sd):
    """timm's keys -> the ConvNeXt repository's (its models/convnext.py), by the table of their names."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.", r"stages.\1.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


@pytest.mark.parametrize("variant", ["atto", "tiny"])  # atto: timm's conv_mlp (4-D fc weights); tiny: Linear
def test_v1_weights_give_timms_logits(variant, one_thread):
    ref = _randomise_(_empty(lambda: timm.create_model(f"convnext_{variant}", pretrained=False)))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    sd = ref.state_dict()
    if variant == "atto":
        assert sd["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4  # the 1x1-conv layout is what is tested
    sources = {"timm": sd}
    if variant == "tiny":  # the repository has no atto; its files are {"model": sd} (as read from disk)
        sources["convnext repository"] = {"model": _timm_to_convnext_repo(sd)}
    for name, source in sources.items():
        model = _empty(lambda: convnextv2(variant, block="v1"))
        load_checkpoint(model, source)
        with torch.no_grad():
            got = model(x)
        err = (got - expected).abs().max().item()
        assert err <= 1e-5 * max(1.0, expected.abs().max().item()), (name, err)
        print(f"{variant} {name}: max |logit diff| {err:.2e} (max |logit| {expected.abs().max().item():.3g})")


def test_v1_file_into_a_v2_model_says_to_build_v1(tmp_path):
    path = tmp_path / "v1.pt"
    torch.save({"model": ConvNeXtV2(**SMALL, block="v1").state_dict()}, path)
    with pytest.raises(CheckpointError, match="ConvNeXt V1 checkpoint .*block='v1'"):
        load_checkpoint(ConvNeXtV2(**SMALL), path)
    with pytest.raises(CheckpointError, match="ConvNeXt V2 checkpoint"):
        load_checkpoint(ConvNeXtV2(**SMALL, block="v1"), ConvNeXtV2(**SMALL).state_dict())


def test_grn_moves_between_models_only_when_asked(tmp_path):
    """Table 2f: GRN dropped at fine-tuning ('drop') or added fresh at fine-tuning ('fresh')."""
    without = ConvNeXtV2(**SMALL, grn="none")
    grn_file = save_checkpoint(ConvNeXtV2(**SMALL), tmp_path / "grn.safetensors")
    plain_file = save_checkpoint(without, tmp_path / "none.safetensors")
    for model, source in ((ConvNeXtV2(**SMALL, grn="none"), grn_file), (ConvNeXtV2(**SMALL), plain_file)):
        with pytest.raises(CheckpointError, match="architecture switches"):
            load_checkpoint(model, source)
    report = load_checkpoint(ConvNeXtV2(**SMALL, grn="none"), grn_file, grn_transfer="drop")
    assert len(report.dropped) == 2 * 4 and report.reinitialized == []
    fresh = ConvNeXtV2(**SMALL)
    report = load_checkpoint(fresh, plain_file, grn_transfer="fresh")
    assert report.reinitialized == ["grn"]
    assert torch.equal(fresh.stages[0][0].pwconv1.weight, without.stages[0][0].pwconv1.weight)
    assert torch.all(fresh.stages[0][0].grn.gamma == 0)
    with pytest.raises(CheckpointError, match="'fresh' is for a checkpoint without GRN"):
        load_checkpoint(ConvNeXtV2(**SMALL), grn_file, grn_transfer="fresh")
    with pytest.raises(CheckpointError, match="'drop' is for a model without GRN"):
        load_checkpoint(ConvNeXtV2(**SMALL), grn_file, grn_transfer="drop")
