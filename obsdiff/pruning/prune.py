"""`prune_`, and unstructured and N:M pruning (docs/method.md#group-wise-sequential-calibration).

The prunable linears of the selected blocks are grouped into *units* (linears that read one input
tensor and so share one Hessian), listed in forward order and split into G contiguous groups, which the
`session.PruningSession` runs in turn: calibrate the current model, solve every unit of the group with the
method (`UnitStrategy`), store the group. Structured sparsity plugs into the same session with
`structured.StructureStrategy`. How a group is calibrated (re-running the pipeline, or cached block inputs)
is the calibrator's business (`calibration.calibrate`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import nn

from obsdiff.calibration.ranges import ActivationRanges
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.errors import ConfigError
from obsdiff.pruning import quantize
from obsdiff.pruning.distributed import World
from obsdiff.pruning.records import LayerRecord, PruneError, PruneReport, Unit, calibration_chunks, select_blocks
from obsdiff.pruning.resume import Checkpoint, CheckpointLike
from obsdiff.pruning.session import Group, PruningSession, Strategy, Work
from obsdiff.pruning.structured import StructureStrategy
from obsdiff.runs.loading import LoadedModel, as_loaded
from obsdiff.solver import obs
from obsdiff.solver.hessian import HessianAccumulator
from obsdiff.solver.qlinear import QuantLinear, placeholder_

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
            if cfg.quant is not None:
                quantize.check_widths(unit, modules, cfg)
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
    return cfg.method_spec.solve(W, H, sparsity, cfg)  # the method's own solve (obsdiff.solver.methods)


def _solve_unit(unit: Unit, modules: dict[str, nn.Module], H: torch.Tensor | None, cfg: PruneConfig,
                ranges: ActivationRanges | None = None) -> list[LayerRecord]:
    records = []
    if H is not None:  # once per unit (its linears share H), on the weights' device
        H = H.to(modules[unit[0]].weight.device, torch.float64 if cfg.compute_dtype == "fp64" else torch.float32)
    prep = None
    if cfg.quant is not None:
        prep = quantize.prepare_unit([modules[name].weight for name in unit], H, ranges, cfg)
        H = prep.H  # of the smoothed input with SmoothQuant
    for k, name in enumerate(unit):
        lin = modules[name]
        t0 = time.perf_counter()
        W = lin.weight.detach()
        try:
            if prep is None:
                W_new, damp = prune_layer(W, H, cfg)
            else:
                W_new, scale, damp, W = quantize.solve_layer(W, prep, cfg)
        except obs.CholeskyError as exc:
            raise PruneError(f"layer {name}: {exc}; raise --percdamp or use more calibration prompts") from None
        if not torch.isfinite(W_new).all():  # also waits for an asynchronous device, so the split below is honest
            raise PruneError(f"layer {name}: pruning produced non-finite weights; raise --percdamp or use fp64")
        t_solve = time.perf_counter()
        err0 = err = None
        if H is not None:
            err0, err = obs.layer_errors(W, W_new, H)
        t_error = time.perf_counter()
        quant = None
        if prep is None:
            lin.weight.data.copy_(W_new.to(lin.weight.dtype))
        else:
            quant = quantize.install_(lin, W_new, scale, prep, k, cfg)
        del W_new
        achieved = float((lin.weight == 0).float().mean())
        records.append(LayerRecord(name, tuple(W.shape), achieved, err0, err, damp, time.perf_counter() - t0,
                                   solve_seconds=t_solve - t0, error_seconds=t_error - t_solve, quant=quant))
    return records


class UnitStrategy(Strategy):
    """Unstructured and N:M sparsity: a work item is a unit (the linears that read one input, so share one
    Hessian), solved by the method (`_solve_unit`)."""

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig):
        super().__init__(model, prune, calib)
        self.units, self.skipped = plan_units(model, prune)

    def plan(self) -> list[Group]:
        return [Group(list(chunk), [list(unit) for unit in chunk], list(chunk))
                for chunk in unit_groups(self.units, self.prune, self.calib, self.positions)]

    def start(self, report: PruneReport) -> None:
        for name, reason in self.skipped.items():
            w = self.modules[name].weight
            report.layers.append(LayerRecord(name, tuple(w.shape), float((w == 0).float().mean()), None, None,
                                             None, 0.0, skipped=reason))
            log.warning("skipping %s: %s", name, reason)

    def work(self, group: Group, accs: dict[str, HessianAccumulator] | None) -> Work:
        units, modules = group.units, self.modules

        def solve(i: int) -> list[LayerRecord]:
            acc = accs[units[i][0]] if accs is not None else None
            return _solve_unit(units[i], modules, acc.H if acc is not None else None, self.prune,
                               acc.ranges if acc is not None else None)

        def tensors(i: int) -> list[torch.Tensor]:  # what the owner's solve changed, to broadcast to every rank
            if self.prune.quant is not None:  # ranks that did not solve it quantize it too, scales to be received
                for name in units[i]:
                    if not isinstance(modules[name], QuantLinear):
                        placeholder_(modules[name], quantize.layer_spec(modules[name], self.prune))
            return [t for name in units[i] for t in (modules[name].weight, *modules[name].buffers())]

        return Work([list(unit) for unit in units], solve, tensors)

    def apply_(self, index: int, group: Group, results: list[list[LayerRecord]], report: PruneReport) -> None:
        report.layers.extend(record for records in results for record in records)

    def changed(self, group: Group) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for unit in group.units for name in unit
                for key, value in [("weight", self.modules[name].weight), *self.modules[name].named_buffers()]}

    def ranges(self, group: Group) -> dict[str, list[str]] | None:
        return quantize.range_requests(group.units, self.prune)

    def resume(self, saved: dict | None, done: int, report: PruneReport) -> None:
        # the finished groups' quantized linears, rebuilt so that the checkpoint's scales have somewhere to go
        for record in report.layers:
            if record.quant is not None:
                placeholder_(self.modules[record.name], record.quant)


def make_strategy(model: LoadedModel, prune: PruneConfig, calib: CalibConfig) -> Strategy:
    """The strategy of `prune`'s sparsity type (`calib` resolved); its `plan()` is the groups a prune runs."""
    return (StructureStrategy if prune.structured else UnitStrategy)(model, prune, calib)


