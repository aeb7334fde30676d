"""Verified ONNX and TorchScript export (the ``convnextv2-export`` command).

Every export is written to a temporary file next to the target, run against the PyTorch model at batch
1 and 3 on random and natural images, and only then renamed over the target (``os.replace``): a failed
export or a failed verification never leaves a file behind.

Exporter choice: the legacy TorchScript-based exporter (``dynamo=False``) at opset 18 exports several
times faster than the dynamo exporter and its graph runs faster in ONNX Runtime; both agree with
PyTorch to float rounding. So the legacy exporter is the default (opset 18: ``LayerNormalization`` is
a single node, GRN becomes ``ReduceL2 -> ReduceMean -> Div -> Mul -> Add``).

Precision bounds (checked by the verification step, stated here once):

- fp32: max |logit difference| <= 1e-4 and identical top-1.
- fp16 (``--half``): weights and activations fp16, but GRN's spatial sum of squares stays fp32 (it
  overflows fp16 at real activation sizes); bound: cosine >= 0.999 per image and max |diff| <= 2e-2 x
  max |logit|.
- int8 (``--quantize int8``, ORT dynamic quantization of the MatMul/Gemm weights): cosine >= 0.98 per
  image; top-1 agreement is measured and printed (it depends on the weights: it is a report, not a gate).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints.registry import label_names
from ..files import PathLike, atomic_path, temp_path
from ..models.layers import GRN
from ..models.convnextv2 import ConvNeXtV2
from ..preprocessing.transforms import IMAGENET_MEAN, IMAGENET_STD
from .onnx_runtime import onnx_session

DEFAULT_OPSET = 18
MIN_OPSET = 13  # below 13 ReduceL2/ReduceMean take axes as attributes the exporter no longer emits
MAX_OPSET = 20  # highest opset the legacy exporter of torch 2.x emits
METADATA_FILE = "convnextv2_hub.json"  # TorchScript _extra_files entry
FORMAT_TAG = "convnextv2_hub"

FP32_ATOL = 1e-4
HALF_COSINE = 0.999
HALF_REL_ATOL = 2e-2
INT8_COSINE = 0.98


class ExportError(RuntimeError):
    """Export or verification failed; no output file was written."""


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------
def export_metadata(model: ConvNeXtV2, image_size: Optional[int] = None, precision: str = "fp32",
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a consumer of the exported file needs: the checkpoint's preprocessing and label names."""
    ckpt = getattr(model, "checkpoint", None)
    res = image_size or (ckpt.resolution if ckpt is not None else 224)
    meta: Dict[str, Any] = {
        "format": FORMAT_TAG,
        "checkpoint": ckpt.name if ckpt is not None else None,
        "variant": getattr(model, "variant", None) or (ckpt.variant if ckpt is not None else None),
        "resolution": int(res),
        "num_classes": int(model.num_classes),
        "precision": precision,
        # The checkpoint's evaluation preprocessing; ImageNet defaults when the model has no entry.
        "mean": list(ckpt.mean) if ckpt is not None else list(IMAGENET_MEAN),
        "std": list(ckpt.std) if ckpt is not None else list(IMAGENET_STD),
        "interpolation": ckpt.interpolation if ckpt is not None else "bicubic",
        "crop_pct": float(ckpt.crop_pct) if ckpt is not None else 0.875,
        "crop_mode": ckpt.crop_mode if ckpt is not None else "center",
        "label_names": label_names(model),
        "input_layout": "NCHW, RGB, normalised with mean/std",
        "torch_version": torch.__version__,
    }
    meta.update(extra or {})
    return meta


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata ``export_onnx``/``export_torchscript`` stored in ``path`` (decoded from JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # TorchScript archives are zip files
        files = {METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        if not files[METADATA_FILE]:
            raise ValueError(f"{str(path)!r} is a TorchScript file without convnextv2_hub metadata")
        raw = files[METADATA_FILE]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """Result of running an exported file against PyTorch (fp32 reference) on the same inputs."""

    precision: str
    max_abs_diff: float
    max_abs_logit: float
    min_cosine: float
    top1_agreement: float
    n_images: int
    bound: str
    passed: bool

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"verification {verdict} ({self.precision}, {self.n_images} images at batch 1 and 3): "
                f"max|diff| {self.max_abs_diff:.3e} (max|logit| {self.max_abs_logit:.3g}), "
                f"min cosine {self.min_cosine:.6f}, top-1 agreement {self.top1_agreement:.1%}; bound: {self.bound}")


def _natural_images(size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Three normalised real photos at ``size``: the package's sample photo plus scikit-image's, if any."""
    from PIL import Image

    from ..preprocessing.images import open_image, sample_image_path
    from ..preprocessing.transforms import to_normalized_tensor, to_rgb

    imgs: List[Image.Image] = []
    if Path(sample_image_path()).is_file():
        imgs.append(open_image(sample_image_path()))
    try:
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea"):
            if len(imgs) >= 3:
                break
            imgs.append(to_rgb(getattr(skdata, name)()))
    except ImportError:
        pass
    if not imgs:
        raise ExportError("no natural image for verification: the package's data/sample.jpg is missing")
    while len(imgs) < 3:  # mirrored copies still look natural and give different logits
        imgs.append(imgs[len(imgs) % len(imgs)].transpose(Image.FLIP_LEFT_RIGHT))
    normalize = to_normalized_tensor(mean, std)
    out = []
    for img in imgs[:3]:
        # Short-side resize + centre crop keeps them natural-looking at any export size.
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(normalize(img.crop((left, top, left + size, top + size))))
    return torch.stack(out)


def verification_inputs(size: int, mean: Sequence[float], std: Sequence[float],
                        static_batch: Optional[int] = None, seed: int = 0) -> List[torch.Tensor]:
    """Batches to compare on: random and natural images, at batch 1 and 3 (or the static batch only)."""
    g = torch.Generator().manual_seed(seed)
    natural = _natural_images(size, mean, std)
    sizes = [static_batch] if static_batch else [1, 3]
    batches = []
    for b in sizes:
        batches.append(torch.randn(b, 3, size, size, generator=g))
        reps = math.ceil(b / natural.shape[0])
        batches.append(natural.repeat(reps, 1, 1, 1)[:b].contiguous())
    return batches


def _compare(ref: List[torch.Tensor], out: List[np.ndarray], precision: str) -> VerifyReport:
    r = torch.cat([t.float() for t in ref])
    o = torch.cat([torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in out])
    max_diff = float((r - o).abs().max())
    max_logit = float(r.abs().max())
    cos = float(torch.nn.functional.cosine_similarity(r.double(), o.double(), dim=1).min())
    top1 = float((r.argmax(1) == o.argmax(1)).float().mean())
    if precision == "fp32":
        bound = f"max|diff| <= {FP32_ATOL:g}"
        passed = max_diff <= FP32_ATOL
    elif precision == "fp16":
        bound = f"cosine >= {HALF_COSINE} and max|diff| <= {HALF_REL_ATOL:g} x max|logit|"
        passed = cos >= HALF_COSINE and max_diff <= HALF_REL_ATOL * max(max_logit, 1e-6)
    else:
        bound = f"cosine >= {INT8_COSINE} (top-1 agreement reported)"
        passed = cos >= INT8_COSINE
    passed = passed and math.isfinite(max_diff)
    return VerifyReport(precision, max_diff, max_logit, cos, top1, r.shape[0], bound, passed)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _check_args(model: nn.Module, path: Path, image_size: int, overwrite: bool, static_batch: Optional[int]) -> None:
    if not isinstance(model, ConvNeXtV2):
        raise TypeError(f"expected a ConvNeXtV2, got {type(model).__name__}")
    if model.features_only or model.num_classes <= 0:
        raise ValueError("export needs a model with a classifier head (num_classes > 0)")
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image size must be a positive multiple of 32 (the network downsamples by 32), "
                         f"got {image_size}; try {max(32, round(image_size / 32) * 32)}")
    if static_batch is not None and static_batch < 1:
        raise ValueError(f"--static-batch must be >= 1, got {static_batch}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist; create it first")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass --overwrite (overwrite=True) to replace it")


def _resolution(model: nn.Module, image_size: Optional[int]) -> int:
    if image_size is not None:
        return int(image_size)
    ckpt = getattr(model, "checkpoint", None)
    return int(ckpt.resolution) if ckpt is not None else 224


def _reference(model: ConvNeXtV2, batches: List[torch.Tensor]) -> List[torch.Tensor]:
    with torch.inference_mode():
        return [model(b).float() for b in batches]


def _prepare(model: ConvNeXtV2, half: bool) -> ConvNeXtV2:
    """An eval-mode copy (the caller's model is never changed), in fp16 when ``half``.

    In fp16 GRN still computes its spatial L2 norm in fp32 (``grn_norms`` upcasts fp16 before the
    reduction), so the exported graph carries that Cast and the statistics never overflow; only the
    final scale is cast back to fp16.
    """
    m = copy.deepcopy(model).eval().float()
    if half:
        m = m.half()
        for module in list(m.modules()):
            for name, child in module.named_children():
                if isinstance(child, GRN):
                    setattr(module, name, _HalfGRN(child))
    return m


class _HalfGRN(GRN):
    """GRN for fp16 export: GRN's own statistics and scale, then ``x * scale + beta`` in fp16.

    It differs from ``GRN.apply_scale`` only in avoiding ``addcmul``, whose legacy ONNX symbolic
    multiplies by an fp32 ``value`` constant and so turns the block output into fp32 (ORT then
    rejects the next fp16 LayerNormalization with a type error).
    """

    def __init__(self, grn: GRN) -> None:
        super().__init__(grn.gamma.shape[-1], grn.eps, grn.aggregation, grn.normalization, grn.residual, grn.form)
        self.gamma = grn.gamma
        self.beta = grn.beta

    def apply_scale(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * scale + self.beta


# ------------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------------
def export_onnx(
    model: ConvNeXtV2,
    path: PathLike,
    *,
    image_size: Optional[int] = None,
    opset: int = DEFAULT_OPSET,
    static_batch: Optional[int] = None,
    dynamic_size: bool = False,
    half: bool = False,
    quantize: Optional[str] = None,
    overwrite: bool = False,
    verify: bool = True,
    verbose: bool = False,
) -> Optional[VerifyReport]:
    """Export ``model`` to ONNX at ``path`` (dynamic batch unless ``static_batch``), verify it, write atomically.

    ``dynamic_size`` also leaves height and width free (any multiple of 32; verified at ``image_size``).
    ``half`` stores fp16 weights/activations (GRN statistics in fp32); ``quantize="int8"`` applies ONNX
    Runtime dynamic int8 quantization to the Linear/MatMul weights. Raises ``ExportError`` (and leaves no
    file) when the export fails or the file disagrees with PyTorch beyond the stated bound.
    """
    path = Path(path)
    size = _resolution(model, image_size)
    _check_args(model, path, size, overwrite, static_batch)
    if half and quantize:
        raise ValueError("choose one of half (fp16) and quantize='int8'")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    precision = "fp16" if half else ("int8" if quantize else "fp32")
    meta = export_metadata(model, size, precision, {"opset": opset, "dynamic_batch": static_batch is None, "dynamic_size": dynamic_size,
                                                    "static_batch": static_batch, "exporter": "torch.onnx legacy"})
    m = _prepare(model, half)
    dtype = torch.float16 if half else torch.float32
    example = torch.zeros(static_batch or 2, 3, size, size, dtype=dtype)
    with atomic_path(path) as tmp:
        # int8: the fp32 export is quantized into tmp; its own temp file never outlives this call
        tmp_fp32 = temp_path(path) if quantize else tmp
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is not actionable here
                try:
                    torch.onnx.export(
                        m, (example,), str(tmp_fp32), dynamo=False, opset_version=opset,
                        input_names=["input"], output_names=["logits"],
                        dynamic_axes=_dynamic_axes(static_batch, dynamic_size),
                        do_constant_folding=True,
                    )
                except Exception as exc:  # the exporter raises many types; report one clear error
                    raise ExportError(f"ONNX export failed at opset {opset}: {type(exc).__name__}: {exc}") from exc
            if quantize:
                import logging

                from onnxruntime.quantization import QuantType, quantize_dynamic

                # Its "run pre-processing first" advice concerns static quantization; dynamic needs none.
                root = logging.getLogger()
                level = root.level
                root.setLevel(logging.ERROR)
                try:
                    quantize_dynamic(str(tmp_fp32), str(tmp), weight_type=QuantType.QInt8)
                finally:
                    root.setLevel(level)
            _write_onnx_metadata(tmp, meta)
            report = _verify_onnx(model, tmp, size, static_batch, precision, meta) if verify else None
            if report is not None:
                if verbose:
                    print(report)
                if not report.passed:
                    raise ExportError(f"{path.name}: {report}")
        finally:
            if tmp_fp32 != tmp:
                tmp_fp32.unlink(missing_ok=True)
    return report


def _dynamic_axes(static_batch: Optional[int], dynamic_size: bool) -> Optional[Dict[str, Dict[int, str]]]:
    axes: Dict[str, Dict[int, str]] = {"input": {}, "logits": {}}
    if not static_batch:
        axes["input"][0] = axes["logits"][0] = "batch"
    if dynamic_size:
        axes["input"].update({2: "height", 3: "width"})
    return axes if axes["input"] else None


def _write_onnx_metadata(path: Path, meta: Dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    proto.producer_name = FORMAT_TAG
    onnx.save(proto, str(path))


def _verify_onnx(model: ConvNeXtV2, path: Path, size: int, static_batch: Optional[int], precision: str,
                 meta: Dict[str, Any]) -> VerifyReport:
    sess = onnx_session(path)
    batches = verification_inputs(size, meta["mean"], meta["std"], static_batch)
    ref = _reference(copy.deepcopy(model).eval().float(), batches)
    np_dtype = np.float16 if precision == "fp16" else np.float32
    out = [sess.run(None, {"input": b.numpy().astype(np_dtype)})[0] for b in batches]
    return _compare(ref, out, precision)


# ------------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------------
def export_torchscript(
    model: ConvNeXtV2,
    path: PathLike,
    *,
    image_size: Optional[int] = None,
    half: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    verbose: bool = False,
) -> Optional[VerifyReport]:
    """Script ``model`` (``torch.jit.script``: any batch and size), store metadata, verify, write atomically."""
    path = Path(path)
    size = _resolution(model, image_size)
    _check_args(model, path, size, overwrite, None)
    precision = "fp16" if half else "fp32"
    meta = export_metadata(model, size, precision, {"dynamic_batch": True, "exporter": "torch.jit.script"})
    m = _prepare(model, half)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # TorchScript's deprecation notices: the format is still what C++/LibTorch users load.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                scripted = torch.jit.script(m)
            except Exception as exc:
                raise ExportError(f"torch.jit.script failed: {type(exc).__name__}: {exc}") from exc
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
            loaded = torch.jit.load(str(tmp), map_location="cpu") if verify else None
        report = None
        if loaded is not None:
            batches = verification_inputs(size, meta["mean"], meta["std"])
            ref = _reference(copy.deepcopy(model).eval().float(), batches)
            dtype = torch.float16 if half else torch.float32
            with torch.inference_mode():
                out = [loaded(b.to(dtype)).float().numpy() for b in batches]
            report = _compare(ref, out, precision)
            if verbose:
                print(report)
            if not report.passed:
                raise ExportError(f"{path.name}: {report}")
    return report
