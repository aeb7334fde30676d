"""The per-GPU memory estimate (``train.memory``): its parameter counts, its monotonicity, and the
trainer's automatic activation-checkpointing decision."""
from __future__ import annotations


import pytest
import torch

from convnextv2_hub.models.convnextv2 import convnextv2, count_params
from convnextv2_hub.models.fcmae import FCMAE
from convnextv2_hub.train import config as C
from convnextv2_hub.train import memory
from convnextv2_hub.train.memory import GIB, estimate, plan_grad_checkpointing


def test_param_counts_match_the_models():
    assert estimate("atto", 224, 1).params == 4 * count_params(convnextv2("atto"))
    fcmae = FCMAE("atto")
    assert estimate("atto", 224, 1, mode="pretrain").params == 4 * count_params(fcmae)
    # Dense encoder masking computes (and keeps) every position, the visible-rows path 40 % of them.
    cfg = dict(C.defaults(), batch_size=8, input_size=224)
    dense = FCMAE(fcmae.encoder, encoder_masking="dense")
    rows = memory.estimate_for_model(fcmae, cfg, "pretrain", False).activations
    assert memory.estimate_for_model(dense, cfg, "pretrain", False).activations > 1.5 * rows


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_monotonic(mode, precision):
    base = estimate("tiny", 224, 32, precision, mode)
    assert estimate("tiny", 224, 64, precision, mode).total > base.total
    assert estimate("tiny", 384, 32, precision, mode).total > base.total
    assert estimate("base", 224, 32, precision, mode).total > base.total
    ckpt = estimate("tiny", 224, 32, precision, mode, grad_checkpointing=True)
    assert ckpt.activations < base.activations
    assert ckpt.params == base.params and ckpt.optimizer == base.optimizer


def test_autocast_keeps_fewer_activation_bytes_and_ema_adds_a_copy():
    assert estimate("tiny", 224, 32, "bf16").activations < estimate("tiny", 224, 32, "fp32").activations
    assert estimate("tiny", 224, 32, ema=True).ema == estimate("tiny", 224, 32).gradients


def test_huge_at_512_needs_checkpointing_on_an_80gb_gpu():
    # The figure: ~100 GB of activations without checkpointing, far less with it.
    without = estimate("huge", 512, 32, "bf16")
    with_ckpt = estimate("huge", 512, 32, "bf16", grad_checkpointing=True)
    assert memory.should_checkpoint(without, 80 * 10**9)
    assert not memory.should_checkpoint(with_ckpt, 80 * 10**9)


def _cfg(**kw):
    cfg = C.defaults()
    cfg.update(input_size=512, batch_size=32, use_amp=True, amp_dtype="bfloat16", **kw)
    return cfg


def test_auto_switch_on_when_the_estimate_exceeds_the_device(monkeypatch):
    model = _HugeStandIn()
    monkeypatch.setattr(memory, "device_memory", lambda device: 80 * GIB)
    on, lines = plan_grad_checkpointing(model, _cfg(), "finetune", torch.device("cuda"))
    assert on and len(lines) == 2 and "turned on" in lines[1] and "device memory 80.0 GiB" in lines[0]
    # The user's explicit false is kept; no auto line.
    on, lines = plan_grad_checkpointing(model, _cfg(grad_checkpointing=False), "finetune", torch.device("cuda"))
    assert not on and len(lines) == 1
    # A big enough device: stays off.
    monkeypatch.setattr(memory, "device_memory", lambda device: 10_000 * GIB)
    on, lines = plan_grad_checkpointing(model, _cfg(), "finetune", torch.device("cuda"))
    assert not on and len(lines) == 1


def test_cpu_only_prints():
    model = _HugeStandIn()
    on, lines = plan_grad_checkpointing(model, _cfg(), "finetune", torch.device("cpu"))
    assert not on and lines == [estimate("huge", 512, 32, "bf16", num_classes=10).line()]
    on, _ = plan_grad_checkpointing(model, _cfg(grad_checkpointing=True), "finetune", torch.device("cpu"))
    assert on


class _HugeStandIn(torch.nn.Module):
    """What the planner reads of a Huge classifier, without allocating its 660M weights."""

    depths = (3, 3, 27, 3)
    dims = (352, 704, 1408, 2816)
    num_classes = 10