def prune_(model: LoadedModel, prune: PruneConfig, calib: CalibConfig | None = None,
           progress: bool = True, checkpoint: CheckpointLike | None = None, world: World | None = None
           ) -> PruneReport:
    """Prune `model`'s denoiser in place and return the report. Unstructured and N:M sparsity never change
    shapes; structured sparsity shrinks the pruned linears at the end.

    `model` is a `LoadedModel` (from `load_pipeline`) or an in-memory diffusers pipeline.

    Calibration settings left unset take the model's defaults (`config.resolve_calib`); SparseGPT and
    Wanda calibrate once with uniform step weights. With a `checkpoint` (`open_checkpoint`), every finished
    group is stored and a checkpoint that already holds groups is continued after its last one.

    With a distributed `world` (`obsdiff.pruning.distributed.init_from_env`), every rank calls this with the same
    arguments and its own copy of the model; rank 0's `checkpoint` goes through
    `resume.share_checkpoint`. Every rank ends with the same pruned model and report.
    """
    t_start = time.perf_counter()
    model = as_loaded(model)
    calib = resolve_calib(calib or CalibConfig(), model.builtin, prune.method)
    if prune.structured and prune.quant is not None:
        return _structured_then_quantized(model, prune, calib, progress, checkpoint, world, t_start)
    strategy = make_strategy(model, prune, calib)
    return PruningSession(model, prune, calib, strategy, progress, checkpoint, world).run(t_start)


def _structured_then_quantized(model: LoadedModel, prune: PruneConfig, calib: CalibConfig, progress: bool,
                               checkpoint: CheckpointLike | None, world: World | None, t_start: float) -> PruneReport:
    """Structured pruning, then a quantization sweep over the shrunk model (docs/method.md#quantization): the
    shrunk linears are quantized with joint OBS at zero sparsity, on Hessians and activation ranges calibrated on
    the shrunk model, so quantization sees the structures' error. The checkpoint covers the structured part; an
    interrupted quantization sweep is re-run whole on resume."""
    # the structure strategy leaves quantization to the sweep (it only checks the group size against shrunk widths)
    report = PruningSession(model, prune, calib, make_strategy(model, prune, calib), progress, checkpoint,
                            world).run(t_start)
    t0 = time.perf_counter()
    sweep = PruneConfig(method=prune.method, sparsity_type="none", quant=prune.quant, percdamp=prune.percdamp,
                        block_size=prune.block_size, blocks=prune.blocks, compute_dtype=prune.compute_dtype)
    quantized = PruningSession(model, sweep, calib, make_strategy(model, sweep, calib), progress, None, world).run()
    by_name = {r.name: r for r in quantized.layers}
    for record in report.layers:
        if record.name in by_name:
            record.quant = by_name[record.name].quant
    report.quantization = {"seconds": time.perf_counter() - t0, "groups": len(quantized.groups),
                           "layers": [asdict(r) for r in quantized.layers]}
    report.total_seconds = time.perf_counter() - t_start
    return report


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
    """The staging directory of a prune that will be saved to `out` (see `obsdiff.pruning.resume`)."""
    return Checkpoint.open(out, run_settings(model, prune, calib, world_size), resume=resume, force=force)
