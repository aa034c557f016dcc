"""Bytes of weights: of loaded components, and of a diffusers folder's components from their safetensors headers
alone (nothing is read but the headers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from obsdiff import devices
from obsdiff.runs.io import safetensors_header


def _header_dtype_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code (4 for codes outside `devices.SAFETENSORS_DTYPES`)."""
    dtype = getattr(torch, devices.SAFETENSORS_DTYPES.get(code, ""), None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def safetensors_bytes(folder: Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of a component folder take once loaded (the `devices.FLOAT_NAMES` dtypes converted to
    `dtype`; float8 and integers as stored), from headers."""
    floats = set(devices.FLOAT_NAMES.values())
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        for key, info in safetensors_header(path).items():
            if key == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            size = _header_dtype_bytes(info["dtype"])
            if dtype is not None and devices.SAFETENSORS_DTYPES.get(info["dtype"]) in floats:
                size = torch.tensor([], dtype=dtype).element_size()
            total += numel * size
    return total


def largest_file_bytes(pipeline_dir: Path) -> int:
    """Bytes of the largest component's safetensors files in a diffusers folder (what one load maps at once)."""
    sizes = [sum(f.stat().st_size for f in folder.glob("*.safetensors"))
             for folder in Path(pipeline_dir).iterdir() if folder.is_dir()]
    return max(sizes, default=0)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def component_bytes(pipeline) -> dict[str, int]:
    """Bytes of every module component of a loaded pipeline."""
    return {name: module_bytes(c) for name, c in pipeline.components.items() if isinstance(c, nn.Module)}


def disk_component_bytes(pipeline_dir: Path, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of every component of a diffusers folder once loaded in `dtype`, read from safetensors headers."""
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = pipeline_dir / name
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            out[name] = safetensors_bytes(folder, dtype)
    return out
