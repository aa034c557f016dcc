"""The device in use and dtype names: one place for `--device auto`, `--dtype auto`, accelerator calls and the
memory probes (free and peak bytes of an accelerator, of the host and of this process).

Accelerator calls go through `torch.accelerator` (any backend: CUDA, ROCm, XPU, MPS) with the backend's own
module as the fallback on older torch. Importing this module is light: torch loads on first use, so the
command-line tools can build their option lists from `DTYPES` without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from obsdiff.errors import ConfigError

if TYPE_CHECKING:
    import torch

# obsdiff's names of floating-point dtypes -> torch's (and ONNX/numpy's) names: every other dtype table derives
# from this one and SAFETENSORS_DTYPES
FLOAT_NAMES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# the floating-point dtypes a model may run or be stored in (`--dtype`)
DTYPES = {short: FLOAT_NAMES[short] for short in ("fp32", "fp16", "bf16")}
# the dtype codes of safetensors headers -> torch's names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
DTYPE_CHOICES = ("auto", *DTYPES)  # `--dtype auto`: bf16 on CUDA (as model cards publish), fp32 elsewhere


def torch_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for `name` ("fp16" or "float16"; "auto": `default_dtype(device)`); dtypes pass through."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return default_dtype(resolve_device(device))
    long = DTYPES.get(name, name)
    if long not in DTYPES.values():
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, long)


def dtype_name(dtype: torch.dtype) -> str:
    """obsdiff's short name of a torch dtype ("bf16"); torch's own for others ("float64", "int8")."""
    long = str(dtype).removeprefix("torch.")
    return next((short for short, name in DTYPES.items() if name == long), long)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere: CPU bf16 matmuls are several times slower than fp32
    (docs/architecture.md#platform-notes)."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` as a torch device: "auto" (or None) is CUDA when available, else the CPU; refuses absent GPUs."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "meta":
        raise ConfigError(f"--device {name!r} holds no data; use auto, cpu or an accelerator")
    return device


def device_option(_ctx, _param, name: str) -> str:
    """click callback of `--device`: "auto" resolved, and a missing GPU refused, before anything loads."""
    return str(resolve_device(name))


def _backend(device: torch.device, name: str, legacy: str | None = None) -> Callable | None:
    """`torch.accelerator.<name>`, else the device module's `<legacy or name>` (torch.cuda on older torch)."""
    import torch

    fn = getattr(getattr(torch, "accelerator", None), name, None)
    return fn if fn is not None else getattr(getattr(torch, device.type, None), legacy or name, None)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type not in ("cpu", "meta"):
        _backend(device, "synchronize")(device)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator (None on the CPU, or where this torch cannot tell)."""
    if device.type == "cpu":
        return None
    get_info = _backend(device, "get_memory_info", "mem_get_info")
    return int(get_info(device)[0]) if get_info is not None else None


def peak_bytes(device: torch.device) -> int | None:
    """The accelerator allocator's peak since the process started (None on the CPU or where unknown)."""
    if device.type == "cpu":
        return None
    get_peak = _backend(device, "max_memory_allocated")
    return int(get_peak(device)) if get_peak is not None else None


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in `obj` (nested tuples, lists, dicts)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _proc_kib(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None where /proc is missing)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: an accelerator's free memory, or the host's available RAM; None if unknown."""
    if device.type != "cpu":
        return free_bytes(device)
    return _proc_kib("/proc/meminfo", "MemAvailable")


def current_rss() -> int:
    """Resident memory of this process now (bytes; 0 where /proc is missing)."""
    return _proc_kib("/proc/self/status", "VmRSS") or 0


def peak_rss() -> int:
    """Peak resident memory of this process so far (bytes).

    VmHWM, the high-water mark of this process's own memory: `getrusage`'s ru_maxrss is not, since Linux
    carries the parent's resident size at fork into it (a child of a 2 GB process never reports less)."""
    hwm = _proc_kib("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured_peaks(device: torch.device) -> dict[str, int]:
    """What this process actually peaked at: host RSS, and the accelerator's allocator peak when one is used."""
    peaks = {"cpu": peak_rss()}
    peak = peak_bytes(device)
    if peak is not None:
        peaks[str(device)] = peak
    return peaks


def empty_cache(device: torch.device) -> None:
    """Hand cached, unused accelerator blocks back, so another allocation (the Hessians) can use them."""
    if device.type != "cpu":
        fn = _backend(device, "empty_cache")
        if fn is not None:
            fn()


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes: device events on an accelerator (queued work counts), perf_counter on CPU."""
    if device.type == "cpu":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    import torch

    synchronize(device)
    event = getattr(torch, "Event", None)  # device-generic events; torch.cuda's on older torch
    start, end = ((event(device, enable_timing=True), event(device, enable_timing=True)) if event is not None
                  else (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3
