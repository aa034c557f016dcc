"""obsdiff.export: PyTorch denoisers to ONNX, with parity and sparsity checks, and serving layouts."""
