"""Checkpoints of ours describe themselves: head size, label names, preprocessing and base checkpoint are
written by save_checkpoint and read back by create / load_checkpoint / load_classifier / the trainer's files.
Files without the description (timm's, older ones of ours) load as before."""
import json
import os
import shutil
import warnings

import pytest
import torch
from conftest import write_digits

import convnextv2_hub as cvh
from convnextv2_hub.checkpoints.io import (
    load_checkpoint,
    read_description,
    read_metadata,
    save_checkpoint,
)
from convnextv2_hub.checkpoints.registry import get_checkpoint
from convnextv2_hub.cli.main import main as cli_main
from convnextv2_hub.inference.predictor import load_classifier
from convnextv2_hub.preprocessing.images import sample_image_path

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"]


@pytest.fixture
def named_file(tmp_path):
    torch.manual_seed(0)
    model = cvh.create("atto", num_classes=10).eval()
    model.label_names = list(NAMES)
    return model, save_checkpoint(model, tmp_path / "named.safetensors")


def test_metadata_keeps_existing_keys_and_adds_the_description(named_file):
    _, path = named_file
    meta = read_metadata(path)
    assert meta["format"] == "convnextv2_hub" and meta["variant"] == "atto" and meta["num_classes"] == "10"
    assert meta["tag"] == "fcmae_ft_in1k" and "base_checkpoint" not in meta  # built, not loaded: no released weights
    assert json.loads(meta["label_names"]) == NAMES
    ck = get_checkpoint("atto")
    assert json.loads(meta["preprocessing"]) == {
        "resolution": ck.resolution, "crop_pct": ck.crop_pct, "crop_mode": ck.crop_mode,
        "interpolation": ck.interpolation, "mean": list(ck.mean), "std": list(ck.std)}


def test_create_without_num_classes_builds_the_described_head_and_names(named_file):
    model, path = named_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "keeping the model's own head" warning: the file's head is used
        loaded = cvh.create("atto", checkpoint_path=path).eval()
    assert loaded.num_classes == 10 and loaded.label_names == NAMES
    assert loaded.checkpoint.num_classes == 10 and loaded.checkpoint.name == "atto.fcmae_ft_in1k"
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    top = cvh.predict(loaded, [sample_image_path()], topk=3)[0]
    assert len(top) == 3 and all(name in NAMES for name, _ in top)


def test_create_without_a_name_builds_the_size_the_file_holds(named_file):
    model, path = named_file
    loaded = cvh.create(checkpoint_path=path)
    assert loaded.variant == "atto" and loaded.label_names == NAMES and loaded.weights_file == str(path)
    with pytest.raises(ValueError, match="holds a ConvNeXt V2-Atto, not 'tiny'"):
        cvh.create("tiny", checkpoint_path=path)  # refused from the metadata, before a Tiny is built


def test_explicit_other_num_classes_still_means_a_fresh_head_without_the_names(named_file):
    _, path = named_file
    with pytest.warns(UserWarning, match="10-class head but the model has 4 classes"):
        model = cvh.create("atto", checkpoint_path=path, num_classes=4)
    assert model.num_classes == 4 and getattr(model, "label_names", None) is None
    assert cvh.checkpoints.registry.label_names(model) == [f"class_{i}" for i in range(4)]


def test_model_without_real_names_records_none(tmp_path):
    path = save_checkpoint(cvh.create("atto", num_classes=5), tmp_path / "plain.safetensors")
    assert "label_names" not in read_metadata(path)  # class_0.. is a fallback, not a name worth storing
    assert cvh.create("atto", checkpoint_path=path).num_classes == 5
    imagenet = read_description(save_checkpoint(cvh.create("atto"), tmp_path / "in1k.safetensors"))
    assert imagenet.num_classes == 1000 and imagenet.label_names == get_checkpoint("atto").label_names


def test_preprocessing_survives_a_round_trip(tmp_path):
    entry = get_checkpoint("nano.fcmae_ft_in22k_in1k_384")
    assert (entry.resolution, entry.crop_mode) == (384, "squash")
    model = cvh.create("nano.fcmae_ft_in22k_in1k_384", num_classes=3)
    model.label_names = ["a", "b", "c"]
    path = save_checkpoint(model, tmp_path / "n384.safetensors")
    loaded = cvh.create("nano", checkpoint_path=path)  # the variant's default entry is 224 centre-crop
    ck = loaded.checkpoint
    assert (ck.resolution, ck.crop_pct, ck.crop_mode, ck.interpolation) == (384, 1.0, "squash", entry.interpolation)
    assert ck.num_classes == 3 and loaded.label_names == ["a", "b", "c"]
    assert loaded.base_checkpoint is None  # built untrained: the file claims no released weights
    from PIL import Image

    assert loaded.checkpoint.transforms()(Image.open(sample_image_path())).shape == (3, 384, 384)


