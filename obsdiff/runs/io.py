"""Run directories: a pruned denoiser plus the report that made it.

    runs/NAME/obsdiff.json                                  report, configs, base model, weight hashes
    runs/NAME/denoiser/config.json                          the base denoiser's config, unchanged
    runs/NAME/denoiser/diffusion_pytorch_model.safetensors  pruned weights, same shapes as the base
or, for a denoiser over the shard size, the diffusers sharded layout:
    runs/NAME/denoiser/diffusion_pytorch_model-0000K-of-0000N.safetensors
    runs/NAME/denoiser/diffusion_pytorch_model.safetensors.index.json

Weights are stored in the base model's dtype unless asked otherwise (`weights_dtype` in obsdiff.json),
with a sha256 per file. Loading (`rebuild.build_run_denoiser`) builds the base architecture on the meta device
and loads the weights shard by shard, strictly (every key, every shape), so no second full copy is ever held.
Format 1 runs (one file, no per-shard hashes) still load. `base` (how to find the base model again: hub id and
commit, or a path relative to the run) was added within format 2; runs without it resolve `base_model` alone.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from obsdiff.devices import FLOAT_NAMES, SAFETENSORS_DTYPES, dtype_name, torch_dtype
from obsdiff.errors import ConfigError, ModelLoadError
from obsdiff.runs.artifacts import (
    check_json,
    check_writable,
    machine,
    read_json,
    sha256_file,
    staged_dir,
    versions,
    write_json,
)

log = logging.getLogger(__name__)

RUN_FILE = "obsdiff.json"
DENOISER_DIR = "denoiser"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SHARD_FILE = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"
FORMAT_VERSION = 2
DEFAULT_MAX_SHARD_SIZE = "10GB"  # as diffusers' save_pretrained

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def base_reference(model, out: str | Path) -> tuple[str, dict]:
    """How a run at `out` refers to its base model: (`base_model`, `base`).

    `base_model` is what a person would pass as --model: `builtin:NAME`, `org/name@sha` for a hub snapshot,
    else the absolute pipeline directory (what format-2 readers without `base` understand). `base` says how
    to find it again: {"builtin"}, {"hub_id", "revision"} (the commit sha), or {"path": relative to the run,
    "absolute_path": a hint}; the relative path is what keeps a run valid when moved together with its base.
    """
    if model.builtin:
        return f"builtin:{model.builtin}", {"builtin": model.builtin}
    if getattr(model, "hub_id", None):
        revision = getattr(model, "revision", None)
        return (f"{model.hub_id}@{revision}" if revision else model.hub_id), {"hub_id": model.hub_id,
                                                                               "revision": revision}
    absolute = Path(model.path).resolve()
    base = {"absolute_path": str(absolute)}
    with contextlib.suppress(ValueError):  # another drive (Windows): no relative path exists
        base["path"] = Path(os.path.relpath(absolute, Path(out).resolve())).as_posix()
    return str(absolute), base


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "10GB", "500MB", "2GiB" (decimal units, as diffusers)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"shard size {size!r} is not a positive size; write it like 10GB or 500MB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


def read_safetensors_header(f: BinaryIO) -> tuple[dict, int]:
    """(header, offset of the first data byte) of the safetensors file open at its start in `f`; the header maps
    tensor name -> dtype, shape and data offsets (plus "__metadata__"). ValueError or struct.error if it is not one.
    """
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 100 * 2**20:  # the format caps headers at 100 MB; more means this is not one
        raise ValueError(f"header length {n}")
    return json.loads(f.read(n)), 8 + n


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), without reading data."""
    try:
        with open(path, "rb") as f:
            return read_safetensors_header(f)[0]
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc})") from None


def stored_dtype(denoiser_dir: str | Path) -> str | None:
    """The dtype name ("fp16", ...) of the floating-point weights in a diffusers model folder, or None.

    Only the safetensors headers are read. Mixed dtypes give the one holding most elements; None when
    the folder has no safetensors weights (e.g. only .bin files) or stores a dtype runs do not use.
    """
    folder = Path(denoiser_dir)
    if (folder / INDEX_FILE).is_file():
        weight_map = read_json(folder / INDEX_FILE, "weight index", require={"weight_map": dict},
                               fix="pass an intact diffusers model", error=ModelLoadError)["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    else:
        files = sorted(folder.glob("*.safetensors"))  # e.g. a variant: diffusion_pytorch_model.fp16.safetensors
    counts: Counter[str] = Counter()
    for file in files:
        for key, info in safetensors_header(file).items():
            if key != "__metadata__" and info["dtype"].startswith(("F", "BF")):
                n = 1
                for s in info["shape"]:
                    n *= s
                counts[info["dtype"]] += n
    if not counts:
        return None
    long = SAFETENSORS_DTYPES.get(counts.most_common(1)[0][0])
    return next((short for short, name in FLOAT_NAMES.items() if name == long), None)


def _dominant_dtype(module):
    counts: Counter = Counter()
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else None


def save_dtype(model, dtype=None):
    """The torch dtype a run of `model` stores its weights in: `dtype` if given (a torch dtype or
    "fp32"/"fp16"/"bf16"), else the base model's dtype on disk, else the in-memory one."""
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"save dtype {dtype} is not a floating-point dtype; use fp32, fp16 or bf16")
        return dtype
    if dtype is not None:
        return torch_dtype(dtype)
    folder = Path(model.path) / model.family.denoiser_attr
    name = stored_dtype(folder) if (folder / "config.json").is_file() else None
    if name is not None:
        return getattr(torch, FLOAT_NAMES[name])
    found = _dominant_dtype(model.denoiser)
    log.info("no safetensors weights in %s to take the base dtype from; saving in %s", folder, found)
    return found or torch.float32


