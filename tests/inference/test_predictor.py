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
])
def test_backend_agrees_with_eager_and_model_is_unchanged(model, batch, backend, precision, bound):
    before = _snapshot(model)
    ref = _reference(model, batch)
    # The compile backend: test_compiled_store.py (Predictor) and test_compile_backend.py (the graphs).
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
    p = Predictor(model, backend="auto", batch_size=3, background=False)
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


@pytest.fixture
def ort_auto(monkeypatch):
    # ONNX Runtime as auto's slow start on every CPU kind: a second to start instead of a compile.
    monkeypatch.setattr(Predictor, "_slow_start_kind", lambda self: "onnxruntime")


def test_auto_prepares_in_the_background_and_then_gives_the_synchronous_results(model, batch, ort_auto):
    lines = []
    background = Predictor(model, backend="auto", batch_size=3, progress=lines.append)
    synchronous = Predictor(model, backend="auto", batch_size=3, background=False)
    for p in (background, synchronous):
        p(batch)  # calibration
        p._setup_estimate_s = float("-inf")  # pretend the start-up is already paid for
    served = background(batch)  # starts the export in a thread, answers from the eager path
    assert background.active_path.startswith("eager")
    assert torch.equal(served, background._run_eager(batch) if background.precision != "fp32"
                       else background._run_fp32_reference(batch))
    assert background.wait_until_ready(timeout=120)
    out_bg, out_sync = background(batch), synchronous(batch)
    assert background.active_path == synchronous.active_path == "onnxruntime fp32"
    assert torch.equal(out_bg, out_sync)
    assert any("in the background" in line for line in lines) and any("ready after" in line for line in lines)


def test_auto_that_cannot_prepare_warns_once_and_stays_eager(model, batch, ort_auto, monkeypatch):
    def broken(self):
        raise RuntimeError("no ONNX for you")

    monkeypatch.setattr(Predictor, "_make_ort", broken)
    p = Predictor(model, backend="auto", batch_size=3)
    ref = p(batch)
    p._setup_estimate_s = float("-inf")
    with pytest.warns(RuntimeWarning, match="no ONNX for you") as caught:
        p(batch)
        assert p.wait_until_ready(timeout=60)
        outs = [p(batch) for _ in range(2)]
    assert sum("no ONNX for you" in str(w.message) for w in caught) == 1  # said once, not per call
    assert p.active_path.startswith("eager") and all(_cosine(out, ref) >= 0.999 for out in outs)


def test_warmup_builds_the_slow_path_ahead_of_the_first_call(model, batch, ort_auto):
    p = Predictor(model, backend="auto", batch_size=3)
    p.warmup(image_size=SIZE)
    p(batch)
    assert p.active_path == "onnxruntime fp32"


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
    headless = Predictor(convnextv2("atto", num_classes=0), backend="eager")  # accepted: it can embed
    with pytest.raises(ValueError, match="classifier head"):
        headless(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="classifier head"):
        headless.predict([Image.new("RGB", (SIZE, SIZE))])
    with pytest.raises(ValueError, match="features_only"):
        Predictor(convnextv2("atto", features_only=True))


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


# ------------------------------------------------------------------------------------------------
# Bad input: refused with a message that says what to do, or reported for its file alone
# ------------------------------------------------------------------------------------------------
def test_decompression_bomb_is_reported_for_its_file_and_the_others_classified(model, photos, bomb_png):
    from convnextv2_hub.preprocessing.transforms import eval_transform

    files = [photos[0], bomb_png, photos[1], photos[2]]
    small = eval_transform(SIZE)  # the model's 224 px pipeline would only make the test slower
    p = Predictor(model, backend="eager", batch_size=2, transform=small)
    for preds in (p.classify(files, topk=3), classify(model, files, topk=3, transform=small)):
        assert [pr.error is None for pr in preds] == [True, False, True, True]
        assert all(len(pr.topk) == 3 for pr in preds if pr.error is None) and preds[1].topk == []
        assert "bomb.png" in preds[1].error and "exceeds the pixel limit" in preds[1].error
        assert "MAX_IMAGE_PIXELS" in preds[1].error
    with pytest.warns(UserWarning, match="bomb.png.*exceeds the pixel limit") as record:
        got = p.predict(files, topk=3)
    assert [len(r) for r in got] == [3, 0, 3, 3] and len(record) == 1


