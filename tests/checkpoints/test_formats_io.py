"""Fidelity of checkpoint conversion: timm, HF transformers and the authors' three layouts load into
our model and give the same outputs; bad files fail loudly and safely; saving is atomic.

Every parameter of the peer models is randomised, GRN included: GRN is the identity at its zero
init, so a comparison with default-initialised weights would not test GRN's conversion at all.
Run with ``pytest -s`` to see the measured max|Δ| values.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import pickle
import pickletools
import re
import warnings
from types import SimpleNamespace

import pytest
import safetensors.torch
import timm
import torch
from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

from convnextv2_hub.checkpoints.io import (
    CheckpointError,
    detect_format,
    load_checkpoint,
    read_metadata,
    read_state_dict,
    save_checkpoint,
    split_fcmae_sparse,
    to_authors_sparse,
    to_hf,
    to_ours,
    to_timm,
)
from convnextv2_hub.models.convnextv2 import Block, convnextv2
from convnextv2_hub.models.variants import get_variant

TOL = 1e-4
SIZES = [(224, 224), (96, 160)]  # square and non-square (H, W); batch 1 keeps tiny affordable
VARIANTS = ["atto", "tiny"]  # atto: timm's 1x1-conv MLP; tiny: timm's Linear MLP


# ------------------------------------------------------------------------------------------------
# Peer models with every parameter randomised
# ------------------------------------------------------------------------------------------------
def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere: LayerNorm weights ~1, GRN gamma/beta clearly non-zero, conv/linear
    weights scaled by 1/sqrt(fan_in) so activations stay O(1) and a 1e-4 tolerance is meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "grn" in name:
                p.copy_(0.2 * r if name.endswith(("weight", "gamma")) else 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif p.ndim == 1:  # LayerNorm weight
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))


def grn_params(sd) -> dict:
    return {k: v for k, v in sd.items() if "grn" in k}


def assert_grn_nonzero(sd) -> None:
    grn = grn_params(sd)
    assert grn, "no GRN parameters found"
    for k, v in grn.items():
        assert v.abs().min() > 0 and v.abs().mean() > 0.01, f"GRN tensor {k} is (near) zero: the test would prove nothing"


def build_empty(factory):
    """Build on the meta device and allocate uninitialised storage: the init would be overwritten anyway
    (by randomise_ or by a checkpoint that covers every parameter), and it is slow for tiny."""
    with torch.device("meta"):
        m = factory()
    return m.to_empty(device="cpu").eval()


def empty_atto(**kwargs) -> torch.nn.Module:
    """For tests whose checkpoint covers every parameter, or that expect the load to fail."""
    return build_empty(lambda: convnextv2("atto", **kwargs))


def hf_config(variant: str, eps: float = 1e-6) -> ConvNextV2Config:
    v = get_variant(variant)
    return ConvNextV2Config(depths=list(v.depths), hidden_sizes=list(v.dims), num_labels=1000, layer_norm_eps=eps)


def new_peer(kind: str, variant: str) -> torch.nn.Module:
    if kind == "timm":
        return build_empty(lambda: timm.create_model(f"convnextv2_{variant}", pretrained=False))
    return build_empty(lambda: ConvNextV2ForImageClassification(hf_config(variant)))


@functools.lru_cache(maxsize=None)
def peer(kind: str, variant: str) -> torch.nn.Module:
    """The randomised timm or HF model (shared by the tests: read only)."""
    m = new_peer(kind, variant)
    randomise_(m, seed=1 if kind == "timm" else 2)
    return m


def timm_model(variant: str) -> torch.nn.Module:
    return peer("timm", variant)


def hf_model(variant: str) -> torch.nn.Module:
    return peer("hf", variant)


@functools.lru_cache(maxsize=None)
def image(size) -> torch.Tensor:
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))


@functools.lru_cache(maxsize=None)
def peer_out(kind: str, variant: str, size):
    """(logits, final-stage map) of a peer: timm forward_head(forward_features), HF logits and
    last_hidden_state (= hidden_states[-1]) from one call."""
    m, x = peer(kind, variant), image(size)
    with torch.no_grad():
        if kind == "timm":
            feats = m.forward_features(x)
            return m.forward_head(feats), feats
        out = m(pixel_values=x, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]


def timm_out(variant: str, size):
    return peer_out("timm", variant, size)


def hf_out(variant: str, size):
    return peer_out("hf", variant, size)


def ours_out(model, size):
    with torch.no_grad():
        feats = model.forward_features(image(size))
        return model.forward_head(feats), feats


@functools.lru_cache(maxsize=None)
def ours_from(kind: str, variant: str):
    """Our model loaded from the peer's state dict, with its report (shared: read only)."""
    model = build_empty(lambda: convnextv2(variant))
    report = load_checkpoint(model, peer(kind, variant).state_dict())
    return model, report


