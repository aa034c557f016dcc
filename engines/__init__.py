"""obsdiff.engines: TensorRT engines from ONNX, runners for every backend, latency benchmarks.

    trt          build_engine / check_engine / EngineConfig (TensorRT 10 and 11), profiles from the export sidecar
    trt_rules    pure rules: builder flags per TensorRT generation, sparse layers from the build log
    trt_runtime  TrtEngine: run a built engine on PyTorch CUDA tensors
    sidecar      read_onnx_sidecar: graph inputs, dtypes, profiles and sparsity of an exported ONNX
    runners      make_runner: torch, torch-compile, torch-sparse24 (+ onnxruntime, tensorrt in graph_runners)
    bench        run_bench / BenchConfig: denoiser or whole-pipeline latency, interleaved, as ratios to dense
    report       format_bench (tables), plot_bench (bar chart), save_bench

Nothing here is imported by `obsdiff` itself; TensorRT, onnxruntime and matplotlib load on first use.
"""
