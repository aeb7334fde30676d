"""Our C++ kernel for a block's start (depthwise conv + LayerNorm): its build and cache, and its results
against the modules."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from convnextv2_hub.inference import cpp_kernel

has_compiler = shutil.which(cpp_kernel.compiler()) is not None
# Only a missing compiler skips: where there is one, a kernel that fails to build fails these tests.
needs_kernel = pytest.mark.skipif(not has_compiler, reason="no C++ compiler to build the kernel")


def block_start(channels: int, seed: int = 0) -> tuple:
    """A block's depthwise conv and LayerNorm with every parameter random (zero biases hide bugs)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    norm = nn.LayerNorm(channels, eps=1e-6)
    with torch.no_grad():
        for p in (conv.bias, norm.weight, norm.bias):
            p.normal_()
    return conv, norm


def reference(conv: nn.Conv2d, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(conv(x).permute(0, 2, 3, 1))


# Channel blocks of 16: full (96, 768), a partial last one (40, 20); widths of tiles of 7 (56, 7), of 8
# (16) and of 8 with a tail (13, 4); heights below the kernel's 7 rows (4).
@needs_kernel
@pytest.mark.parametrize("n, c, h, w", [(1, 96, 56, 56), (2, 40, 9, 13), (3, 20, 7, 7), (2, 48, 14, 16),
                                        (1, 16, 4, 4), (1, 768, 7, 7)])
def test_dwconv7x7_layernorm_equals_the_modules_in_fp32(n, c, h, w):
    assert cpp_kernel.load()
    conv, norm = block_start(c)
    x = torch.randn(n, c, h, w)
    with torch.no_grad():
        ref = reference(conv, norm, x)
        out = cpp_kernel.dwconv7x7_layernorm(conv, norm, x.contiguous(memory_format=torch.channels_last))
        from_nchw = cpp_kernel.dwconv7x7_layernorm(conv, norm, x)
    assert out.shape == (n, h, w, c) and out.is_contiguous() and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(from_nchw, out)


@needs_kernel
def test_dwconv7x7_layernorm_in_bf16_is_the_fp32_result_rounded_once():
    assert cpp_kernel.load()
    conv, norm = block_start(40)
    x = torch.randn(2, 40, 14, 14)
    with torch.no_grad():
        ref = reference(conv, norm, x.bfloat16().float())  # autocast's bf16 input, fp32 maths
        with torch.autocast("cpu", torch.bfloat16):
            out = cpp_kernel.dwconv7x7_layernorm(conv, norm, x)
        direct = cpp_kernel.dwconv7x7_layernorm(conv, norm, x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, direct)
    # one rounding to bf16 (8 significant bits), plus fp32 summation-order noise near zero
    assert ((out.float() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-5).all()


def test_dwconv7x7_layernorm_leaves_other_layers_and_dtypes_to_the_modules():
    x = torch.randn(1, 16, 8, 8)
    conv, norm = block_start(16)
    dense = nn.Conv2d(16, 16, 7, padding=3)
    strided = nn.Conv2d(16, 16, 7, padding=3, groups=16, stride=2)
    plain_norm = nn.LayerNorm(16, elementwise_affine=False)
    with torch.no_grad():
        for c, n in ((dense, norm), (strided, norm), (conv, plain_norm)):
            assert torch.equal(cpp_kernel.dwconv7x7_layernorm(c, n, x), reference(c, n, x))
        conv, norm = conv.double(), norm.double()
        assert torch.equal(cpp_kernel.dwconv7x7_layernorm(conv, norm, x.double()), reference(conv, norm, x.double()))


def test_a_failed_build_warns_and_reports_false(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_kernel, "_loaded", None)
    with pytest.warns(RuntimeWarning, match="could not build the C.. kernel.*Set CXX"):
        assert cpp_kernel.load() is False
    assert cpp_kernel.load() is False  # decided once per process
    monkeypatch.setattr(cpp_kernel, "_loaded", None)
    monkeypatch.setenv("CONVNEXTV2_HUB_NATIVE", "0")
    assert cpp_kernel.load() is False


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_the_build_is_cached_and_written_whole(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    code = "from convnextv2_hub.inference import cpp_kernel; import sys; sys.exit(0 if cpp_kernel.load() else 1)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    built = sorted((tmp_path / "convnextv2_hub").iterdir())
    assert len(built) == 1 and built[0].name.startswith("dwconv7x7_layernorm-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], env=env, check=True)  # found in the cache, not rebuilt
    assert sorted((tmp_path / "convnextv2_hub").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp


def test_a_question_without_building_builds_nothing(tmp_path, monkeypatch):
    # Predictor.is_compiled_stored asks on a serving thread: an unbuilt kernel is a "no", not a build.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_kernel, "_loaded", None)
    assert cpp_kernel.load(build=False) is False
    assert cpp_kernel._loaded is None and not any(tmp_path.rglob("*.so"))  # nothing built, nothing decided