def test_topk_below_one_is_refused(model, photos):
    p = Predictor(model, backend="eager")
    for topk in (0, -2):
        with pytest.raises(ValueError, match=f"topk must be a whole number >= 1.*got {topk}"):
            p.predict(photos, topk=topk)
        with pytest.raises(ValueError, match="topk must be"):
            classify(model, photos, topk=topk)
    assert [len(r) for r in p.predict(photos[:1], topk=50)] == [10]  # above the class count: all of them


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_non_float_and_too_small_inputs_are_refused_before_any_backend_runs(model, batch, backend):
    p = Predictor(model, backend=backend, batch_size=3)
    as_uint8 = (batch * 50 + 120).clamp(0, 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"got dtype torch.uint8.*checkpoint's transforms \(model.checkpoint.transforms"):
        p(as_uint8)
    for h, w in ((31, SIZE), (SIZE, 16)):
        with pytest.raises(ValueError, match=f"{h} x {w} px is too small.*at least 32 x 32.*multiple of 32"):
            p(batch[..., :h, :w])
    assert p.active_path == "none yet"  # nothing ran
    assert p(batch[..., :32, :40]).shape == (3, 10)  # 32 px is enough
    # classify() checks what a custom transform makes, too
    images = [Image.new("RGB", (64, 64))]
    with pytest.raises(TypeError, match="create_transform"):
        classify(model, images, transform=lambda im: torch.zeros(3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 32"):
        classify(model, images, transform=lambda im: torch.zeros(3, 24, 24))


@pytest.fixture(scope="module")
def ten_class_file(model, tmp_path_factory):
    from convnextv2_hub.checkpoints.io import save_checkpoint

    return save_checkpoint(model, tmp_path_factory.mktemp("w10") / "atto10.safetensors")


def test_predictor_refuses_a_new_untrained_head(ten_class_file, photos, monkeypatch):
    import convnextv2_hub.models.factory as factory

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded for a refused head")

    monkeypatch.setattr(factory, "download_checkpoint", no_download)
    # A pretrained name: checked against the manifest, before any download.
    with pytest.raises(ValueError, match=r"atto.fcmae_ft_in1k has a 1000-class head, not 10: .*new, untrained head"):
        Predictor("atto", num_classes=10)
    with pytest.raises(ValueError, match="atto.fcmae is an encoder without a classifier head"):
        Predictor("atto.fcmae")
    # A local file with a 10-class head, asked for 1000 classes: the head would be new.
    with pytest.raises(ValueError, match=r"has a 10-class head but the model has 1000 classes: .*fine-tuning"):
        Predictor("atto", checkpoint_path=ten_class_file, num_classes=1000, backend="eager")
    # A file that does not state its head (timm's layout) is checked against the default 1000 classes.
    from convnextv2_hub.checkpoints.io import load_checkpoint, save_checkpoint
    from convnextv2_hub.models.convnextv2 import convnextv2

    ten = convnextv2("atto", num_classes=10)
    load_checkpoint(ten, ten_class_file)
    timm_file = save_checkpoint(ten, ten_class_file.with_name("atto10_timm.safetensors"), format="timm")
    with pytest.raises(ValueError, match=r"has a 10-class head but the model has 1000 classes: .*fine-tuning"):
        Predictor("atto", checkpoint_path=timm_file, backend="eager")
    # Our own file states its head: no num_classes needed.
    for p in (Predictor("atto", checkpoint_path=ten_class_file, backend="eager"),
              Predictor("atto", checkpoint_path=timm_file, num_classes=10, backend="eager")):
        assert [len(r) for r in p.predict(photos[:1], topk=3)] == [3]
