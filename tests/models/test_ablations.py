"""The paper's architecture ablations as switches of ConvNeXtV2 (models/ablations.py, layers.GRN's parts):
every switch builds, runs forward and backward on the dense and the FCMAE sparse path (which agree), saves
and loads with its switches; the defaults are the released model; GRN's parts follow their formulas."""
from __future__ import annotations

import warnings

import pytest
import torch

import convnextv2_hub as cvh
from convnextv2_hub.checkpoints.io import CheckpointError, load_checkpoint, read_arch, save_checkpoint
from convnextv2_hub.models.ablations import GATE_REDUCTION, ArchOptions
from convnextv2_hub.models.convnextv2 import ConvNeXtV2, convnextv2, count_params
from convnextv2_hub.models.fcmae import FCMAE
from convnextv2_hub.models.layers import GRN
from convnextv2_hub.models.variants import get_variant

SWITCHES = [
    dict(block="v1"),
    *[dict(grn=g) for g in ("none", "lrn", "bn", "ln", "se", "cbam")],
    *[dict(grn_aggregation=a) for a in ("l1", "mean")],
    *[dict(grn_normalization=n) for n in ("standardize", "inverse_sum")],
    dict(grn_residual=False),
    *[dict(grn_form=f) for f in ("affine", "x_g", "x_n")],
]


def _id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


def _stir_(model: torch.nn.Module) -> torch.nn.Module:
    # GRN's gamma/beta (and V1's LayerScale) start at values that hide the layer: make them count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.normal_(0, 0.5)
    return model


# Atto's structure at a fraction of its cost: one block per stage, narrow. Every switch acts per block.
SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


@pytest.mark.parametrize("kw", SWITCHES, ids=_id)
def test_switch_builds_trains_dense_and_sparse_saves_and_loads(kw, one_thread, tmp_path):
    torch.manual_seed(0)
    model = _stir_(ConvNeXtV2(**SMALL, num_classes=4, **kw))
    assert model.arch_options() == kw
    x = torch.randn(2, 3, 64, 64)
    # Unequal visible counts per image: the padded per-image path of the sparse rows (FCMAE's own
    # masks, equal counts, are the free view of the same code).
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1]])
    dense = model.forward_features(x, mask.view(2, 2, 2))
    sparse = model.forward_features_sparse(x, mask.view(2, 2, 2))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())
    loss, _, _ = FCMAE(model, decoder_dim=16).train()(x, mask=torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1]]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 20 and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    logits = model(x)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert read_arch(path) == kw
    back = ConvNeXtV2(**SMALL, num_classes=4, **read_arch(path))
    load_checkpoint(back, path)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), logits, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="architecture switches"):
        load_checkpoint(ConvNeXtV2(**SMALL, num_classes=4), path)


def test_create_rebuilds_the_switches_of_a_file(tmp_path):
    path = save_checkpoint(convnextv2("atto", num_classes=2, grn="se"), tmp_path / "se.safetensors")
    assert cvh.create("atto", checkpoint_path=path).arch_options() == {"grn": "se"}
    with pytest.raises(CheckpointError, match=r"switches \{'grn': 'se'\}, but this model has \{'grn': 'ln'\}"):
        cvh.create("atto", checkpoint_path=path, grn="ln")


