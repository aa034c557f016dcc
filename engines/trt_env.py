"""What building or running an engine needs here: TensorRT, Polygraphy's TensorRT backend and a CUDA GPU.

A leaf module (no other `obsdiff.engines` import), so stale-engine checks, the builder and the runtime
can all ask for the same environment without importing each other.
"""

from __future__ import annotations

from obsdiff.errors import MissingDependencyError, ObsdiffError

TENSORRT_INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt"
POLYGRAPHY_INSTALL = 'pip install "obsdiff[onnx]" (or pip install polygraphy)'


class NoGpuError(ObsdiffError):
    """A CUDA GPU is needed (TensorRT builds and runs engines on the GPU that will use them)."""


def require_tensorrt():
    """The `tensorrt` module, or a one-line error that says how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed (no `tensorrt` Python module); install it from NVIDIA's index: "
            f"`{TENSORRT_INSTALL}` (Linux or Windows with an NVIDIA GPU and driver)") from None
    return tensorrt


def require_polygraphy_trt():
    """`polygraphy.backend.trt` (engines are built and run through it), or a one-line error."""
    try:
        from polygraphy.backend import trt as poly_trt
    except ImportError:
        raise MissingDependencyError(f"Polygraphy is not installed; it builds and runs TensorRT engines: "
                                     f"{POLYGRAPHY_INSTALL}") from None
    return poly_trt


def require_cuda_gpu() -> dict:
    """Name and compute capability of CUDA device 0, or a one-line error."""
    import torch

    if not torch.cuda.is_available():
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "no GPU or driver is visible to PyTorch")
        raise NoGpuError(f"TensorRT engines need a CUDA GPU and none is usable here ({why}); run on a machine with "
                         "an NVIDIA GPU, its driver and a CUDA build of PyTorch")
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def current_environment() -> dict:
    """What an engine built here is tied to: the TensorRT version and the GPU."""
    trt = require_tensorrt()
    gpu = require_cuda_gpu()
    return {"tensorrt": getattr(trt, "__version__", "unknown"), "gpu": gpu["name"],
            "compute_capability": gpu["compute_capability"]}
