"""obsdiff.engines: TensorRT engines from ONNX, runners for every backend, latency benchmarks."""