def test_defaults_are_the_released_model(one_thread):
    explicit = dict(block="v2", grn="grn", grn_aggregation="l2", grn_normalization="divisive", grn_residual=True,
                    grn_form="full")
    torch.manual_seed(0)
    plain = _stir_(ConvNeXtV2(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), num_classes=10))
    torch.manual_seed(0)
    spelled = _stir_(ConvNeXtV2(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), num_classes=10, **explicit))
    assert plain.arch_options() == {} and spelled.arch_options() == {}
    a, b = plain.state_dict(), spelled.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The authors' keys: GRN (1, 1, 1, 4C) under every block, no LayerScale.
    assert a["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160) and not any(k.endswith(".0.gamma") for k in a)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), spelled.eval()(x))


def test_default_checkpoint_stores_no_switches(tmp_path):
    path = save_checkpoint(convnextv2("atto", num_classes=2), tmp_path / "plain.safetensors")
    assert read_arch(path) == {}
    from convnextv2_hub.checkpoints.reading import read_metadata

    assert "arch" not in read_metadata(path)


@pytest.mark.parametrize("kw, message", [
    (dict(block="v3"), "block must be one of"),
    (dict(grn="gn"), "grn must be one of"),
    (dict(block="v1", grn="se"), "has no GRN"),
    (dict(block="v1", grn_aggregation="l1"), "has no GRN"),
    (dict(grn="none", grn_residual=False), "replaces it"),
    (dict(grn_form="x_g", grn_normalization="standardize"), "no normalisation"),
    (dict(grn_form="affine", grn_aggregation="l1"), "no aggregation"),
])
def test_meaningless_switches_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        ArchOptions(**kw)
    with pytest.raises(ValueError, match="unknown architecture switch"):
        ArchOptions.from_dict({"blocks": "v1"})


def _nhwc(seed=0, shape=(2, 3, 5, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).abs() + 0.1


@pytest.mark.parametrize("kw", [
    dict(), dict(aggregation="l1"), dict(aggregation="mean"), dict(normalization="standardize"),
    dict(normalization="inverse_sum"), dict(residual=False), dict(form="affine"), dict(form="x_g"), dict(form="x_n"),
], ids=_id)
def test_grn_parts_follow_the_papers_formulas(kw):
    """Each part against the formula written out by hand (paper §4, Table 2a-c, Table 16)."""
    grn = GRN(8, **kw)
    with torch.no_grad():
        grn.gamma.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        grn.beta.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    x = _nhwc()
    g = {"l2": x.pow(2).sum((1, 2), keepdim=True).sqrt(), "l1": x.abs().sum((1, 2), keepdim=True),
         "mean": x.mean((1, 2), keepdim=True)}[kw.get("aggregation", "l2")]
    form = kw.get("form", "full")
    if form == "x_n":
        g = x.abs()
    mean_c = g.mean(-1, keepdim=True)
    n = {"divisive": g / (mean_c + 1e-6),
         "standardize": (g - mean_c) / (g.std(-1, unbiased=False, keepdim=True) + 1e-6),
         "inverse_sum": 1 / (mean_c + 1e-6)}[kw.get("normalization", "divisive")]
    n = {"full": n, "x_n": n, "x_g": g, "affine": torch.ones(())}[form]
    expected = grn.gamma * (x * n) + grn.beta + (x if kw.get("residual", True) else 0)
    torch.testing.assert_close(grn(x), expected, rtol=1e-5, atol=1e-5)


def test_grn_mean_aggregation_counts_only_visible_positions():
    grn = GRN(8, aggregation="mean")
    with torch.no_grad():
        grn.gamma.fill_(1.0)
    x = _nhwc(shape=(1, 4, 4, 8))
    keep = torch.zeros(1, 4, 4, 1)
    keep[:, :2, :3] = 1
    masked = grn(x * keep, keep)
    alone = grn(x[:, :2, :3])  # the visible positions as an image of their own
    torch.testing.assert_close(masked[:, :2, :3], alone)


@pytest.mark.parametrize("place", ["se", "cbam"])
def test_gating_adds_the_papers_parameters_to_base(place):
    """Table 2e: SE and CBAM take Base from 89M to 109M; GRN adds next to nothing."""
    v = get_variant("base")
    with torch.device("meta"):
        plain = count_params(ConvNeXtV2(depths=v.depths, dims=v.dims))
        gated = count_params(ConvNeXtV2(depths=v.depths, dims=v.dims, grn=place))
    assert round(plain / 1e6) == 89 and round(gated / 1e6, 0) in (109, 110)
    assert GATE_REDUCTION == 16


@pytest.mark.parametrize("variant, expected", [("tiny", 28_589_128), ("base", 88_591_464)])
def test_v1_parameter_counts_are_convnext_v1s(variant, expected):
    v = get_variant(variant)
    with torch.device("meta"):
        assert count_params(ConvNeXtV2(depths=v.depths, dims=v.dims, block="v1")) == expected


def test_v1_block_is_layerscale_without_grn():
    model = convnextv2("atto", block="v1")
    blk = model.stages[1][0]
    assert blk.gamma.shape == (80,) and torch.all(blk.gamma == 1e-6)
    assert not any(".grn." in k for k in model.state_dict())
    assert sorted({k.split(".", 3)[3] for k in model.state_dict() if k.startswith("stages.")}) == [
        "dwconv.bias", "dwconv.weight", "gamma", "norm.bias", "norm.weight", "pwconv1.bias", "pwconv1.weight",
        "pwconv2.bias", "pwconv2.weight"]


def test_v1_exports_to_torchscript_and_onnx(one_thread, tmp_path):
    from convnextv2_hub.inference import export as ex

    torch.manual_seed(0)
    model = _stir_(ConvNeXtV2(**SMALL, num_classes=3, block="v1")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ex.export_torchscript(model, tmp_path / "v1.pt", image_size=64).max_abs_diff <= 1e-4
        assert ex.export_onnx(model, tmp_path / "v1.onnx", image_size=64).max_abs_diff <= 1e-4
