"""Our C++ depthwise-conv kernel: its build and cache, and its results against PyTorch's conv."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnextv2_hub import native

has_compiler = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernel = pytest.mark.skipif(not has_compiler or not native.load(), reason="no C++ compiler to build it")


def depthwise(channels: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    with torch.no_grad():
        conv.bias.normal_()  # a zero bias would hide a bias bug
    return conv


# Channel blocks of 16: full (96), a partial last one (40, 20); widths of rows of 7 (56, 14, 7), of 8
# (16) and of 8 with a tail (13, 4).
@needs_kernel
@pytest.mark.parametrize("n, c, h, w", [(1, 96, 56, 56), (2, 40, 9, 13), (3, 20, 7, 7), (2, 48, 14, 16),
                                        (1, 16, 4, 4)])
def test_dwconv7x7_equals_the_conv_in_fp32(n, c, h, w):
    conv = depthwise(c)
    x = torch.randn(n, c, h, w)
    with torch.no_grad():
        ref = conv(x)
        out = native.dwconv7x7(conv, x.contiguous(memory_format=torch.channels_last))
        from_nchw = native.dwconv7x7(conv, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(from_nchw, out)


@needs_kernel
def test_dwconv7x7_in_bf16_is_the_fp32_conv_rounded_once():
    conv = depthwise(40)
    x = torch.randn(2, 40, 14, 14).bfloat16()
    with torch.no_grad():
        ref = F.conv2d(x.float(), conv.weight, conv.bias, padding=3, groups=40)  # bf16 input, fp32 maths
        out = native.dwconv7x7(conv, x)
        with torch.autocast("cpu", torch.bfloat16):  # autocast casts fp32 input as it does for the conv
            auto = native.dwconv7x7(conv, x.float())
    assert out.dtype == auto.dtype == torch.bfloat16
    assert torch.equal(out, auto)
    # fp32 accumulation and one rounding to bf16 (8 significant bits): within half an ulp of the result
    assert ((out.float() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-6).all()


def test_dwconv7x7_leaves_other_convs_and_dtypes_to_the_module():
    dense = nn.Conv2d(16, 16, 7, padding=3)
    strided = nn.Conv2d(16, 16, 7, padding=3, groups=16, stride=2)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(native.dwconv7x7(dense, x), dense(x))
        assert torch.equal(native.dwconv7x7(strided, x), strided(x))
        conv = depthwise(16).double()
        assert torch.equal(native.dwconv7x7(conv, x.double()), conv(x.double()))


def test_a_failed_build_warns_and_reports_false(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)
    with pytest.warns(RuntimeWarning, match="could not build the C.. depthwise-conv kernel.*Set CXX"):
        assert native.load() is False
    assert native.load() is False  # decided once per process
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("CONVNEXTV2_HUB_NATIVE", "0")
    assert native.load() is False


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_the_build_is_cached_and_written_whole(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    code = "from convnextv2_hub import native; import sys; sys.exit(0 if native.load() else 1)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    built = sorted((tmp_path / "convnextv2_hub").iterdir())
    assert len(built) == 1 and built[0].name.startswith("dwconv7x7-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], env=env, check=True)  # found in the cache, not rebuilt
    assert sorted((tmp_path / "convnextv2_hub").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp
