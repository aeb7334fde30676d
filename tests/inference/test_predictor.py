"""Predictor backends agree with eager fp32 on the same input; the caller's model is never modified."""
import pytest
from conftest import write_skimage_photos
import torch
from PIL import Image

from convnextv2_hub.models.convnextv2 import convnextv2
from convnextv2_hub.inference.predictor import Predictor, classify, cpu_has_native_bf16

SIZE = 64


@pytest.fixture(scope="module")
def model():
    # Every parameter random (GRN's zero init would make it an identity and hide its numerics).
    torch.manual_seed(0)
    m = convnextv2("atto", num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.train()  # training mode on purpose: the predictor must not switch the caller's model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_skimage_photos(tmp_path_factory.mktemp("photos"), ("astronaut", "coffee", "chelsea"))


@pytest.fixture(scope="module")
def batch(photos):
    from convnextv2_hub.checkpoints.registry import create_transform

    tf = create_transform("atto.fcmae_ft_in1k")
    x = torch.stack([tf(Image.open(p)) for p in photos])
    return torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)


def _reference(model, x):
    m = convnextv2("atto", num_classes=10).eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        return m(x)


def _snapshot(model):
    return model.training, {k: v.clone() for k, v in model.state_dict().items()}, \
        [p.is_contiguous() for p in model.parameters()], next(model.parameters()).dtype


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min().item()


@pytest.mark.parametrize("backend, precision, bound", [
    ("eager", None, "exact"),
    ("eager", "bf16", "bf16"),
    ("onnxruntime", None, "exact"),
    ("compile", None, "bf16"),
])
def test_backend_agrees_with_eager_and_model_is_unchanged(model, batch, backend, precision, bound):
    before = _snapshot(model)
    ref = _reference(model, batch)
    p = Predictor(model, backend=backend, precision=precision, batch_size=3)
    for x in (batch, batch[:1]):
        out = p(x)
        assert out.shape == (x.shape[0], 10) and out.dtype == torch.float32
        if bound == "exact" or p.precision == "fp32":
            assert (out - ref[: x.shape[0]]).abs().max() <= 1e-4
        else:
            assert _cosine(out, ref[: x.shape[0]]) >= 0.999
    after = _snapshot(model)
    assert before[0] == after[0] and before[2:] == after[2:]
    assert all(torch.equal(before[1][k], v) for k, v in after[1].items())


def test_auto_is_safe_and_switches_when_it_pays_off(model, batch):
    ref = _reference(model, batch)
    p = Predictor(model, backend="auto", batch_size=3)
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert p.precision == expected
    first = p(batch)  # calibration batch: exactly eager fp32
    assert p.active_path == "eager fp32" and (first - ref).abs().max() <= 1e-5
    assert _cosine(p(batch), ref) >= 0.999
    assert "compile" not in p.active_path and "onnxruntime" not in p.active_path  # far from paying off
    p._setup_estimate_s = float("-inf")  # pretend the start-up is already paid for
    out = p(batch)
    assert p.active_path.startswith("compile" if expected == "bf16" else "onnxruntime")
    assert _cosine(out, ref) >= 0.999


def test_predict_matches_classify(model, photos):
    eager = classify(model, photos, topk=3)
    p = Predictor(model, backend="onnxruntime", batch_size=2)
    got = p.predict(photos, topk=3)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in e.topk] for e in eager]
    assert [pr for r in got for _, pr in r] == pytest.approx([pr for e in eager for _, pr in e.topk], abs=1e-5)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="backend"):
        Predictor(model, backend="tensorrt")
    with pytest.raises(ValueError, match="precision"):
        Predictor(model, precision="int4")
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        Predictor(model, backend="eager")(torch.zeros(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="classifier head"):
        Predictor(convnextv2("atto", num_classes=0))


def test_files_and_pil_images_of_any_mode_classify_alike(model, photos, tmp_path):
    """Files go through preprocessing.images.open_image, PIL images straight to the transform: the
    transform's own to_rgb makes them agree, for palette and greyscale images too."""
    with Image.open(photos[2]) as img:
        palette = img.convert("P", palette=Image.Palette.ADAPTIVE)
    with Image.open(photos[1]) as img:
        grey = img.convert("L")
    files = []
    for name, img in (("palette.png", palette), ("grey.png", grey)):
        files.append(str(tmp_path / name))
        img.save(files[-1])
    from_files = classify(model, files, topk=3)
    from_images = classify(model, [palette, grey], topk=3)
    for f, i in zip(from_files, from_images):
        assert f.error is None and [label for label, _ in f.topk] == [label for label, _ in i.topk]
        assert [p for _, p in f.topk] == pytest.approx([p for _, p in i.topk], abs=1e-6)
