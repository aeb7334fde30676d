"""Running a trained model: ``predictor`` (``predict``, ``Predictor`` and its backends),
``compile_backend`` (the compiled path), ``compiled_store`` (its CPU graphs as AOTInductor packages kept
on disk for later processes) and ``compile_worker`` (the process that builds them), ``cpp_kernel`` (its C++
kernel, source in ``csrc/``), ``export`` (ONNX and TorchScript, verified) and ``onnx_runtime`` (sessions for
exported files)."""
