"""Classify images with a ConvNeXtV2, using the preprocessing and labels of its checkpoint.

``classify``/``predict`` run a model as it is; ``Predictor`` picks a fast inference backend for it
(eager / torch.compile / ONNX Runtime, fp32 / bf16 / fp16, channels_last) without modifying it.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from ..checkpoints.registry import get_checkpoint, label_names
from ..models.convnextv2 import ConvNeXtV2
from ..preprocessing.image_folder import default_transform
from ..preprocessing.images import UNREADABLE_IMAGE_ERRORS, open_image
from . import compiled_store

if TYPE_CHECKING:
    from .compile_backend import CompiledConvNeXtV2

ImageInput = Union[str, os.PathLike, Image.Image]

# The stem (stride 4) and the three 2x downsamplings divide the input by 32: below 32 px a stage has no
# pixels left and the conv (or ONNX Runtime) fails with an error that does not say why.
MIN_INPUT_SIZE = 32


@dataclass
class Prediction:
    """Top-k result for one input; ``error`` is set (and ``topk`` empty) when the input could not be read."""

    source: str
    topk: List[Tuple[str, float]] = field(default_factory=list)
    error: Optional[str] = None


def _load(item: ImageInput) -> Image.Image:
    """A PIL image as given; a file decoded now, so a truncated one fails here and is reported for it alone."""
    return item if isinstance(item, Image.Image) else open_image(item)


def classify(
    model: ConvNeXtV2,
    images: Iterable[ImageInput],
    topk: int = 5,
    batch_size: int = 16,
    transform: Optional[Callable] = None,
    device: Union[str, torch.device, None] = None,
) -> List[Prediction]:
    """Classify files or PIL images; unreadable inputs get a Prediction with ``error`` set."""
    _require_head(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    in_chans = model.downsample_layers[0][0].in_channels

    def run(batch: torch.Tensor) -> torch.Tensor:
        check_batch(batch, channels=in_chans)
        with torch.inference_mode():
            return model(batch.to(device))

    was_training = model.training
    model.eval()
    try:
        return _classify_with(run, images, label_names(model), transform or default_transform(model),
                              topk, batch_size, model.num_classes)
    finally:
        model.train(was_training)


def _require_head(model: ConvNeXtV2) -> None:
    if model.features_only or model.num_classes <= 0:
        raise ValueError("predict needs a model with a classifier head (num_classes > 0); "
                         "create it from a fine-tuned checkpoint, e.g. create('tiny', pretrained=True)")


def check_topk(topk: int) -> None:
    """Refuse ``topk < 1`` (it used to become 1 without a word); a ``topk`` above the class count gives all."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a whole number >= 1 (how many labels to report per image), got {topk!r}")


