"""obsdiff.engines: TensorRT engines from ONNX, runners for every backend, latency benchmarks.

    cli            build-engine and bench, added to the export group: the `obsdiff-export` entry point
    trt            build_engine / EngineConfig through Polygraphy's TensorRT backend (TensorRT 10, 11)
    trt_rules      pure rules: builder flags per TensorRT generation, CreateConfig arguments, the trtexec line,
                   sparse layers from the build log
    trt_env        TensorRT, Polygraphy and the GPU this machine has (one-line errors when missing)
    engine_record  engine sidecars and stale-engine detection (check_engine)
    build_monitor  the build log through Polygraphy's logger, a progress line while TensorRT builds
    trt_runtime    TrtEngine: run a built engine with Polygraphy's TrtRunner on PyTorch CUDA tensors
    sidecar        read_onnx_sidecar: graph inputs, dtypes, profiles and sparsity of an exported ONNX; its Q/DQ nodes
    runner_base    the Runner interface and registry; runners: torch, torch-compile, torch-sparse24 and
                   make_runner; graph_runners: onnxruntime, tensorrt
    bench          run_bench (BenchConfig in bench_config): denoiser or whole-pipeline latency, interleaved,
                   as ratios to dense; pipeline_bench: the pipeline scope; timing: shared timing primitives
    report         format_bench (tables), plot_bench (bar chart), save_bench

Nothing here is imported by `obsdiff` or `obsdiff.export`; TensorRT, Polygraphy, onnxruntime and matplotlib
load on first use.
"""
