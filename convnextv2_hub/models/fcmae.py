"""FCMAE: the fully convolutional masked autoencoder of ConvNeXt V2 (paper §3), on plain PyTorch.

The encoder is the ordinary :class:`convnextv2_hub.models.convnextv2.ConvNeXtV2` (``m.encoder``; same
class, no copy), so a pre-trained encoder is saved and fine-tuned like any other model. What follows
the authors' ``models/fcmae.py`` and where we deliberately differ:

Masking
    One random mask per image on the final-stage grid (one cell = one 32x32 patch): Gaussian noise,
    ``argsort``, the first ``len_keep = int(L * (1 - mask_ratio))`` cells of the shuffled order are
    kept (19 of 49 at 224 px and ratio 0.6, i.e. 61.2 % masked), 1 = masked. The mask is upsampled
    to every stage by ``repeat_interleave``; since 32 is the encoder's total stride, every stride-2
    window lies wholly inside or outside a patch, which is what makes masked-dense == sparse.

Encoder
    ``sparse=False``: the dense-masked path (``ConvNeXtV2.forward_features(x, mask)``): masked
    positions are zeroed after every spatial op and before GRN; equal to submanifold sparse conv, as
    the authors' JAX code used on TPU. ``sparse=True``: ``forward_features_sparse`` runs every
    per-position op on the visible rows only (``models.sparse``) and keeps only the convs dense. Same
    numbers (forward bit-identical for FCMAE masks, gradients <= 1e-5 relative, tested).
    ``benchmarks/fcmae.py`` compares the two: on CPU the sparse path was never slower, and the more
    is masked the faster it is and the less activation memory it needs, so ``sparse=None`` (auto)
    picks it, on every device (GPU speed was not measured).

GRN
    Statistics per image over its visible positions, as the paper and the authors' dense/JAX code;
    the authors' MinkowskiGRN pools over the whole batch (their issue #86). We do not copy that.

Decoder and loss
    ``proj`` 1x1 conv to ``decoder_dim`` -> ``mask_token`` at masked cells -> ``decoder_depth``
    ConvNeXt V2 Blocks -> ``pred`` 1x1 conv to ``patch_size**2 * 3``. Patches are ordered (row p, col
    q, colour c), colour fastest. With ``norm_pix_loss`` the target is each patch normalised by its
    own mean and unbiased variance (eps 1e-6). The loss is the per-patch MSE summed over masked
    patches of the whole batch divided by their count (not a per-image mean). It is computed in fp32
    for fp16/bf16 predictions and in float64 for a float64 model.

Initialisation
    std 0.02 truncated normal for every conv/linear, zero biases, LayerNorm 1/0, GRN gamma/beta 0,
    ``mask_token`` normal(0.02). The authors' ``FCMAE._init_weights`` re-initialises the whole model
    with timm's default std 1.0 on the depthwise/linear/conv layers (probably MAE's xavier line ported
    without an std; users report NaNs when fine-tuning, their issue #64). We do not copy it, and a
    passed-in encoder is never re-initialised (it may be pre-trained).

Ablation switches (paper §3 and Table 1; defaults are the method above)
    ``encoder_masking="dense"``: §3's "without sparse conv" row. The masked 32x32 patches of the image
    are zeroed once, at the input, and the encoder runs as a plain dense ConvNeXt: its convolutions see
    the zeroed patches and carry that (mask) information into visible positions, which the masked
    computation prevents. Decoder and loss are unchanged (the decoder still puts ``mask_token`` at
    masked cells). ``decoder``: ``"convnext"`` (above), ``"unet"`` / ``"unet_noskip"`` or
    ``"transformer"`` (``models.decoders``; the UNet reads every encoder stage, which the masked-dense
    path computes: same numbers as the sparse path). ``decoder_depth`` / ``decoder_dim`` are Table 1b/1c's
    depth and width for every type. All of them go into ``config()``, so a saved file rebuilds the same
    model; the encoder (``m.encoder``) is the same ConvNeXtV2 whatever the decoder.

Inputs
    H and W must be multiples of 32, and need not be equal (the authors' ``patchify`` asserts a
    square input; nothing in the method needs it). ``patch_size`` must be 32, the encoder's total
    stride: the authors' code has the same coupling (their issue #30) and we fail loudly instead.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.formats import split_fcmae_sparse
from ..checkpoints.io import arch_metadata, read_arch, stage_layout
from ..checkpoints.reading import is_safetensors, read_checkpoint_file, read_metadata, read_state_dict
from ..files import PathLike, atomic_path
from .convnextv2 import ConvNeXtV2, convnextv2, init_weights, upsample_mask
from .decoders import UNET_STRIDE, build_decoder, check_decoder, decoder_from_keys
from .layers import at_least_float32
from .variants import variant_of

ENCODER_STRIDE = 32
FORMAT = "convnextv2_hub.models.fcmae"
FORMAT_VERSION = "1"
ENCODER_MASKINGS = ("sparse", "dense")


# --- masks and patches ----------------------------------------------------------------------------
def gen_random_mask(
    n: int,
    h: int,
    w: int,
    mask_ratio: float,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """(N, h*w) float mask in row-major (h, w) order, 1 = masked, independent per image.

    Exactly ``L - int(L * (1 - mask_ratio))`` cells are masked in every image (authors'
    ``gen_random_mask``): 30 of 49 at 224 px and ratio 0.6.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    length = h * w
    len_keep = int(length * (1 - mask_ratio))
    if generator is not None and device is None:
        device = generator.device
    noise = torch.randn(n, length, device=device, generator=generator)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # rank of each cell's noise
    # A cell is kept when its noise ranks among the len_keep smallest: the authors' shuffle/unshuffle.
    return (ids_restore >= len_keep).float()


