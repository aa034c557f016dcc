"""Memory of a prune, planned before any work: per group and per device, from shapes alone.

The denoiser is rebuilt on the meta device (no memory, seconds even at 12 B parameters) and run once at the
calibration shape under a dispatch mode that counts the bytes of live intermediate tensors: that gives
every prunable linear's input shape (so the Hessians, the hook transients and the cached block inputs) and
the activation peak of one forward, exactly, for any family. Weights come from the loaded modules or from the
safetensors headers on disk (nothing is read but the headers). What remains is a model of the solver's
workspace, measured against peak RSS in `bench/scale.py`.

Peak of a prune = max over its phases, per device:
  encode:     weights (text encoders on the device)
  calibrate:  denoiser + group Hessians + activations + one call's hook transient (+ cached inputs)
  solve:      denoiser + group Hessians + the largest layer's solver workspace
Text encoders and the VAE leave the accelerator after the prompts are encoded (`text_encoders_parked`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from obsdiff import devices
from obsdiff.errors import ConfigError
from obsdiff.io import safetensors_header

log = logging.getLogger(__name__)

GiB = 2**30
# Solver workspace per layer, as (copies of d_in^2, copies of d_out * d_in) values in the solver dtype, by what the
# method reads from calibration (`methods.Method.hessian`):
# - "full" (OBS): H's damped copy, its Cholesky factor, the inverse and U (blocked OBS) or the running inverse
#   (structured); W in the compute dtype, the updated copy and the error terms. Fitted against peak RSS on
#   SD3-Medium-width layers (bench/scale.py).
# - "diag" (Wanda): H moved to the weights' device and the Cholesky factor of the error records
#   (`obs.layer_errors`); W in the compute dtype, its score, top-k values and int64 indices, the mask, the pruned
#   copy and the three stacked error terms. The live bytes of `prune._solve_unit`, counted op by op like a
#   forward below (`_LiveBytes`) on 256 to 1024 wide layers, bf16 and fp32 weights, fp32 and fp64 solves,
#   sparsity 0.5, 0.9 and 2:4, peaked at 7 d_out d_in + 0.55 d_in^2.
# - None (magnitude): W in the compute dtype, |W|, the top-k values and int64 indices of up to every entry and
#   the bool mask: 1 + 1 + 3 + 0.25 at most (the pruned copy is made once the scores are freed). Counted the same
#   way: 2.75 at sparsity 0.5 on fp32 weights, 4.95 at 0.9 on bf16 ones.
SOLVE_COPIES: dict[str | None, tuple[float, float]] = {"full": (4, 4), "diag": (2, 7), None: (0, 5.25)}


# ---------------------------------------------------------------------------------------- measuring on meta


class _LiveBytes:
    """Bytes of live tensors created inside a `TorchDispatchMode`, and their peak (views and in-place ops
    allocate nothing and are not counted)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def track(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)