@functools.lru_cache(maxsize=None)
def ours_from_out(kind: str, variant: str, size):
    return ours_out(ours_from(kind, variant)[0], size)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def fmt_size(size) -> str:
    return f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------------------------------------
# The authors' layouts, written from the docs' rules (independently of the code under test)
# ------------------------------------------------------------------------------------------------
def timm_to_authors(sd_timm) -> dict:
    """timm -> authors' dense (fine-tuned *_ema.pt) layout: inverse of timm's checkpoint_filter_fn."""
    out = {}
    for k, v in sd_timm.items():
        k2 = k
        k2 = re.sub(r"^stem\.", "downsample_layers.0.", k2)
        k2 = re.sub(r"^stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k2)
        k2 = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k2)
        k2 = k2.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "mlp.grn" in k2:
            k2 = k2.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
            v = v.reshape(1, 1, 1, -1)  # authors' GRN shape
        k2 = k2.replace("head.fc.", "head.").replace("head.norm.", "norm.")
        if "pwconv" in k2 and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])  # authors' MLP is nn.Linear
        out[k2] = v.clone()
    return out


def authors_dense_to_sparse(dense) -> dict:
    """Authors' dense encoder -> main_pretrain's sparse (Minkowski) encoder keys/shapes (docs §4.3)."""
    out = {}
    for k, v in dense.items():
        if k.startswith(("norm.", "head.")):
            continue  # the FCMAE encoder has neither
        parts = k.split(".")
        if re.match(r"downsample_layers\.[123]\.0\.", k) or re.match(r"stages\.\d+\.\d+\.norm\.", k):
            parts.insert(-1, "ln")
        elif re.match(r"stages\.\d+\.\d+\.pwconv[12]\.", k):
            parts.insert(-1, "linear")
        elif re.match(r"(downsample_layers\.[123]\.1|stages\.\d+\.\d+\.dwconv)\.weight$", k):
            parts[-1] = "kernel"
            o, i, kh, kw = v.shape
            # inverse of: permute(2,1,0) (or (1,0)) -> reshape(o, i, k, k) -> transpose(3, 2)
            t = v.transpose(3, 2).reshape(o, i, kh * kw)
            v = t[:, 0, :].permute(1, 0) if i == 1 else t.permute(2, 1, 0)
        elif re.match(r"(downsample_layers\.[123]\.1|stages\.\d+\.\d+\.dwconv)\.bias$", k):
            v = v.reshape(1, -1)
        elif ".grn." in k:
            v = v.reshape(1, -1)
        out["encoder." + ".".join(parts)] = v.contiguous().clone()
    return out


def authors_remap(ckpt) -> dict:
    """The authors' ``remap_checkpoint_keys`` transcribed from docs §4.4 (plus step 3's key drop)."""
    ckpt = {k: v for k, v in ckpt.items() if not any(s in k for s in ("decoder", "mask_token", "proj", "pred"))}
    new = {}
    for k, v in ckpt.items():
        if k.startswith("encoder"):
            k = ".".join(k.split(".")[1:])
        if k.endswith("kernel"):
            k = ".".join(k.split(".")[:-1] + ["weight"])
            if v.ndim == 3:
                kv, in_dim, out_dim = v.shape
                ks = int(math.sqrt(kv))
                v = v.permute(2, 1, 0).reshape(out_dim, in_dim, ks, ks).transpose(3, 2)
            elif v.ndim == 2:
                kv, dim = v.shape
                ks = int(math.sqrt(kv))
                v = v.permute(1, 0).reshape(dim, 1, ks, ks).transpose(3, 2)
        elif "ln" in k or "linear" in k:
            k = k.split(".")
            k.pop(-2)
            k = ".".join(k)
        new[k] = v
    for k, v in list(new.items()):
        if k.endswith("bias") and v.ndim != 1:
            new[k] = v.reshape(-1)
        elif "grn" in k:
            new[k] = v.unsqueeze(0).unsqueeze(1)
    return new


