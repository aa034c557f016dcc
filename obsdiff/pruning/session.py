"""One prune, group by group: the loop every sparsity type shares (docs/method.md#group-wise-sequential-calibration).

The selected blocks' work is planned as contiguous groups. For each group in turn: calibrate the current model
(earlier groups already pruned, later ones still dense), accumulating Hessians only for the linears the group
hooks; solve its work items, each on its owner rank (`distributed.share_work`); apply the results; store the
group in the checkpoint; free the Hessians. A `Strategy` says what differs between sparsity types (what a unit
is, how it is solved, what a checkpoint keeps beyond the weights, what happens before and after the loop); the
`PruningSession` does everything else, once: the calibrator's lifetime, parked text encoders, resume, the
progress bar, per-group calibration, the shared solves, checkpoints, the report and its timings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from obsdiff.calibration.calibrate import Calibrator, block_positions, make_calibrator
from obsdiff.calibration.placement import text_encoders_parked
from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.pruning.distributed import World, share_work
from obsdiff.pruning.records import PruneReport, Unit, select_blocks
from obsdiff.pruning.resume import CheckpointLike
from obsdiff.runs.loading import LoadedModel
from obsdiff.solver.hessian import HessianAccumulator


@dataclass
class Group:
    """One calibration group of the plan."""

    units: list[Unit]  # linears that read one input: the first is hooked for their shared Hessian
    names: list[list[str]]  # what the report's group record lists
    items: list  # the strategy's own work of the group (units; structured: (structure group, count))

    @property
    def hooked(self) -> list[str]:
        """The linears whose Hessians the group accumulates."""
        return [unit[0] for unit in self.units]


@dataclass
class Work:
    """One group's work items, for `distributed.share_work`."""

    linears: list[list[str]]  # per item: the linears solved together (their cost picks the owner rank)
    solve: Callable[[int], Any]  # item -> its result (small: every rank receives every result)
    tensors: Callable[[int], Sequence[torch.Tensor]]  # item -> the tensors its solve changed in place


class Strategy:
    """What one sparsity type prunes and how; the session runs the loop around it.

    Built from the model and the settings alone (the planner builds one on a meta-device twin), so nothing
    here may run the model or log: `start` does what a real run does first.
    """

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig):
        self.model, self.prune, self.calib = model, prune, calib
        self.modules = dict(model.denoiser.named_modules())
        self.blocks = select_blocks(model.family.blocks(model.denoiser), prune.blocks)
        self.positions = block_positions(self.blocks, self.modules)  # block position of every linear

    def plan(self) -> list[Group]:
        """The groups as planned from the settings (what the memory planner sizes)."""
        raise NotImplementedError

    def start(self, report: PruneReport) -> None:
        """Before calibration: the plan's warnings and skipped layers into the report."""

    def prepare(self, calibrator: Calibrator | None, saved: dict | None, report: PruneReport, world: World,
                progress: bool) -> list[Group]:
        """The groups the loop runs, with the calibrator open (on the dense model). `saved`: the state a resumed
        checkpoint stored after its last group (`state`), so the plan is the interrupted run's."""
        return self.plan()

    def resume(self, saved: dict, done: int, report: PruneReport) -> None:
        """Continue after `done` finished groups: `saved` is `state()` after them, `report` the report. Called
        while the model is still dense (the checkpoint is restored right after)."""

    def ranges(self, group: Group) -> dict[str, list[str]] | None:
        """Activation ranges the group's calibration records (`Calibrator.hessians`); None: Hessians only."""
        return None

    def work(self, group: Group, accs: dict[str, HessianAccumulator] | None) -> Work:
        """The group's work items; `accs` (None without calibration) are the Hessians by hooked linear."""
        raise NotImplementedError

    def apply_(self, index: int, group: Group, results: list, report: PruneReport) -> None:
        """Take every item's result (in item order; the weights are already in place) into the report."""
        raise NotImplementedError

    def changed(self, group: Group) -> dict[str, torch.Tensor]:
        """The tensors the group changed, by state-dict name: what its checkpoint file stores."""
        raise NotImplementedError

    def state(self) -> dict | None:
        """What a checkpoint stores beyond the weights and the report, for `prepare` and `resume`."""
        return None

    def finish(self, report: PruneReport) -> None:
        """After the loop (the calibrator closed)."""


