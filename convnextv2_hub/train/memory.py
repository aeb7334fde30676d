"""Per-GPU memory of one training step, estimated from the variant, resolution, batch and precision.

The trainer prints it before the first step and, on CUDA, turns activation checkpointing on when the
estimate without it would not fit (``auto_grad_checkpointing``). Everything is in bytes.

The peak of a step is reached in the backward pass, when every tensor the forward kept for backward is
still alive, the gradients are being written and (from the second step on) AdamW's state exists:

    total = params + gradients + AdamW state (+ EMA copy) + activations

Activations are counted from the ops of a ConvNeXt V2 block (``models.convnextv2.Block``), per
spatial position of its stage, for a block of width C (a = 2 bytes under fp16/bf16 autocast, 4 in fp32):

    dwconv 7x7 input ...... C * a   (autocast saves the low-precision copy of the fp32 residual stream;
                                     in fp32 it is the block input, i.e. the previous block's output)
    LayerNorm input ........ C * 4   (autocast runs layer_norm in fp32: it saves an fp32 copy)
    LayerNorm mean, rstd ... 2 * 4
    pwconv1 input .......... C * a   (the LayerNorm output; a cast copy under autocast)
    pwconv1 output ......... 4C * a  (GELU's input, saved by GELU)
    GELU output ............ 4C * a  (GRN's input, saved by its ``x * scale``)
    GRN statistic input .... 4C * 4  (autocast only: GRN takes its L2 norm in fp32, on an fp32 copy;
                                     in fp32 ``.float()`` is the same tensor, nothing new)
    pwconv2 input .......... 4C * a  (the GRN output)
    residual ............... 0       (an add keeps nothing; its output is the next block's input)

In fp32 that is 60 C + 8 bytes per position, under autocast 48 C + 8. With activation checkpointing a
block keeps only its input (C * 4, the fp32 stream) and, during backward, one block at a time is
recomputed, so the largest single block is added once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..models.variants import Variant, get_variant, variant_of

GIB = 1024**3
# Turn checkpointing on above this share of the device: the CUDA context, the caching allocator's
# fragmentation and cuDNN workspaces need the rest.
AUTO_CHECKPOINT_FRACTION = 0.9
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of one training step's peak memory per GPU, in bytes."""

    params: int
    gradients: int
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32
    ema: int  # the EMA copy of the weights (0 when off)
    activations: int
    grad_checkpointing: bool

    @property
    def total(self) -> int:
        return self.params + self.gradients + self.optimizer + self.ema + self.activations

    def line(self, device_total: Optional[int] = None) -> str:
        """One log line in GiB; with ``device_total`` (bytes), the device's memory too."""
        ckpt = "on" if self.grad_checkpointing else "off"
        text = (f"memory estimate per GPU: params {self.params / GIB:.2f} GiB, optimiser "
                f"{(self.gradients + self.optimizer + self.ema) / GIB:.2f} GiB (grads, AdamW"
                f"{', EMA' if self.ema else ''}), activations {self.activations / GIB:.2f} GiB "
                f"(checkpointing {ckpt}), total {self.total / GIB:.2f} GiB")
        if device_total is not None:
            text += f"; device memory {device_total / GIB:.1f} GiB"
        return text


def block_params(c: int) -> int:
    """dwconv (49C + C) + LayerNorm (2C) + pwconv1 (4C^2 + 4C) + GRN (8C) + pwconv2 (4C^2 + C)."""
    return 8 * c * c + 65 * c


def encoder_params(depths: Sequence[int], dims: Sequence[int], num_classes: int) -> int:
    """Stem (4x4 conv + LayerNorm), the three 2x2 downsamplings (LayerNorm + conv), the blocks, the
    final LayerNorm and (``num_classes`` > 0) the linear classifier."""
    n = 3 * 16 * dims[0] + dims[0] + 2 * dims[0]
    n += sum(2 * dims[i] + 4 * dims[i] * dims[i + 1] + dims[i + 1] for i in range(3))
    n += sum(d * block_params(c) for d, c in zip(depths, dims))
    n += 2 * dims[-1]
    if num_classes > 0:
        n += dims[-1] * num_classes + num_classes
    return n