def fcmae_decoder(c3: int, seed: int = 4) -> dict:
    """proj / mask_token / decoder.0 (dense Block of dim 512) / pred, shaped as in docs §4.3."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "proj.weight": torch.randn(512, c3, 1, 1, generator=g),
        "proj.bias": torch.randn(512, generator=g),
        "mask_token": torch.randn(1, 512, 1, 1, generator=g),
        "pred.weight": torch.randn(3072, 512, 1, 1, generator=g),
        "pred.bias": torch.randn(3072, generator=g),
    }
    for k, v in Block(512).state_dict().items():
        out[f"decoder.0.{k}"] = torch.randn(v.shape, generator=g)
    return out


@functools.lru_cache(maxsize=None)
def authors_atto():
    tm = timm_model("atto")
    dense = timm_to_authors(tm.state_dict())
    # The test's authors' dict is right by timm's own (independent) rules: filtering it gives timm's dict back.
    back = timm.models.convnext.checkpoint_filter_fn(dense, tm)
    ref = tm.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    return dense


# ------------------------------------------------------------------------------------------------
# Equivalence with timm and HF transformers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=fmt_size)
@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_equivalence(variant, size):
    sd = timm_model(variant).state_dict()
    assert_grn_nonzero(sd)
    model, report = ours_from("timm", variant)
    assert report.format == "timm" and not report.reinitialized and not report.missing and not report.unexpected
    assert_grn_nonzero(model.state_dict())
    logits, feats = ours_from_out("timm", variant, size)
    ref_logits, ref_feats = timm_out(variant, size)
    d_logits, d_feats = maxdiff(logits, ref_logits), maxdiff(feats, ref_feats)
    print(f"\n[convert] timm {variant} {fmt_size(size)}: max|Δlogits|={d_logits:.2e} "
          f"max|Δforward_features|={d_feats:.2e} (max|logit| {ref_logits.abs().max():.2f})")
    assert d_logits <= TOL and d_feats <= TOL


def test_grn_matters():
    """Zeroing GRN moves the logits far beyond the tolerance, so the comparisons above do test GRN."""
    model = copy.deepcopy(ours_from("timm", "atto")[0])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name:
                p.zero_()
    zeroed, _ = ours_out(model, SIZES[1])
    assert maxdiff(ours_from_out("timm", "atto", SIZES[1])[0], zeroed) > 100 * TOL


@pytest.mark.parametrize("size", SIZES, ids=fmt_size)
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_equivalence(variant, size):
    hf = hf_model(variant)
    assert_grn_nonzero(hf.state_dict())
    model, report = ours_from("hf", variant)
    assert report.format == "hf" and not report.reinitialized and not report.missing and not report.unexpected
    logits, feats = ours_from_out("hf", variant, size)
    ref_logits, ref_feats = hf_out(variant, size)
    d_logits, d_feats = maxdiff(logits, ref_logits), maxdiff(feats, ref_feats)
    # HF's default final-LayerNorm eps is 1e-12 (authors: 1e-6): measure what it changes. That eps is
    # used only by HF's pooler, layernorm(last_hidden_state.mean([-2, -1])), so rerun just that.
    ln = hf.convnextv2.layernorm
    try:
        ln.eps = 1e-12
        with torch.no_grad():
            logits12 = hf.classifier(ln(ref_feats.mean([-2, -1])))
    finally:
        ln.eps = 1e-6
    d12 = maxdiff(logits, logits12)
    print(f"\n[convert] HF {variant} {fmt_size(size)} (eps 1e-6): max|Δlogits|={d_logits:.2e} "
          f"max|Δlast_hidden_state|={d_feats:.2e}; HF eps 1e-12: max|Δlogits|={d12:.2e}")
    assert d_logits <= TOL and d_feats <= TOL and d12 <= 1e-3


@pytest.mark.parametrize("source", ["folder", "safetensors_file"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_save_pretrained_files(variant, source, tmp_path):
    """HF's save_pretrained folder, and its model.safetensors, load exactly like its state dict."""
    hf_model(variant).save_pretrained(tmp_path)
    src = tmp_path if source == "folder" else tmp_path / "model.safetensors"
    model = build_empty(lambda: convnextv2(variant))
    assert load_checkpoint(model, src).format == "hf"
    ref = ours_from("hf", variant)[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    size = SIZES[1]  # the logits of both sizes are compared in test_hf_equivalence
    d = maxdiff(ours_out(model, size)[0], hf_out(variant, size)[0])
    print(f"\n[convert] HF {variant} {fmt_size(size)} from save_pretrained {source}: max|Δlogits|={d:.2e}")
    assert d <= TOL


# ------------------------------------------------------------------------------------------------
# The authors' formats
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=fmt_size)
def test_authors_dense_file(tmp_path, size):
    dense = authors_atto()
    assert dense["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    path = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    torch.save({"model": dense}, path)
    model = empty_atto().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without any warning
        report = load_checkpoint(model, path)
    assert report.format == "convnextv2_hub" and report.source == str(path)
    d = maxdiff(ours_out(model, size)[0], timm_out("atto", size)[0])
    print(f"\n[convert] authors' dense .pt atto {fmt_size(size)}: max|Δlogits| vs timm={d:.2e}")
    assert d <= TOL


def test_authors_fcmae_pt_only(tmp_path):
    enc = {k: v for k, v in authors_atto().items() if not k.startswith(("norm.", "head."))}
    path = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": enc}, path)
    assert detect_format(read_state_dict(path)) == "fcmae_dense"

    model = convnextv2("atto").eval()
    head_before = model.head.weight.detach().clone()
    with pytest.warns(UserWarning) as rec:
        report = load_checkpoint(model, path)
    text = " ".join(str(w.message) for w in rec)
    assert "no classifier head" in text and "1000 classes" in text and "LayerNorm" in text
    assert report.format == "fcmae_dense" and sorted(report.reinitialized) == ["head", "norm"]
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.norm.weight, torch.ones(320)) and torch.equal(model.norm.bias, torch.zeros(320))
    d = maxdiff(ours_out(model, SIZES[1])[1], timm_out("atto", SIZES[1])[1])
    print(f"\n[convert] authors' FCMAE pt_only atto {fmt_size(SIZES[1])}: max|Δforward_features| vs timm={d:.2e}")
    assert d <= TOL

    feat_model = convnextv2("atto", features_only=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # features_only ignores the absent norm/head silently
        load_checkpoint(feat_model, path)
    with torch.no_grad():
        assert maxdiff(feat_model(image(SIZES[1]))[-1], timm_out("atto", SIZES[1])[1]) <= TOL


class NotAllowed:
    """A picklable object that is not on any allowlist (stands in for arbitrary Python objects)."""

    def __init__(self):
        self.x = 1


def sparse_checkpoint(args) -> dict:
    dense = authors_atto()
    sparse = authors_dense_to_sparse(dense)
    model_sd = {**sparse, **fcmae_decoder(320)}
    return {
        "model": model_sd,
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.05, "params": [0]}]},
        "epoch": 799,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
        "args": args,
    }