def check_can_save(model, out: str | Path, force: bool = False, dtype=None):
    """Everything `save_run` would refuse, checked before the (slow) prune. Returns the save dtype.

    Refuses an existing `out` without `force`, an unwritable location and a bad `dtype`. Size is no
    reason to refuse (large denoisers are sharded); short disk space is only logged, since a
    structured prune saves less than the dense size estimated here.
    """
    out = check_writable(out, force)
    target = save_dtype(model, dtype)
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {out}: {parent} is not writable; choose another --out")
    size = sum(p.numel() for p in model.denoiser.parameters()) * target.itemsize
    free = shutil.disk_usage(parent).free
    if free < size:
        log.warning("%s has %.1f GB free; the run may need up to %.1f GB", parent, free / 1e9, size / 1e9)
    return target


def _plan_shards(state: dict, itemsize: dict, max_bytes: int) -> list[list[str]]:
    # Greedy in state-dict order, as diffusers/huggingface_hub shard: a tensor over the limit gets a shard alone.
    shards, current, used = [], [], 0
    for key, t in state.items():
        n = t.numel() * itemsize[key]
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    if current or not shards:
        shards.append(current)
    return shards


def _shard_tensors(state: dict, keys: list[str], dtype, as_stored: frozenset = frozenset()) -> dict:
    """CPU copies of one shard's tensors, floating ones cast to `dtype` (each tensor converted on its own) except
    those in `as_stored` (quantized layers' codes and scales)."""
    import torch

    out, storages = {}, set()
    for key in keys:
        src = state[key].detach()
        cast = src.is_floating_point() and key not in as_stored
        t = src.to("cpu", dtype) if cast else src.to("cpu")
        if t.is_floating_point() and t.dtype != src.dtype and not torch.isfinite(t).all() \
                and torch.isfinite(src).all():
            raise ConfigError(f"weight {key} overflows {dtype_name(dtype)} (largest |w| "
                              f"{float(src.abs().max()):g}); save in fp32 or bf16 instead (--save-dtype)")
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors sharing memory (tied weights)
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def quantized_state(denoiser) -> tuple[dict, frozenset, dict[str, dict]]:
    """The state dict a run stores: quantized linears' weights as their codes (int8, int4 in int8, float8) next
    to their float32 scales; the keys stored as they are (not cast); {layer: spec} of the quantized linears."""
    from obsdiff.solver.qlinear import quantized_layers

    state = denoiser.state_dict()  # references, not copies
    layers = quantized_layers(denoiser)
    as_stored = set()
    for name, lin in layers.items():
        state[f"{name}.weight"] = lin.weight_codes()
        as_stored |= {f"{name}.weight", *(f"{name}.{b}" for b, _ in lin.named_buffers())}
    return state, frozenset(as_stored), {name: lin.quant_spec() for name, lin in layers.items()}


def _write_weights(denoiser, folder: Path, dtype, max_shard_size) -> tuple[dict[str, str], dict[str, dict]]:
    """Write the denoiser's state dict as safetensors shards in `dtype`; ({file name: sha256}, quantized layers)."""
    from safetensors.torch import save_file

    state, as_stored, quantized = quantized_state(denoiser)
    itemsize = {k: (dtype.itemsize if t.is_floating_point() and k not in as_stored else t.element_size())
                for k, t in state.items()}
    shards = _plan_shards(state, itemsize, parse_size(max_shard_size))
    names = [WEIGHTS_FILE] if len(shards) == 1 else [SHARD_FILE.format(i + 1, len(shards))
                                                     for i in range(len(shards))]
    hashes = {}
    for name, keys in zip(names, shards, strict=True):
        tensors = _shard_tensors(state, keys, dtype, as_stored)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        hashes[name] = sha256_file(folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(state[k].numel() * itemsize[k] for k in state)},
                 "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys}}
        write_json(folder / INDEX_FILE, index)
    return hashes, quantized


def combined_sha256(hashes: dict[str, str]) -> str:
    """One hash for a sharded denoiser: sha256 of its "path sha256" lines (paths relative to the run), sorted."""
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()


