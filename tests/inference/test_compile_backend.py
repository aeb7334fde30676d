"""The compile backend's micro-batch plan, its CPU forms against the modules, and the in-process graphs'
guards (the compiled segments against eager fp32, through the store: test_compiled_store.py)."""
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from convnextv2_hub.inference import cpp_kernel
from convnextv2_hub.inference.compile_backend import (CompiledConvNeXtV2, cpu_block_forward, downsample_as_linear,
                                               grn_two_step, poly_gelu, stage_micro_batches)
from convnextv2_hub.models.layers import GRN
from convnextv2_hub.models.convnextv2 import ConvNeXtV2, convnextv2


@pytest.mark.parametrize("n, size, device, expected", [
    (16, 224, "cpu", [1, 4, 16, 16]),    # stage positions 3136, 784, 196, 49
    (6, 224, "cpu", [1, 3, 6, 6]),       # largest divisor of the batch within the row budget
    (1, 224, "cpu", [1, 1, 1, 1]),
    (16, 384, "cpu", [1, 1, 4, 16]),     # 9216 positions per image in stage 1: still one image
    (16, 224, "cuda", [16, 16, 16, 16]),  # GPUs run the whole batch
])
def test_stage_micro_batches(n, size, device, expected):
    sizes = stage_micro_batches(n, size, size, device)
    assert sizes == expected
    assert all(n % s == 0 for s in sizes)


def test_plan_merges_stages_with_the_same_micro_batch():
    runner = CompiledConvNeXtV2(convnextv2("atto", num_classes=10).eval())
    x = torch.empty(16, 3, 224, 224)
    assert runner.plan(x) == [(0, 0, 1), (1, 1, 4), (2, 3, 16)]
    assert runner.plan(x[:1]) == [(0, 3, 1)]


def test_refuses_a_training_or_headless_model():
    with pytest.raises(ValueError, match="eval-mode"):
        CompiledConvNeXtV2(convnextv2("atto").train())
    with pytest.raises(ValueError, match="classifier head"):
        CompiledConvNeXtV2(convnextv2("atto", features_only=True).eval())


