"""predict() and the `convnextv2` command on real photos."""
import importlib
import json
import shutil
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


def test_cli_predict_expands_folders_recursively_sorted_and_mixed_with_files(atto_file, photos, tmp_path, capsys):
    import shutil

    folder = tmp_path / "album"
    (folder / "trip").mkdir(parents=True)
    shutil.copy(photos[0], folder / "trip" / "b.png")
    shutil.copy(photos[1], folder / "a.png")
    (folder / "notes.txt").write_text("not an image, not listed")
    code = main(["predict", photos[2], str(folder), "--model", "atto", "--checkpoint-path", str(atto_file),
                 "--topk", "2", "--backend", "eager", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [photos[2], str(folder / "a.png"), str(folder / "trip" / "b.png")]
    assert all(len(o["topk"]) == 2 and o["error"] is None for o in out)


def test_cli_predict_empty_folder_is_an_error_before_loading_weights(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code = main(["predict", str(tmp_path / "empty"), "--model", "atto",
                 "--checkpoint-path", str(tmp_path / "absent.safetensors")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no images" in err and "empty" in err and "absent" not in err and len(err.strip().splitlines()) == 1


def test_cli_predict_reports_a_decompression_bomb_and_classifies_the_rest(atto_file, photos, bomb_png, capsys):
    code = main(["predict", photos[0], bomb_png, photos[1], "--model", "atto", "--checkpoint-path",
                 str(atto_file), "--topk", "2", "--backend", "eager", "--json"])
    assert code == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [len(o["topk"]) for o in out] == [2, 0, 2]
    assert "bomb.png" in out[1]["error"] and "exceeds the pixel limit" in out[1]["error"]
    assert "PIL.Image.MAX_IMAGE_PIXELS" in out[1]["error"]
    assert "1 of 3 images could not be read" in captured.err


def test_cli_predict_refuses_a_class_count_that_means_an_untrained_head(atto_file, monkeypatch, capsys):
    import convnextv2_hub.models.factory as factory

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded for a refused head")

    monkeypatch.setattr(factory, "download_checkpoint", no_download)
    # atto_file holds a 1000-class head
    code = main(["predict", "--model", "atto", "--checkpoint-path", str(atto_file), "--num-classes", "10"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "has a 1000-class head but the model has 10 classes" in captured.err
    assert "new, untrained head" in captured.err and "fine-tuning" in captured.err
    code = main(["predict", "--model", "atto", "--num-classes", "10"])  # pretrained: refused before downloading
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert "atto.fcmae_ft_in1k has a 1000-class head, not 10" in captured.err
    # The checkpoint's own class count is fine.
    assert main(["predict", "--model", "atto", "--checkpoint-path", str(atto_file), "--num-classes", "1000",
                 "--topk", "1", "--backend", "eager"]) == 0


def test_cli_predict_refuses_topk_below_one_before_loading_weights(tmp_path, capsys):
    for topk in ("0", "-3"):
        code = main(["predict", "--model", "atto", "--checkpoint-path", str(tmp_path / "absent.safetensors"),
                     "--topk", topk])
        err = capsys.readouterr().err
        assert code == 1 and "topk must be a whole number >= 1" in err and f"got {topk}" in err
        assert "absent" not in err


@pytest.mark.usefixtures("one_thread")  # small tensors: see conftest
def test_cli_predict_output_and_embed_write_files_and_say_what_they_did(atto_file, photos, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in photos[:2]:
        shutil.copy(p, folder)
    (folder / "notes.jpg").write_text("this is not an image")
    common = ["--model", "atto", "--checkpoint-path", str(atto_file), "--workers", "0", "--batch-size", "2",
              "--backend", "eager"]
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(folder), "--output", str(out), "--topk", "2"] + common) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["astronaut.png", "coffee.png", "notes.jpg"]
    assert [len(r["topk"]) for r in rows] == [2, 2, 0] and "cannot read image" in rows[2]["error"]
    err = capsys.readouterr().err
    assert "3 images in" in err and "1 of 3 images could not be read" in err
    assert main(["predict", str(folder), "--output", str(out)] + common) == 0  # resumed: nothing left
    assert "3 already in" in capsys.readouterr().err and len(out.read_text().splitlines()) == 3

    feats = tmp_path / "feats.npy"
    assert main(["embed", str(folder), "--output", str(feats)] + common) == 1
    err = capsys.readouterr().err
    assert "notes.jpg: cannot read image" in err and "feats.paths.txt" in err
    from convnextv2_hub.inference.result_files import load_embeddings

    values, paths = load_embeddings(feats)
    assert values.shape == (2, 320) and paths == [r["image"] for r in rows[:2]]
    # Refused before any weights are read: an unknown format, --no-pool without a stage.
    for bad, match in ((["--output", str(tmp_path / "f.h5")], "must end in .npy or .npz or .parquet"),
                       (["--output", str(feats), "--no-pool"], "--no-pool keeps a stage's whole map")):
        assert main(["embed", str(folder), "--model", "atto", "--checkpoint-path", str(tmp_path / "absent")] + bad) == 1
        assert match in capsys.readouterr().err
