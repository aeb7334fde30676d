"""convnextv2-train eval reads what a checkpoint says about itself: its size, head, label names and
preprocessing. The evaluation folder's classes are matched to the model's labels by name (ImageNet heads:
names or WordNet ids), by index when the counts agree, or refused with the reason and the fix: never a
silent top-1 of 0 from comparing unrelated classes."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_digits

import convnextv2_hub as cvh
from convnextv2_hub.checkpoints.io import save_checkpoint
from convnextv2_hub.checkpoints.registry import imagenet_class_names, imagenet_wnids
from convnextv2_hub.cli.train import main
from convnextv2_hub.train.evaluation import class_mapping
from convnextv2_hub.train.run import TrainingInputError

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDER = Path("val")  # class_mapping only asks whether the data set is a folder or a file list


@pytest.fixture(scope="module")
def imagenet_atto():
    return cvh.create("atto")  # a 1000-class head with ImageNet's labels (random weights: only labels matter)


def test_imagenet_head_maps_class_folders_by_name_or_wordnet_id(imagenet_atto):
    tabby, espresso = imagenet_class_names().index("tabby"), imagenet_wnids().index("n07920052")
    assert class_mapping(["n07920052", "tabby"], imagenet_atto, FOLDER) == ([espresso, tabby], "by name")
    # ImageNet's own val folder: all 1000 WordNet ids, whose sorted order is the class order.
    assert class_mapping(sorted(imagenet_wnids()), imagenet_atto, FOLDER) == (None, "by name")


def test_imagenet_head_on_unrelated_classes_is_refused_with_the_fix(imagenet_atto):
    with pytest.raises(TrainingInputError) as err:
        class_mapping(["cat", "dog"], imagenet_atto, FOLDER)
    msg = str(err.value)
    assert "has 2 classes but the model has a 1000-class head with its ImageNet-1K labels" in msg
    assert "cat, dog are not among them" in msg and "convnextv2-train finetune" in msg and "n02123045" in msg
    # A file list's labels are the model's class numbers: no names to match, taken as they are.
    assert class_mapping(["0", "1"], imagenet_atto, Path(__file__)) == (None, "by index")


def test_own_labels_map_a_subset_by_name_and_say_when_only_the_order_is_used():
    model = cvh.models.convnextv2.convnextv2("atto", num_classes=3)
    model.label_names = ["ant", "bee", "cat"]
    assert class_mapping(["ant", "cat"], model, FOLDER) == ([0, 2], "by name")
    index, how = class_mapping(["x", "y", "z"], model, FOLDER)
    assert index is None and how.startswith("by index: the class folders (x, y, z) are not the model's labels")
    with pytest.raises(TrainingInputError, match=r"with its labels \(ant, bee, cat\), and x, y are not among them"):
        class_mapping(["x", "y"], model, FOLDER)


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory):
    """val/0 (1 image), val/1 (2), val/2 (3): unequal classes, so a wrong mapping changes top-1."""
    root = tmp_path_factory.mktemp("eval") / "digits"
    write_digits(root, [0, 1, 2], 0, 3)
    for digit, keep in (("0", 1), ("1", 2)):
        for extra in sorted((root / "val" / digit).iterdir())[keep:]:
            extra.unlink()
    shutil.rmtree(root / "train")
    return root


def test_eval_of_a_described_file_needs_no_model_and_matches_labels_by_name(digits_val, tmp_path, capsys):
    model = cvh.create("atto", num_classes=3)
    model.label_names = ["2", "0", "1"]  # the folder's classes, in another order
    with torch.no_grad():  # always predicts the model's class 0, whose name is "2"
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    model.checkpoint = dataclasses.replace(model.checkpoint, resolution=32)  # as the trainer records a 32-px run
    path = save_checkpoint(model, tmp_path / "described.safetensors")
    assert main(["eval", "--init", str(path), "--data", str(digits_val), "--num-workers", "0",
                 "--output", str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["classes"] == "by name" and printed["num_images"] == 6
    assert printed["top1"] == pytest.approx(50.0)  # the 3 images of "2"; index order would give 1 of 6
    written = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert written["model"] == "atto" and written["preprocessing"]["resolution"] == 32  # the file's size


def test_eval_of_an_imagenet_model_on_a_small_folder_is_refused(imagenet_atto, digits_val, tmp_path, capsys):
    path = save_checkpoint(imagenet_atto, tmp_path / "in1k.safetensors")
    assert main(["eval", "--init", str(path), "--data", str(digits_val), "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "has 3 classes but the model has a 1000-class head with its ImageNet-1K labels" in err
    assert "top-1 would compare unrelated classes" in err


def test_eval_of_weights_without_a_head_is_refused(digits_val, tmp_path, capsys):
    encoder = save_checkpoint(cvh.create("atto", num_classes=0), tmp_path / "encoder.safetensors")
    assert main(["eval", "--init", str(encoder), "--data", str(digits_val), "--num-workers", "0"]) == 1
    assert "new, untrained head" in capsys.readouterr().err  # not the top-1 of a random head
    assert main(["eval", "--model", "atto.fcmae", "--pretrained", "--data", str(digits_val)]) == 1
    assert "atto.fcmae is an encoder without a classifier head" in capsys.readouterr().err  # before any download