def save_run(model, report: dict, out: str | Path, force: bool = False, dtype=None,
             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the pruned denoiser of `model` and `report` as a run directory (atomically).

    `dtype` None stores the weights in the base model's dtype (read from its safetensors headers), a torch
    dtype or "fp32"/"fp16"/"bf16" overrides it. Denoisers over `max_shard_size` bytes (int or "10GB")
    are written in shards; tensors are cast one shard at a time, never as a second full copy.
    """
    target = check_can_save(model, out, force, dtype)
    out = Path(out)
    with staged_dir(out, force=force) as tmp:
        folder = tmp / DENOISER_DIR
        folder.mkdir()
        model.denoiser.save_config(folder)
        written, quantized = _write_weights(model.denoiser, folder, target, max_shard_size)
        hashes = {f"{DENOISER_DIR}/{k}": v for k, v in written.items()}
        sharded = len(hashes) > 1
        base_model, base = base_reference(model, out)
        record = {
            "format": FORMAT_VERSION,
            "base_model": base_model,
            "base": base,
            "family": model.family.name,
            "denoiser_file": f"{DENOISER_DIR}/{INDEX_FILE if sharded else WEIGHTS_FILE}",
            "denoiser_sha256": combined_sha256(hashes) if sharded else next(iter(hashes.values())),
            "denoiser_shards": hashes,
            "weights_dtype": dtype_name(target),
            **({"quantized_layers": quantized} if quantized else {}),
            **report,
            "versions": versions(),
            "machine": machine(),
        }
        # the report's base_model is the --model value as typed (maybe relative): the run keeps the resolved one
        record.update(base_model=base_model, base=base)
        write_json(tmp / RUN_FILE, record)
    return out


@dataclass(frozen=True)
class RunRecord:
    """A run's obsdiff.json (`read_run`): the keys obsdiff reads as typed fields, each as stored (None where the
    record lacks it), and the whole record as `raw`, which `to_dict` gives back as written."""

    raw: dict = field(repr=False)
    format: int = 1
    base_model: str | None = None  # what a person would pass as --model (required by `read_run`)
    base_hub_id: str | None = None  # `base`: how to find the base model again (format 2)
    base_revision: str | None = None  # the hub snapshot's commit sha
    base_path: str | None = None  # the base pipeline directory relative to the run
    family: str = "sd3"  # format 1 runs were all SD3
    denoiser_file: str | None = None  # relative to the run (required by `read_run`)
    denoiser_sha256: str | None = None  # of the file, or `combined_sha256` of the shards
    denoiser_shards: dict[str, str] | None = None  # {relative path: sha256}; format 1 has none
    weights_dtype: str | None = None
    prune: dict | None = None  # `PruneConfig.to_dict()`
    calib: dict | None = None  # `CalibConfig.to_dict()`
    sparsity: float | None = None  # overall fraction of pruned weights
    layers: list[dict] | None = None  # `LayerRecord`s
    structures: list[dict] | None = None  # structured pruning's `StructureRecord`s
    shrink_plan: list[dict] | None = None  # structured pruning's kept slices, replayed when the run loads
    quantized_layers: dict[str, dict] | None = None  # {linear: `QuantLinear.quant_spec()`}: stored as codes + scales

    @classmethod
    def from_dict(cls, record: dict) -> RunRecord:
        base = record.get("base") or {}
        return cls(raw=record, format=record.get("format", 1), base_model=record.get("base_model"),
                   base_hub_id=base.get("hub_id"), base_revision=base.get("revision"), base_path=base.get("path"),
                   family=record.get("family", "sd3"), denoiser_file=record.get("denoiser_file"),
                   denoiser_sha256=record.get("denoiser_sha256"), denoiser_shards=record.get("denoiser_shards"),
                   weights_dtype=record.get("weights_dtype"), prune=record.get("prune"), calib=record.get("calib"),
                   sparsity=record.get("sparsity"), layers=record.get("layers"),
                   structures=record.get("structures"), shrink_plan=record.get("shrink_plan"),
                   quantized_layers=record.get("quantized_layers"))

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)

    @property
    def quant_scheme(self) -> str | None:
        """The quantization scheme ("w8a8", ...) of a quantized run, None for one in the model dtype."""
        return next(iter(self.quantized_layers.values()))["scheme"] if self.quantized_layers else None

    @property
    def sparsity_type(self) -> str | None:
        """The prune's sparsity type ("2:4", "structured", ...; None where the record has no prune config)."""
        return (self.prune or {}).get("sparsity_type")


def read_run(path: str | Path) -> RunRecord:
    """The run record of run directory `path`, checked: one line for a damaged, foreign or newer record."""
    path = Path(path)
    record = read_json(path / RUN_FILE, "run record", fix="the run directory is damaged; re-run obsdiff prune",
                       error=ModelLoadError)
    check_json(record, path / RUN_FILE, "run record", require={"base_model": str, "denoiser_file": str},
               fix="it was not written by obsdiff prune", error=ModelLoadError)
    if not isinstance(record.get("format", 1), int):
        raise ModelLoadError(f"{path / RUN_FILE} has format {record['format']!r}; it was not written by obsdiff prune")
    if record.get("format", 1) > FORMAT_VERSION:
        raise ModelLoadError(f"{path / RUN_FILE} has format {record['format']}, newer than this obsdiff reads "
                             f"({FORMAT_VERSION}); update obsdiff")
    return RunRecord.from_dict(record)


