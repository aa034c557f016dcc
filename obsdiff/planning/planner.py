"""The memory plan of a prune before it starts: `--dry-run`, `--max-memory`, and the up-front refusal.

Works on a loaded model or on a *skeleton* read from disk (configs and safetensors headers; the denoiser on
the meta device), so a model that cannot fit is refused before a single weight is loaded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from obsdiff import devices
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.devices import current_rss
from obsdiff.errors import ConfigError, ObsdiffError
from obsdiff.planning.memory import GiB, MemoryPlan, plan_groups
from obsdiff.planning.profile import ForwardProfile, meta_twin, profile_forward
from obsdiff.planning.sizes import component_bytes, disk_component_bytes, largest_file_bytes
from obsdiff.pruning.prune import make_strategy
from obsdiff.pruning.quantize import output_quant
from obsdiff.pruning.records import select_blocks
from obsdiff.runs.loading import LoadedModel

log = logging.getLogger(__name__)


def skeleton(ref: str, dtype: str | torch.dtype = "fp32") -> tuple[LoadedModel, dict[str, int]]:
    """`ref` as a model whose denoiser lives on the meta device, and its components' bytes in `dtype`.

    Reads configs and safetensors headers only (`loading.load_denoiser(weights=False)`), so planning a 12 B
    model takes seconds and no RAM.
    """
    from obsdiff.runs.loading import load_denoiser, quiet_libraries

    torch_dtype = devices.torch_dtype(dtype)
    found = load_denoiser(ref, torch_dtype, "cpu", weights=False)
    family = found.family
    with quiet_libraries():  # diffusers warns about casting with `to()`
        denoiser = found.denoiser.to(torch_dtype)
    base = Path(found.path)
    vae_cfg = _read_json(base / "vae" / "config.json")
    sample_size = denoiser.config.get("sample_size", 128)
    pipeline = SimpleNamespace(
        **{family.denoiser_attr: denoiser}, vae_scale_factor=2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1),
        tokenizer=SimpleNamespace(model_max_length=found.tokenizer_max_length.get("tokenizer", 77)),
        default_sample_size=sample_size if isinstance(sample_size, int) else 128)
    model = found.with_pipeline(pipeline)
    return model, disk_component_bytes(base, torch_dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def calibration_latent_size(model: LoadedModel, calib: CalibConfig) -> tuple[int, int]:
    """Latent height and width of the calibration images."""
    pipe = model.pipeline
    scale = getattr(pipe, "vae_scale_factor", 8)
    default_px = model.generation_defaults.get("height") or getattr(pipe, "default_sample_size", 128) * scale
    h = calib.height or model.generation_defaults.get("height") or default_px
    w = calib.width or model.generation_defaults.get("width") or default_px
    return max(1, h // scale), max(1, w // scale)


def group_units(model: LoadedModel, prune: PruneConfig, calib: CalibConfig) -> list[list[tuple[str, ...]]]:
    """The groups the prune will run, each as its units: the linears that read one input, whose first is hooked
    for their Hessian. The prune's own plan (`prune.make_strategy(...).plan()`: one group for a method that
    calibrates nothing); a structured group's units are its reader linears."""
    return [group.units for group in make_strategy(model, prune, calib).plan()]


def forward_profile(model: LoadedModel, prune: PruneConfig, calib: CalibConfig) -> ForwardProfile:
    """One calibration call of `model`'s denoiser, measured on its meta twin (`profile.profile_forward`); nothing
    for a method that calibrates nothing (it never runs the denoiser)."""
    if not prune.needs_calibration:
        return ForwardProfile({}, 0, 0)
    calib = resolve_calib(calib, model.builtin, prune.method)
    twin = meta_twin(model.denoiser, model.run.shrink_plan if model.run else None, model.family)
    rows = calib.batch_size * model.family.guidance_rows(calib.guidance)
    h, w = calibration_latent_size(model, calib)
    msl = model.generation_defaults.get("max_sequence_length")
    with torch.device("meta"):
        inputs = model.family.example_inputs(twin, batch=rows, height=h, width=w,
                                             text_len=model.family.text_len(model.pipeline, msl))
    inputs = {k: _to_meta(v) for k, v in inputs.items()}
    blocks = select_blocks(model.family.blocks(twin), prune.blocks)
    return profile_forward(twin, inputs, blocks[0].module if calib.mode == "cached" else None)


