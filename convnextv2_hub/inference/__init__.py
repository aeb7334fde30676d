"""Running a trained model: ``predictor`` (``predict``, ``Predictor`` and its backends), ``compiled``
(the torch.compile path), ``native`` (its C++ kernel, source in ``csrc/``), ``export`` (ONNX and
TorchScript, verified) and ``onnx_runtime`` (sessions for exported files)."""
