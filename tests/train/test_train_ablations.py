"""The architecture switches as ``convnextv2-train`` config keys: pre-training hands them to the FCMAE
encoder, whose file records them; fine-tuning from it must use the same ones; ``grn_at`` (paper Table
2f) drops GRN at fine-tuning or adds it fresh, saying so in the log. The models are built as the
trainer builds them (``train.models``) from configs resolved as the CLI resolves them; no training
loop runs (the switches change the model, not the loop)."""
from __future__ import annotations

import pytest
import torch

from convnextv2_hub.checkpoints.io import read_arch
from convnextv2_hub.train import config as C
from convnextv2_hub.train.distributed import DistEnv
from convnextv2_hub.train.models import build_finetune_model, build_pretrain_model
from convnextv2_hub.train.run import Run, TrainingInputError
from convnextv2_hub.train.runlog import Logger

LOGGER = Logger(None, DistEnv(0, 1, 0, torch.device("cpu"), False), use_tensorboard=False)


def _run(mode: str, settings, init=None) -> Run:
    cfg, _ = C.resolve(mode, "atto", None, C.parse_set([*settings, "decoder_embed_dim=16"]))
    return Run(mode=mode, model="atto", data_path="unused", output_dir=None, cfg=cfg, init=init and str(init))


@pytest.mark.parametrize("grn_at, line, pre_arch, fine_arch", [
    ("pretrain_only", "dropped the 24 GRN tensors", {}, {"grn": "none"}),
    ("finetune_only", "GRN is freshly initialised", {"grn": "none"}, {}),
])
def test_grn_at_moves_grn_between_pretraining_and_finetuning(grn_at, line, pre_arch, fine_arch, tmp_path, capsys):
    fcmae = build_pretrain_model(_run("pretrain", [f"grn_at={grn_at}"]))
    assert fcmae.encoder.arch_options() == pre_arch
    pre = fcmae.save(tmp_path / "pt.safetensors")  # what the trainer writes after each epoch
    assert read_arch(pre) == pre_arch
    model = build_finetune_model(_run("finetune", [f"grn_at={grn_at}"], init=pre), 2, LOGGER)
    assert model.arch_options() == fine_arch
    assert line in capsys.readouterr().out
    assert torch.equal(model.stages[1][0].pwconv1.weight, fcmae.encoder.stages[1][0].pwconv1.weight)


def test_switches_reach_the_fcmae_encoder_and_must_match_at_finetuning(tmp_path):
    fcmae = build_pretrain_model(_run("pretrain", ["block=v1"]))
    assert fcmae.encoder.arch_options() == {"block": "v1"}
    pre = fcmae.save(tmp_path / "pt.safetensors")
    assert build_finetune_model(_run("finetune", ["block=v1"], init=pre), 2, LOGGER).arch_options() == {"block": "v1"}
    with pytest.raises(TrainingInputError, match="--set block=v1"):
        build_finetune_model(_run("finetune", [], init=pre), 2, LOGGER)
    with pytest.raises(TrainingInputError, match="--set block=v1"):
        build_pretrain_model(_run("pretrain", [], init=pre))  # continuing the pre-training: the same


@pytest.mark.parametrize("setting, message", [
    ("block=v3", "block must be one of"),
    ("grn_at=everywhere", "grn_at must be one of"),
])
def test_bad_switches_are_refused_before_anything_runs(setting, message):
    with pytest.raises(C.ConfigError, match=message):
        C.resolve("finetune", "atto", None, C.parse_set([setting]))
    with pytest.raises(C.ConfigError, match="needs block='v2' and grn='grn'"):
        C.resolve("finetune", "atto", None, C.parse_set(["grn_at=pretrain_only", "grn=se"]))


def test_config_defaults_are_the_models_defaults():
    from convnextv2_hub.models.ablations import ArchOptions

    assert {k: C.KEYS[k][0] for k in C.ARCH_KEYS} == ArchOptions().__dict__
    cfg = C.resolve("pretrain", "atto", None, C.parse_set(["grn_at=finetune_only", "grn_aggregation=l1"]))[0]
    assert C.arch_switches(cfg, "pretrain") == {"grn": "none"}
    assert C.arch_switches(cfg, "finetune") == {"grn_aggregation": "l1"}