def check_batch(x: torch.Tensor, channels: int = 3) -> None:
    """Refuse, before any backend runs, a batch the model would misread or fail on with a raw error."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"expected an N x {channels} x H x W batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        # A uint8 image tensor would be taken as already normalised and give confident nonsense.
        raise TypeError(
            f"expected a normalised floating-point batch, got dtype {x.dtype}: preprocess images with the "
            "checkpoint's transforms (model.checkpoint.transforms() or cvh.create_transform(name)), "
            "or pass the files or PIL images to predict()")
    h, w = x.shape[-2:]
    if min(h, w) < MIN_INPUT_SIZE:
        raise ValueError(
            f"input of {h} x {w} px is too small: ConvNeXt V2 needs at least {MIN_INPUT_SIZE} x {MIN_INPUT_SIZE} "
            f"px (it downsamples by 32; a multiple of 32 is recommended)")


def topk_labels(logits: torch.Tensor, names: Sequence[str], k: int) -> List[List[Tuple[str, float]]]:
    """Per row of ``logits``: the ``k`` most probable ``(label, probability)`` after a softmax, best first."""
    values, indices = logits.float().softmax(dim=-1).topk(k, dim=-1)
    return [[(names[j], p) for j, p in zip(i, v)] for v, i in zip(values.tolist(), indices.tolist())]


def _classify_with(
    run: Callable[[torch.Tensor], torch.Tensor],
    images: Iterable[ImageInput],
    names: Sequence[str],
    transform: Callable,
    topk: int,
    batch_size: int,
    num_classes: int,
) -> List[Prediction]:
    """Decode, transform and batch ``images``; ``run`` maps an (N, 3, H, W) batch to logits."""
    check_topk(topk)
    k = min(topk, num_classes)
    results: List[Prediction] = []
    pending: List[Tuple[Prediction, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending])
        for (pred, _), top in zip(pending, topk_labels(run(batch), names, k)):
            pred.topk = top
        pending.clear()

    for item in images:
        pred = Prediction(source=os.fspath(item) if not isinstance(item, Image.Image) else "<PIL.Image>")
        results.append(pred)
        try:
            tensor = transform(_load(item))
        except UNREADABLE_IMAGE_ERRORS as exc:
            pred.error = f"cannot read image: {exc}"
            continue
        pending.append((pred, tensor))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def predict(
    model: ConvNeXtV2,
    images: Union[ImageInput, Sequence[ImageInput]],
    topk: int = 5,
    batch_size: int = 16,
    transform: Optional[Callable] = None,
    device: Union[str, torch.device, None] = None,
) -> List[List[Tuple[str, float]]]:
    """Top-k ``(label, probability)`` per image, in input order.

    An unreadable image yields an empty list and a warning naming the file; the others are classified.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = []
    for pred in classify(model, images, topk=topk, batch_size=batch_size, transform=transform, device=device):
        if pred.error:
            warnings.warn(f"{pred.source}: {pred.error}", stacklevel=2)
        out.append(pred.topk)
    return out


_NEW_HEAD_ADVICE = ("predicting would use a new, untrained head (a new head is for fine-tuning, e.g. with "
                    "convnextv2-train); pass weights with a trained head and their class count "
                    "(num_classes / --num-classes), or omit the class count to use the checkpoint's")


