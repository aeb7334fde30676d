"""Compiled inference for a ConvNeXtV2 (inductor): frozen weights, static shapes, cache-sized micro-batches.

On CPUs each segment is an AOTInductor package that ``compiled_store`` keeps for later processes; on
GPUs (and with ``in_process=True``) it is ``torch.compile`` in this process.

On a CPU the early stages do not fit the caches at batch size 16: stage 1 of Tiny at 224² holds a
50176 x 384 hidden tensor (38 MB in bf16) between its two Linears, and then oneDNN's GEMM and the
GRN passes run from memory, several times slower per image than on one image. So each stage runs on
micro-batches of about ``ROWS_PER_CHUNK`` spatial positions (at 224²: stage 1 one image, stage 2
four, stages 3 and 4 the whole batch, where larger GEMMs are the faster ones), and consecutive stages
with the same micro-batch form one segment, compiled once per micro-batch shape. GPUs run the whole
batch at once.

On CPUs the segments run three ops in forms that inductor compiles better: the blocks' GELU is
``poly_gelu``, a polynomial (within 1.3e-4 of the exact GELU) fused into inductor's own AMX GEMM for
``pwconv1``; GRN's sum of squares goes through partial sums (``grn_two_step``) and the 2x2 downsampling
convs are GEMMs (``downsample_as_linear``), both equal to the modules up to rounding; the blocks'
depthwise conv and LayerNorm run as one C++ kernel of ours (``cpp_kernel.dwconv7x7_layernorm``) when it
builds. GPUs run the model's own modules. On every device GRN's per-channel factor and its
application are GRN's own (``GRN.scale_by_norm``).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from . import compiled_store, cpp_kernel
from ..models.layers import GRN, at_least_float32, stored_once_when_compiled
from ..models.convnextv2 import Block, ConvNeXtV2

# Spatial positions per micro-batch: one 224² image at stage 1 (56 x 56), the fastest of the
# micro-batch sizes tried at stages 1 and 2.
ROWS_PER_CHUNK = 3136
# Compiled graphs allowed per segment (one per input shape and precision); without isolate_recompiles,
# for Segment.forward across all predictors of a process. Four times as many across all segments.
RECOMPILE_LIMIT = 256
# torch >= 2.14: each torch.compile call can keep its graphs apart from other calls' (isolate_recompiles).
_CAN_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


class _NoCudaNoteFilter(logging.Filter):
    """Drops torch's "No CUDA runtime is found" note, which inductor's C++ builds trigger on any machine
    with a CUDA toolkit but no GPU: it reads like an error to someone compiling for the CPU, and nothing
    here needs CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaNoteFilter())


