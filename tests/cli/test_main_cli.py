"""predict() and the `convnextv2` command on real photos."""
import importlib
import json
import subprocess
import sys

import pytest
from conftest import write_skimage_photos
import torch
from PIL import Image

import convnextv2_hub as cvh
from convnextv2_hub.cli.main import main, sample_image_path
from convnextv2_hub.checkpoints.io import save_checkpoint


@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    torch.manual_seed(0)
    model = cvh.create("atto")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return save_checkpoint(model, tmp_path_factory.mktemp("w") / "atto.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_skimage_photos(tmp_path_factory.mktemp("photos"), ("astronaut", "coffee", "camera"))


def test_predict_matches_manual_pipeline(atto_file, photos):
    model = cvh.create("atto", checkpoint_path=atto_file).eval()
    results = cvh.predict(model, photos + [sample_image_path()], topk=3, batch_size=2)
    assert len(results) == 4
    tf = model.checkpoint.transforms()
    names = model.checkpoint.label_names
    with torch.no_grad():
        probs = model(torch.stack([tf(Image.open(p)) for p in photos])).softmax(-1)
    for res, pr in zip(results, probs):
        values, idx = pr.topk(3)
        assert [label for label, _ in res] == [names[i] for i in idx.tolist()]
        assert [p for _, p in res] == pytest.approx(values.tolist(), abs=1e-5)
        assert res[0][1] >= res[1][1] >= res[2][1]


def test_unreadable_files_are_reported_and_others_classified(atto_file, photos, tmp_path):
    model = cvh.create("atto", checkpoint_path=atto_file)
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(open(photos[0], "rb").read()[:2000])
    with pytest.warns(UserWarning) as record:
        results = cvh.predict(model, [photos[0], str(bad), str(truncated), str(tmp_path / "missing.png")])
    assert len(results[0]) == 5
    assert results[1] == [] and results[2] == [] and results[3] == []
    messages = " ".join(str(w.message) for w in record)
    assert "notes.jpg" in messages and "cut.png" in messages and "missing.png" in messages


def test_predict_refuses_headless_model():
    with pytest.raises(ValueError, match="classifier head"):
        cvh.predict(cvh.create("atto.fcmae"), [sample_image_path()])


def test_cli_list_and_info(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == cvh.list_models()
    assert main(["list", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == cvh.list_checkpoints("tiny")
    assert main(["info", "convnextv2_base.fcmae_ft_in22k_in1k_384", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["resolution"] == 384 and info["crop_mode"] == "squash" and info["license"] == "cc-by-nc-4.0"
    assert main(["info", "bse"]) == 1
    assert "base" in capsys.readouterr().err


def test_cli_predict_json_reports_bad_files(atto_file, photos, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    code = main(["predict", photos[1], str(bad), "--model", "atto", "--checkpoint-path", str(atto_file),
                 "--topk", "2", "--json"])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert [len(o["topk"]) for o in out] == [2, 0]
    assert out[0]["error"] is None and "cannot read" in out[1]["error"]


def test_cli_console_script_classifies_bundled_sample(atto_file):
    # The installed entry point, in a fresh process, on the sample photo (what README's command does).
    proc = subprocess.run(
        [sys.executable, "-m", "convnextv2_hub.cli.main", "predict", "--model", "atto", "--checkpoint-path",
         str(atto_file), "--topk", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith("sample.jpg") and "%" in proc.stdout


def test_cli_predict_names_missing_image_before_loading_weights(photos, tmp_path, capsys):
    # The weights path does not exist either: the image check must come first, so no download is started.
    code = main(["predict", photos[0], str(tmp_path / "typo.jpg"), "--model", "atto",
                 "--checkpoint-path", str(tmp_path / "absent.safetensors")])
    assert code == 1
    err = capsys.readouterr().err
    assert "typo.jpg" in err and "no such image" in err and "absent" not in err


def test_cli_predict_batches_no_more_than_the_images(atto_file, photos, monkeypatch, capsys):
    predict_module = importlib.import_module("convnextv2_hub.inference.predictor")  # cvh.predict is the function
    sizes = []

    class RecordingPredictor(predict_module.Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sizes.append(self.batch_size)

    monkeypatch.setattr(predict_module, "Predictor", RecordingPredictor)
    common = ["--model", "atto", "--checkpoint-path", str(atto_file), "--backend", "eager"]
    assert main(["predict", photos[0], photos[1]] + common) == 0  # default --batch-size 16
    assert main(["predict"] + photos + common + ["--batch-size", "2"]) == 0
    assert sizes == [2, 2]
    assert capsys.readouterr().out.count(photos[0]) == 2
