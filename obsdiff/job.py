"""A whole prune in one call, as `obsdiff prune` runs it: plan, check the fit, load, checkpoint, prune, save.

`run_prune` takes a model reference (or a loaded model), the two configs and the run directory, and does
everything the command does around `prune_`:

1. validate every input before the (slow) load: prompts file, image size, output path, a leftover checkpoint;
2. plan the memory from configs and safetensors headers (`planner`): with `max_memory` the calibration groups
   are chosen so every group fits, and a prune that cannot fit is refused before any weight loads;
3. load, open the checkpoint (`OUT.partial`, `resume`/`force`), prune, measure the peaks, save the run, plot.

Under torchrun (or with an explicit `World`) every rank makes the same call: it joins the job, every failure
is known to every rank (`World.failures`), and rank 0 alone writes. A KeyboardInterrupt during the prune keeps
the checkpoint and raises `PruneInterrupted`; the same call with `resume=True` continues after the last finished
group and ends bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import ConfigError, Interrupted, first_line

if TYPE_CHECKING:  # the annotations only: importing these loads torch and diffusers
    import torch

    from obsdiff.planning.memory import MemoryPlan
    from obsdiff.pruning.distributed import World
    from obsdiff.pruning.records import PruneReport
    from obsdiff.runs.loading import LoadedModel

log = logging.getLogger(__name__)

# Set on an exception a rank other than 0 raises for a failure every rank knows of: rank 0 reports it.
_RANK_ZERO_REPORTS = "obsdiff_rank_zero_reports"


class PruneInterrupted(Interrupted):
    """A prune stopped by KeyboardInterrupt (Ctrl-C); its `done` finished groups are kept in `path` (the
    checkpoint): the same call with `resume=True` continues after them."""

    def __init__(self, done: int, path: Path | None):
        self.done, self.path = done, path
        super().__init__(f"interrupted; {done} finished groups are kept in {path}: call again with resume=True "
                         "to continue")


@dataclass
class PruneResult:
    """What `run_prune` did: the plan always; after a prune (not `dry_run`) also its report and peaks."""

    plan: MemoryPlan
    calib: CalibConfig  # as planned: `max_memory` may have chosen the groups
    report: PruneReport | None = None  # None: planned only (`dry_run`)
    out: Path | None = None  # the run directory; None when planned only
    measured: dict[str, int] = field(default_factory=dict)  # this process's peak bytes per device
    measured_ranks: list[dict[str, int]] | None = None  # every rank's peaks (torchrun)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that wrote the run."""
        return self.rank == 0


@dataclass
class _Planned:
    calib: CalibConfig
    plan: MemoryPlan
    dtype: str  # the model dtype's short name ("bf16")
    save_as: torch.dtype | None  # the dtype the run stores (None when planned only)


def reported_by_rank_zero(exc: BaseException) -> bool:
    """Whether `exc`, raised by `run_prune` on a rank other than 0 of a torchrun job, is a failure that rank 0
    reports as well (every rank knows of it): a command line stays quiet about it on this rank. A failure only
    this rank knows of is a `RankFailed` naming the rank, not marked."""
    return bool(getattr(exc, _RANK_ZERO_REPORTS, False))


