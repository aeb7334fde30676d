"""ONNX Runtime sessions for exported models: the onnxruntime backend of ``Predictor`` and export verification."""
from __future__ import annotations

from typing import Optional

import torch

from ..files import PathLike


def onnx_session(path: PathLike, threads: Optional[int] = None):
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