def patchify(imgs: torch.Tensor, p: int = 32) -> torch.Tensor:
    """(N, 3, H, W) -> (N, (H/p)*(W/p), p*p*3), each patch ordered (row, col, colour)."""
    n, c, height, width = imgs.shape
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int = 32) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, h*w, p*p*3) -> (N, 3, h*p, w*p)."""
    n = x.shape[0]
    c = x.shape[2] // (p * p)
    x = x.reshape(n, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, h * p, w * p)


# --- the model ------------------------------------------------------------------------------------
class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder around a ConvNeXt V2 encoder.

    ``forward(imgs)`` returns ``(loss, pred, mask)``: the scalar loss, predictions (N, L, p*p*3) in
    :func:`patchify` order and the mask (N, L), 1 = masked, L = (H/32)*(W/32).

    ``encoder_or_variant``: a variant name (the encoder is ``convnextv2(name, num_classes=0,
    drop_path_rate=drop_path_rate)``) or a ConvNeXtV2 used as it is (``drop_path_rate`` is then
    ignored: the encoder keeps its own). The encoder's final ``norm`` (and head, if any) are not used.
    ``sparse``: True = visible-rows fast path, False = dense-masked path, None = auto (sparse).
    ``encoder_masking``: ``"sparse"`` (the masked computation) or ``"dense"`` (zeroed input patches,
    plain dense convs: §3's ablation). ``decoder``: one of ``models.decoders.DECODERS``.
    """

    def __init__(
        self,
        encoder_or_variant: Union[str, ConvNeXtV2] = "atto",
        mask_ratio: float = 0.6,
        patch_size: int = 32,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        sparse: Optional[bool] = None,
        drop_path_rate: float = 0.0,
        encoder_masking: str = "sparse",
        decoder: str = "convnext",
    ) -> None:
        super().__init__()
        if isinstance(encoder_or_variant, ConvNeXtV2):
            # Used as is (weights, drop path and all): it may be pre-trained, so no re-init.
            self.encoder = encoder_or_variant
        elif isinstance(encoder_or_variant, str):
            self.encoder = convnextv2(encoder_or_variant, num_classes=0, drop_path_rate=drop_path_rate)
        else:
            raise TypeError(f"encoder_or_variant must be a variant name or a ConvNeXtV2, got {type(encoder_or_variant)}")
        if patch_size != ENCODER_STRIDE:
            raise ValueError(
                f"patch_size must be {ENCODER_STRIDE}, the encoder's total stride: the mask lives on the "
                f"final-stage grid (one cell per {ENCODER_STRIDE}x{ENCODER_STRIDE} patch), got {patch_size}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        check_decoder(decoder, decoder_dim, decoder_depth)
        if encoder_masking not in ENCODER_MASKINGS:
            raise ValueError(f"encoder_masking must be one of {list(ENCODER_MASKINGS)}, got {encoder_masking!r}")
        if encoder_masking == "dense" and sparse:
            raise ValueError("sparse=True is the masked computation's fast path; encoder_masking='dense' runs "
                             "plain dense convolutions: leave sparse at None")
        self.mask_ratio = float(mask_ratio)
        self.patch_size = patch_size
        self.decoder_dim = decoder_dim
        self.decoder_depth = decoder_depth
        self.norm_pix_loss = bool(norm_pix_loss)
        # Auto = sparse: never slower than dense-masked at any ratio we measured (module docstring).
        self.sparse = True if sparse is None else bool(sparse)
        self.encoder_masking = encoder_masking
        self.decoder_type = decoder

        # Module names are the authors' (proj, mask_token, decoder.{i}, pred) so their keys map 1:1.
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder, out_dim, self.pred_stride = build_decoder(decoder, decoder_dim, decoder_depth, self.encoder.dims[:3])
        # One position of the decoder's output map predicts its pred_stride x pred_stride pixels.
        self.pred = nn.Conv2d(out_dim, self.pred_stride * self.pred_stride * 3, kernel_size=1)
        for part in (self.proj, self.decoder, self.pred):
            part.apply(init_weights)  # std 0.02, zero bias; GRN is zero and LayerNorm 1/0 by construction
        nn.init.normal_(self.mask_token, std=0.02)

    # --- pieces -----------------------------------------------------------------------------------
    def gen_random_mask(
        self, imgs: torch.Tensor, mask_ratio: Optional[float] = None, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """(N, L) mask for ``imgs`` (1 = masked), at ``mask_ratio`` or the model's."""
        n, _, height, width = imgs.shape
        h, w = self._grid(height, width)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return gen_random_mask(n, h, w, ratio, device=imgs.device, generator=generator)

    def _grid(self, height: int, width: int) -> Tuple[int, int]:
        if height % ENCODER_STRIDE or width % ENCODER_STRIDE:
            raise ValueError(f"FCMAE needs H and W multiples of {ENCODER_STRIDE}, got {height}x{width}")
        return height // ENCODER_STRIDE, width // ENCODER_STRIDE

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (N, C3, h, w), with exact zeros at masked cells unless ``encoder_masking`` is
        ``"dense"``; ``mask`` (N, L) or (N, h, w)."""
        return self.forward_encoder_stages(imgs, mask, all_stages=False)[-1]

    def forward_encoder_stages(self, imgs: torch.Tensor, mask: torch.Tensor, all_stages: bool = True) -> list[torch.Tensor]:
        """The encoder's four stage maps (only the last one when ``all_stages`` is False)."""
        n, _, height, width = imgs.shape
        mask = mask.reshape(n, *self._grid(height, width))
        if self.encoder_masking == "dense":
            # Masked patches zeroed at the input only: no mask inside the network (§3's ablation).
            keep = 1.0 - upsample_mask(mask.to(imgs.dtype), ENCODER_STRIDE)
            return self.encoder.forward_stages(imgs * keep.unsqueeze(1))
        if all_stages:
            return self.encoder.forward_stages(imgs, mask)  # masked-dense: the sparse path's numbers
        if self.sparse:
            return [self.encoder.forward_features_sparse(imgs, mask)]
        return [self.encoder.forward_features(imgs, mask)]

    def forward_decoder(self, x: torch.Tensor | list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Encoder map (N, C3, h, w) (the UNet decoders: the list of stage maps) -> predictions (N, h*w, p*p*3)."""
        stages = x if isinstance(x, (list, tuple)) else [x]
        n, _, h, w = stages[-1].shape
        x = self.proj(stages[-1])
        m = mask.reshape(n, 1, h, w).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        if self.pred_stride == UNET_STRIDE:
            if self.decoder.skip and len(stages) != 4:
                raise ValueError("the UNet decoder with skips needs all four encoder stage maps (forward_encoder_stages)")
            pixels = F.pixel_shuffle(self.pred(self.decoder(x, stages[:3])), UNET_STRIDE)  # (N, 3, H, W)
            return patchify(pixels, self.patch_size)
        pred = self.pred(self.decoder(x))
        return pred.flatten(2).transpose(1, 2)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What ``pred`` is compared with: patchified pixels, per-patch normalised if norm_pix_loss."""
        t = patchify(at_least_float32(imgs), self.patch_size)
        if self.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True, correction=1)  # unbiased, as the authors' torch.var
            t = (t - mean) / (var + 1.0e-6) ** 0.5
        return t

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE, summed over the masked patches of the whole batch / their number.

        With no masked patch at all (mask_ratio 0) there is nothing to reconstruct: the loss is 0
        (the authors' 0/0 would be NaN).
        """
        loss = (at_least_float32(pred) - self.target(imgs)).pow(2).mean(dim=-1)
        mask = mask.reshape(loss.shape).to(loss.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self,
        imgs: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        mask_ratio: Optional[float] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, pred, mask)``; ``labels`` is accepted and ignored (the authors' signature).

        ``mask`` (N, L) or (N, h, w), 1 = masked, overrides the random mask; ``generator`` makes the
        random mask reproducible.
        """
        n, _, height, width = imgs.shape
        h, w = self._grid(height, width)
        if mask is None:
            mask = self.gen_random_mask(imgs, mask_ratio, generator)
        else:
            if mask.numel() != n * h * w:
                raise ValueError(f"mask must have N*h*w = {n}*{h}*{w} cells, got shape {tuple(mask.shape)}")
            mask = mask.reshape(n, h * w).to(device=imgs.device, dtype=torch.float32)
        latent = self.forward_encoder_stages(imgs, mask, all_stages=self.decoder_type == "unet")
        pred = self.forward_decoder(latent, mask)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # --- checkpoints ------------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """The hyper-parameters ``from_checkpoint`` needs to rebuild this model."""
        return dict(
            variant=getattr(self.encoder, "variant", None),
            depths=list(self.encoder.depths),
            dims=list(self.encoder.dims),
            mask_ratio=self.mask_ratio,
            patch_size=self.patch_size,
            decoder_dim=self.decoder_dim,
            decoder_depth=self.decoder_depth,
            norm_pix_loss=self.norm_pix_loss,
            decoder=self.decoder_type,
            encoder_masking=self.encoder_masking,
        )

    def save(self, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
        """Write a safetensors file: ``encoder.*`` (our dense layout), ``proj.*``, ``mask_token``,
        ``decoder.*``, ``pred.*``; the hyper-parameters go into the metadata (``config``, with the
        variant), then ``metadata``'s entries (the trainer's: epoch, recipe, ``start``). Written to a
        temporary file in the same folder and moved into place, so a crash never leaves a truncated file."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(self.config())}
        meta.update(arch_metadata(self.encoder))  # the encoder's ablation switches, read back by read_arch
        for k, v in (metadata or {}).items():
            if k in meta:
                raise ValueError(f"metadata key {k!r} is reserved: FCMAE.save writes it from the model")
            meta[str(k)] = str(v)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def from_checkpoint(cls, path_or_state_dict: Union[PathLike, Mapping[str, Any]], **kw: Any) -> "FCMAE":
        """Rebuild an FCMAE from (a) a file written by :meth:`save`, (b) the authors' pre-training
        checkpoint (``{'model': ..., 'args': ...}`` with the Minkowski ``encoder.*`` keys), or a
        state dict of either layout. Architecture (decoder type, depth and width included) comes from
        the tensor names and shapes, the other hyper-parameters (``encoder_masking`` too) from our
        metadata or the authors' ``args``; ``kw`` overrides both.

        The encoder's architecture switches (``ConvNeXtV2.arch_options``) come from the file's ``arch``
        metadata, which :meth:`save` writes. Loading is strict: every decoder key must be present and every shape must match. The only
        keys allowed to be absent are the encoder's final ``norm``/``head``, which FCMAE never uses
        (the authors' checkpoints do not have them); they keep their fresh init.
        """
        sd, config = _read_fcmae_source(path_or_state_dict)
        enc_sd, rest = _split_encoder(sd)
        depths, dims = _encoder_layout(enc_sd)
        if "mask_token" not in rest or "pred.weight" not in rest:
            raise ValueError("not an FCMAE checkpoint: no mask_token / pred.weight (an encoder-only file "
                             "such as the released *_fcmae.pt has no decoder and cannot continue pre-training)")
        decoder_dim = int(rest["mask_token"].shape[1])
        # The decoder's type and depth come from its keys (a state dict without our metadata works too).
        decoder, decoder_depth = decoder_from_keys(rest)
        patch_size = ENCODER_STRIDE
        if decoder in ("convnext", "transformer"):  # one position predicts its whole patch
            patch_size = int(round(math.sqrt(rest["pred.weight"].shape[0] / 3)))
        args: Dict[str, Any] = dict(mask_ratio=0.6, norm_pix_loss=True)
        args.update({k: v for k, v in config.items() if k in ("mask_ratio", "norm_pix_loss", "encoder_masking")})
        args.update(patch_size=patch_size, decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder=decoder)
        args.update(kw)
        drop_path_rate = args.pop("drop_path_rate", 0.0)
        arch = read_arch(path_or_state_dict) or {}  # a Mapping (a state dict) says nothing: the defaults
        encoder = ConvNeXtV2(depths=depths, dims=dims, num_classes=0, drop_path_rate=drop_path_rate, **arch)
        encoder.variant = variant_of(depths, dims) or config.get("variant")
        model = cls(encoder, **args)

        full = {f"encoder.{k}": v for k, v in enc_sd.items()}
        full.update(rest)
        own = model.state_dict()
        for k, v in list(full.items()):
            # GRN is (1,1,1,D) here, (1,D) in sparse files: reshape to ours rather than skip (the
            # authors' loader silently leaves mis-shaped GRN at zero).
            if k in own and ".grn." in k and v.shape != own[k].shape and v.numel() == own[k].numel():
                full[k] = v.reshape(own[k].shape)
        optional = ("encoder.norm.", "encoder.head.")
        missing, unexpected = model.load_state_dict(full, strict=False)
        missing = [k for k in missing if not k.startswith(optional)]
        unexpected = [k for k in unexpected if not k.startswith("encoder.head.")]  # a classifier's head
        if missing or unexpected:
            raise ValueError(f"FCMAE checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        return model


def _read_fcmae_source(source: Union[PathLike, Mapping[str, Any]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """-> (flat state dict, hyper-parameters found alongside it: our metadata or the authors' args)."""
    config: Dict[str, Any] = {}
    obj: Any = source
    if not isinstance(source, Mapping):
        path = Path(source)
        if path.is_file() and is_safetensors(path):
            meta = read_metadata(path)
            if meta.get("format") == FORMAT:
                config = json.loads(meta["config"])
        elif path.is_file():
            # The authors' {'model', 'optimizer', 'epoch', 'scaler', 'args'} as a dict, to see 'args'.
            obj = read_checkpoint_file(path)
    if isinstance(obj, Mapping):
        config.update(_args_config(obj.get("args")))
    # read_state_dict does the reading of paths (weights_only / safetensors, folders), the unwrapping
    # of {'model': ...} and the error messages for broken files.
    return read_state_dict(obj), config


def _args_config(args: Any) -> Dict[str, Any]:
    """mask_ratio / norm_pix_loss from the authors' argparse.Namespace (or a dict of it)."""
    if isinstance(args, argparse.Namespace):
        items: Mapping[str, Any] = vars(args)
    elif isinstance(args, Mapping):
        items = args
    else:
        return {}
    out: Dict[str, Any] = {}
    if "mask_ratio" in items:
        out["mask_ratio"] = float(items["mask_ratio"])
    if "norm_pix_loss" in items:
        out["norm_pix_loss"] = bool(items["norm_pix_loss"])
    return out


def _split_encoder(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """-> (encoder in our layout, decoder side). ``split_fcmae_sparse`` converts the authors'
    Minkowski encoder keys (kernel (kv, in, out) with swapped spatial axes, .ln./.linear., (1, C)
    biases and GRN) and passes our dense ``encoder.*`` keys through unchanged."""
    if not any(k.startswith("encoder.") for k in sd):
        raise ValueError("not an FCMAE checkpoint: no encoder.* keys")
    enc_sd, rest = split_fcmae_sparse(sd)
    return dict(enc_sd), dict(rest)


def _encoder_layout(enc_sd: Mapping[str, torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(depths, dims) of encoder weights in our layout; every stage must be there."""
    dims, depths = stage_layout(enc_sd)
    if dims is None or depths is None or 0 in depths:
        raise ValueError(f"encoder weights lack a stage: found dims {dims}, depths {depths} (4 stages needed)")
    return depths, dims


__all__ = [
    "ENCODER_MASKINGS",
    "FCMAE",
    "gen_random_mask",
    "patchify",
    "unpatchify",
    "upsample_mask",
]