def test_poly_gelu_is_within_its_stated_error_of_the_exact_gelu():
    x = torch.linspace(-12, 12, 240_001)
    err = (poly_gelu(x).double() - F.gelu(x.double())).abs()
    assert err.max() <= 1.4e-4  # the docstring's 1.3e-4, with fp32 evaluation noise
    # Inside [-4, 4] the error is x times Phi's (3.3e-5): relative, so small activations stay exact.
    inside = (x.abs() < 4) & (x != 0)
    assert (err[inside] / x[inside].abs()).max() <= 3.5e-5
    # The ends and the specials: relu outside [-4, 4], NaN stays NaN, bf16 in -> bf16 out.
    special = torch.tensor([float("inf"), float("-inf"), -1e30, 1e30, -4.0, 4.0, float("nan")])
    out = poly_gelu(special)
    assert torch.equal(out[:6], torch.tensor([float("inf"), 0.0, 0.0, 1e30, 0.0, 4.0]))
    assert out[6].isnan()
    assert poly_gelu(torch.randn(8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_cpu_segments_use_the_cpu_forms_and_gpu_segments_the_models_modules():
    runner = CompiledConvNeXtV2(convnextv2("atto", num_classes=10).eval())
    cpu = runner._segment(0, 3, on_cpu=True)._orig_mod
    assert cpu.cpu_forms and cpu.dwconv_ln_kernel == cpp_kernel.load()
    runner._segments.clear()
    gpu = runner._segment(0, 3, on_cpu=False)._orig_mod
    assert not gpu.cpu_forms and not gpu.dwconv_ln_kernel


@pytest.mark.parametrize("size", [16, 8, 14])  # 256 and 64 positions: two steps; 196: the one-step sum
def test_grn_two_step_equals_grn(size):
    torch.manual_seed(0)
    grn = GRN(24)
    with torch.no_grad():
        grn.gamma.normal_(0, 1)
        grn.beta.normal_(0, 1)
    x = torch.randn(3, size, size, 24) * torch.linspace(0.1, 3, 24)  # channels of unequal norms
    out = grn_two_step(grn, x)
    assert out.shape == x.shape
    assert (out - grn(x)).abs().max() <= 1e-5
    # Per image: one image's output does not depend on its neighbours.
    assert (grn_two_step(grn, x[1:2]) - out[1:2]).abs().max() <= 1e-6


def test_grn_two_step_keeps_float64_and_upcasts_bf16():
    torch.manual_seed(0)
    grn = GRN(24).double()
    with torch.no_grad():
        grn.gamma.normal_(0, 1)
        grn.beta.normal_(0, 1)
    x = torch.randn(2, 8, 8, 24, dtype=torch.float64)
    out = grn_two_step(grn, x)
    assert out.dtype == torch.float64 and (out - grn(x)).abs().max() <= 1e-12
    half = grn_two_step(grn.float(), x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


@pytest.mark.parametrize("dwconv_ln_kernel", [False, True])
def test_cpu_block_forward_equals_block_forward(dwconv_ln_kernel):
    # Run eagerly here: the same block as Block.forward up to poly_gelu's error and rounding.
    if dwconv_ln_kernel:
        if shutil.which(cpp_kernel.compiler()) is None:
            pytest.skip("no C++ compiler to build the kernel with")
        assert cpp_kernel.load()  # a compiler that fails to build the kernel is a failure, not a skip
    block = _random_tiny_model(4).stages[1][0]
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = cpu_block_forward(block, x, dwconv_ln_kernel)
        ref = block(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-3 * max(1.0, ref.abs().max().item())


def test_downsample_as_linear_equals_the_downsampling_layer():
    model = _random_tiny_model(3)
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    layer = model.downsample_layers[1]
    out = downsample_as_linear(layer, x)
    ref = layer(x)
    assert out.shape == ref.shape == (2, 32, 6, 5)
    assert (out - ref).abs().max() <= 1e-5


def _random_tiny_model(seed: int) -> ConvNeXtV2:
    torch.manual_seed(seed)
    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_in_process_graphs_match_eager_fp32():
    # torch.compile in this process, as on GPUs (CPUs load AOTInductor packages: test_compiled_store.py)
    model = _random_tiny_model(1)
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert (CompiledConvNeXtV2(model, autotune=False, in_process=True)(x) - model(x)).abs().max() <= 1e-4


def test_runners_of_equal_shape_keep_their_own_graphs_and_recompile_for_a_new_shape(monkeypatch):
    # The in-process segments guard only on the input and the global state, not on the modules: two
    # runners of the same architecture and input shape must still each get a graph of their own (frozen
    # weights: a shared graph would compute the first model), and a new batch size must not reuse a graph
    # of another shape. Guards and graph lookup are dynamo's, whatever backend compiles the graphs:
    # dynamo's eager backend makes each graph free.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile_(*args, **dict(kwargs, backend="eager")))
    from torch._dynamo.utils import counters

    models = [_random_tiny_model(seed) for seed in (1, 2)]
    runners = [CompiledConvNeXtV2(m, autotune=False, in_process=True) for m in models]
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    counters.clear()
    with torch.inference_mode():
        for _ in range(2):  # the second round runs the cached graphs
            for model, runner in zip(models, runners):
                assert (runner(x) - model(x)).abs().max() <= 1e-4
        assert counters["stats"]["unique_graphs"] == 2  # one each, none shared, none compiled twice
        with torch._dynamo.config.patch(error_on_recompile=True), \
                pytest.raises(torch._dynamo.exc.RecompileError):
            runners[0](x[:1])


def test_the_misleading_no_cuda_note_of_cpu_builds_is_dropped_and_nothing_else(caplog):
    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


@pytest.mark.parametrize("switches", [dict(block="v1"), dict(grn="se"), dict(grn_aggregation="l1"),
                                      dict(grn_form="x_g")])
def test_cpu_block_forward_takes_the_ablation_switches(switches):
    # The compiled CPU forms (two-step GRN, poly GELU) on blocks of models.ablations: still Block.forward.
    torch.manual_seed(0)
    block = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **switches).stages[1][0]
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.normal_(0, 1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = cpu_block_forward(block, x, dwconv_ln_kernel=False)
        ref = block(x)
    assert (out - ref).abs().max() <= 1e-3 * max(1.0, ref.abs().max().item())