def run_prune(model: str | os.PathLike | LoadedModel, prune: PruneConfig, calib: CalibConfig | None = None,
              out: str | os.PathLike | None = None, *, resume: bool = False, force: bool = False,
              max_memory: float | None = None, dry_run: bool = False, save_dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
              world: World | None = None, world_size: int | None = None, progress: bool = True,
              plots: bool = True, on_plan: Callable[[MemoryPlan], None] | None = None) -> PruneResult:
    """Prune `model` and save the run to `out`, or with `dry_run` only plan it (loads no weights, writes nothing).

    `model`: a pipeline folder, hub id, builtin:digits or run directory, loaded on `device` (default auto: CUDA
    when available) in `dtype` (default auto: bf16 on CUDA, fp32 on the CPU); or a `LoadedModel` / diffusers
    pipeline, pruned where it is (`device` and `dtype` must then be left unset). A loaded model is pruned in
    place, so resume with a fresh one: a reference is loaded anew by every call.

    `out` keeps finished groups in `OUT.partial` until the run is saved. A leftover one is refused unless
    `resume` (continue after its last finished group) or `force` (discard it; `force` also replaces an existing
    `out`). `max_memory` (GiB on the model's device) picks the fewest calibration groups that fit, or refuses;
    without it a plan over the free memory is refused too, before loading. `save_dtype` ("fp32", "fp16",
    "bf16"; None: the base model's own) is the dtype of the saved weights.

    Distributed: outside torchrun this is one process; under torchrun (found in the environment when `world` is
    None) every rank calls this alike, joins the job and leaves it at the end. `world_size` plans one rank of a
    job of that many processes (`dry_run` only). `on_plan(plan)` is called on rank 0 after planning, before the
    load; `progress` shows progress bars (rank 0 only); `plots` draws the run's plots (best effort).

    Errors are `ObsdiffError`s, raised before anything is written where they can be known up front; a
    KeyboardInterrupt during the prune raises `PruneInterrupted` and keeps the checkpoint.
    """
    from obsdiff.devices import resolve_device
    from obsdiff.pruning.distributed import init_from_env
    from obsdiff.runs.loading import as_loaded

    calib = calib or CalibConfig()
    ref = None if _is_loaded(model) else str(model)
    loaded = None if ref is not None else as_loaded(model)
    if loaded is not None and (device not in (None, "auto") or dtype not in (None, "auto")):
        raise ConfigError("device and dtype apply to a model reference; a loaded model is pruned where it is, in "
                          "its own dtype (move it with .to() first)")
    if out is None and not dry_run:
        raise ConfigError("a prune needs out, the run directory to write (or dry_run=True to plan only)")
    out = Path(out) if out is not None else None
    torch_device = loaded.denoiser.device if loaded is not None else resolve_device(device)
    owned = world is None
    if owned:
        world, torch_device = init_from_env(torch_device)
    with _session(world, owned):
        with world.failures():
            if loaded is not None and loaded.denoiser.device != torch_device:
                raise ConfigError(f"this rank prunes on {torch_device} but the model is on {loaded.denoiser.device}; "
                                  f"load it on {torch_device}")
            planned = _plan(ref or loaded, prune, calib, out, dry_run=dry_run, resume=resume, force=force,
                            max_memory=max_memory, save_dtype=save_dtype, dtype=dtype, device=torch_device,
                            world=world, world_size=world_size)
        result = PruneResult(planned.plan, planned.calib, rank=world.rank, world_size=world.size)
        if dry_run:
            return result
        if world.is_main and on_plan is not None:
            on_plan(planned.plan)
        return _prune_and_save(ref, loaded, prune, planned, out, resume, force, torch_device, world,
                               progress and world.is_main, plots, result)


def _is_loaded(model) -> bool:
    return not isinstance(model, str | os.PathLike)


def _plan(model: str | LoadedModel, prune: PruneConfig, calib: CalibConfig, out: Path | None, *, dry_run: bool,
          resume: bool, force: bool, max_memory: float | None, save_dtype, dtype, device: torch.device,
          world: World, world_size: int | None) -> _Planned:
    """Validate everything and plan, before the load: bad input fails at once and writes nothing."""
    from obsdiff.calibration.prompts import read_prompts
    from obsdiff.devices import dtype_name, torch_dtype
    from obsdiff.planning.memory import check_fits
    from obsdiff.planning.planner import choose_groups, plan_memory, skeleton
    from obsdiff.pruning.resume import Checkpoint
    from obsdiff.runs.artifacts import check_writable
    from obsdiff.runs.io import check_can_save

    if calib.prompts != "builtin":
        read_prompts(calib.prompts, "pass a text file, one prompt per line, or 'builtin'")
    if isinstance(model, str):
        from obsdiff.runs.loading import check_sizes

        check_sizes([model], calib.height, calib.width)
    if world_size is not None and (not dry_run or world.distributed):
        raise ConfigError("--world-size only plans a torchrun job with --dry-run; under torchrun the world size is "
                          "torchrun's")
    ranks = world_size or world.size
    if not dry_run and world.is_main:  # rank 0 alone writes the run
        check_writable(out, force)
        Checkpoint.check_leftover(out, resume=resume, force=force)
    # From configs and safetensors headers (a skeleton) for a reference; under torchrun the plan is one rank's.
    if isinstance(model, str):
        name = dtype_name(torch_dtype(dtype or "auto", device))  # auto follows the device
        sketch, weights = skeleton(model, name)
    else:
        name, sketch, weights = dtype_name(model.denoiser.dtype), model, None
    if max_memory is not None:
        calib, plan = choose_groups(sketch, prune, calib, max_memory, device, calib.hessian_device, weights,
                                    world_size=ranks)
    else:
        plan = plan_memory(sketch, prune, calib, device, calib.hessian_device, weights, world_size=ranks)
    save_as = None
    if not dry_run:
        check_fits(plan, device, plan.limit)
        save_as = check_can_save(sketch, out, force, save_dtype)
    return _Planned(calib, plan, name, save_as)


