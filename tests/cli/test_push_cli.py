"""``convnextv2 push ... --dry-run DIR`` on a run folder that started from the released weights: the folder
it writes, the card's licence and base model, the EMA choice, and the refusals that come before anything is
written. (Uploading and pulling back: tests/checkpoints/test_hub.py and tests/test_whole_loop.py.)"""
from __future__ import annotations

import json

import huggingface_hub
import pytest

import convnextv2_hub as cvh
from convnextv2_hub.cli.main import main

LABELS = ["apple", "pear", "plum"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fine-tune folder as convnextv2-train leaves it: model and EMA weights, config.json, eval.json; the run
    started from the released atto.fcmae_ft_in1k (--pretrained) and changed two recipe settings."""
    run = tmp_path_factory.mktemp("runs") / "ft"
    run.mkdir()
    model = cvh.create("atto", num_classes=3)
    model.label_names = list(LABELS)
    cvh.save_checkpoint(model, run / "checkpoint-last.safetensors", metadata={"epoch": "3"})
    cvh.save_checkpoint(model, run / "checkpoint-last-ema.safetensors", metadata={"ema": "true"})
    config = {"epochs": 3, "lr": 4e-5, "blr": 2e-4, "batch_size": 8, "update_freq": 1, "smoothing": 0.2,
              "weight_decay": 0.1}
    (run / "config.json").write_text(json.dumps({"run": {
        "mode": "finetune", "model": "atto", "data_path": "/data/fruit", "recipe": "finetune_in1k", "finetune": None,
        "pretrained": True, "effective_batch": 8, "num_classes": 3, "train_images": 24}, "config": config}))
    (run / "eval.json").write_text(json.dumps({"epoch": 2, "top1": 75.0, "top5": 100.0, "loss": 0.7, "num_images": 12,
                                               "ema": {"top1": 83.3, "top5": 100.0, "loss": 0.6, "num_images": 12}}))
    return run


def test_dry_run_of_a_run_from_released_weights(run_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["push", str(run_dir), "--repo", "bob/fruit", "--dry-run", str(out), "--format", "ours,timm",
                 "--ema"]) == 0
    assert "cc-by-nc-4.0" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "config.json", "model.safetensors", "timm/model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["base_checkpoint"] == "atto.fcmae_ft_in1k" and config["license"] == "cc-by-nc-4.0"
    assert config["label_names"] == LABELS and config["peer_formats"] == {"timm": "timm/model.safetensors"}
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.base_model == cvh.get_checkpoint("atto.fcmae_ft_in1k").hf_hub_id
    assert card.data.base_model_relation == "finetune"
    assert [r.metric_value for r in card.data.eval_results] == [83.3, 100.0]  # the EMA's, as pushed
    assert "`weight_decay=0.1`" in card.text and "`/data/fruit`" not in card.text and "`fruit`" in card.text
    assert "weights: EMA" in card.text and "inherited" in card.text
    assert "pretrained_cfg_overlay=dict(file=path, num_classes=3)" in card.text


def test_refusals_come_before_anything_is_written(run_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["push", str(run_dir), "--repo", "bob/fruit", "--dry-run", str(out), "--license", "mit"]) == 1
    assert "CC BY-NC 4.0" in capsys.readouterr().err and not out.exists()
    assert main(["push", str(run_dir), "--repo", "fruit", "--dry-run", str(out)]) == 1
    assert "OWNER/NAME" in capsys.readouterr().err
    assert main(["push", str(run_dir), "--repo", "bob/fruit", "--dry-run", str(out), "--format", "ours,onnx"]) == 1
    assert "unknown format" in capsys.readouterr().err
    out.mkdir()
    assert main(["push", str(tmp_path / "missing"), "--repo", "bob/fruit", "--dry-run", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err  # named before the missing source is looked at
    assert main(["push", str(tmp_path), "--repo", "bob/fruit", "--dry-run", str(tmp_path / "x")]) == 1
    assert "not a convnextv2-train finetune folder" in capsys.readouterr().err
