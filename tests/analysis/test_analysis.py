"""The paper's analyses (cosine distance Fig. 4, class selectivity Fig. 7, activation maps Fig. 3)."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2_hub.analysis import measures as A
from convnextv2_hub.analysis.hooks import find_block, residual_blocks
from convnextv2_hub.analysis.figures import _atomic_write, plot_activations, plot_selectivity
from convnextv2_hub.preprocessing.image_folder import list_images
from convnextv2_hub.models.convnextv2 import convnextv2


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def _brute_force_distance(x: torch.Tensor) -> float:
    """The formula of ``analysis.measures``' docstring, literally: C x C cosines, (1 - cos)/2, mean over
    all (i, j) incl. i = j."""
    v = x.reshape(-1, x.shape[-1]).double().T  # (C, HW)
    c = v.shape[0]
    total = 0.0
    for i in range(c):
        for j in range(c):
            cos = 1.0 if i == j else float(v[i] @ v[j] / (v[i].norm() * v[j].norm()))
            total += (1 - cos) / 2
    return total / c**2


# --- cosine distance --------------------------------------------------------------------------------
def test_cosine_distance_identical_channels_is_zero():
    base = torch.randn(3, 7, 7, 1)
    same = base.repeat(1, 1, 1, 12)
    scaled = base * torch.rand(1, 1, 1, 12).add(0.5)  # positive rescaling keeps the direction
    assert A.cosine_distance(same).tolist() == pytest.approx([0.0] * 3, abs=1e-6)
    assert A.cosine_distance(scaled).tolist() == pytest.approx([0.0] * 3, abs=1e-6)


@pytest.mark.parametrize("c", [2, 16, 64])
def test_cosine_distance_orthogonal_channels_is_half(c):
    # One-hot spatial maps: every pair orthogonal. The formula's sum includes the C zero diagonal terms,
    # so D = 0.5 * (C^2 - C) / C^2, i.e. 0.5 in the limit of many channels.
    x = torch.eye(c).reshape(1, 1, c, c)  # (N=1, H=1, W=C, C)
    assert float(A.cosine_distance(x)) == pytest.approx(0.5 * (1 - 1 / c), abs=1e-6)
    assert float(A.cosine_distance(torch.eye(1024).reshape(1, 32, 32, 1024))) == pytest.approx(0.5, abs=1e-3)


def test_cosine_distance_matches_formula_and_layouts():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 9)
    x[1, ..., 3] = 0  # a dead channel: orthogonal to the others, zero against itself
    ours = A.cosine_distance(x)
    assert ours[0].item() == pytest.approx(_brute_force_distance(x[0]), abs=1e-6)
    dead_free = [k for k in range(9) if k != 3]
    expected = _brute_force_distance(x[1][..., dead_free]) * 8**2 + 2 * 8 * 0.5  # + the dead channel's pairs
    assert ours[1].item() == pytest.approx(expected / 81, abs=1e-6)
    assert torch.allclose(A.cosine_distance(x.permute(0, 3, 1, 2), channel_dim=1), ours, atol=1e-6)
    assert float(A.cosine_distance(torch.stack([x[0, ..., 0], -x[0, ..., 0]], -1)[None])) == pytest.approx(0.5)


def _collapse(model: torch.nn.Module, noise: float = 1e-3) -> None:
    """Make every block's 4C expansion channels (nearly) the same channel: the V1 FCMAE failure mode."""
    with torch.no_grad():
        for ref in residual_blocks(model):
            w, b = ref.module.pwconv1.weight, ref.module.pwconv1.bias
            w.copy_(w[:1].expand_as(w) + noise * torch.randn_like(w))
            b.fill_(0.1)


def test_collapsed_network_has_lower_cosine_distance_than_diverse():
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    diverse = convnextv2("atto", num_classes=0)
    collapsed = convnextv2("atto", num_classes=0)
    collapsed.load_state_dict(diverse.state_dict())
    _collapse(collapsed)
    d_div = A.compute_cosine_distance(diverse, batches, progress=False)
    d_col = A.compute_cosine_distance(collapsed, batches, progress=False)
    assert d_div.num_images == d_col.num_images == 4
    assert d_div.layers[0] == "1.1" and d_div.layers[-1] == "4.2" and len(d_div.layers) == 12
    assert d_div.channels == [160, 160, 320, 320] + [640] * 6 + [1280, 1280]
    assert d_div.normalized_index[-1] == 1.0 and d_div.normalized_index[0] == pytest.approx(1 / 12)
    assert max(d_col.distance) < 0.02 < 0.3 < min(d_div.distance)


