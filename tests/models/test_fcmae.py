"""FCMAE: masking rule, sparse == dense-masked == submanifold semantics, per-image GRN, precision, loss,
training, checkpoints (ours, encoder -> fine-tuning, the authors' sparse layout)."""
import argparse
import math
import os

import pytest
import torch

from conftest import normalised_photos
from convnextv2_hub.checkpoints import io as convert
from convnextv2_hub.models.convnextv2 import convnextv2
from convnextv2_hub.models.fcmae import FCMAE, gen_random_mask, patchify, unpatchify
from convnextv2_hub.models.layers import GRN
from convnextv2_hub.models.sparse import SparseLayout, grn_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere: GRN (zero at init = identity), LayerNorm affine and biases
    (zero at init) would otherwise hide per-image statistics, masking and bias-reshape bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if ".grn." in name:
                p.copy_(0.5 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif p.ndim == 1:  # LayerNorm weights
                p.copy_(1.0 + 0.1 * r)
            else:
                p.add_(0.005 * r)
    return model


def _fixed_mask(n: int, h: int, w: int, masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([(torch.randperm(h * w, generator=g) < masked).float() for _ in range(n)])


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


# --- masking and patches --------------------------------------------------------------------------
def _authors_gen_random_mask(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    # The authors' gen_random_mask written literally.
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore)


def test_mask_count_rule_per_image_and_seeded():
    m = FCMAE("atto", decoder_dim=32)
    imgs = torch.zeros(8, 3, 224, 224)
    mask = m.gen_random_mask(imgs, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (8, 49)
    # len_keep = int(49 * 0.4) = 19 kept, 30 masked, in every image.
    assert ((mask == 0).sum(1) == 19).all() and ((mask == 1).sum(1) == 30).all()
    assert len({tuple(r.tolist()) for r in mask}) == 8, "masks must be independent per image"
    again = m.gen_random_mask(imgs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)
    # Same noise -> exactly the authors' argsort/unshuffle result.
    noise = torch.randn(8, 49, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, _authors_gen_random_mask(noise, 0.6))
    # Non-square grid (6 x 4 = 24 cells): int(24 * 0.4) = 9 kept.
    rect = gen_random_mask(3, 6, 4, 0.6, generator=torch.Generator().manual_seed(0))
    assert rect.shape == (3, 24) and ((rect == 0).sum(1) == 9).all()


def test_patchify_order_and_unpatchify_non_square():
    # Pixel value encodes (c, y, x): the patch vector must be ordered (row p, col q, colour c).
    c, hh, ww, p = 3, 64, 96, 32
    yy, xx = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    img = torch.stack([ch * 100000 + yy * 1000 + xx for ch in range(c)]).float().unsqueeze(0)
    t = patchify(img, p)
    assert t.shape == (1, 6, p * p * 3)
    cell, row, col, ch = 4, 5, 7, 2  # cell 4 of a 2x3 grid = (1, 1)
    assert t[0, cell, (row * p + col) * 3 + ch] == ch * 100000 + (32 + row) * 1000 + (32 + col)
    assert torch.equal(unpatchify(t, 2, 3, p), img)


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="patch_size"):
        FCMAE("atto", patch_size=16)
    with pytest.raises(ValueError, match="mask_ratio"):
        FCMAE("atto", mask_ratio=1.0)
    m = FCMAE("atto", decoder_dim=32)
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.zeros(1, 3, 64, 80))


# --- encoder semantics ----------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_pixels_cannot_reach_the_encoder_output(sparse):
    torch.manual_seed(0)
    m = _randomise(FCMAE("atto", decoder_dim=32, sparse=sparse)).eval()
    x = torch.randn(2, 3, 96, 128)
    mask = _fixed_mask(2, 3, 4, 7)
    up = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 32 * 32 * 3), 3, 4)
    x2 = torch.where(up.bool(), 10.0 * torch.randn_like(x), x)  # new pixels under masked patches only
    with torch.no_grad():
        a = m.forward_encoder(x, mask)
        b = m.forward_encoder(x2, mask)
    assert (a - b).abs().max().item() <= 1e-6
    grid = mask.view(2, 1, 3, 4).expand_as(a).bool()
    assert (a[grid] == 0).all() and (b[grid] == 0).all(), "masked positions must be exactly 0"
    assert (a[~grid] != 0).float().mean() > 0.99  # and the visible ones are real features
    if not sparse:  # every stage of the dense path keeps masked positions at exactly 0
        for i, s in enumerate(m.encoder.forward_stages(x, mask.view(2, 3, 4))):
            k = 1 << (3 - i)
            up_i = mask.view(2, 3, 4).repeat_interleave(k, 1).repeat_interleave(k, 2).bool()
            assert (s.permute(1, 0, 2, 3)[:, up_i] == 0).all()