def plan_memory(model: LoadedModel, prune: PruneConfig, calib: CalibConfig | None = None,
                device: str | torch.device | None = None, hessian_device: str | None = None,
                weights: dict[str, int] | None = None, baseline_bytes: int | None = None,
                profile: ForwardProfile | None = None, world_size: int = 1) -> MemoryPlan:
    """The predicted memory of pruning `model` (loaded or a `skeleton`) on `device` [the denoiser's].

    `profile` (from `forward_profile`) can be passed when planning the same calibration shape repeatedly.
    With `world_size` ranks (torchrun), the plan is one rank's, the busiest: it runs ceil(batches / W)
    prompt batches and caches only their block inputs; every rank holds the group's partial Hessians and
    any rank may own the largest solve, so those terms do not shrink. What each method builds follows its
    `methods.Method.hessian`: magnitude plans no Hessians, no forward and one group.
    """
    calib = resolve_calib(calib or CalibConfig(), model.builtin, prune.method)
    denoiser = model.denoiser
    device = torch.device(device) if device is not None else denoiser.device
    if device.type == "meta":
        device = torch.device("cpu")
    dev = "cpu" if device.type == "cpu" else str(device)
    weights = weights if weights is not None else component_bytes(model.pipeline)
    twin = meta_twin(denoiser, model.run.shrink_plan if model.run else None, model.family)
    profile = profile or forward_profile(model, prune, calib)
    shapes = {n: (m.out_features, m.in_features) for n, m in twin.named_modules() if isinstance(m, torch.nn.Linear)}
    batches = math.ceil(math.ceil(calib.num_prompts / calib.batch_size) / world_size)  # the busiest rank's share
    cache_device = None
    if calib.mode == "cached":
        cache_device = dev if calib.cache_device is None else _device_name(calib.cache_device)
    h_dev = dev if hessian_device in (None, "auto") else _device_name(hessian_device)
    groups = group_units(_with_denoiser(model, twin), prune, calib)
    calls = batches * calib.steps if prune.needs_calibration else 0
    held = None
    if prune.structured:  # the loop keeps a dense copy of each reader of the group for its error records
        held = [sum(shapes[u[0]][0] * shapes[u[0]][1] for u in g) * denoiser.dtype.itemsize for g in groups]
    loaded = not all(p.is_meta for p in denoiser.parameters())
    if baseline_bytes is None:  # the process without the model: a loaded one is already in its RSS
        baseline_bytes = max(current_rss() - (sum(weights.values()) if loaded else 0), 0)
    plan = plan_groups(groups, profile, shapes, calls, weights, model.family.denoiser_attr, dev, h_dev, cache_device,
                       8 if prune.compute_dtype == "fp64" else 4, calib.max_tokens, baseline_bytes,
                       save_shard_bytes(model), load_extra_bytes(model, dev, loaded), prune.method_spec.hessian, held,
                       quant=prune.quant is not None, output_ranges=output_quant(prune))
    plan.world_size = world_size
    return plan


def save_shard_bytes(model: LoadedModel) -> int:
    """What saving the run holds beyond the model: one shard converted to the base dtype (nothing when the model
    already has that dtype: its tensors are written as they are)."""
    from obsdiff.runs.io import DEFAULT_MAX_SHARD_SIZE, save_dtype

    try:
        target = save_dtype(model)
    except ObsdiffError:  # planning must not fail on what only the save decides
        target = torch.float32
    if target == model.denoiser.dtype:
        return 0
    total = sum(p.numel() for p in model.denoiser.parameters()) * target.itemsize
    return min(total, int(DEFAULT_MAX_SHARD_SIZE.removesuffix("GB")) * 10**9)


def load_extra_bytes(model: LoadedModel, device: str, loaded: bool) -> int:
    """What loading holds beyond the loaded weights: the memory-mapped file of the largest component while its
    converted copy is built. A CPU load in the dtype the checkpoint stores uses the mapped pages as the weights
    themselves (nothing extra); a model that is already loaded has nothing left to load."""
    from obsdiff.runs.io import stored_dtype

    if loaded or not Path(model.path).is_dir():
        return 0
    try:
        stored = stored_dtype(Path(model.path) / model.family.denoiser_attr)
    except ObsdiffError:
        stored = None
    if device == "cpu" and stored is not None and devices.torch_dtype(stored) == model.denoiser.dtype:
        return 0
    return largest_file_bytes(model.path)