def load_classifier(
    name: str,
    checkpoint_path: Union[str, os.PathLike, None] = None,
    num_classes: Optional[int] = None,
    **create_kwargs: Any,
) -> ConvNeXtV2:
    """``create(name, ...)`` for classifying: the pretrained weights of ``name``, or ``checkpoint_path``'s.

    Refuses (``ValueError``) a model whose head would be new and untrained: ``num_classes`` different from
    the checkpoint's, or weights without a classifier head. ``create`` keeps such a head on purpose, as the
    start of a fine-tune; classifying with it prints guesses. A pretrained name is checked against the
    manifest before anything is downloaded. ``create_kwargs`` go to ``create``.
    """
    from ..checkpoints.hub import hub_repo_id
    from ..checkpoints.io import described_num_classes, load_checkpoint
    from ..models.factory import create

    if checkpoint_path is None and hub_repo_id(name) is not None:
        model = create(name, pretrained=True, **create_kwargs)  # a pushed model: its repo states its head
        if num_classes is not None and num_classes != model.num_classes:
            raise ValueError(f"{name} has a {model.num_classes}-class head, not {num_classes}: {_NEW_HEAD_ADVICE}")
        if model.num_classes == 0:
            raise ValueError(f"{name} is an encoder without a classifier head: fine-tune it (convnextv2-train) to classify")
        return model
    if checkpoint_path is None:
        ckpt = get_checkpoint(name)
        wanted = ckpt.num_classes if num_classes is None else num_classes
        if ckpt.num_classes == 0:
            raise ValueError(f"{ckpt.name} is an encoder without a classifier head (a pre-training checkpoint); "
                             "to classify, use a fine-tuned checkpoint such as tiny.fcmae_ft_in1k or fine-tune "
                             "this one (convnextv2-train)")
        if wanted != ckpt.num_classes:
            raise ValueError(f"{ckpt.name} has a {ckpt.num_classes}-class head, not {wanted}: {_NEW_HEAD_ADVICE}")
        return create(name, pretrained=True, num_classes=num_classes, **create_kwargs)
    if num_classes is None:
        # A file of ours says its head size: its own head is then the one classified with, not a new one.
        num_classes = described_num_classes(checkpoint_path)
    model = create(name, num_classes=num_classes, **create_kwargs)
    # load_checkpoint warns that it keeps a new head; here that is an error, so its warning is held back.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_checkpoint(model, checkpoint_path)
    if "head" in report.reinitialized:
        reasons = [str(w.message).split("; keeping")[0] for w in caught if "head" in str(w.message)]
        reason = reasons[0] if reasons else f"{report.source} has no {model.num_classes}-class head"
        raise ValueError(f"{reason}: {_NEW_HEAD_ADVICE}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


# ------------------------------------------------------------------------------------------------
# Predictor: a fast inference backend for one model
# ------------------------------------------------------------------------------------------------
BACKENDS = ("auto", "eager", "compile", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# auto's estimate of the one-off cost of torch.compile (inductor, freezing) per residual block, in
# seconds, on a cold cache. It errs high on purpose: compiling too late costs a little speed,
# compiling too early makes a short run slower than eager fp32.
COMPILE_SECONDS_PER_BLOCK = 2.5
# The same estimate for the ONNX Runtime backend's export + session creation.
ONNX_SECONDS_PER_BLOCK = 0.3
# ... and for loading compiled graphs that an earlier process stored (inference.compiled_store).
LOAD_SECONDS_PER_BLOCK = 0.05


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), so bf16 is a speed-up.

    Without these instructions oneDNN emulates bf16 and it is slower than fp32.
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
    except OSError:
        # No cpuinfo (macOS, Windows): trust the capability level torch detected.
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def _fast_precision(device: torch.device) -> str:
    """The low precision that is both fast and numerically safe on ``device`` (fp32 if none is)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def _check_options(backend: str, precision: Optional[str], batch_size: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class Predictor:
    """Fast inference for one ConvNeXtV2: ``p(batch) -> logits`` and ``p.predict(files, topk)``.

    ``model_or_name``: a ConvNeXtV2 (never modified: the predictor works on its own eval-mode copy)
    or a name for ``load_classifier`` (pretrained unless ``checkpoint_path`` is given; a ``num_classes``
    that would leave the head new and untrained is refused). A model without a classifier head (an
    FCMAE encoder, ``num_classes=0``) is accepted for ``embed`` only.

    ``embed(batch)`` gives the pooled pre-logits features (what the head's Linear sees) through the same
    backend as the logits: eager, compile (a graph of its own that stops before the Linear), auto (the
    same calibration and switch, counted apart from the logits'), and eager fp32 for onnxruntime, whose
    graph ends in the logits; also on fp32-only CPUs auto's embeddings stay on eager fp32 for that reason.
    ``embed(batch, stage=s)`` gives stage ``s``'s map (pooled or not), in eager mode.

    Backends:

    - ``"eager"``: plain PyTorch; fp32 unless ``precision`` says otherwise (bf16/fp16 via autocast,
      GRN statistics and LayerNorms stay fp32).
    - ``"compile"``: ``torch.compile`` with inductor freezing (weights folded as constants),
      channels_last, and the device's fast precision (bf16 on CPUs with AVX512-BF16/AMX and on
      GPUs); on CPUs the early stages run in cache-sized micro-batches, GELU is a polynomial fused
      into inductor's GEMMs, GRN's sum of squares runs in two steps, the downsampling convs as
      GEMMs, and each block's depthwise conv + LayerNorm as one C++ kernel of ours, built on first
      use (``inference.compile_backend.CompiledConvNeXtV2``, ``inference.cpp_kernel`` and their module docstrings).
      Compiles on the first call and once per new batch size (minutes on a CPU, in a child process);
      ``predict`` pads a final partial batch to ``batch_size`` to avoid a recompile. On CPUs the
      compiled graphs are stored (``inference.compiled_store``): a later process with the same weights,
      batch size, precision and machine loads them in about a second, and ``auto`` switches to them
      as soon as that pays. ``compile_store=False`` compiles in this process every time instead: in fp32
      that graph runs ~15 % faster (MKL's packed GEMM, which AOTInductor's packages cannot hold).
    - ``"onnxruntime"``: the model exported to ONNX (fp32, verified against PyTorch, in memory) and run
      by ONNX Runtime on the CPU.
    - ``"auto"``: the fastest numerically safe path, without ever being slower than eager fp32 overall.
      It runs the first batch of each batch size in eager fp32 (timing it), then the cheap fast path
      (eager + channels_last + bf16 where the hardware has it; back to fp32 for a batch size where that
      turns out slower, as on tiny inputs). It switches a batch size to the
      expensive-to-start path (torch.compile where bf16 is native or on GPU, ONNX Runtime on fp32-only
      CPUs) once the time it has already saved against eager fp32 pays for the start-up cost estimate:
      so a short CLI run never pays a compile, and a long batch job compiles early. The slow start
      runs in a background thread while the calls go on being served by the eager path; the first call
      after it is ready switches (``background=False``: the call that crosses the estimate waits for it).

    ``warmup()`` builds the compiled graph (or ONNX session) for a batch size ahead of time, so a
    service's first requests do not wait for it. ``progress`` (e.g. ``print``) receives a line when a
    slow start begins and ends (without it, the lines go to the ``convnextv2_hub`` logger at INFO).
    ``autotune=False`` compiles in about half the time, with oneDNN's GEMMs where inductor's own might have
    been faster (``CompiledConvNeXtV2``).

    bf16 logits keep cosine similarity >= 0.999 with fp32 (tested); int8 is export-only (opt-in).
    """

    def __init__(
        self,
        model_or_name: Union[str, ConvNeXtV2],
        backend: str = "auto",
        device: Union[str, torch.device, None] = None,
        *,
        precision: Optional[str] = None,
        channels_last: Optional[bool] = None,
        batch_size: int = 16,
        checkpoint_path: Union[str, os.PathLike, None] = None,
        num_classes: Optional[int] = None,
        transform: Optional[Callable] = None,
        background: bool = True,
        autotune: bool = True,
        progress: Optional[Callable[[str], Any]] = None,
        compile_store: bool = True,
    ) -> None:
        _check_options(backend, precision, batch_size)
        if isinstance(model_or_name, str):
            model = load_classifier(model_or_name, checkpoint_path=checkpoint_path, num_classes=num_classes)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
        elif isinstance(model_or_name, ConvNeXtV2):
            model = model_or_name
            if device is None:
                device = next(model.parameters()).device
        else:
            raise TypeError(f"expected a ConvNeXtV2 or a model name, got {type(model_or_name).__name__}")
        if model.features_only:
            raise ValueError("Predictor needs a whole model, not a features_only one: create it without "
                             "features_only (Predictor.embed(batch, stage=s) gives the stage maps)")
        self.device = torch.device(device)
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU; use device='cpu'")
        if backend == "onnxruntime" and precision not in (None, "fp32"):
            raise ValueError("the onnxruntime backend is fp32; use export_onnx(half=/quantize=) for other precisions")

        self.backend = backend
        self.batch_size = batch_size
        self.num_classes = model.num_classes
        self.checkpoint = getattr(model, "checkpoint", None)
        self.label_names = label_names(model)
        self.transform = transform or default_transform(model)
        fast = _fast_precision(self.device)
        if precision is None:
            precision = {"eager": "fp32", "onnxruntime": "fp32"}.get(backend, fast)
        self.precision = precision
        if channels_last is None:
            # channels_last is what oneDNN/cuDNN want for bf16/fp16 convs and what inductor lays out
            # best; the plain eager fp32 path stays NCHW (it is the reference), ORT takes NCHW.
            channels_last = not (backend in ("eager", "onnxruntime") and precision == "fp32")
        self.channels_last = channels_last

        # Our own copy: eval mode, device and layout change; the caller's model stays as it was.
        self._model = copy.deepcopy(model).eval().to(self.device)
        self._model.requires_grad_(False)
        self._fp32_model: Optional[ConvNeXtV2] = None
        if backend == "auto" and channels_last:
            # auto's calibration batches run eager fp32 NCHW; keep a second view only when layouts differ
            self._fp32_model = copy.deepcopy(self._model)
            self._model = self._model.to(memory_format=torch.channels_last)
        elif channels_last:
            self._model = self._model.to(memory_format=torch.channels_last)
        # compiled graphs ending in the logits (False) and before the head's Linear (True, for embed)
        self._compiled: Dict[bool, "CompiledConvNeXtV2"] = {}
        self._compiled_shapes: set = set()  # (input shape, pre_logits) of the graphs compiled so far
        self._ort: Any = None
        self._setup_estimate_s = self._estimate_setup()
        # auto's bookkeeping per (batch size, pre_logits): fp32 time, seconds saved, switched or not
        self._stats: Dict[Tuple[int, bool], Dict[str, float]] = {}
        self.background = background
        self.autotune = autotune
        self.compile_store = compile_store
        self._progress = progress
        # auto's slow starts in flight or done, per (batch size, pre_logits): the thread and its error, if any
        self._preparing: Dict[Tuple[int, bool], Tuple[threading.Thread, List[BaseException]]] = {}
        self._setup_lock = threading.Lock()
        self._runner_lock = threading.Lock()
        if backend == "onnxruntime":
            self._ort = self._make_ort()

    # --- public API ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the predictor's device) for an N x 3 x H x W normalised float batch, H and W >= 32."""
        check_batch(x)
        self.require_head()
        return self._dispatch(x, pre_logits=False)

    def embed(self, x: torch.Tensor, stage: Optional[int] = None, pool: bool = True) -> torch.Tensor:
        """Features (float32, on the predictor's device) of an N x 3 x H x W normalised float batch.

        ``stage=None``: the pooled pre-logits features, N x C (``forward_head(forward_features(x),
        pre_logits=True)``: global average pool and the head's LayerNorm), through the predictor's backend.
        ``stage=s`` (0..3): stage ``s``'s output map, N x C_s x H/2^(s+2) x W/2^(s+2), or its global
        average pool (N x C_s) with ``pool``; eager, in the predictor's precision.
        """
        check_batch(x)
        if stage is None:
            return self._dispatch(x, pre_logits=True)
        if isinstance(stage, bool) or stage not in range(4):
            raise ValueError(f"stage must be 0, 1, 2 or 3 (the four stages of ConvNeXt V2), got {stage!r}")
        self._last_path = f"eager {self.precision}{' channels_last' if self.channels_last else ''}"
        with torch.inference_mode(), self._autocast():
            maps = self._model.forward_stages(self._prepare_input(x, self.channels_last), last_stage=stage)[-1]
            return (maps.mean(dim=(2, 3)) if pool else maps.contiguous()).float()

    def predict_batch(self, batch: torch.Tensor, topk: int = 5) -> List[List[Tuple[str, float]]]:
        """Top-k ``(label, probability)`` per image of a preprocessed batch (what ``predict`` does after
        reading and transforming the files); a batch smaller than ``batch_size`` is padded for compiled graphs."""
        check_topk(topk)
        return topk_labels(self._run_padded(batch), self.label_names, min(topk, self.num_classes))

    def embed_batch(self, batch: torch.Tensor, stage: Optional[int] = None, pool: bool = True) -> torch.Tensor:
        """``embed`` with a batch smaller than ``batch_size`` padded for compiled graphs (no recompile)."""
        if stage is not None:
            return self.embed(batch, stage=stage, pool=pool)
        return self._run_padded(batch, pre_logits=True)

    def classify(self, images: Iterable[ImageInput], topk: int = 5) -> List[Prediction]:
        """Like ``classify()``: one Prediction per input, ``error`` set for unreadable files."""
        self.require_head()
        return _classify_with(self._run_padded, images, self.label_names, self.transform, topk,
                              self.batch_size, self.num_classes)

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], topk: int = 5) -> List[List[Tuple[str, float]]]:
        """Top-k ``(label, probability)`` per image, in input order (unreadable: empty list + warning)."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        out = []
        for pred in self.classify(images, topk=topk):
            if pred.error:
                warnings.warn(f"{pred.source}: {pred.error}", stacklevel=2)
            out.append(pred.topk)
        return out

    def warmup(self, batch_size: Optional[int] = None, image_size: Optional[int] = None, embed: bool = False) -> None:
        """Build the expensive-to-start path for ``batch_size`` (default: the predictor's) now: the
        compiled graph (``compile``, or ``auto`` where it compiles) or the ONNX session (``onnxruntime``,
        or ``auto`` on fp32-only CPUs). ``auto`` then uses it from its first call of that size on.
        ``embed``: also the compiled graph that ends in the pooled features (``embed``)."""
        n = batch_size or self.batch_size
        size = image_size or (self.checkpoint.resolution if self.checkpoint is not None else 224)
        example = torch.zeros(n, 3, size, size)
        if self.backend == "eager":
            return
        kind = "onnxruntime" if self.backend == "onnxruntime" else (
            "compile" if self.backend == "compile" else self._slow_start_kind())
        for pre_logits in (False, True) if embed and kind == "compile" else (False,):
            self._prepare(kind, example, pre_logits)
            if self.backend == "auto":
                self._stats[(n, pre_logits)] = {"fp32_s": 0.0, "saved_s": 0.0, "switched": 1.0,
                                                "fp32_is_faster": 0.0}

    @property
    def compile_events(self) -> List[str]:
        """What the compiled path did for each graph it prepared on the CPU, in order: ``"built"``
        (compiled and stored) or ``"loaded"`` (from the store)."""
        return [event for runner in self._compiled.values() for event in runner.store_events]

    @property
    def active_path(self) -> str:
        """What the last batch ran on, e.g. ``"eager bf16 channels_last"`` (for logs and benchmarks)."""
        return getattr(self, "_last_path", "none yet")

    def __repr__(self) -> str:
        return (f"Predictor(backend={self.backend!r}, precision={self.precision!r}, device={str(self.device)!r}, "
                f"channels_last={self.channels_last}, batch_size={self.batch_size})")

    # --- backends ------------------------------------------------------------------------------
    def require_head(self) -> None:
        """Refuse (``ValueError``) to classify with a model that has no classifier head."""
        if self.num_classes <= 0:
            _require_head(self._model)

    def _dispatch(self, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        if self.backend == "eager":
            return self._run_eager(x, pre_logits)
        if self.backend == "compile":
            return self._run_compiled(x, pre_logits)
        if self.backend == "onnxruntime":
            return self._run_fp32_reference(x, pre_logits) if pre_logits else self._run_ort(x)
        return self._run_auto(x, pre_logits)

    def _estimate_setup(self) -> float:
        blocks = sum(self._model.depths)
        per_block = ONNX_SECONDS_PER_BLOCK if self._slow_start_kind() == "onnxruntime" else COMPILE_SECONDS_PER_BLOCK
        return per_block * blocks

    def _slow_start_kind(self) -> str:
        """auto's expensive-to-start path: compile where low precision is fast, else ORT (CPU fp32)."""
        if self.device.type == "cpu" and self.precision == "fp32":
            return "onnxruntime"
        return "compile"

    def _prepare_input(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        x = x.to(self.device, torch.float32, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    @staticmethod
    def _forward(model: ConvNeXtV2, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True) if pre_logits else model(x)

    def _run_eager(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        self._last_path = f"eager {self.precision}{' channels_last' if self.channels_last else ''}"
        with torch.inference_mode(), self._autocast():
            return self._forward(self._model, self._prepare_input(x, self.channels_last), pre_logits).float()

    def _run_fp32_reference(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        self._last_path = "eager fp32"
        model = self._fp32_model if self._fp32_model is not None else self._model
        with torch.inference_mode():
            return self._forward(model, self._prepare_input(x, False), pre_logits).float()

    def _run_compiled(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if (tuple(x.shape), pre_logits) not in self._compiled_shapes:
            self._prepare("compile", x, pre_logits)
        self._last_path = f"compile {self.precision}{' channels_last' if self.channels_last else ''}"
        with torch.inference_mode(), self._autocast():
            return self._compiled[pre_logits](self._prepare_input(x, self.channels_last)).float()

    def _compiled_runner(self, pre_logits: bool) -> "CompiledConvNeXtV2":
        with self._runner_lock:  # the serving thread may ask while a background one prepares
            if pre_logits not in self._compiled:
                from .compile_backend import CompiledConvNeXtV2

                self._compiled[pre_logits] = CompiledConvNeXtV2(self._model, pre_logits=pre_logits,
                                                                autotune=self.autotune, progress=self._say,
                                                                in_process=not self.compile_store)
            return self._compiled[pre_logits]

    def is_compiled_stored(self, example: torch.Tensor, pre_logits: bool = False) -> bool:
        """Whether the compiled graphs for ``example``'s shape are in the store (CPU), so that
        compiling means loading them (``inference.compiled_store``)."""
        if self.device.type != "cpu" or not self.compile_store:
            return False
        with torch.inference_mode(), self._autocast():
            return self._compiled_runner(pre_logits).is_stored(self._prepare_input(example, self.channels_last))

    def _prepare(self, kind: str, example: torch.Tensor, pre_logits: bool = False) -> None:
        """Build the slow-start path ``kind`` for ``example``'s shape (any thread), saying so."""
        with self._setup_lock:
            if kind == "compile" and (tuple(example.shape), pre_logits) in self._compiled_shapes:
                return
            if kind == "onnxruntime" and self._ort is not None:
                return
            if kind == "onnxruntime":
                what = "exporting the model to ONNX Runtime"
            elif self.is_compiled_stored(example, pre_logits):
                what = f"loading the compiled model for batch {example.shape[0]} from {compiled_store.store_dir()}"
            else:
                where = (f"in a separate process, then stored in {compiled_store.store_dir()} for later processes"
                         if self.device.type == "cpu" and self.compile_store else "in this process")
                what = (f"compiling the model for batch {example.shape[0]} at {example.shape[-2]}x"
                        f"{example.shape[-1]} ({self.precision}; may take minutes on a CPU) {where}")
            self._say(f"{what} ...")
            t0 = time.perf_counter()
            if kind == "onnxruntime":
                self._ort = self._make_ort()
            else:
                with torch.inference_mode(), self._autocast():
                    self._compiled_runner(pre_logits)(self._prepare_input(example, self.channels_last))
                self._compiled_shapes.add((tuple(example.shape), pre_logits))
            self._say(f"{kind} ready after {time.perf_counter() - t0:.1f} s")

    def _say(self, line: str) -> None:
        if self._progress is not None:
            self._progress(f"convnextv2_hub: {line}")
        else:
            logging.getLogger("convnextv2_hub").info(line)

    def _make_ort(self) -> Any:
        import tempfile

        from .export import export_onnx
        from .onnx_runtime import onnx_session

        model = self._fp32_model if self._fp32_model is not None else self._model
        model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
        size = self.checkpoint.resolution if self.checkpoint is not None else 224
        with tempfile.TemporaryDirectory(prefix="convnextv2_ort_") as d:
            path = os.path.join(d, "model.onnx")
            # Verified like every export (fp32, <= 1e-4); the session keeps the graph in memory.
            export_onnx(model, path, image_size=size, dynamic_size=True, verify=True)
            return onnx_session(path)

    def _run_ort(self, x: torch.Tensor) -> torch.Tensor:
        self._last_path = "onnxruntime fp32"
        out = self._ort.run(None, {"input": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(self.device)

    def _run_auto(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        key = (x.shape[0], pre_logits)
        st = self._stats.get(key)
        kind = self._slow_start_kind()
        if st is None:
            # First batch of this size: eager fp32 (exactly the baseline), timed to price the others.
            t0 = time.perf_counter()
            out = self._run_fp32_reference(x, pre_logits)
            self._sync()
            self._stats[key] = {"fp32_s": time.perf_counter() - t0, "saved_s": 0.0, "switched": 0.0,
                                "fp32_is_faster": 0.0}
            return out
        if st["switched"]:
            return self._run_compiled(x, pre_logits) if kind == "compile" else self._run_ort(x)
        # The ONNX graph ends in the logits: embeddings never switch to it.
        can_switch = kind == "compile" or not pre_logits
        if can_switch and st["saved_s"] >= self._switch_cost(kind, x, pre_logits) and \
                self._slow_start_ready(kind, x, pre_logits):
            # The time saved so far pays for the start-up, and the start-up is done: switch.
            st["switched"] = 1.0
            return self._run_compiled(x, pre_logits) if kind == "compile" else self._run_ort(x)
        t0 = time.perf_counter()
        if st["fp32_is_faster"] or (self.precision == "fp32" and not self.channels_last):
            out = self._run_fp32_reference(x, pre_logits)  # nothing cheaper to run before the switch
        else:
            out = self._run_eager(x, pre_logits)
        self._sync()
        elapsed = time.perf_counter() - t0
        if self._last_path.startswith("eager") and self._last_path != "eager fp32" and elapsed > st["fp32_s"]:
            # Tiny inputs: casts and layout changes can cost more than bf16 saves; stay on fp32 here.
            st["fp32_is_faster"] = 1.0
        st["saved_s"] += st["fp32_s"] - elapsed
        return out

    def _switch_cost(self, kind: str, x: torch.Tensor, pre_logits: bool) -> float:
        """auto's start-up estimate for ``kind`` at ``x``'s batch size: small when the store already holds
        the compiled graphs, which then only load."""
        st = self._stats[(x.shape[0], pre_logits)]
        if "stored" not in st:
            st["stored"] = float(kind == "compile" and self.is_compiled_stored(x, pre_logits))
        return LOAD_SECONDS_PER_BLOCK * sum(self._model.depths) if st["stored"] else self._setup_estimate_s

    def _slow_start_ready(self, kind: str, x: torch.Tensor, pre_logits: bool = False) -> bool:
        """Whether ``kind`` can serve ``x``'s batch size; starts preparing it (in a background thread
        unless ``background=False``) the first time it is asked. A failed start is reported once and
        leaves the batch size on the eager path for good."""
        key = (x.shape[0], pre_logits)
        if key not in self._preparing:
            errors: List[BaseException] = []
            example = x.detach().to("cpu", copy=True) if self.device.type == "cpu" else x.detach().clone()

            def work() -> None:
                try:
                    self._prepare(kind, example, pre_logits)
                except Exception as exc:  # reported on the serving thread, which carries on eagerly
                    errors.append(exc)

            thread = threading.Thread(target=work, name=f"convnextv2_hub-{kind}-{key[0]}", daemon=True)
            self._preparing[key] = (thread, errors)
            if self.background:
                self._say(f"auto: preparing {kind} for batch {key[0]} in the background; serving on the eager path "
                          "meanwhile")
                if kind == "compile":
                    from .compile_backend import before_compiling_in_another_thread

                    before_compiling_in_another_thread()
                thread.start()
            else:
                thread.run()
        thread, errors = self._preparing[key]
        if thread.is_alive():
            return False
        if errors:
            if not self._stats[key].get("failed"):
                self._stats[key]["failed"] = 1.0
                warnings.warn(f"convnextv2_hub: auto could not prepare {kind} for batch {key[0]} "
                              f"({type(errors[0]).__name__}: {errors[0]}); staying on the eager path", RuntimeWarning)
            return False
        return True

    def wait_until_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait for ``auto``'s background starts; True when none is still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread, _ in list(self._preparing.values()):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t, _ in self._preparing.values())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_padded(self, batch: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``predict``'s and ``embed_batch``'s runner: pad a final partial batch for compiled graphs (no recompile)."""
        n = batch.shape[0]
        run = self.embed if pre_logits else self
        compiled_for_full = self.backend == "compile" or (
            self.backend == "auto" and self._stats.get((self.batch_size, pre_logits), {}).get("switched")
            and self._slow_start_kind() == "compile")
        if compiled_for_full and n < self.batch_size:
            # Samples are independent (GRN and LayerNorm statistics are per image), so zero rows
            # change nothing for the real ones.
            pad = batch.new_zeros((self.batch_size - n,) + tuple(batch.shape[1:]))
            return run(torch.cat([batch, pad]))[:n]
        return run(batch)
