"""The model itself: exact parameter counts, GRN semantics and precision, API surface, scripting,
layouts, and float64 logits against timm's independent implementation."""
import math

import pytest
import torch
import torch.nn.functional as F

from convnextv2_hub.checkpoints.io import to_timm
from convnextv2_hub.models.layers import GRN, LayerNorm2d, grn_norms
from convnextv2_hub.models.convnextv2 import ConvNeXtV2, convnextv2, count_params
from convnextv2_hub.models.variants import VARIANTS

# Exact published counts (the paper's and the authors' model zoo, equal to mmpretrain's metafile).
PARAMS_WITH_HEAD = {
    "atto": 3_708_400, "femto": 5_233_240, "pico": 9_066_280, "nano": 15_623_800,
    "tiny": 28_635_496, "base": 88_717_800, "large": 197_956_840, "huge": 660_289_640,
}
PARAMS_ENCODER_ONLY = {
    "atto": 3_386_760, "femto": 4_847_472, "pico": 8_552_256, "nano": 14_981_520,
    "tiny": 27_864_960, "base": 87_690_752, "large": 196_416_768, "huge": 657_467_008,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exact_parameter_counts_on_meta_device(variant):
    with torch.device("meta"):
        full = convnextv2(variant)
        encoder = convnextv2(variant, features_only=True)
    assert count_params(full) == PARAMS_WITH_HEAD[variant]
    assert count_params(encoder) == PARAMS_ENCODER_ONLY[variant]


def reference_grn(x, gamma, beta, eps=1e-6):
    # The authors' dense GRN written literally.
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return gamma * (x * nx) + beta + x


def test_grn_matches_authors_formula_and_is_per_sample():
    torch.manual_seed(0)
    grn = GRN(16)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(3, 5, 7, 16)
    out = grn(x)
    torch.testing.assert_close(out, reference_grn(x, grn.gamma, grn.beta), atol=1e-6, rtol=1e-5)
    # Per sample: each image alone gives the same result as inside the batch.
    for i in range(3):
        torch.testing.assert_close(grn(x[i : i + 1]), out[i : i + 1], atol=1e-6, rtol=1e-5)


def test_grn_statistics_do_not_overflow_in_half_precision():
    grn = GRN(8)
    with torch.no_grad():
        grn.gamma.fill_(0.5)
    # 300^2 * 64 positions > fp16 max (65504): a half-precision sum of squares would be inf.
    x = torch.full((1, 8, 8, 8), 300.0, dtype=torch.float16)
    out = grn(x)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference_grn(x.float(), grn.gamma, grn.beta), rtol=1e-3, atol=0.5)


def test_grn_in_float64_computes_in_float64():
    torch.manual_seed(0)
    grn = GRN(16).double()
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(3, 5, 7, 16, dtype=torch.float64) * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    out = grn(x)
    assert out.dtype == torch.float64
    ref = reference_grn(x, grn.gamma, grn.beta)  # all float64
    assert (out - ref).abs().max() <= 1e-12
    # A float32 computation (the statistics in fp32) is far from that: the check can fail.
    assert (grn.float()(x.float()).double() - ref).abs().max() > 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grn_statistics_of_half_inputs_are_fp32(dtype):
    grn = GRN(8)
    x = torch.randn(2, 4, 4, 8).to(dtype)
    assert grn_norms(x, [1, 2]).dtype == torch.float32
    assert grn_norms(x.double(), [1, 2]).dtype == torch.float64
    assert grn(x).dtype == dtype


def test_layernorm2d_matches_channels_first_formula():
    torch.manual_seed(0)
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 6, 5, 4)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    ref = ln.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_block_structure_has_no_layerscale_and_exact_gelu():
    m = convnextv2("atto")
    blk = m.stages[0][0]
    names = {n for n, _ in blk.named_parameters()}
    assert names == {
        "dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias",
        "grn.gamma", "grn.beta", "pwconv2.weight", "pwconv2.bias",
    }
    assert blk.act.approximate == "none"
    assert blk.norm.eps == 1e-6 and m.norm.eps == 1e-6 and m.downsample_layers[0][1].eps == 1e-6
    assert blk.grn.gamma.shape == (1, 1, 1, 160)


