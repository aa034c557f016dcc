"""Cached block inputs of the cached calibrator: one `(kwargs, step)` per denoiser call, in memory or spilled to
a memory-mapped file (`calibrate.CachedCalibrator` picks which)."""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from obsdiff.calibration.hooks import tensors_to
from obsdiff.devices import tensor_bytes


class MemoryCache:
    """Cached block inputs, one `(kwargs, step)` per denoiser call, as tensors on `device`."""

    location = "memory"

    def __init__(self, device: torch.device):
        self.device = device
        self.calls: list[tuple[dict, int]] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.calls)

    def append(self, kwargs: dict, step: int) -> None:
        kwargs = tensors_to(kwargs, self.device)
        self.calls.append((kwargs, step))
        self.nbytes += tensor_bytes(kwargs)

    def read(self, i: int, device: torch.device) -> tuple[dict, int]:
        kwargs, step = self.calls[i]
        return tensors_to(kwargs, device), step

    def write(self, i: int, kwargs: dict) -> None:
        self.calls[i] = (tensors_to(kwargs, self.device), self.calls[i][1])

    def __getitem__(self, i: int) -> tuple[dict, int]:
        return self.calls[i]

    def close(self) -> None:
        self.calls = []


@dataclass(frozen=True)
class _Slot:
    """Where one cached tensor lies in a spill file."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


_ALIGN = 64  # bytes; every tensor starts aligned, so a byte view can be reinterpreted as any dtype


class SpillCache:
    """Cached block inputs in a memory-mapped file in `workdir`, one record per denoiser call.

    Records keep the structure of the block's keyword inputs in memory and the tensors in the file; the
    frontier is written back in place (same shapes, as the chained blocks give), anything else is
    appended. The file starts at `capacity` bytes and grows if needed; `close()` (or garbage collection, or
    interpreter exit) deletes it.
    """

    def __init__(self, workdir: Path, capacity: int):
        fd, name = tempfile.mkstemp(prefix="obsdiff-block-inputs-", suffix=".bin", dir=workdir)
        os.close(fd)
        self.path = Path(name)
        self.location = str(self.path)
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        self._capacity = 0
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._end = 0
        self.records: list[tuple[object, int]] = []
        self._reserve(max(capacity, _ALIGN))

    @property
    def nbytes(self) -> int:
        return self._end

    def __len__(self) -> int:
        return len(self.records)

    def _reserve(self, size: int) -> None:
        if size > self._capacity:
            self._capacity = max(size, 2 * self._capacity)
            # Extend the file first: torch.from_file writes a zero to byte 0 when it has to grow the file itself.
            # Older views keep the old mapping alive.
            os.truncate(self.path, self._capacity)
            self._buf = torch.from_file(str(self.path), shared=True, size=self._capacity, dtype=torch.uint8)

    def _new_slot(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(self._end, tuple(t.shape), t.dtype)
        self._end = -(-(self._end + slot.nbytes) // _ALIGN) * _ALIGN
        self._reserve(self._end)
        return slot

    def _store(self, obj, old=None):
        """`obj` with each tensor written to the file and replaced by its slot (reusing `old`'s if it fits)."""
        if isinstance(obj, torch.Tensor):
            slot = old if isinstance(old, _Slot) and old.shape == tuple(obj.shape) and old.dtype == obj.dtype \
                else self._new_slot(obj)
            self._view(slot).copy_(obj.detach().reshape(-1).view(torch.uint8))
            return slot
        if isinstance(obj, dict):
            old = old if isinstance(old, dict) else {}
            return {k: self._store(v, old.get(k)) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            old = old if isinstance(old, list | tuple) and len(old) == len(obj) else [None] * len(obj)
            return type(obj)(self._store(v, o) for v, o in zip(obj, old, strict=True))
        return obj

    def _view(self, slot: _Slot) -> torch.Tensor:
        return self._buf[slot.offset:slot.offset + slot.nbytes]

    def _load(self, obj, device: torch.device):
        if isinstance(obj, _Slot):
            t = self._view(obj).view(obj.dtype).view(obj.shape)
            return t.to(device) if device.type != "cpu" else t  # on the CPU: a view of the mapped file
        if isinstance(obj, dict):
            return {k: self._load(v, device) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._load(v, device) for v in obj)
        return obj

    def append(self, kwargs: dict, step: int) -> None:
        self.records.append((self._store(kwargs), step))

    def read(self, i: int, device: torch.device) -> tuple[dict, int]:
        skeleton, step = self.records[i]
        return self._load(skeleton, device), step

    def write(self, i: int, kwargs: dict) -> None:
        skeleton, step = self.records[i]
        self.records[i] = (self._store(kwargs, skeleton), step)

    def __getitem__(self, i: int) -> tuple[dict, int]:
        return self.read(i, torch.device("cpu"))

    def close(self) -> None:
        self.records = []
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._finalizer()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
