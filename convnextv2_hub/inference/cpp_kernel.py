"""C++ CPU kernels of our own, built with the system's C++ compiler on first use and cached.

One so far: ``convnextv2_hub::dwconv7x7_layernorm`` (``csrc/dwconv7x7_layernorm.cpp``), the blocks'
depthwise conv and LayerNorm in one pass, for the compiled CPU graphs. The library is built once per
(source, torch version, compiler, flags) into ``$TORCH_EXTENSIONS_DIR/convnextv2_hub`` (default
``~/.cache/torch_extensions/convnextv2_hub``), where torch keeps its own C++ extensions, and loaded
with ``torch.ops.load_library``. torch.compile on a CPU needs the same compiler, so wherever the
compiled path runs this builds too; if the build fails anyway, ``load()`` returns False with a
warning once, and the callers keep oneDNN's conv.
``CONVNEXTV2_HUB_NATIVE=0`` turns the kernels off.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from ..files import atomic_path, user_cache_dir

SOURCE = Path(__file__).with_name("csrc") / "dwconv7x7_layernorm.cpp"

torch.library.define("convnextv2_hub::dwconv7x7_layernorm",
                     "(Tensor x, Tensor weight, Tensor bias, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor")


@torch.library.register_fake("convnextv2_hub::dwconv7x7_layernorm")
def _dwconv7x7_layernorm_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                               ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.new_empty(n, h, w, c)


_loaded: Optional[bool] = None


def compiler() -> str:
    """The C++ compiler the kernels are built with: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def _compile_command() -> List[str]:
    """The build command, less its ``-o <output>``."""
    torch_dir = Path(torch.__file__).parent
    torch_lib = torch_dir / "lib"
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp",  # OpenMP: at::parallel_for's threads
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Built on the machine it runs on, so for its ISA; 512-bit vectors where it has them.
        flags += ["-march=native", "-mprefer-vector-width=512"]
    else:
        flags += ["-mcpu=native"]
    includes = [f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    return [compiler(), *flags, *includes, str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{torch_lib}"]


def _library_path(command: List[str]) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(user_cache_dir() / "torch_extensions")
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join([torch.__version__, sys.version, *command]).encode())
    executable = shutil.which(command[0]) or command[0]
    key.update(subprocess.run([executable, "--version"], capture_output=True, check=True).stdout)
    return Path(root) / "convnextv2_hub" / f"dwconv7x7_layernorm-{key.hexdigest()[:16]}.so"


def load(build: bool = True) -> bool:
    """Build (once, cached) and load the kernels; True when ``convnextv2_hub::dwconv7x7_layernorm`` can run.
    ``build=False``: False rather than build a library that is not in the cache yet (a question that must
    not stall its caller), without deciding anything for later calls."""
    global _loaded
    if _loaded is None and not build and os.environ.get("CONVNEXTV2_HUB_NATIVE", "1") != "0":
        try:
            if not _library_path(_compile_command()).exists():
                return False
        except (OSError, subprocess.CalledProcessError):
            return False
    if _loaded is None:
        _loaded = False
        if os.environ.get("CONVNEXTV2_HUB_NATIVE", "1") != "0":
            try:
                command = _compile_command()
                path = _library_path(command)
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # Built next to its final name and renamed: a process reading the cache never
                    # sees half a library, and two building at once each write their own file.
                    with atomic_path(path) as tmp:
                        subprocess.run([*command, "-o", str(tmp)], capture_output=True, text=True, check=True)
                torch.ops.load_library(str(path))
                _loaded = True
            except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
                detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else str(e)
                warnings.warn(f"convnextv2_hub: could not build the C++ kernel for the blocks' depthwise conv "
                              f"and LayerNorm, so the compiled CPU path keeps oneDNN's conv (a little slower). "
                              f"Set CXX to a working C++ compiler to use it.\n{detail}", RuntimeWarning,
                              stacklevel=2)
    return _loaded


def dwconv7x7_layernorm(conv: nn.Conv2d, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x).permute(0, 2, 3, 1))``, how a block starts (its 7x7 depthwise conv, padding 3,
    then the LayerNorm over channels), through ``convnextv2_hub::dwconv7x7_layernorm``: in fp32, or
    in bf16 under CPU autocast (fp32 maths, one rounding of the result, the dtype the next Linear casts
    to). Returns NHWC. Call ``load()`` first; other layers and dtypes run the modules themselves."""
    c = conv.out_channels
    x_in = x.to(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else x
    if (conv.kernel_size != (7, 7) or conv.groups != c or conv.in_channels != c or conv.padding != (3, 3)
            or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.bias is None
            or norm.normalized_shape != (c,) or norm.weight is None or norm.bias is None
            or x_in.dtype not in (torch.float32, torch.bfloat16)):
        return norm(conv(x).permute(0, 2, 3, 1))
    # 49 x C, contiguous: under freezing this is folded into a constant once, when the graph compiles.
    weight = conv.weight.float().permute(2, 3, 0, 1).reshape(49, c).contiguous()
    return torch.ops.convnextv2_hub.dwconv7x7_layernorm(x_in, weight, conv.bias.float(), norm.weight.float(),
                                                         norm.bias.float(), norm.eps)
