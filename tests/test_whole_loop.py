"""The whole loop a user runs with a folder of their own images, through the commands they type:
``convnextv2-train finetune`` -> ``convnextv2 predict`` (labels by the folder's names) -> ``convnextv2-export``
-> ``convnextv2 push`` (to a loopback Hub) -> ``create("hf-hub:...")`` in a fresh cache (same logits), and
``convnextv2 predict`` / ``convnextv2-train eval`` with ``--model hf-hub:...``."""
from __future__ import annotations

import json

import huggingface_hub
import torch
from conftest import tiny_finetune_argv, write_digits

import convnextv2_hub as cvh
from convnextv2_hub.cli.export import main as export_main
from convnextv2_hub.cli.main import main as cli_main
from convnextv2_hub.cli.train import main as train_main
from convnextv2_hub.inference.export import read_metadata

NAMES = {"0": "zero", "1": "one", "7": "seven"}


def test_folder_finetune_predict_export_push_pull(pushable_hub, tmp_path, monkeypatch, capsys, one_thread):
    data = write_digits(tmp_path / "my_digits", list(map(int, NAMES)), 4, 1)
    for split in ("train", "val"):
        for digit, name in NAMES.items():
            (data / split / digit).rename(data / split / name)  # class folders named as a user would
    run = tmp_path / "run"
    assert train_main(tiny_finetune_argv(data, run, "--set", "epochs=1", "--set", "lr=1e-3")) == 0
    weights = run / "checkpoint-last.safetensors"

    capsys.readouterr()
    assert cli_main(["predict", str(data / "val"), "--model", "atto", "--checkpoint-path", str(weights),
                     "--topk", "3", "--json", "--backend", "eager"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert len(local) == 3 and all({t["label"] for t in p["topk"]} == set(NAMES.values()) for p in local)

    exported = tmp_path / "model.pt"
    assert export_main(["atto", "--checkpoint-path", str(weights), "--torchscript", str(exported),
                        "--image-size", "32"]) == 0
    assert read_metadata(exported)["label_names"] == sorted(NAMES.values())

    assert cli_main(["push", str(run), "--repo", "me/my-digits"]) == 0
    files = pushable_hub.head("me/my-digits")
    card = huggingface_hub.ModelCard(files["README.md"].decode())
    assert card.data.license == "mit"  # trained from random weights: the package's licence by default
    assert "random weights" in card.text and "`my_digits`" in card.text and "finetune_in1k" in card.text
    assert "`epochs=1`" in card.text  # the --set that changed the recipe
    assert card.data.eval_results[0].metric_type == "accuracy"

    monkeypatch.setenv("HF_HOME", str(tmp_path / "fresh_home"))
    pulled = cvh.create("hf-hub:me/my-digits", pretrained=True, progress=False).eval()
    trained = cvh.create("atto", checkpoint_path=weights).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pulled(x), trained(x), atol=0, rtol=0)
    assert pulled.label_names == sorted(NAMES.values())

    capsys.readouterr()
    assert cli_main(["predict", str(data / "val"), "--model", "hf-hub:me/my-digits", "--topk", "3", "--json",
                     "--backend", "eager"]) == 0
    assert json.loads(capsys.readouterr().out) == local  # the same images, the same answers
    assert train_main(["eval", "--model", "hf-hub:me/my-digits", "--data", str(data), "--num-workers", "0",
                       "--set", "batch_size=8"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["num_images"] == 3 and 0 <= evaluated["top1"] <= 100