def test_grn_before_and_after_differ_only_once_grn_is_trained():
    torch.manual_seed(0)
    model = convnextv2("atto", num_classes=0)
    batches = [torch.randn(2, 3, 64, 64)]
    # gamma = beta = 0 at init: GRN is the identity, so both readings agree exactly.
    before = A.compute_cosine_distance(model, batches, grn="before", progress=False).distance
    after = A.compute_cosine_distance(model, batches, grn="after", progress=False).distance
    assert before == pytest.approx(after, abs=1e-7)
    with torch.no_grad():
        for ref in residual_blocks(model):
            ref.module.grn.beta.normal_(0, 1.0)  # a per-channel offset moves channel directions
    after = A.compute_cosine_distance(model, batches, grn="after", progress=False).distance
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3
    with pytest.raises(ValueError, match="grn"):
        A.compute_cosine_distance(model, batches, grn="middle", progress=False)


# --- class selectivity ------------------------------------------------------------------------------
def test_class_selectivity_index_extremes():
    means = torch.tensor([[5.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 2.0, 1.0, 0.0]])
    si = A.class_selectivity(means)
    assert si[0].item() == pytest.approx(1.0)  # fires for one class only
    assert si[1].item() == pytest.approx(0.0)  # fires equally for all classes
    assert si[2].item() == pytest.approx((3 - 1) / (3 + 1))
    assert math.isnan(si[3].item())  # never active: undefined
    with pytest.raises(ValueError, match="non-negative"):
        A.class_selectivity(-means)


def test_selectivity_meter_negative_activity_modes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    acts = torch.zeros(6, 3, 4, 4)
    acts[labels == 0, 0] = 2.0  # channel 0: positive for class 0, negative for the others
    acts[labels != 0, 0] = -1.0
    acts[:, 1] = 1.5  # channel 1: the same positive response for every class
    acts[:, 2] = -3.0  # channel 2: negative for every class
    si = {}
    for mode in ("relu", "abs", "shift"):
        meter = A.SelectivityMeter(3, 3, mode)
        meter.update(acts[:3], labels[:3])  # streamed in two batches
        meter.update(acts[3:], labels[3:])
        si[mode] = meter.compute()
    assert si["relu"][0].item() == pytest.approx(1.0) and si["relu"][1].item() == pytest.approx(0.0)
    assert math.isnan(si["relu"][2].item())  # rectified away entirely
    assert si["abs"][0].item() == pytest.approx((2 - 1) / (2 + 1)) and si["abs"][2].item() == pytest.approx(0.0)
    assert si["shift"][0].item() == pytest.approx(1.0) and math.isnan(si["shift"][1].item())


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """sklearn's handwritten digits as an ImageFolder: 4 classes x 3 images, upscaled 8x8 -> 32x32 PNGs."""
    from sklearn import datasets
    digits = datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    for cls in range(4):
        (root / f"digit_{cls}").mkdir()
        idx = np.flatnonzero(digits.target == cls)[:3]
        for k, i in enumerate(idx):
            img = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(img).resize((32, 32), Image.NEAREST).save(root / f"digit_{cls}" / f"{k}.png")
    return root


def _small_transform(size: int = 64):
    from convnextv2_hub.preprocessing.transforms import eval_transform

    return eval_transform(size, crop_pct=1.0)