def _prune_and_save(ref: str | None, loaded: LoadedModel | None, prune: PruneConfig, planned: _Planned, out: Path,
                    resume: bool, force: bool, device: torch.device, world: World, progress: bool, plots: bool,
                    result: PruneResult) -> PruneResult:
    # module attributes looked up at call time (not imported names): tests and tools patch them
    from obsdiff.devices import dtype_name, measured_peaks
    from obsdiff.pruning import prune as pruning
    from obsdiff.pruning.resume import share_checkpoint
    from obsdiff.runs import loading
    from obsdiff.runs.io import save_run

    calib = planned.calib
    with world.failures():
        model = loaded if loaded is not None else loading.load_pipeline(ref, device=device, dtype=planned.dtype)
        checkpoint = (pruning.open_checkpoint(model, prune, calib, out, resume=resume, force=force,
                                              world_size=world.size) if world.is_main else None)
    checkpoint = share_checkpoint(world, checkpoint)
    try:
        report = pruning.prune_(model, prune, calib, checkpoint=checkpoint, world=world, progress=progress)
    except KeyboardInterrupt:
        raise PruneInterrupted(checkpoint.done, checkpoint.path) from None
    report.device, report.dtype = str(device), dtype_name(model.denoiser.dtype)
    measured = measured_peaks(device)
    extra = {"memory_plan": planned.plan.to_dict(), "memory_measured": measured}
    if world.distributed:  # every rank's peaks: ranks differ in the solves they own
        extra["memory_measured_ranks"] = result.measured_ranks = world.all_gather(measured)
    with world.failures():
        if world.is_main:
            save_run(model, report.to_dict() | extra, out, force=force, dtype=planned.save_as)
            checkpoint.remove()
            if plots:
                draw_plots_best_effort(out)
    result.report, result.measured = report, measured
    result.out = out if world.is_main else None
    return result


def draw_plots_best_effort(run: Path) -> None:
    """The run's plots (`obsdiff report`) after a prune: a missing matplotlib or a failed plot never fails it."""
    from obsdiff.eval.plots import write_run_plots

    try:
        write_run_plots(run)
    except Exception as exc:  # the run is saved by now: no plotting fault may turn it into a failed prune
        log.warning("no plots for %s (%s); obsdiff report %s draws them later", run, first_line(exc), run)


@contextlib.contextmanager
def _session(world: World, owned: bool) -> Iterator[None]:
    """The call's time in the job: a world this call joined is left at the end (after a failure without waiting
    for the others, which may never come). On a rank other than 0, a failure every rank knows of is marked for
    rank 0 to report (`reported_by_rank_zero`), and one only this rank knows of becomes a `RankFailed` naming it."""
    from obsdiff.pruning.distributed import RankFailed

    failed = True
    try:
        yield
        failed = False
    except BaseException as exc:
        if world.distributed and not world.is_main:
            agreed = getattr(exc, "obsdiff_agreed", False)  # set by `World.agree`: every rank raised it
            if not (agreed or isinstance(exc, RankFailed | Interrupted | KeyboardInterrupt)):
                raise RankFailed(f"rank {world.rank} of {world.size}: {first_line(exc)}") from exc
            with contextlib.suppress(AttributeError):
                setattr(exc, _RANK_ZERO_REPORTS, True)
        raise
    finally:
        if owned:
            world.close(together=not failed)
