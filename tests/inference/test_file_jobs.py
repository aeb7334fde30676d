"""Jobs over folders: predictions appended to .jsonl/.csv and resumed after an interruption, embeddings
written atomically with their paths, and Predictor.embed against the model's own pre-logits features."""
import csv
import io
import json
import sys

import numpy as np
import pytest
import torch
from conftest import write_skimage_photos

from convnextv2_hub.inference.file_jobs import embed_files, predict_files
from convnextv2_hub.inference.predictor import Predictor
from convnextv2_hub.inference.result_files import MissingDependencyError, load_embeddings, paths_file
from convnextv2_hub.models.factory import create
from convnextv2_hub.preprocessing.images import open_image
from convnextv2_hub.preprocessing.transforms import eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest
SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create("atto")  # ImageNet head and label names (atto.fcmae_ft_in1k), random weights
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five real photos, one in a sub-folder, and a truncated PNG between them."""
    root = tmp_path_factory.mktemp("photos")
    write_skimage_photos(root, ("astronaut", "coffee", "chelsea", "rocket"))
    (root / "sub").mkdir()
    write_skimage_photos(root / "sub", ("camera",))
    (root / "broken.png").write_bytes((root / "coffee.png").read_bytes()[:3000])
    from convnextv2_hub.preprocessing.images import expand_image_paths

    return expand_image_paths([root])


class Counting:
    """The 64 px transform, counting its calls; raises KeyboardInterrupt (a Ctrl-C) at call ``stop_at``."""

    def __init__(self, stop_at=None):
        self.tf, self.calls, self.stop_at = eval_transform(SIZE), 0, stop_at

    def __call__(self, img):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.tf(img)


def _predictor(model, transform=None, backend="eager"):
    return Predictor(model, backend=backend, batch_size=2, transform=transform or eval_transform(SIZE))


def _read(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_predictions_file_has_one_line_per_image_labels_by_name_and_errors(model, folder, tmp_path, fmt):
    p = _predictor(model)
    out = tmp_path / f"preds.{fmt}"
    summary = predict_files(p, folder, out, topk=3, workers=0, progress=False)
    assert (summary.total, summary.processed, summary.skipped) == (6, 6, 0)
    assert [path for path, _ in summary.errors] == [folder[1]] and folder[1].endswith("broken.png")
    rows = _read(out)
    expected = p.classify(folder, topk=3)
    assert len(rows) == len(folder)
    for row, exp in zip(rows, expected):
        assert row["image"] == exp.source
        if fmt == "jsonl":
            labels, probs, error = [t["label"] for t in row["topk"]], [t["prob"] for t in row["topk"]], row["error"]
        else:
            labels = [row[f"label_{i}"] for i in (1, 2, 3) if row[f"label_{i}"]]
            probs = [float(row[f"prob_{i}"]) for i in (1, 2, 3) if row[f"prob_{i}"]]
            error = row["error"] or None
        assert labels == [label for label, _ in exp.topk]
        assert probs == pytest.approx([pr for _, pr in exp.topk], abs=1e-6)
        assert (error is None) == (exp.error is None)
    assert "cannot read image" in (rows[1]["error"]) and not rows[0]["error"]
    if fmt == "csv":
        assert out.read_text().splitlines()[0] == "image,label_1,prob_1,label_2,prob_2,label_3,prob_3,error"
    # an ImageNet label name, not a class index
    first = rows[0]["topk"][0]["label"] if fmt == "jsonl" else rows[0]["label_1"]
    assert first in p.label_names and not first.startswith("class_")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_interrupted_job_resumes_with_the_rest_and_ends_as_an_uninterrupted_run(model, folder, tmp_path, fmt):
    full = tmp_path / f"full.{fmt}"
    predict_files(_predictor(model), folder, full, topk=2, workers=0, progress=False)
    lines = full.read_bytes().splitlines(keepends=True)
    header = 1 if fmt == "csv" else 0

    out = tmp_path / f"preds.{fmt}"
    # Ctrl-C while the second batch is being read: the first batch (photo 0 and the broken file) is on disk.
    with pytest.raises(KeyboardInterrupt):
        predict_files(_predictor(model, Counting(stop_at=3)), folder, out, topk=2, workers=0, progress=False)
    assert out.read_bytes() == b"".join(lines[:header + 2])
    # A kill in the middle of writing the next line leaves half of it.
    with open(out, "ab") as f:
        f.write(lines[header + 2][: len(lines[header + 2]) // 2])

    again = Counting()
    with pytest.warns(UserWarning, match="cut off an incomplete last line"):
        summary = predict_files(_predictor(model, again), folder, out, topk=2, workers=0, progress=False)
    assert summary.skipped == 2 and summary.processed == 4 and again.calls == 4  # only the rest was read
    assert out.read_bytes() == full.read_bytes()
    # Run once more: nothing left to do, nothing written.
    summary = predict_files(_predictor(model, again), folder, out, topk=2, workers=0, progress=False)
    assert summary.processed == 0 and again.calls == 4 and out.read_bytes() == full.read_bytes()


def test_resume_refuses_a_file_that_is_not_ours_and_overwrite_starts_afresh(model, folder, tmp_path):
    out = tmp_path / "preds.csv"
    predict_files(_predictor(model), folder[:2], out, topk=2, workers=0, progress=False)
    with pytest.raises(ValueError, match="--topk 3.*resume it with the --topk it was written with"):
        predict_files(_predictor(model), folder, out, topk=3, workers=0, progress=False)
    jsonl = tmp_path / "preds.jsonl"
    jsonl.write_text("not json\n{\"image\": \"x\", \"topk\": [], \"error\": null}\n")
    with pytest.raises(ValueError, match="record 1 is not a prediction.*--overwrite"):
        predict_files(_predictor(model), folder, jsonl, topk=2, workers=0, progress=False)
    summary = predict_files(_predictor(model), folder[:1], jsonl, topk=2, workers=0, overwrite=True, progress=False)
    assert summary.processed == 1 and len(_read(jsonl)) == 1
    with pytest.raises(ValueError, match=r"must end in \.jsonl or \.csv"):
        predict_files(_predictor(model), folder, tmp_path / "preds.txt", workers=0)


def test_embed_file_rows_follow_their_paths_and_equal_predictor_embed(model, folder, tmp_path):
    p = _predictor(model)
    readable = [f for f in folder if not f.endswith("broken.png")]
    direct = p.embed(torch.stack([eval_transform(SIZE)(open_image(f)) for f in readable]))
    summary = embed_files(p, folder, tmp_path / "feats.npy", workers=0, progress=False)
    feats, paths = load_embeddings(tmp_path / "feats.npy")
    assert [e for e, _ in summary.errors] == [folder[1]]
    assert paths == readable and paths_file(tmp_path / "feats.npy").read_text().splitlines() == readable
    assert feats.shape == (5, 320) and feats.dtype == np.float32
    assert np.abs(feats - direct.numpy()).max() < 1e-5
    # one worker process decodes: same rows; .npz holds features and paths in one file
    embed_files(p, folder, tmp_path / "feats.npz", workers=1, progress=False)
    npz_feats, npz_paths = load_embeddings(tmp_path / "feats.npz")
    assert npz_paths == readable and np.abs(npz_feats - feats).max() < 1e-6
    # a stage's map, unpooled: atto's stage 1 has 80 channels at 1/8 of 64 px
    embed_files(p, folder, tmp_path / "stage1.npy", stage=1, pool=False, workers=0, progress=False)
    maps, _ = load_embeddings(tmp_path / "stage1.npy")
    assert maps.shape == (5, 80, 8, 8)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["feats.npy", "feats.npz", "feats.paths.txt",
                                                          "stage1.npy", "stage1.paths.txt"]


def test_interrupted_embedding_leaves_the_previous_file(model, folder, tmp_path):
    out = tmp_path / "feats.npz"
    embed_files(_predictor(model), folder[:2], out, workers=0, progress=False)
    before = out.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        embed_files(_predictor(model, Counting(stop_at=4)), folder, out, workers=0, progress=False)
    assert out.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["feats.npz"]


def test_parquet_needs_pyarrow_and_says_so(model, folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match="needs pyarrow.*pip install pyarrow.*npy or .npz"):
        embed_files(_predictor(model), folder, tmp_path / "feats.parquet", workers=0)
    assert list(tmp_path.iterdir()) == []


def test_parquet_round_trip(model, folder, tmp_path):
    pytest.importorskip("pyarrow")
    p = _predictor(model)
    embed_files(p, folder, tmp_path / "feats.npy", workers=0, progress=False)
    embed_files(p, folder, tmp_path / "feats.parquet", workers=0, progress=False)
    (a, pa), (b, pb) = load_embeddings(tmp_path / "feats.npy"), load_embeddings(tmp_path / "feats.parquet")
    assert pa == pb and np.array_equal(a, b)


def test_predictor_embed_is_the_models_pre_logits(model, folder):
    x = torch.stack([eval_transform(SIZE)(open_image(f)) for f in folder[2:5]])
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        stage2 = model.forward_stages(x)[2]
    eager = _predictor(model)
    assert (eager.embed(x) - ref).abs().max() <= 1e-5
    assert (eager.embed(x, stage=2) - stage2.mean(dim=(2, 3))).abs().max() <= 1e-5
    assert (eager.embed(x, stage=2, pool=False) - stage2).abs().max() <= 1e-5
    auto = _predictor(model, backend="auto")
    first, second = auto.embed(x), auto.embed(x)  # calibration in fp32, then the fast path
    assert (first - ref).abs().max() <= 1e-5
    assert torch.nn.functional.cosine_similarity(second, ref, dim=1).min() >= 0.999
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        eager.embed(x, stage=4)
    # An encoder without a head embeds; it cannot classify.
    encoder = create("atto", num_classes=0)
    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    headless = Predictor(encoder, backend="eager")
    assert (headless.embed(x) - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="classifier head"):
        predict_files(headless, folder, "never.jsonl")


def test_same_path_listed_twice_runs_twice_also_on_resume(model, folder, tmp_path):
    out = tmp_path / "twice.jsonl"
    twice = [folder[0], folder[0], folder[2]]
    predict_files(_predictor(model), twice[:2], out, topk=1, workers=0, progress=False)
    summary = predict_files(_predictor(model), twice, out, topk=1, workers=0, progress=False)
    assert summary.skipped == 2 and summary.processed == 1
    assert [r["image"] for r in _read(out)] == twice


def test_a_file_name_that_is_not_utf8_is_written_and_resumed(model, folder, tmp_path):
    import os
    import shutil

    odd = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.png"))  # Latin-1 bytes in the name
    shutil.copy(folder[0], odd)
    out = tmp_path / "preds.jsonl"
    predict_files(_predictor(model), [odd], out, topk=1, workers=0, progress=False)
    assert predict_files(_predictor(model), [odd], out, topk=1, workers=0, progress=False).skipped == 1
    embed_files(_predictor(model), [odd], tmp_path / "feats.npy", workers=0, progress=False)
    assert load_embeddings(tmp_path / "feats.npy")[1] == [odd]