def stage_micro_batches(n: int, height: int, width: int, device_type: str = "cpu",
                        rows: int = ROWS_PER_CHUNK) -> List[int]:
    """Micro-batch size of each of the 4 stages for a batch of ``n`` images of ``height`` x ``width``.

    Each is the largest divisor of ``n`` whose positions fit in ``rows`` (at least 1), so every
    micro-batch of a stage has the same static shape. On GPUs: ``n`` for every stage.
    """
    if device_type != "cpu":
        return [n] * 4
    sizes = []
    for stage in range(4):
        positions = (height >> (stage + 2)) * (width >> (stage + 2))
        limit = max(1, rows // max(1, positions))
        sizes.append(max(d for d in range(1, n + 1) if n % d == 0 and d <= limit))
    return sizes


# Odd coefficients (t, t^3, ..., t^17) of Phi(4t) - 1/2 on [-1, 1], Phi the standard normal CDF:
# a degree-17 Chebyshev fit, scaled so that Phi(+-4) is exactly 1 and 0.
_PHI_ODD = (1.5957566363361324, -4.2509064079219865, 10.122645430366617, -18.634241254243896,
            26.135585234514902, -26.834940802330824, 18.735020372983463, -7.833456498292391,
            1.4645372885879837)


def poly_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x * Phi(x) with Phi from ``_PHI_ODD`` on [-4, 4] and relu outside, in fp32.

    Max |error| against the exact (erf) GELU: 1.3e-4 over the whole real line, and 3.3e-5 |x| inside
    [-4, 4]: below the rounding of a bf16 result (2^-9 relative). It is multiply-adds only, which
    inductor fuses cheaply into its AMX GEMM as an epilogue; the erf form there costs a libm-style call
    per vector, so with it the fastest choice was oneDNN's GEMM + GELU, which has a fixed cost per
    call. It makes small batches faster and leaves large ones unchanged.
    """
    xf = x.float()
    t = (xf * 0.25).clamp(-1.0, 1.0)
    t2 = t * t
    acc = torch.full_like(t, _PHI_ODD[-1])
    for c in reversed(_PHI_ODD[:-1]):
        acc = acc * t2 + c
    # Outside [-4, 4] GELU is relu to within 1.3e-4; there the polynomial's fp32 residual at t = -1,
    # times a huge x, would not be (GELU(-inf) must be 0, not inf).
    out = torch.where(xf.abs() < 4.0, xf * (0.5 + t * acc), xf.clamp(min=0.0)).to(x.dtype)
    # Inlined into its readers, the polynomial would be evaluated again by the GRN kernel and by the
    # second GEMM instead of once in the first GEMM's epilogue.
    return stored_once_when_compiled(out)


# Positions per partial sum in grn_two_step.
GRN_PARTIAL_ROWS = 16


def grn_two_step(grn: GRN, x: torch.Tensor) -> torch.Tensor:
    """``grn(x)`` on NHWC ``x``, its spatial sum of squares taken over ``GRN_PARTIAL_ROWS`` consecutive
    positions first, then over those partial sums.

    Inductor reduces over positions with the channels as its vector lanes, one sweep down the whole
    tensor per 32 channels: at stage 1 (3136 x 384) twelve strided passes over 2.4 MB, more than the
    L2 holds. The partial sums read the tensor once, in order, which makes the kernel faster. Shapes
    whose positions do not split evenly keep the one-step sum.
    """
    n, h, w, c = x.shape
    rows = GRN_PARTIAL_ROWS
    if (h * w) % rows or grn.aggregation != "l2" or grn.form not in ("full", "x_g"):
        return grn(x)  # the ablations' other statistics are not a spatial L2 norm
    # Differs from grn_norms (one vector_norm) only in summation order, for speed: tests pin it to GRN.
    partial = at_least_float32(x).reshape(n, h * w // rows, rows, c).square().sum(2)
    gx = stored_once_when_compiled(partial).sum(1).sqrt().view(n, 1, 1, c)
    return grn.scale_by_norm(x, gx)


def downsample_as_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A downsampling layer between stages (LayerNorm2d, then a k x k conv of stride k) as LayerNorm,
    space-to-depth and a Linear on an NCHW (channels_last) map.

    The conv's output at each position is a Linear of its k x k input patch. As a Linear it becomes
    inductor's AMX GEMM with prepacked weights, and the LayerNorm writes straight into the patch
    layout, where the conv was a oneDNN call with its own setup per call.
    """
    norm, conv = layer[0], layer[1]
    k = conv.kernel_size[0]
    x = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    n, h, w, c = x.shape
    patches = x.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, h // k, w // k, k * k * c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, k * k * c)
    return F.linear(patches, weight, conv.bias).permute(0, 3, 1, 2)


def cpu_block_forward(block: Block, x: torch.Tensor, dwconv_ln_kernel: bool) -> torch.Tensor:
    """``Block.forward`` without a mask, with ``poly_gelu``, ``grn_two_step`` and, if
    ``dwconv_ln_kernel``, the depthwise conv and LayerNorm as ``cpp_kernel.dwconv7x7_layernorm``."""
    # Not Block.forward/expand: these forms compile to faster CPU kernels; tests pin it to Block.forward.
    shortcut = x
    if dwconv_ln_kernel:
        x = cpp_kernel.dwconv7x7_layernorm(block.dwconv, block.norm, x)
    else:
        x = block.norm(block.dwconv(x).permute(0, 2, 3, 1))
    x = poly_gelu(block.pwconv1(x))
    # The ablations' blocks (models.ablations): another module in GRN's place, V1's LayerScale.
    x = block.pwconv2(grn_two_step(block.grn, x) if isinstance(block.grn, GRN) else block.grn(x))
    if block.gamma is not None:
        x = x * block.gamma
    return shortcut + x.permute(0, 3, 1, 2)


class Segment(nn.Module):
    """Stages ``first``..``last`` of a ConvNeXtV2 (each: downsampling layer + blocks), plus the head
    when ``last`` is the final stage (up to its LayerNorm only with ``pre_logits``). Shares the model's
    parameters. ``cpu_forms``: run the ops in the forms of the module docstring instead of the model's
    own modules."""

    def __init__(self, model: ConvNeXtV2, first: int, last: int, cpu_forms: bool, pre_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.first, self.last = first, last
        self.cpu_forms = cpu_forms
        self.pre_logits = pre_logits
        # Built (or found in its cache) here, before tracing: the graph then calls the loaded op.
        self.dwconv_ln_kernel = cpu_forms and cpp_kernel.load()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.first, self.last + 1):
            layer = self.model.downsample_layers[i]
            # Layer 0 is the stem (conv, then LayerNorm), which stays a conv.
            x = downsample_as_linear(layer, x) if self.cpu_forms and i > 0 else layer(x)
            for block in self.model.stages[i]:
                x = cpu_block_forward(block, x, self.dwconv_ln_kernel) if self.cpu_forms else block(x)
        return self.model.forward_head(x, pre_logits=self.pre_logits) if self.last == 3 else x


def inductor_options(on_cpu: bool, autotune: bool) -> Dict[str, Any]:
    """Inductor's options for the compiled path, in process and in AOTInductor's packages alike.

    freezing: weights folded as constants, prepacked for oneDNN. On CPUs, max_autotune times
    inductor's own (AMX) GEMM kernels, which fuse GRN's scaling and the residual add, against oneDNN's,
    per GEMM shape, and keeps the faster; ffp-contract=fast lets the C++ compiler turn poly_gelu's
    multiply-adds into FMAs.
    """
    options: Dict[str, Any] = {"freezing": True, "autotune_num_choices_displayed": 0,
                               "max_autotune_report_choices_stats": False}
    if on_cpu:
        options.update({"max_autotune": autotune, "max_autotune_gemm_backends": "CPP,ATEN",
                        "cpp.enable_floating_point_contract_flag": "fast"})
    return options


def before_compiling_in_another_thread() -> None:
    """Call on the thread that goes on running eager modules while another thread compiles.

    ``torch.fx.symbolic_trace`` patches ``nn.Module.__call__`` for the whole process while it traces, so
    an eager module called from any thread at that moment is taken for part of the traced function and
    fails (NameError: module is not installed as a submodule). Inductor runs such a trace once per
    process, lazily, while it generates loops; running it here, first, leaves none for the compile."""
    try:
        from torch._inductor.loop_body import InterpreterShim

        InterpreterShim._dummy_gm()
    except (ImportError, AttributeError):  # another torch: its compile may not trace this way
        pass


class CompiledConvNeXtV2:
    """``torch.compile`` (inductor, frozen weights, static shapes) of an eval-mode ConvNeXtV2 with a
    classifier head, run in micro-batched segments (see the module docstring). ``pre_logits=True``:
    the graphs stop before the head's Linear and give the pooled features (``Predictor.embed``).

    The caller sets precision (autocast) and ``inference_mode``; inputs are N x 3 x H x W with H and
    W multiples of 32. Each new (segment, micro-batch shape) compiles on first use. The model's
    weights and structure are read once, when a graph compiles: change the model afterwards and the
    graphs go on computing the old one (``Predictor`` compiles a private copy, so it never sees that).

    ``autotune=False`` skips timing inductor's GEMM kernels against oneDNN's on CPUs: compiling takes
    about half as long, and each GEMM runs oneDNN's kernel, which may be the slower one.

    On CPUs the segments are AOTInductor packages from the store of ``inference.compiled_store``:
    loaded when a process (this one or an earlier one) has compiled them for the same weights, input
    shape, precision and machine, else compiled in a child process and stored. ``progress`` receives
    the child's lines (default: the ``convnextv2_hub`` logger). ``in_process=True``, and every
    non-CPU device, run ``torch.compile`` in this process instead, kept in memory only.
    """

    def __init__(self, model: ConvNeXtV2, rows: int = ROWS_PER_CHUNK, autotune: bool = True,
                 pre_logits: bool = False, in_process: bool = False,
                 progress: Optional[Callable[[str], Any]] = None) -> None:
        if model.features_only or model.training:
            raise ValueError("CompiledConvNeXtV2 needs an eval-mode model with a classifier head")
        self.model = model
        self.rows = rows
        self.autotune = autotune
        self.pre_logits = pre_logits
        self.in_process = in_process
        self.progress = progress or logging.getLogger("convnextv2_hub").info
        self._segments: Dict[Tuple[int, int], nn.Module] = {}
        # Stored runners per (shape, stride, dtype, autocast dtype) of the input; how each was obtained.
        self._stored: Dict[Tuple[Any, ...], List[Callable[[torch.Tensor], torch.Tensor]]] = {}
        self.store_events: List[str] = []
        self._weights: Optional[str] = None

    def plan(self, x: torch.Tensor) -> List[Tuple[int, int, int]]:
        """``(first stage, last stage, micro-batch)`` for each segment that ``x`` runs through."""
        n, _, height, width = x.shape
        sizes = stage_micro_batches(n, height, width, x.device.type, self.rows)
        plan: List[Tuple[int, int, int]] = []
        for stage, size in enumerate(sizes):
            if plan and plan[-1][2] == size:
                plan[-1] = (plan[-1][0], stage, size)
            else:
                plan.append((stage, stage, size))
        return plan

    def _segment(self, first: int, last: int, on_cpu: bool) -> nn.Module:
        key = (first, last)
        if key not in self._segments:
            # dynamic=False: static shapes give inductor its best kernels; a new shape recompiles.
            segment = Segment(self.model, first, last, cpu_forms=on_cpu, pre_logits=self.pre_logits)
            lean_guards = {}
            if _CAN_ISOLATE:
                # Guards only on the input's metadata and the global state (grad mode, autocast).
                # The model is frozen into the graphs, so dynamo's guards on its modules and parameters
                # (about a thousand) protect nothing and cost time on every call. What they
                # also did, telling segments of one code object apart, isolate_recompiles does: each
                # segment looks up only its own graphs. Older torch keeps the full guards.
                lean_guards = dict(isolate_recompiles=True, recompile_limit=RECOMPILE_LIMIT,
                                   options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
            self._segments[key] = torch.compile(segment, dynamic=False, **lean_guards)
        return self._segments[key]

    def _store_key(self, x: torch.Tensor, build_kernel: bool = True) -> Dict[str, Any]:
        """The store key of ``x``'s graphs; ``compile_worker`` rebuilds the segments from these fields.
        ``build_kernel=False``: a key without our C++ kernel where it is not built yet (an estimate)."""
        if self._weights is None:
            self._weights = compiled_store.weights_sha256(self.model)
        autocast = str(torch.get_autocast_dtype("cpu")).split(".")[-1] if torch.is_autocast_enabled("cpu") else None
        return compiled_store.entry_key(self.model, self._weights, x, plan=[list(p) for p in self.plan(x)],
                                        autocast=autocast, pre_logits=self.pre_logits, autotune=self.autotune,
                                        native_kernel=cpp_kernel.load(build=build_kernel))

    def is_stored(self, x: torch.Tensor) -> bool:
        """Whether the store holds compiled graphs for inputs like ``x`` (under the current autocast).
        Quick enough for a serving thread: it never builds our C++ kernel to answer."""
        return (compiled_store.entry_dir(self._store_key(x, build_kernel=False)) / compiled_store.MANIFEST).exists()

    def _run_stored(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        signature = (tuple(x.shape), x.stride(), x.dtype, autocast)
        if signature not in self._stored:
            runners, event = compiled_store.load_or_build(self.model, self._store_key(x), say=self.progress)
            self._stored[signature] = runners
            self.store_events.append(event)
        for (_, _, size), run in zip(self.plan(x), self._stored[signature]):
            out = run(x) if size == x.shape[0] else torch.cat([run(chunk) for chunk in x.split(size)])
            x = compiled_store.between_segments(out)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not self.in_process:
            return self._run_stored(x)
        on_cpu = x.device.type == "cpu"
        # Read when a graph compiles. On CPUs, cpp_wrapper saves the Python call overhead of ~150
        # kernels per forward (AOTInductor's packages are C++ throughout).
        # Every segment of every CompiledConvNeXtV2 is one more graph of the one code object
        # Segment.forward; dynamo's default limits (8 per code object or region, 256 in all) would
        # quietly run the rest eagerly.
        with inductor_config.patch(cpp_wrapper=on_cpu, **inductor_options(on_cpu, self.autotune)), \
                torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                           accumulated_recompile_limit=4 * RECOMPILE_LIMIT):
            for first, last, size in self.plan(x):
                segment = self._segment(first, last, on_cpu)
                if size == x.shape[0]:
                    x = segment(x)
                else:
                    x = torch.cat([segment(chunk) for chunk in x.split(size)])
        return x