def test_state_dict_keys_are_the_authors():
    keys = set(convnextv2("atto").state_dict())
    for k in ("downsample_layers.0.0.weight", "downsample_layers.0.1.bias", "downsample_layers.3.1.weight",
              "stages.2.5.pwconv2.bias", "stages.3.1.grn.gamma", "norm.weight", "head.bias"):
        assert k in keys


def test_drop_path_rates_rise_linearly_over_all_blocks():
    m = convnextv2("tiny", drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s]
    assert len(rates) == 18
    expected = torch.linspace(0, 0.2, 18).tolist()
    assert rates == pytest.approx(expected, abs=1e-7)


def test_init_trunc_normal_zero_bias_and_head_scale():
    torch.manual_seed(0)
    m = convnextv2("tiny", head_init_scale=0.001)
    w = m.stages[2][0].pwconv1.weight
    assert abs(w.std().item() - 0.02) < 0.001
    assert m.stages[2][0].pwconv1.bias.abs().max() == 0
    assert m.stages[0][0].grn.gamma.abs().max() == 0 and m.stages[0][0].grn.beta.abs().max() == 0
    assert abs(m.head.weight.std().item() - 2e-5) < 2e-6


def test_forward_features_head_and_pre_logits():
    torch.manual_seed(0)
    m = convnextv2("atto").eval()
    x = torch.randn(2, 3, 96, 128)
    feats = m.forward_features(x)
    assert feats.shape == (2, 320, 3, 4)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 320)
    torch.testing.assert_close(pre, F.layer_norm(feats.mean((2, 3)), (320,), m.norm.weight, m.norm.bias, 1e-6))
    torch.testing.assert_close(m(x), m.head(pre))


def test_reset_classifier_and_headless_model():
    m = convnextv2("atto")
    m.reset_classifier(10)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10) and m.num_classes == 10
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 320)
    assert convnextv2("atto", num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 320)


def test_features_only_returns_per_stage_maps():
    m = convnextv2("atto", features_only=True, out_indices=(0, 2, 3)).eval()
    outs = m(torch.randn(1, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 40, 32, 24), (1, 160, 8, 6), (1, 320, 4, 3)]
    assert [f["num_chs"] for f in m.feature_info] == [40, 80, 160, 320]
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="out_indices"):
        convnextv2("atto", features_only=True, out_indices=(4,))


def randomise_(model):
    # GRN gamma/beta start at zero (GRN = identity): randomise everything so GRN is exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = randomise_(convnextv2("atto")).train()
    x = torch.randn(2, 3, 64, 64)
    m(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_channels_last_script_and_trace_agree_with_eager():
    torch.manual_seed(0)
    m = randomise_(convnextv2("atto")).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
        scripted = torch.jit.script(m)
        torch.testing.assert_close(scripted(x), ref, atol=1e-5, rtol=1e-5)
        traced = torch.jit.trace(m, x)
        torch.testing.assert_close(traced(x), ref, atol=1e-5, rtol=1e-5)
        feats = torch.jit.script(convnextv2("atto", features_only=True).eval())(x)
        assert len(feats) == 4


def test_mask_keeps_masked_positions_zero():
    torch.manual_seed(0)
    m = randomise_(convnextv2("atto")).eval()
    x = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 2, 3)
    mask[0, 1, 2] = 1
    mask[1, 0, 0] = 1
    with torch.no_grad():
        stages = m.forward_stages(x, mask)
    for i, out in enumerate(stages):
        scale = 2 ** (3 - i)
        up = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).bool()
        assert out.permute(0, 2, 3, 1)[up].abs().max() == 0
        visible = out.permute(0, 2, 3, 1)[~up]
        assert visible.abs().sum() > 0 and math.isfinite(visible.abs().max().item())


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="4 entries"):
        ConvNeXtV2(depths=(2, 2, 2), dims=(8, 16, 32))
    with pytest.raises(ValueError, match="unknown ConvNeXt V2 variant"):
        convnextv2("small")


def test_float64_model_logits_equal_timms_float64_implementation():
    # timm's ConvNeXt V2 (its own GRN, 1x1-conv MLP for atto) in float64 with our weights converted:
    # an independent float64 reference. A float32 GRN statistic anywhere would show as ~1e-7.
    import timm

    torch.manual_seed(0)
    m = randomise_(convnextv2("atto", num_classes=10)).double().eval()
    ref_model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    ref_model.load_state_dict(to_timm(m.state_dict(), "atto"))
    ref_model = ref_model.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        ref = ref_model(x)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max().item())
