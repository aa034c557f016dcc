"""What this installation can do: library versions, devices, sparse tensor core support."""

from __future__ import annotations

from obsdiff.runs.artifacts import package_version


def tensorrt_version() -> str | None:
    # TensorRT wheels ship under several distribution names; the module is what counts.
    try:
        import tensorrt

        return getattr(tensorrt, "__version__", "unknown")
    except Exception:
        return None


def sparse_tensor_cores() -> tuple[bool, str]:
    """Whether 2:4 sparse tensor cores are reachable from PyTorch here, and why (not)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to PyTorch"
    major, minor = torch.cuda.get_device_capability(0)
    if major < 8:
        return False, f"GPU compute capability {major}.{minor} < 8.0 (Ampere or newer needed)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return True, f"compute capability {major}.{minor} with torch.sparse.to_sparse_semi_structured"


def environment_info() -> dict:
    import platform

    import torch

    libs = {name: package_version(name) for name in
            ("obsdiff", "torch", "diffusers", "transformers", "onnx", "onnxscript", "polygraphy")}
    libs["onnxruntime"] = package_version("onnxruntime") or package_version("onnxruntime-gpu")
    libs["tensorrt"] = tensorrt_version()
    devices = [{"name": "cpu", "detail": f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} torch threads"}]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        cap = torch.cuda.get_device_capability(i)
        mem = torch.cuda.get_device_properties(i).total_memory / 2**30
        devices.append({"name": f"cuda:{i}",
                        "detail": f"{torch.cuda.get_device_name(i)}, sm_{cap[0]}{cap[1]}, {mem:.0f} GiB"})
    ok, why = sparse_tensor_cores()
    providers = None
    if libs["onnxruntime"]:
        try:
            import onnxruntime

            providers = onnxruntime.get_available_providers()
        except Exception as exc:  # a broken install should not break `info`
            providers = [f"error: {exc}"]
    from obsdiff.builtin import builtin_names
    from obsdiff.models import FAMILIES

    return {
        "python": platform.python_version(),
        "libraries": libs,
        "devices": devices,
        "sparse_tensor_cores": {"usable": ok, "reason": why},
        "onnxruntime_providers": providers,
        "families": {f.name: f.description for f in FAMILIES.values()},
        "builtin_models": ["builtin:" + n for n in builtin_names()],
    }