def _batch_pooled_grn(x: torch.Tensor, grn: GRN) -> torch.Tensor:
    # The authors' MinkowskiGRN statistic (issue #86): one L2 norm over every position of the batch.
    gx = torch.linalg.vector_norm(x, dim=(0, 1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return grn.gamma * (x * nx) + grn.beta + x


@pytest.mark.parametrize("sparse", [False, True])
def test_grn_statistics_are_per_image(sparse):
    torch.manual_seed(1)
    m = _randomise(FCMAE("atto", decoder_dim=32, sparse=sparse)).eval()
    x = torch.randn(2, 3, 64, 96)
    x[1] *= 3.0  # very different statistics in the two images
    mask = _fixed_mask(2, 2, 3, 3, seed=1)
    with torch.no_grad():
        both = m.forward_encoder(x, mask)
        alone = torch.cat([m.forward_encoder(x[i : i + 1], mask[i : i + 1]) for i in range(2)])
    assert (both - alone).abs().max().item() <= 1e-5
    # The check can fail: batch-pooled GRN statistics make image 0 depend on image 1.
    grn = m.encoder.stages[0][0].grn
    h = torch.randn(2, 4, 4, grn.gamma.shape[-1])
    h[1] *= 3.0
    pooled = _batch_pooled_grn(h, grn)
    assert (pooled[:1] - _batch_pooled_grn(h[:1], grn)).abs().max() > 1e-2


def _loss_and_grads(m, x, mask, params):
    torch.manual_seed(123)  # same drop-path draws in both paths
    loss, pred, _ = m(x, mask=mask)
    return loss, pred, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_sparse_equals_dense_forward_and_gradients(drop_path_rate):
    torch.manual_seed(2)
    m = _randomise(FCMAE("atto", decoder_dim=64, drop_path_rate=drop_path_rate)).train()
    x = torch.randn(3, 3, 96, 64)
    mask = m.gen_random_mask(x, generator=torch.Generator().manual_seed(2))
    params = [p for n, p in m.named_parameters() if not n.startswith("encoder.norm.")]  # unused by FCMAE
    m.sparse = False
    loss_d, pred_d, g_d = _loss_and_grads(m, x, mask, params)
    m.sparse = True
    loss_s, pred_s, g_s = _loss_and_grads(m, x, mask, params)
    assert abs(loss_s.item() - loss_d.item()) <= 1e-5 * max(1.0, abs(loss_d.item()))
    assert _max_rel(pred_s, pred_d) <= 1e-5
    worst = max(_max_rel(a, b) for a, b in zip(g_s, g_d))
    assert worst <= 1e-5, f"largest gradient difference {worst:.2e} (relative to the gradient's max)"
    assert all(g.abs().sum() > 0 for g in g_d[:5])  # gradients really flow into the encoder


def test_sparse_path_with_unequal_visible_counts():
    # FCMAE masks keep the same count per image; forward_features also takes arbitrary masks, which
    # take the index_add (segment sum) GRN branch. It must equal the dense path too, incl. gradients.
    torch.manual_seed(3)
    enc = _randomise(convnextv2("atto", num_classes=0)).train()
    x = torch.randn(3, 3, 64, 96)
    mask = torch.tensor([[[0, 0, 1], [0, 1, 1]], [[1, 1, 1], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]]]).float()
    params = [p for n, p in enc.named_parameters() if not n.startswith("norm.")]
    w = torch.randn(3, 320, 2, 3)
    yd = enc.forward_features(x, mask)
    ys = enc.forward_features_sparse(x, mask)
    assert _max_rel(ys, yd) <= 1e-5
    gd = torch.autograd.grad((yd * w).mean(), params)
    gs = torch.autograd.grad((ys * w).mean(), params)
    assert max(_max_rel(a, b) for a, b in zip(gs, gd)) <= 1e-5
    assert all(torch.isfinite(g).all() for g in gs)
    # Activation checkpointing recomputes the sparse blocks in backward: same gradients.
    enc.set_grad_checkpointing(True)
    gc = torch.autograd.grad((enc.forward_features_sparse(x, mask) * w).mean(), params)
    assert max(_max_rel(a, b) for a, b in zip(gc, gs)) <= 1e-6


@pytest.mark.parametrize("visible_rows", [[3, 3], [3, 1]])  # equal counts (a view) and unequal (index_add)
def test_grn_on_sparse_rows_in_float64_equals_the_dense_reference(visible_rows):
    torch.manual_seed(8)
    grn = GRN(12).double()
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    visible = torch.zeros(2, 2, 2, dtype=torch.bool)
    for i, k in enumerate(visible_rows):
        visible.view(2, 4)[i, :k] = True
    layout = SparseLayout(visible)
    rows = torch.randn(sum(visible_rows), 12, dtype=torch.float64)
    out = grn_rows(grn, rows, layout)
    assert out.dtype == torch.float64
    # The plain float64 formula on the zero-masked dense map, per image.
    dense = layout.scatter(rows).permute(0, 2, 3, 1)
    gx = torch.sqrt((dense * dense).sum(dim=(1, 2), keepdim=True))
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    ref = grn.gamma * (dense * nx) + grn.beta + dense
    assert (out - layout.gather(ref.permute(0, 3, 1, 2))).abs().max() <= 1e-12
    # fp16 rows keep fp32 statistics: no overflow of the sum of squares.
    big = torch.full((sum(visible_rows), 12), 300.0, dtype=torch.float16)
    assert torch.isfinite(grn_rows(grn.half(), big, layout)).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_a_float64_model_computes_its_loss_in_float64(sparse):
    torch.manual_seed(9)
    m = _randomise(FCMAE("atto", decoder_dim=32, sparse=sparse)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = _fixed_mask(2, 2, 2, 2)
    loss, pred, _ = m(x, mask=mask)
    assert loss.dtype == pred.dtype == torch.float64
    per_patch = (pred - m.target(x)).pow(2).mean(-1)
    assert m.target(x).dtype == torch.float64
    assert abs(loss.item() - ((per_patch * mask).sum() / mask.sum()).item()) <= 1e-12 * max(1.0, loss.item())
    # Half-precision predictions are compared in fp32.
    assert m.forward_loss(x.float(), pred.detach().half(), mask).dtype == torch.float32


def test_scripting_of_the_plain_model_still_works():
    m = convnextv2("atto").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(m)(x), m(x))


# --- loss -----------------------------------------------------------------------------------------
def test_loss_uses_masked_patches_only_averaged_over_the_batch():
    m = FCMAE("atto", decoder_dim=32, norm_pix_loss=False)
    torch.manual_seed(4)
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # 1 and 3 masked patches
    pred = torch.randn(2, 4, 3072)
    loss = m.forward_loss(imgs, pred, mask)
    per_patch = (pred - patchify(imgs)).pow(2).mean(-1)
    # Sum over the 4 masked patches of the batch / 4 (not the mean of per-image means).
    assert torch.allclose(loss, (per_patch * mask).sum() / 4)
    assert not torch.allclose(loss, ((per_patch * mask).sum(1) / mask.sum(1)).mean())
    visible = mask.bool().logical_not().unsqueeze(-1)
    changed = torch.where(visible, pred + 5.0, pred)
    assert torch.equal(m.forward_loss(imgs, changed, mask), loss)
    changed_masked = torch.where(~visible, pred + 5.0, pred)
    assert m.forward_loss(imgs, changed_masked, mask) > loss + 1.0


def test_norm_pix_target_on_and_off():
    torch.manual_seed(5)
    imgs = torch.randn(2, 3, 64, 96)
    on = FCMAE("atto", decoder_dim=32, norm_pix_loss=True)
    off = FCMAE("atto", decoder_dim=32, norm_pix_loss=False)
    raw = patchify(imgs)
    assert torch.equal(off.target(imgs), raw)
    expected = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(torch.var(raw, dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(on.target(imgs), expected)  # torch.var: unbiased, as the authors'
    biased = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, keepdim=True, correction=0) + 1e-6)
    assert (on.target(imgs) - biased).abs().max() > 1e-4
    # Per-patch normalised targets ignore a patch's brightness and contrast; raw targets do not.
    brighter = imgs * 2.0 + 1.0
    torch.testing.assert_close(on.target(brighter), on.target(imgs), atol=1e-4, rtol=1e-4)
    assert (off.target(brighter) - off.target(imgs)).abs().mean() > 0.5
    # And the switch reaches the loss.
    mask = _fixed_mask(2, 2, 3, 3)
    off.load_state_dict(on.state_dict())
    assert not torch.allclose(on(imgs, mask=mask)[0], off(imgs, mask=mask)[0])


# --- training on real images (the ``overfit`` fixture is in conftest) ------------------------------
def test_fifty_steps_on_real_images_drive_the_loss_down(overfit):
    _, losses, _ = overfit
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > 0.5  # a per-patch normalised target starts near unit error
    assert losses[-1] * 5 <= losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


# --- checkpoints ----------------------------------------------------------------------------------
def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(6)
    m = _randomise(FCMAE("atto", mask_ratio=0.5, decoder_dim=48, decoder_depth=2, norm_pix_loss=False))
    path = m.save(tmp_path / "pt.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["pt.safetensors"]  # no temporary file left behind
    meta = convert.read_metadata(path)
    assert meta["format"] == "convnextv2_hub.models.fcmae"
    m2 = FCMAE.from_checkpoint(path)
    assert (m2.mask_ratio, m2.decoder_dim, m2.decoder_depth, m2.norm_pix_loss) == (0.5, 48, 2, False)
    assert m2.encoder.variant == "atto" and type(m2.encoder) is type(m.encoder)
    x = torch.randn(2, 3, 64, 64)
    mask = _fixed_mask(2, 2, 2, 2)
    m.eval(), m2.eval()
    with torch.no_grad():
        assert torch.equal(m(x, mask=mask)[1], m2(x, mask=mask)[1])
    # kw overrides what the file says.
    assert FCMAE.from_checkpoint(path, mask_ratio=0.75).mask_ratio == 0.75


def test_encoder_checkpoint_starts_a_fine_tune(tmp_path, overfit):
    from convnextv2_hub.models.factory import create

    m, _, _ = overfit
    path = convert.save_checkpoint(m.encoder, tmp_path / "enc.safetensors")
    clf = convnextv2("atto", num_classes=10)
    with pytest.warns(UserWarning, match="no classifier head"):
        report = convert.load_checkpoint(clf, path)  # strict
    # Only the head is the model's own. The final norm is loaded too, but FCMAE never uses it, so it
    # is still at its init (1, 0): the fine-tune trains it like the head.
    assert report.reinitialized == ["head"] and not report.missing and not report.unexpected
    enc_sd, clf_sd = m.encoder.state_dict(), clf.state_dict()
    for k, v in enc_sd.items():
        assert torch.equal(clf_sd[k], v), k
    assert torch.equal(enc_sd["norm.weight"], torch.ones(320)) and torch.equal(enc_sd["norm.bias"], torch.zeros(320))
    x = normalised_photos(96)[:1]
    with torch.no_grad():
        assert torch.equal(clf.eval().forward_features(x), m.encoder.eval().forward_features(x))
    with pytest.warns(UserWarning):
        via_create = create("atto", num_classes=10, checkpoint_path=path)
    assert torch.equal(via_create.stages[2][3].grn.gamma, m.encoder.stages[2][3].grn.gamma)


def _authors_kernel(w: torch.Tensor) -> torch.Tensor:
    # Inverse of the authors' remap: their loader does kernel.permute(2,1,0).reshape(out,in,k,k).transpose(3,2) (dense conv) and
    # kernel.permute(1,0).reshape(C,1,k,k).transpose(3,2) (depthwise).
    out_c, in_c, k, _ = w.shape
    t = w.transpose(3, 2).reshape(out_c, in_c, k * k)
    return t[:, 0, :].permute(1, 0).contiguous() if in_c == 1 else t.permute(2, 1, 0).contiguous()


def _authors_sparse_state_dict(m: FCMAE) -> dict:
    """What the authors' main_pretrain.py saves under 'model', built from our model."""
    sd = {}
    for k, v in m.encoder.state_dict().items():
        if k.startswith(("norm.", "head.")):  # their sparse encoder has no final norm
            continue
        parts = k.split(".")
        if k.startswith("downsample_layers.") and parts[1] != "0":
            if parts[2] == "0":
                parts.insert(3, "ln")  # MinkowskiLayerNorm.ln
            elif parts[3] == "weight":
                parts[3], v = "kernel", _authors_kernel(v)  # (4, in, out)
            else:
                v = v.reshape(1, -1)
        elif k.startswith("stages."):
            mod = parts[3]
            if mod == "dwconv":
                if parts[4] == "weight":
                    parts[4], v = "kernel", _authors_kernel(v)  # (49, C)
                else:
                    v = v.reshape(1, -1)
            elif mod == "norm":
                parts.insert(4, "ln")
            elif mod in ("pwconv1", "pwconv2"):
                parts.insert(4, "linear")
            elif mod == "grn":
                v = v.reshape(1, -1)  # (1, 4C)
        sd["encoder." + ".".join(parts)] = v.clone()
    for k, v in m.state_dict().items():
        if not k.startswith("encoder."):
            sd[k] = v.clone()  # proj, mask_token, decoder.0.* (dense Block, GRN (1,1,1,D)), pred
    return sd


def test_authors_sparse_checkpoint_loads_into_from_checkpoint(tmp_path):
    torch.manual_seed(7)
    m = _randomise(FCMAE("atto", decoder_dim=64, norm_pix_loss=False, mask_ratio=0.6)).eval()
    sd = _authors_sparse_state_dict(m)
    dw = sd["encoder.stages.0.0.dwconv.kernel"]
    assert dw.shape == (49, 40) and sd["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
    assert sd["encoder.stages.1.0.grn.gamma"].shape == (1, 320) and sd["encoder.stages.0.0.dwconv.bias"].shape == (1, 40)
    # A randomised kernel is not symmetric, so a missing spatial-axis swap would change the outputs.
    w = m.encoder.stages[0][0].dwconv.weight
    assert (w - w.transpose(2, 3)).abs().max() > 1e-3
    # The test's own layout agrees with convert's writer of it.
    ours = convert.to_authors_sparse(m.encoder.state_dict())
    assert ours.keys() == {k for k in sd if k.startswith("encoder.")}
    assert all(torch.equal(ours[k], sd[k]) for k in ours)

    ckpt = {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 799,
        "scaler": {},
        "args": argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6, norm_pix_loss=False, decoder_depth=1),
    }
    path = tmp_path / "checkpoint-799.pth"
    torch.save(ckpt, path)
    loaded = FCMAE.from_checkpoint(path).eval()
    assert loaded.encoder.variant == "atto" and loaded.norm_pix_loss is False and loaded.decoder_dim == 64
    x = torch.randn(2, 3, 96, 96)
    mask = _fixed_mask(2, 3, 3, 5)
    with torch.no_grad():
        ref_loss, ref_pred, _ = m(x, mask=mask)
        loss, pred, _ = loaded(x, mask=mask)
    assert torch.equal(pred, ref_pred) and torch.equal(loss, ref_loss)
    # Without the transpose (the bug a symmetric kernel would hide) the outputs would differ.
    bad = dict(sd)
    bad["encoder.stages.0.0.dwconv.kernel"] = m.encoder.stages[0][0].dwconv.weight.reshape(40, 49).t().contiguous()
    with torch.no_grad():
        assert not torch.allclose(FCMAE.from_checkpoint(bad).eval()(x, mask=mask)[1], ref_pred)
    # The bare state dict works too, and the decoder side must be complete.
    assert torch.equal(FCMAE.from_checkpoint(sd).eval()(x, mask=mask)[1], ref_pred)
    with pytest.raises(ValueError, match="missing"):
        FCMAE.from_checkpoint({k: v for k, v in sd.items() if not k.startswith("decoder.0.pwconv2")})


def test_encoder_only_file_is_refused_with_a_reason(tmp_path, overfit):
    m, _, _ = overfit
    path = convert.save_checkpoint(m.encoder, tmp_path / "enc.safetensors")
    with pytest.raises(ValueError):
        FCMAE.from_checkpoint(path)