def test_load_checkpoint_into_a_bare_model_applies_the_description(named_file):
    _, path = named_file
    bare = cvh.models.convnextv2.convnextv2("atto", num_classes=10)
    load_checkpoint(bare, path)
    assert bare.label_names == NAMES and bare.checkpoint.resolution == 224


def test_timm_layout_and_older_files_load_as_before(named_file, tmp_path):
    model, _ = named_file
    timm_file = save_checkpoint(model, tmp_path / "timm.safetensors", format="timm")
    assert read_description(timm_file) is None
    with pytest.warns(UserWarning, match="10-class head but the model has 1000 classes"):
        fresh = cvh.create("atto", checkpoint_path=timm_file)
    assert fresh.num_classes == 1000 and fresh.checkpoint == get_checkpoint("atto")
    ten = cvh.create("atto", checkpoint_path=timm_file, num_classes=10)
    assert getattr(ten, "label_names", None) is None and ten.checkpoint == get_checkpoint("atto")
    # A file of ours from before the description: only format/variant/num_classes (and its tensors).
    old = tmp_path / "old.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old),
              metadata={"format": "convnextv2_hub", "variant": "atto", "num_classes": "10"})
    desc = read_description(old)
    assert desc.label_names is None and desc.preprocessing is None
    older = cvh.create("atto", checkpoint_path=old)
    assert older.num_classes == 10 and older.checkpoint == get_checkpoint("atto")
    assert getattr(older, "label_names", None) is None


def test_foreign_entries_of_older_files_are_ignored_with_a_warning(named_file, tmp_path):
    model, _ = named_file
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bad),
              metadata={"format": "convnextv2_hub", "num_classes": "10", "label_names": "cats and dogs",
                        "preprocessing": '{"resolution": 224}'})
    with pytest.warns(UserWarning) as caught:
        loaded = cvh.create("atto", checkpoint_path=bad)
    said = " ".join(str(w.message) for w in caught)
    assert "bad.safetensors: metadata 'label_names' is ignored" in said and "'preprocessing' is ignored" in said
    assert loaded.num_classes == 10 and getattr(loaded, "label_names", None) is None
    assert loaded.checkpoint == get_checkpoint("atto")


def test_description_keys_are_reserved_for_the_model(named_file, tmp_path):
    model, _ = named_file
    with pytest.raises(ValueError, match="'label_names' is reserved"):
        save_checkpoint(model, tmp_path / "x.safetensors", metadata={"label_names": '["a"]'})
    with pytest.raises(ValueError, match="'base_checkpoint' is reserved"):  # built untrained: it has none
        save_checkpoint(model, tmp_path / "y.safetensors", metadata={"base_checkpoint": "atto.fcmae_ft_in1k"})
    model.base_checkpoint = "atto.fcmae_ft_in1k"
    save_checkpoint(model, tmp_path / "y.safetensors", metadata={"base_checkpoint": "atto.fcmae_ft_in1k"})  # agrees


def test_load_classifier_takes_the_described_head(named_file):
    _, path = named_file
    model = load_classifier("atto", checkpoint_path=path)
    assert model.num_classes == 10 and model.label_names == NAMES
    with pytest.raises(ValueError, match="10-class head"):
        load_classifier("atto", checkpoint_path=path, num_classes=7)


def test_trainer_checkpoint_names_the_folders_classes(tmp_path, capsys):
    from convnextv2_hub.cli.train import main as train_main

    data = write_digits(tmp_path / "digits", [0, 1], 16, 4)
    words = {"0": "zero", "1": "one"}
    for split in ("train", "val"):
        for digit, word in words.items():
            shutil.move(str(data / split / digit), str(data / split / word))
    out = tmp_path / "ft"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["finetune", "--model", "atto", "--data", str(data), "--output", str(out), "--init", "none", "--num-workers", "0",
                           "--set", "update_freq=1", "--set", "warmup_epochs=0", "--set", "use_amp=false",
                           "--set", "epochs=1", "--set", "batch_size=16", "--set", "input_size=32"]) == 0
    finally:
        torch.set_num_threads(n)
    weights = out / "checkpoint-last.safetensors"
    assert json.loads(read_metadata(weights)["label_names"]) == ["one", "zero"]  # ImageFolder's sorted order
    for ema in out.glob("*ema*.safetensors"):
        assert json.loads(read_metadata(ema)["label_names"]) == ["one", "zero"]
    capsys.readouterr()
    assert cli_main(["predict", sample_image_path(), "--checkpoint-path", str(weights),  # no --model: the file's size
                     "--topk", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["topk"]
    assert sorted(entry[0] if isinstance(entry, list) else entry["label"] for entry in top) == ["one", "zero"]
    assert os.path.getsize(weights) > 0