def test_selectivity_on_real_digits_writes_consistent_csv_json_png(digits_folder, tmp_path):
    torch.manual_seed(0)
    model = convnextv2("atto", num_classes=4)
    res = A.compute_selectivity(model, digits_folder, transform=_small_transform(), batch_size=5, progress=False)
    assert res.num_images == 12 and res.num_classes == 4
    assert res.images_per_class == {f"digit_{c}": 3 for c in range(4)}
    assert [s.size for s in res.selectivity] == [40, 40, 80, 80] + [160] * 6 + [320, 320]
    values = np.concatenate(res.selectivity)
    finite = values[np.isfinite(values)]
    assert finite.size > 0.9 * values.size and finite.min() >= 0 and finite.max() <= 1

    out = tmp_path / "fig7.png"
    summary = plot_selectivity([res], out, bins=10, figsize=(12, 4), dpi=50)
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.size == (600, 200) and img.format == "PNG"
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == values.size
    got = np.array([float(r["selectivity"]) for r in rows])
    assert np.allclose(got, values, atol=1e-7, equal_nan=True)
    disk = json.loads(out.with_suffix(".json").read_text())
    assert disk == summary
    for block, si in zip(disk["models"][0]["blocks"], res.selectivity):
        valid = si[np.isfinite(si)]
        assert block["histogram_counts"] == np.histogram(valid, bins=np.linspace(0, 1, 11))[0].tolist()
        assert block["undefined"] == si.size - valid.size
        assert block["mean"] == pytest.approx(float(valid.mean()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig7.csv", "fig7.json", "fig7.png"]  # no temp files


# --- streaming --------------------------------------------------------------------------------------
def test_accumulators_do_not_grow_with_image_count():
    torch.manual_seed(0)
    model = convnextv2("atto", num_classes=0)
    states = []
    meter = A.CosineDistanceMeter(3)
    sel = A.SelectivityMeter(5, 40)
    for step in range(6):
        meter.update(step % 3, torch.randn(4, 8, 8, 160))
        sel.update(torch.randn(4, 40, 8, 8), torch.randint(0, 5, (4,)))
        states.append((meter.sums.numel() + meter.counts.numel(), sel.sums.numel() + sel.counts.numel()))
    assert len(set(states)) == 1 and states[0] == (6, 5 * 40 + 5)
    # Batching does not change the streamed mean, and hooks are gone afterwards (no features retained).
    images = torch.randn(6, 3, 64, 64)
    one = A.compute_cosine_distance(model, [images], progress=False).distance
    three = A.compute_cosine_distance(model, list(images.split(2)), progress=False).distance
    assert one == pytest.approx(three, abs=1e-6)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_list_images_round_robin_over_classes(digits_folder, tmp_path):
    paths, labels, names = list_images(digits_folder, limit=4, seed=1)
    assert sorted(labels) == [0, 1, 2, 3] and names == [f"digit_{c}" for c in range(4)]  # one per class
    assert list_images(digits_folder, limit=4, seed=1)[0] == paths  # seeded
    _, labels, _ = list_images(digits_folder, per_class=2)
    assert np.bincount(labels).tolist() == [2, 2, 2, 2]
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(flat / f"{k}.png")
    (flat / "notes.txt").write_text("not an image")
    paths, labels, names = list_images(flat)
    assert len(paths) == 3 and labels == [-1] * 3 and names == []
    with pytest.raises(ValueError, match="class sub-folders"):
        list_images(flat, require_classes=True)


# --- activation maps --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from skimage import data as skimage_data
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


def test_activation_maps_grid(photo, tmp_path):
    torch.manual_seed(0)
    model = convnextv2("atto", num_classes=0)
    with Image.open(photo) as img:
        x = _small_transform(96)(img)
    feats = A.expansion_activations(model, x, "3.5")
    assert feats.shape == (640, 6, 6)  # 4C = 4 * 160 at stride 16
    # The hook reads the model itself: the same tensor as a manual pass up to that block.
    with torch.no_grad():
        h = x[None]
        for i in range(3):
            h = model.downsample_layers[i](h)
            for blk in model.stages[i][: (4 if i == 2 else len(model.stages[i]))]:
                h = blk(h)
        blk = model.stages[2][4]
        manual = blk.grn(blk.act(blk.pwconv1(blk.norm(blk.dwconv(h).permute(0, 2, 3, 1)))))
    assert torch.allclose(feats, manual[0].permute(2, 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="stage 3: blocks 1..6"):
        find_block(model, "3.7")

    out = tmp_path / "fig3.png"
    summary = plot_activations(feats, out, channels=16, figsize=(4, 4), dpi=50)
    with Image.open(out) as img:
        assert img.size == (200, 200)
    assert summary["channels_shown"] == 16 and len(summary["channels"]) == 16
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["max"]) for r in rows] == pytest.approx(feats[:16].flatten(1).max(1).values.tolist(), rel=1e-6)
    assert json.loads(out.with_suffix(".json").read_text())["cosine_distance_all_channels"] == pytest.approx(
        float(A.cosine_distance(feats.permute(1, 2, 0)[None])), abs=1e-6)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def fail(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --- command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    from convnextv2_hub.checkpoints.io import save_checkpoint
    from convnextv2_hub.models.factory import create

    torch.manual_seed(0)
    return save_checkpoint(create("atto"), tmp_path_factory.mktemp("w") / "atto.safetensors")


def test_cli_cosine_distance_compare(atto_file, photo, digits_folder, tmp_path, capsys):
    from convnextv2_hub.cli.main import main

    out = tmp_path / "fig4.png"
    code = main(["analyze", "cosine-distance", "--model", "atto", "--checkpoint-path", str(atto_file),
                 "--compare", f"atto.fcmae_ft_in1k={atto_file}", "--data", str(digits_folder), "--images", "3",
                 "--grn", "before", "--workers", "0", "--no-progress", "--out", str(out), "--figsize", "5x3",
                 "--dpi", "40", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as img:
        assert img.size == (200, 120)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [m["model"] for m in data["models"]] == ["atto", "atto.fcmae_ft_in1k"]
    assert all(m["num_images"] == 3 and m["grn"] == "before" for m in data["models"])
    a, b = ([l["cosine_distance"] for l in m["layers"]] for m in data["models"])
    assert a == pytest.approx(b, abs=1e-6)  # the same weights under two names
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["cosine_distance"]) for r in rows] == pytest.approx(a + b, abs=1e-7)
    assert "wrote" in capsys.readouterr().out


def test_cli_selectivity_and_activations(atto_file, photo, digits_folder, tmp_path, capsys):
    from convnextv2_hub.cli.main import main

    out = tmp_path / "fig7.png"
    assert main(["analyze", "selectivity", "--model", f"atto={atto_file}", "--data", str(digits_folder),
                 "--images-per-class", "1", "--workers", "0", "--no-progress", "--out", str(out),
                 "--negative", "abs", "--device", "cpu"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["models"][0]["num_images"] == 4 and data["activity"] == "spatial mean of |x|"
    assert "median SI at stage ends" in capsys.readouterr().out

    out = tmp_path / "fig3.png"
    assert main(["analyze", "activations", "--model", "atto", "--checkpoint-path", str(atto_file),
                 "--image", str(photo), "--block", "3.5", "--channels", "9", "--out", str(out),
                 "--figsize", "3x3", "--dpi", "40", "--device", "cpu"]) == 0
    with Image.open(out) as img:
        assert img.size == (120, 120)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["block"] == "3.5" and info["shape"] == [640, 14, 14] and info["channels_shown"] == 9
    assert main(["analyze", "activations", "--model", "atto", "--checkpoint-path", str(atto_file),
                 "--image", str(photo), "--block", "9.1", "--out", str(out), "--device", "cpu"]) == 1
    assert "STAGE.BLOCK" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["atto", "tiny"])  # timm: 1x1-conv MLP (NCHW) for atto, Linear (NHWC) for tiny
def test_timm_models_are_read_at_the_same_positions(variant):
    import timm
    from convnextv2_hub.checkpoints.io import to_timm

    torch.manual_seed(0)
    from convnextv2_hub.models.convnextv2 import ConvNeXtV2
    from convnextv2_hub.models.variants import get_variant

    dims = get_variant(variant).dims
    ours = ConvNeXtV2(depths=(1, 1, 2, 1), dims=dims, num_classes=0)  # shallow: only the layout matters
    with torch.no_grad():
        for ref in residual_blocks(ours):
            ref.module.grn.gamma.normal_(0, 0.5)
            ref.module.grn.beta.normal_(0, 0.5)
    theirs = timm.create_model(f"convnextv2_{variant}", pretrained=False, num_classes=0, depths=ours.depths)
    theirs.load_state_dict(to_timm(ours.state_dict(), variant), strict=False)
    assert [r.label for r in residual_blocks(theirs)] == [r.label for r in residual_blocks(ours)]
    batches = [torch.randn(2, 3, 64, 64)]
    for grn in ("before", "after"):
        a = A.compute_cosine_distance(ours, batches, grn=grn, progress=False)
        b = A.compute_cosine_distance(theirs, batches, grn=grn, progress=False)
        assert a.channels == b.channels and a.distance == pytest.approx(b.distance, abs=1e-5)
    # V1 (no GRN) has the same 4C position, so it can share a Fig. 4 with V2.
    v1 = A.compute_cosine_distance(timm.create_model(f"convnext_{variant}", pretrained=False, num_classes=0,
                                                     depths=ours.depths), batches, progress=False)
    assert v1.channels == a.channels


def test_fcmae_show_input_is_the_fitted_photo_normalised(photo):
    from PIL import ImageOps
    from skimage import data as skimage_data

    from convnextv2_hub.analysis.reconstruction import _load_image
    from convnextv2_hub.preprocessing.transforms import IMAGENET_MEAN, IMAGENET_STD

    chelsea = photo.parent / "chelsea.png"  # 451 x 300: an odd size difference, where resize-then-crop differs
    Image.fromarray(skimage_data.chelsea()).save(chelsea)
    for path in (photo, chelsea):
        with Image.open(path) as img:
            fitted = ImageOps.fit(img.convert("RGB"), (64, 96), method=Image.Resampling.BICUBIC)
        ref = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).permute(2, 0, 1)
        ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = _load_image(path, (96, 64))
        assert x.shape == (1, 3, 96, 64)
        assert torch.allclose(x[0], ref, atol=1e-6)