class FusedAttention(torch.overrides.TorchFunctionMode):
    """Attention as the fused kernels run it (flash / memory-efficient on GPUs, flash on CPUs): an output the
    size of the query, no (tokens x tokens) score matrix. On the meta device SDPA would otherwise decompose
    into the math path and count scores that real runs never hold."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **kwargs)


def _allocates(func) -> bool:
    return not any(r.alias_info is not None for r in func._schema.returns)


@dataclass
class ForwardProfile:
    """What one denoiser forward at the calibration shape needs, measured on the meta device."""

    linear_inputs: dict[str, tuple[int, ...]]  # dotted linear name -> input shape of its (first) call
    activation_peak: int  # bytes of intermediate tensors alive at once
    block_input_bytes: int  # one call's keyword inputs of the first selected block (cached calibration)


def profile_forward(denoiser: nn.Module, inputs: dict, first_block: nn.Module | None = None) -> ForwardProfile:
    """Run `denoiser` (on the meta device, with meta `inputs`) once and measure shapes and live bytes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: dict[str, tuple[int, ...]] = {}
    block_bytes = [0]
    live = _LiveBytes()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if _allocates(func):
                live.track(out)
            return out

    handles = []
    for name, mod in denoiser.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, n=name: shapes.setdefault(n, tuple(args[0].shape)) and None))
    if first_block is not None:
        def on_block(mod, args, kwargs):
            if not block_bytes[0]:
                block_bytes[0] = tensor_bytes(kwargs) + tensor_bytes(args)

        handles.append(first_block.register_forward_pre_hook(on_block, with_kwargs=True))
    try:
        with torch.no_grad(), FusedAttention(), Count():
            denoiser(**inputs, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return ForwardProfile(shapes, live.peak, block_bytes[0])


def meta_twin(denoiser: nn.Module, shrink_plan: list | None = None, family=None) -> nn.Module:
    """The same architecture on the meta device (shrunk like a structured run when given its plan)."""
    if all(p.is_meta for p in denoiser.parameters()):
        return denoiser
    with torch.device("meta"):
        twin = type(denoiser).from_config(denoiser.config)
    if shrink_plan:
        from obsdiff.shrink import replay_plan_

        groups = [g for b in family.blocks(twin) for g in family.structure_groups(b)]
        replay_plan_(twin, groups, shrink_plan)
    return twin


# ---------------------------------------------------------------------------------------------- weights


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


# ---------------------------------------------------------------------------------------------- devices


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in `obj` (nested tuples, lists, dicts)."""
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
        return devices.free_bytes(device)
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
    peak = devices.peak_bytes(device)
    if peak is not None:
        peaks[str(device)] = peak
    return peaks


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class GroupPlan:
    index: int
    layers: list[str]  # the hooked linears (one per shared input)
    hessian_bytes: int
    hook_bytes: int  # one call's input converted for accumulation
    solve_bytes: int  # the largest layer's solver workspace
    calls: int  # denoiser calls that feed this group's Hessians
    peak: dict[str, int] = field(default_factory=dict)  # device -> predicted bytes
    held_bytes: int = 0  # what the group's solves hold besides (structured: its readers' dense weights)


@dataclass
class MemoryPlan:
    device: str
    hessian_device: str
    cache_device: str | None
    weights: dict[str, int]  # component -> bytes
    activation_bytes: int
    cache_bytes: int
    baseline_bytes: int  # the process before loading (Python, torch, libraries)
    groups: list[GroupPlan]
    peak: dict[str, int]  # device -> predicted peak bytes
    limit: int | None = None  # bytes allowed on the model's device
    chosen_groups: int | None = None
    world_size: int = 1  # torchrun: the plan is per rank (each one's share of the calibration calls)
    hessian: str | None = "full"  # what the method reads from calibration (`methods.Method.hessian`)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        from obsdiff.cli_utils import format_table

        devices = sorted(self.peak)
        rows = [[g.index, _span(g.layers), len(g.layers), g.hessian_bytes / 2**20,
                 (g.solve_bytes + g.held_bytes) / 2**20, g.calls,
                 *[g.peak.get(d, 0) / GiB for d in devices]] for g in self.groups]
        return format_table(["group", "layers", "inputs", "Hessians MiB", "solve MiB", "denoiser calls",
                             *[f"peak {d} GiB" for d in devices]], rows)


def _span(names: list[str]) -> str:
    """`first .. last` of a group's layer names (they are in forward order)."""
    if not names:
        return ""
    if len(names) == 1:
        return names[0]
    return f"{names[0]} .. {names[-1]}"


def plan_groups(groups: list[list[Sequence[str]]], profile: ForwardProfile, linear_shapes: dict[str, tuple[int, int]],
                calls_per_pass: int, weights: dict[str, int], denoiser_name: str, device: str, hessian_device: str,
                cache_device: str | None = None, solver_bytes: int = 4, max_tokens: int | None = None,
                baseline_bytes: int = 0, save_shard_bytes: int = 0, load_extra_bytes: int = 0,
                hessian: str | None = "full", held_bytes: list[int] | None = None) -> MemoryPlan:
    """Predicted peak bytes per device for a prune that runs `groups`: per group its units, the linears that read
    one input, whose first is hooked (one Hessian per unit) and all of which are solved with that Hessian.

    `profile` is one forward at one batch of calibration rows; `calls_per_pass` the denoiser calls of one
    calibration pass; `linear_shapes` the (d_out, d_in) of every linear; `weights` the bytes of the loaded
    components; `solver_bytes` 4 (fp32 Hessians and solves) or 8 (fp64); `save_shard_bytes` the largest weight
    file the run will write (each is converted on the host before it is written); `load_extra_bytes` what loading
    holds beyond the loaded weights (the memory-mapped file of the largest component while it is converted).
    `hessian` is what the method reads from calibration (`methods.Method.hessian`): None plans no calibration
    at all (no Hessians, no forward, and the text encoders stay where they were loaded: nothing parks them);
    "diag" plans the full matrices, which the calibrator accumulates for every method, and a lighter solve
    (`SOLVE_COPIES`). `held_bytes`: per group, what its solves hold besides (structured: its readers' dense
    weights, kept for the error records).
    """
    denoiser_bytes = weights.get(denoiser_name, 0)
    others = sum(v for k, v in weights.items() if k != denoiser_name)
    calibrates = hessian is not None
    cache_device = cache_device if calibrates else None  # nothing is cached without a calibration pass
    cache_bytes = profile.block_input_bytes * calls_per_pass if cache_device else 0
    h_copies, w_copies = SOLVE_COPIES[hessian]
    host = "cpu"

    def add(peaks: dict, where: str, n: int) -> None:
        peaks[where] = peaks.get(where, 0) + n

    plans = []
    for i, units in enumerate(groups):
        hooked = [u[0] for u in units]
        hess = sum(linear_shapes[n][1] ** 2 for n in hooked) * solver_bytes if calibrates else 0
        hook = 0
        for n in hooked if calibrates else ():
            shape = profile.linear_inputs.get(n)
            if shape is not None:
                tokens = max(1, _prod(shape[:-1]))
                hook = max(hook, min(tokens, max_tokens or tokens) * shape[-1] * solver_bytes)
        solve = max((math.ceil((h_copies * d_in**2 + w_copies * d_out * d_in) * solver_bytes)
                     for d_out, d_in in (linear_shapes[n] for u in units for n in u)), default=0)
        held = held_bytes[i] if held_bytes else 0
        phases = []
        # calibration (methods that calibrate), then the solves
        for transient in ([profile.activation_peak + hook] if calibrates else []) + [solve + held]:
            peaks: dict[str, int] = {}
            add(peaks, device, denoiser_bytes + transient)
            if calibrates:
                add(peaks, hessian_device, hess)
            add(peaks, host if calibrates else device, others)  # parked on the host while a method calibrates
            add(peaks, host, baseline_bytes)
            if cache_device:
                add(peaks, cache_device, cache_bytes)
            phases.append(peaks)
        peak = {d: max(p.get(d, 0) for p in phases) for p in phases for d in p}
        plans.append(GroupPlan(i, hooked, hess, hook, solve, calls_per_pass if calibrates else 0, peak, held))

    encode: dict[str, int] = {}
    add(encode, device, denoiser_bytes + others)  # the text encoders run where the denoiser does
    add(encode, host, baseline_bytes)
    load: dict[str, int] = {}  # loading reads each component through a memory map while it builds its copy
    add(load, host, baseline_bytes + denoiser_bytes + others + load_extra_bytes)
    save: dict[str, int] = {}  # the run is written one shard at a time, each converted on the host
    add(save, device, denoiser_bytes)
    add(save, host, baseline_bytes + others + save_shard_bytes)
    peak = {d: max(p.get(d, 0) for p in (load, encode, save)) for d in load.keys() | encode.keys() | save.keys()}
    for g in plans:
        for d, n in g.peak.items():
            peak[d] = max(peak.get(d, 0), n)
    return MemoryPlan(device, hessian_device if calibrates else device, cache_device, weights,
                      profile.activation_peak if calibrates else 0, cache_bytes, baseline_bytes, plans, peak,
                      hessian=hessian)


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


@contextlib.contextmanager
def text_encoders_parked(model):
    """Text encoders (and every other component but the denoiser and the VAE) on the host while the denoiser
    calibrates on an accelerator; back where they were afterwards. A no-op on the CPU.

    The VAE stays: it is small, and some pipelines (Flux, SDXL) take their execution device from it.
    """
    pipeline = model.pipeline
    denoiser = model.denoiser
    if denoiser.device.type == "cpu" or not hasattr(pipeline, "components"):
        yield
        return
    moved = {}
    for name, comp in pipeline.components.items():
        if isinstance(comp, nn.Module) and comp is not denoiser and name != "vae":
            device = next(iter(comp.parameters()), torch.empty(0)).device
            if device.type != "cpu":
                moved[name] = device
                comp.to("cpu")
    if moved:
        log.info("parked %s on the CPU during calibration", ", ".join(moved))
        for device in set(moved.values()):
            devices.empty_cache(device)  # hand the freed blocks back, so the Hessians can use them
    try:
        yield
    finally:
        for name, device in moved.items():
            pipeline.components[name].to(device)


def check_fits(plan: MemoryPlan, device: torch.device, limit: int | None = None) -> None:
    """Refuse, in one line, a plan whose peak exceeds the limit or the free memory of its devices."""
    for where, need in sorted(plan.peak.items()):
        free = available_bytes(torch.device(where))
        cap = limit if (limit is not None and where == plan.device) else None
        if cap is None and free is not None and where == "cpu":
            free += current_rss()  # what this process already holds is part of the predicted peak
        allowed = cap if cap is not None else free
        if allowed is not None and need > allowed:
            what = "--max-memory" if cap is not None else f"free memory on {where}"
            raise ConfigError(
                f"this prune needs about {need / GiB:.1f} GiB on {where} but {what} is {allowed / GiB:.1f} GiB; "
                "use --dtype bf16, --hessian-device cpu, --cache-device cpu, fewer --num-prompts/--batch-size, "
                "more --groups, or see --dry-run")
