"""``convnextv2-train pretrain`` with every FCMAE ablation switch (encoder masking x decoder type): two
steps on real images, the switches in config.json and in the weights file, the encoder file for
fine-tuning the same whatever the decoder, and ``--resume auto`` rebuilding the checkpoint's model
when the command line does not repeat the switches. Each run costs about a second of CPU."""
import json
import warnings

import pytest
import torch
from conftest import write_digits

from convnextv2_hub.cli.train import main
from convnextv2_hub.models.convnextv2 import convnextv2
from convnextv2_hub.models.decoders import DECODERS
from convnextv2_hub.models.factory import create
from convnextv2_hub.models.fcmae import ENCODER_MASKINGS, FCMAE

pytestmark = pytest.mark.usefixtures("one_thread")

# Two optimiser steps per epoch: 4 images of 32 px (upscaled to 64 by the crop), batch 2, Atto.
ARGS = ["--model", "atto", "--num-workers", "0", "--set", "update_freq=1", "--set", "warmup_epochs=0",
        "--set", "batch_size=2", "--set", "input_size=64", "--set", "decoder_embed_dim=32", "--set", "lr=1e-3",
        "--set", "tensorboard=false", "--set", "log_interval=1", "--set", "use_amp=false"]


@pytest.fixture(scope="module")
def four_digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("data") / "digits", [0, 1], 2, 1)


@pytest.mark.parametrize("masking", ENCODER_MASKINGS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_pretrain_runs_and_resumes_with_every_switch(tmp_path, four_digits, masking, decoder):
    out = tmp_path / "pt"
    switches = ["--set", f"decoder={decoder}", "--set", f"encoder_masking={masking}"]
    assert main(["pretrain", "--data", str(four_digits), "--output", str(out), *ARGS, "--set", "epochs=1", *switches]) == 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in steps if e["type"] == "step"] == [1, 2]
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["decoder"], cfg["encoder_masking"], cfg["mask_ratio"]) == (decoder, masking, 0.6)

    weights = out / "checkpoint-last.safetensors"
    m = FCMAE.from_checkpoint(weights)
    assert (m.decoder_type, m.encoder_masking, m.decoder_dim) == (decoder, masking, 32)
    # The encoder is a plain Atto whatever the decoder: fine-tuning loads it from the same file.
    assert set(m.encoder.state_dict()) == set(convnextv2("atto", num_classes=0).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no head, no final norm in an FCMAE file: said, and expected
        clf = create("atto", num_classes=2, checkpoint_path=weights)
    assert torch.equal(clf.stages[3][1].grn.gamma, m.encoder.stages[3][1].grn.gamma)

    if (decoder, masking) != ("unet", "dense"):
        return  # resuming reads the switches the same way for all: one combination checks it
    # Resumed without the switches: the checkpoint's model is rebuilt and trained on.
    assert main(["pretrain", "--data", str(four_digits), "--output", str(out), *ARGS, "--set", "epochs=2",
                 "--resume", "auto"]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["decoder"], cfg["encoder_masking"]) == (decoder, masking)
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in steps if e["type"] == "step"] == [1, 2, 3, 4]
