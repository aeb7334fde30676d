"""Every script in examples/ runs end to end on tiny inputs, offline (randomised weights on disk)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def _example(name: str):
    """Import examples/<name>.py as a module (they are scripts, not a package) and return it."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    from convnextv2_hub.checkpoints.io import save_checkpoint
    from convnextv2_hub.models.factory import create

    torch.manual_seed(0)
    model = create("atto")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("w") / "atto.safetensors"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data as skimage_data
    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage_data, name)()).save(d / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """sklearn digits as DATA/{train,val}/<class>/*.png: 3 classes, 4 images each per split."""
    from sklearn import datasets
    data = datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    for split, offset in (("train", 0), ("val", 4)):
        for cls in range(3):
            (root / split / f"digit_{cls}").mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(data.target == cls)[offset:offset + 4]):
                img = (data.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(img).resize((32, 32), Image.NEAREST).save(root / split / f"digit_{cls}" / f"{k}.png")
    return root


def test_classify_runs_as_a_script(atto_file, photos):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "classify.py"), str(photos / "chelsea.png"), "--model", "atto",
         "--checkpoint-path", atto_file],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("chelsea.png") and len(lines) == 6  # the path, then the top 5
    probs = [float(line.split("%")[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.5


def test_features(atto_file, photos, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    assert _example("features").main([str(photos / "coffee.png"), "--model", "atto", "--checkpoint-path", atto_file,
                                      "--resolution", "96", "--out-indices", "1", "3", "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "input (1, 3, 96, 96)" in text
    saved = np.load(out)
    assert sorted(saved.files) == ["stage1", "stage3"]
    assert saved["stage1"].shape == (80, 12, 12) and saved["stage3"].shape == (320, 3, 3)


def test_pretrain_fcmae(photos, tmp_path, capsys):
    out = tmp_path / "fcmae.safetensors"
    assert _example("pretrain_fcmae").main([str(photos), "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "step     3" in text and "identical after reload: True" in text
    assert out.exists() and (tmp_path / "fcmae-encoder.safetensors").exists()


def test_finetune_folder_with_the_trainer_api(atto_file, digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert _example("finetune_folder").main([str(digits), "--model", "atto", "--init", atto_file, "--quick",
                                             "--output", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert (out / "checkpoint-last.safetensors").exists()
    assert '"global_step": 3' in text  # 12 train images / batch 4
    assert text.count(", predicted digit_") == 3


@pytest.mark.parametrize("arch", ["mask", "faster"])
def test_detection_backbone(atto_file, arch, capsys):
    assert _example("detection_backbone").main(["--model", "atto", "--checkpoint-path", atto_file, "--quick",
                                                "--arch", arch, "--batch-size", "1"]) == 0
    text = capsys.readouterr().out
    assert ("MaskRCNN" if arch == "mask" else "FasterRCNN") in text
    assert "eval image 0:" in text and "train step losses:" in text
    assert ("loss_mask" in text) == (arch == "mask")
    # Layer decay 0.9 over atto's 12 blocks: the stem trains at 0.9^12 of the heads' lr.
    assert "backbone lr 2.82e-05 (stem) .. 1.00e-04 (heads)" in text


def test_detection_backbone_shapes_and_layer_decay(atto_file):
    det = _example("detection_backbone")
    backbone = det.ConvNeXtV2FPN("atto", checkpoint_path=atto_file, drop_path_rate=0.3)
    with torch.no_grad():
        maps = backbone.eval()(torch.randn(1, 3, 128, 160))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    assert all(m.shape[1] == 256 for m in maps.values())
    assert backbone.body.stages[3][1].drop_path.drop_prob == pytest.approx(0.3)  # the recipe's drop path reaches the model
    detector = det.build_detector("faster", backbone, num_classes=5, min_size=128, max_size=160)
    opt = det.optimizer_for(detector, lr=1e-4, weight_decay=0.05, layer_decay=0.9)
    covered = [p for g in opt.param_groups for p in g["params"]]
    assert len(covered) == len({id(p) for p in covered}) == sum(1 for p in detector.parameters())


def test_export_onnx_and_pil_only_preprocessing(atto_file, photos, tmp_path, capsys):
    import onnxruntime  # noqa: F401  (the example needs it)
    ex = _example("export_onnx")
    out = tmp_path / "atto.onnx"
    assert ex.main([str(photos / "rocket.png"), "--model", "atto", "--checkpoint-path", atto_file,
                    "--image-size", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verification PASSED" in text and "rocket.png (onnxruntime" in text
    assert len([line for line in text.splitlines() if line.startswith("  ") and "%" in line]) == 5
    meta = ex.read_metadata(out)
    assert meta["resolution"] == 64 and len(meta["label_names"]) == 1000

    # The PIL-only preprocessing equals the package's transform for this checkpoint, on non-square
    # photos (portrait and landscape), and ORT's logits equal PyTorch's on it.
    from convnextv2_hub.models.factory import create
    from convnextv2_hub.preprocessing.transforms import eval_transform

    tf = eval_transform(meta["resolution"], meta["crop_pct"], meta["crop_mode"], meta["interpolation"],
                        meta["mean"], meta["std"])
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = create("atto", checkpoint_path=atto_file).eval()
    with Image.open(photos / "rocket.png") as img:
        landscape = img.copy()
    with Image.open(photos / "astronaut.png") as img:
        square = img.copy()
    for img in (landscape, landscape.transpose(Image.ROTATE_90), square):
        ours, ref = ex.preprocess(img, meta), tf(img)
        assert ours.shape == (1, 3, 64, 64)
        assert np.abs(ours[0] - ref.numpy()).max() < 1e-5
        with torch.no_grad():
            expected = model(torch.from_numpy(ours)).numpy()
        assert np.abs(session.run(None, {"input": ours})[0] - expected).max() < 1e-4


def test_nearest_neighbours_finds_an_images_copy(atto_file, photos, tmp_path, capsys):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    shutil.copy(folder / "coffee.png", folder / "coffee_copy.png")
    assert _example("nearest_neighbours").main([str(folder), "--model", "atto", "--checkpoint-path", atto_file,
                                                "--resolution", "64", "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("5 images, 320 features each")
    pairs = dict(line.split("  (cosine")[0].split(" -> ") for line in lines[1:])
    assert len(pairs) == 5 and all(a != b for a, b in pairs.items())
    assert pairs[str(folder / "coffee.png")] == str(folder / "coffee_copy.png")
    assert pairs[str(folder / "coffee_copy.png")] == str(folder / "coffee.png")
    assert "coffee_copy.png  (cosine 1.000)" in "\n".join(lines)