def choose_groups(model: LoadedModel, prune: PruneConfig, calib: CalibConfig, max_memory: float,
                  device=None, hessian_device: str | None = None, weights: dict[str, int] | None = None,
                  baseline_bytes: int | None = None, world_size: int = 1) -> tuple[CalibConfig, MemoryPlan]:
    """The calibration config with the fewest groups (at least the requested number) whose predicted peak on
    the model's device stays within `max_memory` GiB, and its plan; a one-line refusal if even one group
    per block does not fit. A method whose groups are fixed (magnitude calibrates nothing; Wanda, and SparseGPT
    in rerun mode, calibrate in one group) has its one plan checked instead."""
    calib = resolve_calib(calib, model.builtin, prune.method)
    limit = int(max_memory * GiB)
    profile = forward_profile(model, prune, calib)
    if not prune.needs_calibration or calib.mode in prune.method_spec.one_group_modes:
        return calib, _fixed_groups(model, prune, calib, max_memory, device, hessian_device, weights, baseline_bytes,
                                    profile, world_size)
    blocks = select_blocks(model.family.blocks(model.denoiser), prune.blocks)
    start = calib.groups or len(blocks)
    plan = None
    for groups in range(start, len(blocks) + 1) if start <= len(blocks) else [start]:
        trial = replace(calib, groups=groups)
        plan = plan_memory(model, prune, trial, device, hessian_device, weights, baseline_bytes, profile, world_size)
        if plan.peak[plan.device] <= limit:
            plan.limit, plan.chosen_groups = limit, len(plan.groups)
            return trial, plan
    worst = max(plan.groups, key=lambda g: g.peak.get(plan.device, 0))
    raise ConfigError(
        f"--max-memory {max_memory:g} GiB is too small: with one group per block the largest group still needs "
        f"{worst.peak[plan.device] / GiB:.1f} GiB on {plan.device} (Hessians {worst.hessian_bytes / GiB:.1f} GiB); "
        "use --hessian-device cpu, --dtype bf16, a smaller --batch-size, or more memory")


def _fixed_groups(model: LoadedModel, prune: PruneConfig, calib: CalibConfig, max_memory: float, device,
                  hessian_device: str | None, weights: dict[str, int] | None, baseline_bytes: int | None,
                  profile: ForwardProfile, world_size: int) -> MemoryPlan:
    """`choose_groups` for a method whose group count cannot change (it calibrates nothing, or in one group in
    this mode): its plan if it fits, else a refusal that names what the method holds."""
    plan = plan_memory(model, prune, calib, device, hessian_device, weights, baseline_bytes, profile, world_size)
    limit = int(max_memory * GiB)
    need = plan.peak[plan.device]
    if need <= limit:
        plan.limit, plan.chosen_groups = limit, len(plan.groups)
        return plan
    if prune.needs_calibration:
        hess = max(g.hessian_bytes for g in plan.groups)
        what = (f"calibrates in one group in {calib.mode} mode and needs {need / GiB:.1f} GiB on {plan.device} "
                f"(Hessians {hess / GiB:.1f} GiB)")
        other = [m for m in ("rerun", "cached") if m not in prune.method_spec.one_group_modes]
        hints = "--hessian-device cpu, --dtype bf16, a smaller --batch-size" + (
            f", --calibration-mode {other[0]} with more --groups" if other else "")
    else:
        what = (f"calibrates nothing and still needs {need / GiB:.1f} GiB on {plan.device} "
                f"(weights {sum(plan.weights.values()) / GiB:.1f} GiB)")
        hints = "--dtype bf16"
    raise ConfigError(f"--max-memory {max_memory:g} GiB is too small: {prune.method} {what}; use {hints}, "
                      "or more memory")


def _device_name(name: str) -> str:
    d = torch.device(name)
    return "cpu" if d.type == "cpu" else str(d)


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, dict):
        return {k: _to_meta(x) for k, x in v.items()}
    return v


def _with_denoiser(model: LoadedModel, denoiser: torch.nn.Module) -> LoadedModel:
    """`model` seen through another denoiser object (the meta twin), for planning only."""
    pipeline = SimpleNamespace(**{model.family.denoiser_attr: denoiser})
    return replace(model, pipeline=pipeline)


def describe(plan: MemoryPlan) -> str:
    """The plan as a person reads it: the groups table and the peaks per device."""
    lines = [plan.table(), ""]
    weights = ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.weights.items())
    lines.append(f"weights (GiB): {weights}")
    if plan.hessian is None:
        lines.append("no calibration: the method reads the weights alone (no Hessians, no denoiser forward)")
    else:
        lines.append(f"activations of one forward: {plan.activation_bytes / GiB:.2f} GiB"
                     + (f"; cached block inputs: {plan.cache_bytes / GiB:.2f} GiB on {plan.cache_device}"
                        if plan.cache_device else ""))
    peaks = ", ".join(f"{d} {n / GiB:.2f} GiB" for d, n in sorted(plan.peak.items()))
    lines.append(f"predicted peak: {peaks}" + (f" (limit {plan.limit / GiB:.2f} GiB)" if plan.limit else "")
                 + (f", per rank of {plan.world_size}" if plan.world_size > 1 else ""))
    return "\n".join(lines)
