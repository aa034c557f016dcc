"""Memory of a prune, planned before any work: per group and per device, from shapes alone.

The shapes and the activation peak of one forward come from the meta device (`profile.profile_forward`), the
weights from the loaded modules or the safetensors headers on disk (`sizes`). What remains is a model of the
solver's workspace, measured against peak RSS in `bench/scale.py`.

Peak of a prune = max over its phases, per device:
  encode:     weights (text encoders on the device)
  calibrate:  denoiser + group Hessians + activations + one call's hook transient (+ cached inputs)
  solve:      denoiser + group Hessians + the largest layer's solver workspace
Text encoders and the VAE leave the accelerator after the prompts are encoded
(`calibration.placement.text_encoders_parked`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from obsdiff.devices import available_bytes, current_rss
from obsdiff.errors import ConfigError
from obsdiff.planning.profile import ForwardProfile
from obsdiff.tables import format_table

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
# --quant adds copies of d_out * d_in: the smoothed weight, and joint OBS's pruning-only sweep that fixes the scales
# (`obs.obs_prune` with a scale rule); the column quantizer's buffers are one column block each.
QUANT_COPIES = 2


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
                hessian: str | None = "full", held_bytes: list[int] | None = None, quant: bool = False,
                output_ranges: bool = False) -> MemoryPlan:
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
    weights, kept for the error records). `quant`: the prune also quantizes (`QUANT_COPIES` more weight copies per
    solve); `output_ranges`: its hooks also compute each hooked unit's outputs (in the solver dtype, planned
    like the converted input).
    """
    denoiser_bytes = weights.get(denoiser_name, 0)
    others = sum(v for k, v in weights.items() if k != denoiser_name)
    calibrates = hessian is not None
    cache_device = cache_device if calibrates else None  # nothing is cached without a calibration pass
    cache_bytes = profile.block_input_bytes * calls_per_pass if cache_device else 0
    h_copies, w_copies = SOLVE_COPIES[hessian]
    w_copies += QUANT_COPIES if quant else 0
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
                if output_ranges:  # the unit's outputs, one linear at a time, at every token
                    hook = max(hook, tokens * (shape[-1] + linear_shapes[n][0]) * solver_bytes)
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