class PruningSession:
    """Runs one prune of `model` with `strategy` (see the module docstring); `run` returns the report."""

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig, strategy: Strategy,
                 progress: bool = True, checkpoint: CheckpointLike | None = None, world: World | None = None):
        self.model, self.prune, self.calib, self.strategy = model, prune, calib, strategy
        self.progress, self.checkpoint, self.world = progress, checkpoint, world or World()
        self.report = PruneReport(prune=prune.to_dict(), calib=calib.to_dict(), family=model.family.name,
                                  base_model=model.ref)

    def run(self, t_start: float | None = None) -> PruneReport:
        """Prune in place; `t_start`: when the prune began (for the report's total), now if None."""
        t_start = time.perf_counter() if t_start is None else t_start
        world, strategy, checkpoint = self.world, self.strategy, self.checkpoint
        strategy.start(self.report)
        calibrator = None
        if self.prune.needs_calibration:
            with world.failures():
                calibrator = make_calibrator(self.model, self.prune, self.calib, strategy.blocks, self.progress,
                                             workdir=checkpoint.path if checkpoint else None, rank=world.rank,
                                             world_size=world.size)
        with contextlib.ExitStack() as stack:
            if calibrator is not None:
                stack.enter_context(calibrator)
                stack.enter_context(text_encoders_parked(self.model))
                self.report.encode_seconds = calibrator.encode_seconds
            resuming = checkpoint is not None and checkpoint.done > 0
            groups = strategy.prepare(calibrator, checkpoint.extra if resuming else None, self.report, world,
                                      self.progress)
            self.report.calib["groups"] = len(groups)
            start = self._resume(calibrator) if resuming else 0
            self._run_groups(groups, start, calibrator)
            self.report.calibration = calibrator.stats() if calibrator is not None else {}
        strategy.finish(self.report)
        self.report.distributed = world.record() if world.distributed else None
        self.report.total_seconds = time.perf_counter() - t_start
        return self.report

    def _resume(self, calibrator: Calibrator | None) -> int:
        """Re-apply the checkpoint's finished groups to the dense model; the report and the strategy's state as
        they were after them. Returns the number of finished groups.

        Cached calibration captures its block inputs on the dense model first, as the uninterrupted run did, and
        carries them through the restored blocks when the next group asks, so the next group's Hessians are
        bitwise those of the uninterrupted run.
        """
        checkpoint = self.checkpoint
        if calibrator is not None and calibrator.mode == "cached":
            calibrator.capture()
        restored = PruneReport.from_dict(checkpoint.report)
        restored.encode_seconds = self.report.encode_seconds
        self.strategy.resume(checkpoint.extra, checkpoint.done, restored)
        checkpoint.restore_(self.model.denoiser)
        self.report = restored
        return checkpoint.done

    def _run_groups(self, groups: list[Group], start: int, calibrator: Calibrator | None) -> None:
        world, strategy, report = self.world, self.strategy, self.report
        modules = strategy.modules
        bar = tqdm(total=len(groups), initial=start, desc="groups", unit="group", disable=not self.progress)
        for g in range(start, len(groups)):
            group, where = groups[g], f"group {g + 1}/{len(groups)}"
            accs, t_calib = None, 0.0
            if calibrator is not None:
                with world.failures():
                    accs, t_calib = calibrator.hessians(group.hooked, f"calibrate {where}", strategy.ranges(group))
                world.stats.calib_seconds += t_calib
            t0 = time.perf_counter()
            work = strategy.work(group, accs)
            results = share_work(world, work.linears, modules, work.solve, work.tensors, accs, f"prune {where}",
                                 self.progress)
            strategy.apply_(g, group, results, report)
            report.add_group(g, group.names, t_calib, time.perf_counter() - t0, accs or {})
            del accs, work, results
            if self.checkpoint is not None:
                self.checkpoint.save_group(g, strategy.changed(group), report.to_dict(), strategy.state())
            bar.update()
        bar.close()
