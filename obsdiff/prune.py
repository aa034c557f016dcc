"""The orchestrator: group-wise calibration and layer-wise OBS (docs/method.md#group-wise-sequential-calibration).

The prunable linears of the selected blocks are grouped into *units* (linears that read one input
tensor and so share one Hessian), listed in forward order and split into G contiguous groups. For each
group in turn: calibrate the current model (earlier groups already pruned, later ones still dense),
accumulating Hessians only for this group's units; prune its layers; free the Hessians. How a group is
calibrated (re-running the pipeline, or cached block inputs) is the calibrator's business (calibrate.py).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from obsdiff import obs
from obsdiff.calibrate import Calibrator, block_positions, make_calibrator  # noqa: F401 (Calibrator: API)
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.distributed import World, owners_by_cost
from obsdiff.errors import ConfigError
from obsdiff.hessian import HessianAccumulator
from obsdiff.loading import LoadedModel, as_loaded
from obsdiff.memory import text_encoders_parked
from obsdiff.records import (  # noqa: F401 (re-exported: the records' historical home)
    GroupRecord,
    LayerRecord,
    PruneError,
    PruneReport,
    Unit,
    calibration_chunks,
    select_blocks,
    split_groups,
)
from obsdiff.resume import Checkpoint
from obsdiff.structured import prune_structured_

log = logging.getLogger(__name__)

def plan_units(model: LoadedModel, cfg: PruneConfig) -> tuple[list[Unit], dict[str, str]]:
    """Units to prune in forward order, and the layers skipped (name -> reason)."""
    fam, denoiser = model.family, model.denoiser
    modules = dict(denoiser.named_modules())
    units, skipped = [], {}
    for block in select_blocks(fam.blocks(denoiser), cfg.blocks):
        for unit in fam.shared_input_groups(block):
            if cfg.nm is not None:
                m = cfg.nm[1]
                d_in = modules[unit[0]].in_features
                if d_in % m:
                    reason = f"input width {d_in} is not a multiple of M={m}"
                    if cfg.on_indivisible == "error":
                        raise ConfigError(f"layer {unit[0]}: {reason}; use another pattern or skip such layers")
                    skipped.update({name: reason for name in unit})
                    continue
            units.append(unit)
    if not units:
        why = f" ({len(skipped)} skipped: {next(iter(skipped.values()))})" if skipped else ""
        raise ConfigError(f"no prunable layers selected{why}; check --blocks and --sparsity-type")
    return units, skipped


def unit_groups(units: list[Unit], prune: PruneConfig, calib: CalibConfig, positions: dict[str, int]
                ) -> list[list[Unit]]:
    """The groups the prune solves `units` in (the planner plans these): contiguous calibration groups (one per
    block with `calib.groups` None), or all at once for a method that calibrates nothing. `positions`: block
    position of every linear (`calibrate.block_positions`)."""
    if not prune.needs_calibration:
        return [units]
    return calibration_chunks(units, calib.groups, lambda unit: positions[unit[0]])


def prune_layer(W: torch.Tensor, H: torch.Tensor | None, cfg: PruneConfig) -> tuple[torch.Tensor, float | None]:
    """Pruned weight (compute dtype) for one linear, and the damping used (OBS methods only).

    Solves on W's device: H is moved there (Hessians may be parked on the CPU while the model is on a GPU).
    """
    dtype = torch.float64 if cfg.compute_dtype == "fp64" else torch.float32
    W = W.detach().to(dtype)
    sparsity = None if cfg.nm else cfg.sparsity
    if H is not None:
        H = H.to(W.device, dtype)  # no copy when it is already there
    return cfg.method_spec.solve(W, H, sparsity, cfg)  # the method's own solve (obsdiff.methods)


def _solve_unit(unit: Unit, modules: dict[str, nn.Module], H: torch.Tensor | None, cfg: PruneConfig
                ) -> list[LayerRecord]:
    records = []
    if H is not None:  # once per unit (its linears share H), on the weights' device
        H = H.to(modules[unit[0]].weight.device, torch.float64 if cfg.compute_dtype == "fp64" else torch.float32)
    for name in unit:
        lin = modules[name]
        t0 = time.perf_counter()
        W = lin.weight.detach()
        try:
            W_new, damp = prune_layer(W, H, cfg)
        except obs.CholeskyError as exc:
            raise PruneError(f"layer {name}: {exc}; raise --percdamp or use more calibration prompts") from None
        if not torch.isfinite(W_new).all():  # also waits for an asynchronous device, so the split below is honest
            raise PruneError(f"layer {name}: pruning produced non-finite weights; raise --percdamp or use fp64")
        t_solve = time.perf_counter()
        err0 = err = None
        if H is not None:
            err0, err = obs.layer_errors(W, W_new, H)
        t_error = time.perf_counter()
        lin.weight.data.copy_(W_new.to(lin.weight.dtype))
        del W_new
        achieved = float((lin.weight == 0).float().mean())
        records.append(LayerRecord(name, tuple(W.shape), achieved, err0, err, damp, time.perf_counter() - t0,
                                   solve_seconds=t_solve - t0, error_seconds=t_error - t_solve))
    return records


def prune_(model: LoadedModel, prune: PruneConfig, calib: CalibConfig | None = None,
           progress: bool = True, checkpoint: Checkpoint | None = None, world: World | None = None) -> PruneReport:
    """Prune `model`'s denoiser in place and return the report. Shapes never change.

    `model` is a `LoadedModel` (from `load_pipeline`) or an in-memory diffusers pipeline.

    Calibration settings left unset take the model's defaults (`config.resolve_calib`); SparseGPT and
    Wanda calibrate once with uniform step weights. With a `checkpoint` (`open_checkpoint`), every finished
    group is stored and a checkpoint that already holds groups is continued after its last one.

    With a distributed `world` (`obsdiff.distributed.init_from_env`), every rank calls this with the same
    arguments and its own copy of the model; rank 0's `checkpoint` goes through
    `distributed.share_checkpoint`. Every rank ends with the same pruned model and report.
    """
    t_start = time.perf_counter()
    model = as_loaded(model)
    world = world or World()
    calib = resolve_calib(calib or CalibConfig(), model.builtin, prune.method)
    if prune.structured:
        return prune_structured_(model, prune, calib, progress, t_start, checkpoint, world)
    denoiser = model.denoiser
    modules = dict(denoiser.named_modules())
    units, skipped = plan_units(model, prune)
    report = PruneReport(prune=prune.to_dict(), calib=calib.to_dict(), family=model.family.name,
                         base_model=model.ref)
    for name, reason in skipped.items():
        w = modules[name].weight
        report.layers.append(LayerRecord(name, tuple(w.shape), float((w == 0).float().mean()), None, None, None,
                                         0.0, skipped=reason))
        log.warning("skipping %s: %s", name, reason)

    blocks = select_blocks(model.family.blocks(denoiser), prune.blocks)
    positions = block_positions(blocks, modules)
    chunks = unit_groups(units, prune, calib, positions)
    if not prune.needs_calibration:  # a single group, solved without a calibrator
        report.layers.extend(solve_units_(chunks[0], None, modules, prune, world, "prune layers", progress))
        report.distributed = world.record() if world.distributed else None
        report.total_seconds = time.perf_counter() - t_start
        return report

    with world.failures():
        calibrator = make_calibrator(model, prune, calib, blocks, progress,
                                     workdir=checkpoint.path if checkpoint else None, rank=world.rank,
                                     world_size=world.size)
    with calibrator, text_encoders_parked(model):
        report.encode_seconds = calibrator.encode_seconds
        report.calib["groups"] = len(chunks)
        start = 0
        if checkpoint is not None and checkpoint.done:
            report, start = resume_from(checkpoint, calibrator, denoiser, report), checkpoint.done
        bar = tqdm(total=len(chunks), initial=start, desc="groups", unit="group", disable=not progress)
        for g in range(start, len(chunks)):
            chunk = chunks[g]
            # the unit's linears share one input: hook (and accumulate for) its first linear only
            with world.failures():
                accs, t_calib = calibrator.hessians([unit[0] for unit in chunk],
                                                    f"calibrate group {g + 1}/{len(chunks)}")
            world.stats.calib_seconds += t_calib
            t0 = time.perf_counter()
            report.layers.extend(solve_units_(chunk, accs, modules, prune, world,
                                              f"prune group {g + 1}/{len(chunks)}", progress))
            report.add_group(g, [list(u) for u in chunk], t_calib, time.perf_counter() - t0, accs)
            del accs
            if checkpoint is not None:
                checkpoint.save_group(g, {f"{name}.weight": modules[name].weight for unit in chunk for name in unit},
                                      report.to_dict())
            bar.update()
        bar.close()
        report.calibration = calibrator.stats()
    report.distributed = world.record() if world.distributed else None
    report.total_seconds = time.perf_counter() - t_start
    return report


def solve_units_(units: list[Unit], accs: dict[str, HessianAccumulator] | None, modules: dict[str, nn.Module],
                 prune: PruneConfig, world: World, desc: str, progress: bool = True) -> list[LayerRecord]:
    """Prune `units` in place, each on its owner rank, and give every rank the new weights.

    `accs` (None for methods without calibration) hold this rank's partial Hessians by first linear; they
    are reduced to the owners first. Returns the layer records of all units in their order.
    """
    owners = owners_by_cost(units, modules, world.size)
    if accs is not None:
        world.reduce_hessians_(accs, {unit[0]: owner for unit, owner in zip(units, owners, strict=True)})
    mine: dict[int, list[LayerRecord]] = {}
    t0 = time.perf_counter()
    with world.failures():
        for i in tqdm([i for i, o in enumerate(owners) if o == world.rank], desc=desc, unit="unit", leave=False,
                      disable=not progress):
            mine[i] = _solve_unit(units[i], modules, accs[units[i][0]].H if accs is not None else None, prune)
    world.stats.solve_seconds += time.perf_counter() - t0
    world.stats.units_solved += len(mine)
    for unit, owner in zip(units, owners, strict=True):
        world.broadcast_([modules[name].weight for name in unit], src=owner)
    records = {i: r for part in world.all_gather(mine) for i, r in part.items()}
    return [record for i in range(len(units)) for record in records[i]]


def resume_from(checkpoint: Checkpoint, calibrator: Calibrator, denoiser: nn.Module, report: PruneReport
                ) -> PruneReport:
    """Re-apply a checkpoint's finished groups to the dense `denoiser`; the report as it was after them.

    Cached calibration captures its block inputs on the dense model first, as the uninterrupted run did, and
    carries them through the restored blocks when the next group asks, so the next group's Hessians are
    bitwise those of the uninterrupted run.
    """
    if calibrator.mode == "cached":
        calibrator.capture()
    checkpoint.restore_(denoiser)
    restored = PruneReport.from_dict(checkpoint.report)
    restored.encode_seconds = report.encode_seconds
    return restored


def run_settings(model: LoadedModel, prune: PruneConfig, calib: CalibConfig | None = None, world_size: int = 1
                 ) -> dict:
    """Everything that determines a prune's result, for a checkpoint to compare against on resume."""
    import obsdiff

    model = as_loaded(model)
    calib = resolve_calib(calib or CalibConfig(), model.builtin, prune.method)
    denoiser = model.denoiser
    config = {k: v for k, v in dict(getattr(denoiser, "config", {})).items() if not k.startswith("_")}
    settings = {"prune": prune.to_dict(), "calib": calib.to_dict(), "model": model.ref,
                "family": model.family.name, "denoiser_config": config,
                "dtype": str(denoiser.dtype).removeprefix("torch."), "device": denoiser.device.type,
                "torch": torch.__version__, "obsdiff": obsdiff.__version__}
    if world_size > 1:  # shards and owners follow the world size, so its results differ in float rounding
        settings["world_size"] = world_size
    return settings


def open_checkpoint(model: LoadedModel, prune: PruneConfig, calib: CalibConfig | None, out, resume: bool = False,
                    force: bool = False, world_size: int = 1) -> Checkpoint:
    """The staging directory of a prune that will be saved to `out` (see `obsdiff.resume`)."""
    return Checkpoint.open(out, run_settings(model, prune, calib, world_size), resume=resume, force=force)
