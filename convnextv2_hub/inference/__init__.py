"""Running a trained model: ``predictor`` (``predict``, ``Predictor`` and its backends),
``compile_backend`` (the torch.compile path), ``cpp_kernel`` (its C++ kernel, source in ``csrc/``),
``export`` (ONNX and TorchScript, verified) and ``onnx_runtime`` (sessions for exported files)."""
