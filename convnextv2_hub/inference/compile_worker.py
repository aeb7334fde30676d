"""The process that builds a store entry of the compiled CPU path (``inference.compiled_store``):
``python -m convnextv2_hub.inference.compile_worker SPEC``, started by ``compiled_store.build_in_child``.

It reads the model and the key, rebuilds the segments of ``CompiledConvNeXtV2`` that the key names, each
under the key's autocast dtype so that ``torch.export`` records the casts into its graph, and has
``compiled_store.build_entry`` export, compile and store them with the compiled path's inductor options.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import compiled_store, cpp_kernel
from .compile_backend import Segment, inductor_options


class InPrecision(nn.Module):
    """``module`` under CPU autocast to ``dtype`` (a torch dtype's name; None: as it is)."""

    def __init__(self, module: nn.Module, dtype: Optional[str]) -> None:
        super().__init__()
        self.module = module
        self.dtype = getattr(torch, dtype) if dtype else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.module(x)
        with torch.autocast("cpu", dtype=self.dtype):
            return self.module(x)


def segments(model: nn.Module, key: Dict[str, Any]) -> List[Tuple[nn.Module, int]]:
    """(segment under the key's precision, micro-batch) for each entry of the key's plan."""
    if key["native_kernel"] and not cpp_kernel.load():
        raise RuntimeError("the C++ kernel that the key names could not be built in the compiling process")
    chain = []
    for first, last, size in key["plan"]:
        segment = Segment(model, first, last, cpu_forms=True, pre_logits=key["pre_logits"])
        segment.dwconv_ln_kernel = key["native_kernel"]
        chain.append((InPrecision(segment, key["autocast"]), size))
    return chain


def main(spec_path: str) -> None:
    model, key, folder = compiled_store.read_spec(spec_path)
    torch.set_num_threads(key["threads"])  # inductor blocks its GEMM kernels for the thread count
    compiled_store.build_entry(segments(model, key), key, folder, inductor_options(True, key["autotune"]),
                               say=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(sys.argv[1])
