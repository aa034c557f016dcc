"""Bytes of weights: of loaded components, and of a diffusers folder's components from their safetensors headers
alone (nothing is read but the headers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


FLOAT_TYPES = {"F64", "F32", "F16", "BF16"}


def safetensors_bytes(folder: Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of a component folder take once loaded (floats converted to `dtype`), from headers."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            size = DTYPE_BYTES.get(info["dtype"], 4)
            if dtype is not None and info["dtype"] in FLOAT_TYPES:
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