def test_authors_sparse_checkpoint(tmp_path):
    dense = authors_atto()
    sparse = authors_dense_to_sparse(dense)
    # The sparse layout built by the test is right by the authors' own remap.
    remapped = authors_remap(sparse)
    enc = {k: v for k, v in dense.items() if not k.startswith(("norm.", "head."))}
    assert set(remapped) == set(enc) and all(torch.equal(remapped[k], enc[k]) for k in enc)
    assert sparse["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
    assert sparse["encoder.stages.0.0.dwconv.kernel"].shape == (49, 40)
    assert sparse["encoder.stages.0.0.grn.gamma"].shape == (1, 160)

    # Real main_pretrain checkpoints store argparse.Namespace under 'args' (allowlisted, see checkpoint_reading.py).
    args = argparse.Namespace(model="convnextv2_atto", input_size=224, mask_ratio=0.6, norm_pix_loss=True,
                              blr=1.5e-4, data_path="/data/imagenet", resume="", layer_decay=None)
    path = tmp_path / "checkpoint-799.pth"
    torch.save(sparse_checkpoint(args), path)

    sd = read_state_dict(path)
    assert detect_format(sd) == "fcmae_sparse"
    encoder, rest = split_fcmae_sparse(sd)
    decoder = fcmae_decoder(320)
    assert set(rest) == set(decoder) and all(torch.equal(rest[k], decoder[k]) for k in decoder)
    assert set(encoder) == set(enc) and all(torch.equal(encoder[k], enc[k]) for k in enc)

    model = convnextv2("atto").eval()
    with pytest.warns(UserWarning) as rec:
        report = load_checkpoint(model, path)
    text = " ".join(str(w.message) for w in rec)
    assert "no classifier head" in text and "without the final LayerNorm" in text
    assert report.format == "fcmae_sparse" and sorted(report.reinitialized) == ["head", "norm"]
    for size in SIZES:
        d = maxdiff(ours_out(model, size)[1], timm_out("atto", size)[1])
        print(f"\n[convert] authors' sparse FCMAE checkpoint atto {fmt_size(size)}: "
              f"max|Δforward_features| vs timm={d:.2e}")
        assert d <= TOL


def test_sparse_checkpoint_with_other_objects_is_refused(tmp_path):
    path = tmp_path / "checkpoint-1.pth"
    torch.save(sparse_checkpoint(NotAllowed()), path)
    with pytest.raises(CheckpointError, match=r"(?s)code/objects.*NotAllowed.*only tensors"):
        read_state_dict(path)


# ------------------------------------------------------------------------------------------------
# Round trips through the inverse converters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_roundtrip_timm(variant):
    model = ours_from("timm", variant)[0]
    back = to_timm(model.state_dict(), variant)
    ref = timm_model(variant).state_dict()  # timm -> ours -> timm is the identity
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    fresh = new_peer("timm", variant)
    fresh.load_state_dict(back, strict=True)
    with torch.no_grad():
        d = maxdiff(fresh(image(SIZES[1])), ours_from_out("timm", variant, SIZES[1])[0])
    assert d <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_roundtrip_hf(variant):
    fresh = new_peer("hf", variant)  # ours (from timm weights) -> HF: strict load, same logits
    fresh.load_state_dict(to_hf(ours_from("timm", variant)[0].state_dict()), strict=True)
    with torch.no_grad():
        d = maxdiff(fresh(pixel_values=image(SIZES[1])).logits, ours_from_out("timm", variant, SIZES[1])[0])
    assert d <= TOL
    ref = hf_model(variant).state_dict()  # HF -> ours -> HF is the identity
    back = to_hf(ours_from("hf", variant)[0].state_dict())
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_roundtrip_authors_sparse(variant):
    ours = ours_from("timm", variant)[0].state_dict()
    sparse = to_authors_sparse(ours)
    assert detect_format(sparse) == "fcmae_sparse"
    back = to_ours(sparse)
    enc = {k: v for k, v in ours.items() if not k.startswith(("norm.", "head."))}
    assert set(back) == set(enc) and all(torch.equal(back[k], enc[k]) for k in enc)
    if variant == "atto":  # our sparse writer agrees with the test's docs-based one
        ref = authors_dense_to_sparse(authors_atto())
        assert set(sparse) == set(ref) and all(torch.equal(sparse[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(empty_atto(), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["empty.pt", "empty.safetensors", "empty.bin"])
def test_zero_byte_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        read_state_dict(path)


def test_truncated_files(tmp_path):
    sd = {"a": torch.randn(64, 64), "b": torch.randn(64)}
    st = tmp_path / "full.safetensors"
    safetensors.torch.save_file(sd, st)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"(?s){re.escape(str(cut))}.*truncated or corrupt"):
        read_state_dict(cut)
    pt = tmp_path / "full.pt"
    torch.save({"model": sd}, pt)
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"(?s)cut\.pt.*truncated or corrupt"):
        read_state_dict(cut_pt)


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors", "garbage.bin", "garbage.ckpt"])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(7, 256)) * 8)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_state_dict(path)


class Payload:
    """Unpickling this would run code that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["pickle", "torch_save"])
def test_malicious_pickle_is_never_executed(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    obj = {"model": {"w": torch.zeros(2)}, "x": Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(obj))
        stream = path.read_bytes()
    else:
        torch.save(obj, path)
        import zipfile

        with zipfile.ZipFile(path) as z:
            stream = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    # The payload is really there (read by opcode, not executed).
    assert any(isinstance(arg, str) and arg.split(" ")[-1] == "exec" for _, arg, _ in pickletools.genops(stream))
    with pytest.raises(CheckpointError, match=r"(?s)code/objects.*exec.*only tensors.*nothing in the file is executed"):
        load_checkpoint(empty_atto(), path)
    assert not marker.exists()


def test_file_without_tensors(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"(?s)no tensors.*epoch"):
        read_state_dict(path)
    empty_st = tmp_path / "empty_tensors.safetensors"
    safetensors.torch.save_file({}, empty_st)
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(empty_st)


def test_unknown_layout():
    with pytest.raises(CheckpointError, match=r"(?s)unrecognised.*'fc\.weight'"):
        detect_format({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})


def test_wrong_variant_suggests_the_right_one():
    sd = timm_model("atto").state_dict()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(convnextv2("femto"), sd)
    msg = str(err.value)
    assert "downsample_layers.0.0.weight: (40, 3, 4, 4) vs (48, 3, 4, 4)" in msg
    assert "'atto' checkpoint" in msg and "convnextv2('atto', ...)" in msg
    # Depth mismatch too (tiny into atto): missing/unexpected block keys are listed.
    with pytest.raises(CheckpointError, match=r"(?s)unexpected.*stages\.0\.2\..*'tiny' checkpoint"):
        load_checkpoint(empty_atto(), timm_model("tiny").state_dict())


def test_different_num_classes_keeps_model_head():
    ref = to_ours(timm_model("atto").state_dict())
    model = convnextv2("atto", num_classes=10)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    with pytest.warns(UserWarning, match=r"1000-class head but the model has 10 classes"):
        report = load_checkpoint(model, ref)
    assert report.reinitialized == ["head"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, head[k] if k.startswith("head.") else ref[k]), k
    # num_classes=0: the checkpoint's head is dropped silently, the final norm still loads.
    m0 = convnextv2("atto", num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(m0, ref)
    assert torch.equal(m0.norm.weight, ref["norm.weight"])


def test_features_only_ignores_norm_and_head():
    model = empty_atto(features_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(model, timm_model("atto").state_dict())
    assert report.format == "timm" and not report.reinitialized and not report.unexpected
    with torch.no_grad():
        maps = model(image(SIZES[1]))
    assert [m.shape[1] for m in maps] == [40, 80, 160, 320]
    assert maxdiff(maps[-1], timm_out("atto", SIZES[1])[1]) <= TOL


@pytest.mark.parametrize("shape", ["(C,)", "(1,C)", "(1,1,1,C)"])
def test_grn_shapes(shape):
    ref = to_ours(timm_model("atto").state_dict())
    reshape = {"(C,)": lambda v: v.reshape(-1), "(1,C)": lambda v: v.reshape(1, -1), "(1,1,1,C)": lambda v: v}[shape]
    sd = {k: reshape(v) if "grn" in k else v for k, v in ref.items()}
    model = empty_atto()
    load_checkpoint(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert_grn_nonzero(model.state_dict())


def test_bad_grn_shape_fails_loudly():
    sd = to_ours(timm_model("atto").state_dict())
    sd["stages.0.0.grn.gamma"] = sd["stages.0.0.grn.gamma"].reshape(2, 80)
    with pytest.raises(CheckpointError, match=r"GRN tensor 'stages\.0\.0\.grn\.gamma' has shape \(2, 80\)"):
        load_checkpoint(empty_atto(), sd)


def test_strict_false_reports_and_strict_true_raises():
    sd = to_ours(timm_model("atto").state_dict())
    del sd["stages.0.0.dwconv.bias"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"(?s)missing.*stages\.0\.0\.dwconv\.bias: model \(40,\).*unexpected.*extra\.weight"):
        load_checkpoint(empty_atto(), sd)
    model = empty_atto()
    report = load_checkpoint(model, sd, strict=False)
    assert report.missing == ["stages.0.0.dwconv.bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(model.stages[0][0].dwconv.weight, sd["stages.0.0.dwconv.weight"])
    sd["stages.0.0.dwconv.weight"] = torch.zeros(40, 1, 5, 5)  # shape mismatches raise even when not strict
    with pytest.raises(CheckpointError, match=r"stages\.0\.0\.dwconv\.weight: \(40, 1, 5, 5\) vs \(40, 1, 7, 7\)"):
        load_checkpoint(empty_atto(), sd, strict=False)


def test_dtype_and_input_untouched():
    src = timm_model("atto").state_dict()
    before = {k: v.clone() for k, v in src.items()}
    model = empty_atto().to(torch.float64)
    load_checkpoint(model, src)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert torch.equal(model.stages[0][0].grn.gamma.float(), src["stages.0.blocks.0.mlp.grn.weight"].reshape(1, 1, 1, -1))
    assert set(src) == set(before) and all(torch.equal(src[k], before[k]) and src[k].shape == before[k].shape for k in src)


def test_wrappers_and_folders(tmp_path):
    a = {"w": torch.zeros(1)}
    b = {"w": torch.ones(1)}
    assert torch.equal(read_state_dict({"model": a, "model_ema": b})["w"], b["w"])  # EMA wins
    assert torch.equal(read_state_dict({"state_dict": a, "state_dict_ema": b})["w"], b["w"])
    assert torch.equal(read_state_dict({"model": {"module.w": torch.ones(1)}})["w"], b["w"])
    (tmp_path / "one").mkdir()
    torch.save({"model": b}, tmp_path / "one" / "weights.pt")
    assert torch.equal(read_state_dict(tmp_path / "one")["w"], b["w"])
    torch.save({"model": a}, tmp_path / "one" / "other.pth")
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoint files \(other\.pth, weights\.pt\)"):
        read_state_dict(tmp_path / "one")


def test_sharded_hf_folder(tmp_path):
    hf = hf_model("atto")
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = empty_atto().eval()
    assert load_checkpoint(model, tmp_path).format == "hf"
    assert maxdiff(ours_out(model, SIZES[0])[0], hf_out("atto", SIZES[0])[0]) <= TOL


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def test_save_checkpoint_metadata_and_reload(tmp_path):
    model = convnextv2("atto", num_classes=10)
    model.checkpoint = SimpleNamespace(tag="fcmae_ft_in1k")
    path = save_checkpoint(model, tmp_path / "atto.safetensors", metadata={"note": "unit test"})
    assert path == tmp_path / "atto.safetensors"
    assert read_metadata(path) == {"format": "convnextv2_hub", "variant": "atto", "tag": "fcmae_ft_in1k",
                                   "num_classes": "10", "note": "unit test"}
    fresh = convnextv2("atto", num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(fresh, path)
    assert report.format == "convnextv2_hub"
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    assert read_metadata(save_checkpoint(convnextv2("atto", features_only=True), tmp_path / "f.safetensors"))["num_classes"] == "0"
    with pytest.raises(TypeError):
        save_checkpoint(model, tmp_path / "x.safetensors", metadata={"epoch": 3})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "x.safetensors", metadata={"format": "timm"})


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = convnextv2("atto")
    target = tmp_path / "model.safetensors"

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")  # a partial write, then the failure
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, target)
    assert not target.exists() and os.listdir(tmp_path) == []

    monkeypatch.undo()
    save_checkpoint(model, target)
    good = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(empty_atto(), target)
    assert target.read_bytes() == good and os.listdir(tmp_path) == ["model.safetensors"]


def test_save_checkpoint_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"(?s)does not exist.*create it"):
        save_checkpoint(empty_atto(), tmp_path / "no" / "such" / "m.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_metadata(tmp_path / "absent.safetensors")
