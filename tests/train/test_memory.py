"""The per-GPU memory estimate (``train.memory``): its parameter counts, its activations against what
autograd measurably saves for Atto, its monotonicity, and the trainer's automatic activation-checkpointing
decision."""
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


def _saved_activation_bytes(model: torch.nn.Module, loss_fn) -> int:
    """What one forward keeps for the backward pass, measured: the bytes of every tensor autograd saves
    (each storage once; the parameters, counted by the estimate's params term, left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


# The stated tolerance of the activation estimate against the measured saved tensors, without checkpointing.
ACTIVATION_TOLERANCE = 0.10


@pytest.mark.parametrize("mode,res,ckpt", [("finetune", 224, False), ("finetune", 128, False),
                                           ("pretrain", 224, False), ("finetune", 64, True)])
def test_activation_estimate_matches_what_autograd_saves_for_atto(mode, res, ckpt, one_thread):
    torch.manual_seed(0)
    x = torch.randn(2, 3, res, res)
    if mode == "finetune":
        model = convnextv2("atto", num_classes=1000).train()
        model.set_grad_checkpointing(ckpt)
        measured = _saved_activation_bytes(
            model, lambda: torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long)))
    else:
        model = FCMAE("atto").train()
        measured = _saved_activation_bytes(model, lambda: model(x)[0])
    est = estimate("atto", res, 2, "fp32", mode, grad_checkpointing=ckpt).activations
    if ckpt:
        # Checkpointing keeps only each block's input; the estimate adds the one block recomputed at a
        # time during the backward pass, which autograd's saved tensors do not show: an upper bound.
        assert measured <= est <= 4 * measured
    else:
        assert abs(est - measured) <= ACTIVATION_TOLERANCE * measured, (est, measured)