def decoder_params(enc_dim: int, dim: int, depth: int, patch_size: int) -> int:
    """FCMAE's 1x1 projection, mask token, decoder blocks and the 1x1 pixel predictor."""
    out = patch_size * patch_size * 3
    return enc_dim * dim + dim + dim + depth * block_params(dim) + dim * out + out


def block_bytes_per_position(c: int, act: int) -> int:
    """What one block keeps for backward at one spatial position (module docstring, term by term)."""
    autocast = act < 4
    dwconv_in = c * act
    ln_in = c * 4
    ln_stats = 2 * 4
    pw1_in = c * act
    pw1_out = 4 * c * act
    gelu_out = 4 * c * act
    grn_fp32 = 4 * c * 4 if autocast else 0
    pw2_in = 4 * c * act
    return dwconv_in + ln_in + ln_stats + pw1_in + pw1_out + gelu_out + grn_fp32 + pw2_in


def stem_bytes(res: int, dims: Sequence[int], act: int) -> int:
    """Per image: the stem conv's input (the image) and LayerNorm input, and each downsampling's
    LayerNorm input (fp32) and conv input (its output, in ``act``)."""
    n = 3 * res * res * act + (res // 4) ** 2 * (dims[0] * 4 + 8)
    for i in range(3):
        n += (res // (4 * 2**i)) ** 2 * (dims[i] * (4 + act) + 8)
    return n


def blocks_activation_bytes(res: int, depths: Sequence[int], dims: Sequence[int], act: int,
                            visible: float, checkpointing: bool) -> int:
    """Per image, all blocks of the encoder. ``visible`` is the share of positions the sparse FCMAE
    path keeps (1 for fine-tuning): all but the dense dwconv input live on visible positions only."""
    kept, largest = 0, 0
    for depth, c, s in zip(depths, dims, (4, 8, 16, 32)):
        pos = (res // s) ** 2
        dense = pos * c * act  # the dwconv runs on the full map, masked positions zero
        one = dense + int(visible * pos * (block_bytes_per_position(c, act) - c * act))
        largest = max(largest, one)
        # Checkpointing: each block keeps its fp32 input (its visible rows when sparse) only.
        kept += depth * (int(visible * pos) * c * 4 if checkpointing else one)
    return kept + (largest if checkpointing else 0)


def estimate(variant: Union[str, Variant], resolution: int, batch: int, precision: str = "fp32", mode: str = "finetune",
             grad_checkpointing: bool = False, ema: bool = False, num_classes: int = 1000,
             mask_ratio: float = 0.6, decoder_dim: int = 512, decoder_depth: int = 1,
             patch_size: int = 32) -> MemoryEstimate:
    """The memory of one training step per GPU (``MemoryEstimate``); ``batch`` is per device,
    ``precision`` one of fp32 / bf16 / fp16 (autocast), ``mode`` finetune or pretrain (FCMAE)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if mode not in ("finetune", "pretrain"):
        raise ValueError(f"mode must be 'finetune' or 'pretrain', got {mode!r}")
    v = get_variant(variant) if isinstance(variant, str) else variant
    act = PRECISIONS[precision]
    if mode == "finetune":
        n_params = encoder_params(v.depths, v.dims, num_classes)
        visible = 1.0
        # Pooled features, final LayerNorm input and the classifier input: a few C per image.
        extra = 3 * v.dims[-1] * 4
    else:
        n_params = encoder_params(v.depths, v.dims, 0) + decoder_params(v.dims[-1], decoder_dim, decoder_depth, patch_size)
        visible = 1.0 - mask_ratio
        grid = (resolution // patch_size) ** 2
        out = patch_size * patch_size * 3
        # Decoder: projection input, mask blend, its blocks (dense on the last-stage grid), the
        # predictor input and output, and the fp32 per-patch target and squared error of the loss.
        extra = grid * (v.dims[-1] * act + 2 * decoder_dim * act
                        + decoder_depth * block_bytes_per_position(decoder_dim, act) + out * (act + 3 * 4))
    acts = batch * (stem_bytes(resolution, v.dims, act)
                    + blocks_activation_bytes(resolution, v.depths, v.dims, act, visible, grad_checkpointing)
                    + extra)
    # Autocast caches a low-precision copy of each weight for the step.
    cast_cache = n_params * act if act < 4 else 0
    return MemoryEstimate(params=n_params * 4 + cast_cache, gradients=n_params * 4, optimizer=n_params * 8,
                          ema=n_params * 4 if ema else 0, activations=acts, grad_checkpointing=grad_checkpointing)


def should_checkpoint(without: MemoryEstimate, device_total: int) -> bool:
    """True when the estimate without checkpointing exceeds ``AUTO_CHECKPOINT_FRACTION`` of the device."""
    return without.total > AUTO_CHECKPOINT_FRACTION * device_total


def device_memory(device: torch.device) -> Optional[int]:
    """The total memory of a CUDA device in bytes; None elsewhere (CPU memory is not the limit here)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def precision_of(cfg: Mapping[str, Any]) -> str:
    """The trainer's autocast choice (``use_amp``, ``amp_dtype``) as fp32 / bf16 / fp16."""
    if not cfg["use_amp"]:
        return "fp32"
    return "bf16" if cfg["amp_dtype"] == "bfloat16" else "fp16"


def estimate_for_model(model: nn.Module, cfg: Mapping[str, Any], mode: str, checkpointing: bool) -> MemoryEstimate:
    """``estimate`` for the trainer's built model (a ConvNeXtV2, or an FCMAE in pre-training): the
    depths, widths, classes and decoder are read from the model, so ``--init`` files are covered."""
    enc = model.encoder if mode == "pretrain" else model
    name = variant_of(enc.depths, enc.dims)
    v = Variant(name or "custom", tuple(enc.depths), tuple(enc.dims))
    kw = dict(num_classes=enc.num_classes)
    if mode == "pretrain":
        # Only the visible-rows path keeps the visible positions alone; dense encoder masking and the
        # UNet decoder's masked-dense stages keep every position. (Decoder parameters and activations
        # are counted as ConvNeXt blocks' whatever the decoder type: a small part of the total.)
        rows_only = model.sparse and model.encoder_masking == "sparse" and model.decoder_type != "unet"
        kw = dict(mask_ratio=model.mask_ratio if rows_only else 0.0, decoder_dim=model.decoder_dim,
                  decoder_depth=model.decoder_depth, patch_size=model.patch_size)
    return estimate(v, cfg["input_size"], cfg["batch_size"], precision_of(cfg), mode, checkpointing,
                    ema=mode == "finetune" and bool(cfg["model_ema"]), **kw)


def plan_grad_checkpointing(model: nn.Module, cfg: Mapping[str, Any], mode: str,
                            device: torch.device) -> Tuple[bool, List[str]]:
    """Whether to checkpoint, and the log lines that say why. ``grad_checkpointing`` true or false is
    the user's choice and kept; null (the default) turns it on only on a CUDA device the estimate
    without it does not fit (``should_checkpoint``); on CPU it stays off."""
    total = device_memory(device)
    chosen = cfg["grad_checkpointing"]
    without = estimate_for_model(model, cfg, mode, False)
    auto = chosen is None and total is not None and should_checkpoint(without, total)
    on = bool(chosen) or auto
    lines = [(estimate_for_model(model, cfg, mode, True) if on else without).line(total)]
    if auto:
        lines.append(f"note: activation checkpointing turned on: the estimate without it, "
                     f"{without.total / GIB:.1f} GiB, exceeds {AUTO_CHECKPOINT_FRACTION:.0%} of the device's "
                     f"{total / GIB:.1f} GiB (set grad_checkpointing=false to keep it off)")
    return on, lines
