"""Structured OBS-Diff: remove heads and FFN neurons, then shrink the model (docs/method.md#structured-selection).

The family's structure groups of the selected blocks are split into G contiguous calibration groups, which
the `session.PruningSession` runs in turn with the `StructureStrategy`: calibrate the current model (earlier
groups already pruned) with Hessians for this group's reader linears only, remove structures greedily with the
block OBS update, and zero the writers' rows of removed structures so later passes see the pruned model.
Finally every linear is sliced once. How much each block loses under `--allocation sensitivity`: allocation.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import ConfigError
from obsdiff.models import StructureGroup
from obsdiff.pruning.allocation import reader_components, readers_of, sensitivity_allocation
from obsdiff.pruning.distributed import World
from obsdiff.pruning.flops import count_flops, parameter_count
from obsdiff.pruning.records import LayerRecord, PruneError, PruneReport, calibration_chunks, select_blocks
from obsdiff.pruning.session import Group, Strategy, Work
from obsdiff.runs.loading import LoadedModel
from obsdiff.runs.shrink import plan_to_json, shrink_, structure_columns, structure_indices
from obsdiff.solver import group_obs, obs

log = logging.getLogger(__name__)


def plan_structures(model: LoadedModel, cfg: PruneConfig) -> tuple[list[tuple[StructureGroup, int]], list[str]]:
    """(group, number to remove) in forward order, and warnings for ratios that round to nothing."""
    fam, denoiser = model.family, model.denoiser
    groups = [g for b in select_blocks(fam.blocks(denoiser), cfg.blocks) for g in fam.structure_groups(b)]
    if not groups:
        raise ConfigError(f"the {fam.name} family defines no heads or FFN groups to remove; "
                          "use --sparsity-type unstructured or 2:4")
    planned, warnings = [], []
    for g in groups:
        ratio = cfg.ratio(g.kind)
        n = min(round(ratio * g.count), g.count - 1)  # at least one head / neuron always remains
        if ratio > 0 and n == 0:
            warnings.append(f"{g.name}: ratio {ratio:g} of {g.count} {g.kind} rounds to zero; nothing removed")
        planned.append((g, n))
    if not any(n for _, n in planned):
        raise ConfigError("the requested ratios remove no structure at all; raise --sparsity / --head-ratio")
    return planned, warnings


def _check_shrunk_widths(planned: list[tuple[StructureGroup, int]], modules: dict, group_size: int | None) -> None:
    """Refuse a quantization group size that will not divide a reader's input width once structures are removed
    (the quantization sweep after structured pruning would meet it only after the structured part)."""
    if group_size is None:
        return
    removed: dict[str, int] = {}
    for g, n in planned:
        for s in g.readers:
            removed[s.linear] = removed.get(s.linear, 0) + n * g.size
    for name, gone in removed.items():
        width = modules[name].in_features - gone
        if width % group_size:
            raise ConfigError(f"layer {name}: --quant-group-size {group_size} does not divide its input width after "
                              f"structured pruning ({width}); choose ratios that keep multiples of it or a smaller "
                              "group size")


def model_stats(model: LoadedModel) -> dict:
    d = model.denoiser
    msl = model.generation_defaults.get("max_sequence_length")
    inputs = model.family.example_inputs(d, batch=1, text_len=model.family.text_len(model.pipeline, msl),
                                         generator=torch.Generator().manual_seed(0))
    return {"parameters": parameter_count(d), "flops_per_forward": count_flops(d, inputs)}  # meta: no compute


def _zero_writers_(modules: dict, group: StructureGroup, removed: list[int]) -> None:
    for s in group.writers:
        rows = structure_indices(group, s.offset, removed)
        lin = modules[s.linear]
        with torch.no_grad():
            lin.weight[rows] = 0
            if lin.bias is not None:
                lin.bias[rows] = 0


def structure_chunks(active: list[tuple[StructureGroup, int]], cfg: PruneConfig, calib: CalibConfig,
                     positions: dict[str, int]) -> list[list[tuple[StructureGroup, int]]]:
    """The groups the loop removes the `active` (group, count) items in (the planner plans these): contiguous
    calibration groups (one per block with `calib.groups` None), or all at once for a method that calibrates
    nothing. `positions`: block position of every reader linear (`calibrate.block_positions`)."""
    if not cfg.needs_calibration:
        return [active]
    return calibration_chunks(active, calib.groups, lambda item: positions[item[0].readers[0].linear])


def report_active(report: PruneReport, planned: list[tuple[StructureGroup, int]]) -> list[tuple[StructureGroup, int]]:
    """The structure groups that lose something, with their final counts (after any allocation)."""
    removed = {s["name"]: len(s["removed"]) for s in report.structures}
    return [(g, removed[g.name]) for g, _ in planned if removed.get(g.name)]


def report_kept(report: PruneReport) -> dict[str, list[int]]:
    """Kept structure indices per group, from the report's records of what each group removed."""
    return {s["name"]: [i for i in range(s["count"]) if i not in set(s["removed"])] for s in report.structures}


@dataclass
class _LoopState:
    """What the group loop carries from one calibration group to the next (and a checkpoint stores)."""

    removed_cols: dict[str, set[int]] = field(default_factory=dict)  # per reader, all groups: never revived
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # dense readers still read by a later group
    records: dict[str, LayerRecord] = field(default_factory=dict)


@dataclass
class _ComponentResult:
    """What the owner of one reader component found, for every rank to apply."""

    structures: dict[int, dict] = field(default_factory=dict)  # position in the calibration group -> entry
    removed_cols: dict[str, list[int]] = field(default_factory=dict)
    records: dict[str, LayerRecord] = field(default_factory=dict)


def _reader_state(name: str, modules: dict, H: torch.Tensor, cfg: PruneConfig, removed: set[int]
                  ) -> group_obs.ReaderState:
    W = modules[name].weight.detach()
    gone = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    gone[list(removed)] = True
    try:
        return group_obs.ReaderState.create(W, H, cfg.percdamp, gone)
    except obs.CholeskyError as exc:
        raise PruneError(f"layer {name}: {exc}; raise --percdamp or use more calibration prompts") from None


def _remove_component_(items: list[tuple[StructureGroup, int]], idx: list[int], readers: list[str], accs: dict,
                       modules: dict, device: torch.device, cfg: PruneConfig, state: _LoopState) -> _ComponentResult:
    """Remove the structures of one reader component greedily (block OBS), zero its writers' rows and write its
    readers' compensated weights, in place; what was removed and the layer records."""
    result = _ComponentResult()
    seconds = dict.fromkeys(readers, 0.0)  # each reader's own solve time, for its LayerRecord
    states: dict[str, group_obs.ReaderState] = {}
    for name in readers:
        t0 = time.perf_counter()
        if name in accs:
            states[name] = _reader_state(name, modules, accs[name].H, cfg, state.removed_cols.get(name, set()))
        seconds[name] += time.perf_counter() - t0
    for i in idx:
        group, n = items[i]
        t1 = time.perf_counter()
        cols = [structure_columns(group, s.offset, device) for s in group.readers]
        if cfg.method_spec.structured == "l1":  # weight norms alone (magnitude)
            gone = group_obs.magnitude_structures([modules[s.linear].weight.detach() for s in group.readers], cols, n)
        else:
            per_round = 1 if group.kind == "heads" else cfg.ffn_per_round
            gone = group_obs.remove_structures_([states[s.linear] for s in group.readers], cols, n, per_round,
                                          cfg.structure_cost, cfg.joint_scoring, cfg.compensate)
        for s, c in zip(group.readers, cols, strict=True):
            state.removed_cols.setdefault(s.linear, set()).update(c[gone].flatten().tolist())
        _zero_writers_(modules, group, gone)
        # Coupled readers (joint heads: both output projections) share one greedy removal; its time is split
        # evenly among them, as no reader's share of the shared rounds can be told apart.
        for s in group.readers:
            seconds[s.linear] += (time.perf_counter() - t1) / len(group.readers)
        result.structures[i] = {"name": group.name, "kind": group.kind, "count": group.count,
                                "kept": group.count - len(gone), "removed": gone,
                                "seconds": time.perf_counter() - t1}
    for name in readers:
        t0 = time.perf_counter()
        lin = modules[name]
        W_new = (states[name].W if name in states else lin.weight.detach().float()).clone()
        cols = sorted(state.removed_cols[name])
        W_new[:, cols] = 0
        if not torch.isfinite(W_new).all():
            raise PruneError(f"layer {name}: structured pruning produced non-finite weights; raise --percdamp")
        with torch.no_grad():
            lin.weight.copy_(W_new.to(lin.weight.dtype))
        W0, H = state.originals[name], accs[name].H if name in accs else None
        masked = W0.clone()
        masked[:, cols] = 0
        result.records[name] = LayerRecord(
            name, tuple(W0.shape), len(cols) / W0.shape[1],
            obs.reconstruction_error(W0, masked, H) if H is not None else None,
            obs.reconstruction_error(W0, lin.weight.detach(), H) if H is not None else None,
            states[name].damp if name in states else None, seconds[name] + time.perf_counter() - t0)
        result.removed_cols[name] = cols
    return result


def _changed_tensors(modules: dict, groups: list[StructureGroup], readers: list[str]) -> dict[str, torch.Tensor]:
    """The tensors a calibration group changes: its readers' weights and its writers' weights and biases."""
    changed = {f"{name}.weight": modules[name].weight for name in readers}
    for group in groups:
        for s in group.writers:
            lin = modules[s.linear]
            changed[f"{s.linear}.weight"] = lin.weight
            if lin.bias is not None:
                changed[f"{s.linear}.bias"] = lin.bias
    return changed


class StructureStrategy(Strategy):
    """Structured sparsity: a work item is a reader component (structure groups that share reader linears),
    whose structures are removed greedily; writers' rows of removed structures are zeroed so later groups see
    the pruned model, and every linear is sliced once at the end (`finish`)."""

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig):
        super().__init__(model, prune, calib)
        self.planned, self.warnings = plan_structures(model, prune)
        if prune.quant is not None and prune.allocation == "uniform":  # known now: refuse before any work
            _check_shrunk_widths(self.planned, self.modules, prune.quant.spec.group_size)
        self.loop = _LoopState()
        self.groups: list[Group] = []
        self.before: dict = {}

    def _groups(self, planned: list[tuple[StructureGroup, int]]) -> list[Group]:
        active = [(g, n) for g, n in planned if n > 0]
        return [Group([(r,) for r in readers_of(chunk)], [[g.name] for g, _ in chunk], chunk)
                for chunk in structure_chunks(active, self.prune, self.calib, self.positions)]

    def plan(self) -> list[Group]:
        return self._groups(self.planned)

    def start(self, report: PruneReport) -> None:
        for w in self.warnings:
            log.warning(w)
        report.warnings = list(self.warnings)
        self.before = model_stats(self.model)

    def prepare(self, calibrator, saved: dict | None, report: PruneReport, world: World, progress: bool
                ) -> list[Group]:
        if saved is not None:  # the counts the interrupted run planned (after any allocation)
            counts = saved["planned"]
            self.planned = [(g, counts[g.name]) for g, _ in self.planned]
        elif self.prune.allocation == "sensitivity":
            if calibrator is None:
                raise ConfigError("--allocation sensitivity needs Hessians; use it with obs-diff or sparsegpt")
            t0 = time.perf_counter()
            chunks = calibration_chunks(self.planned, self.calib.groups,
                                        lambda item: self.positions[item[0].readers[0].linear])
            self.planned = sensitivity_allocation(self.planned, self.prune, calibrator, self.modules, chunks,
                                                  progress, world)
            report.allocation = {"seconds": time.perf_counter() - t0, "removed": {g.name: n for g, n in self.planned}}
        self.groups = self._groups(self.planned)
        return self.groups

    def resume(self, saved: dict, done: int, report: PruneReport) -> None:
        finished = {name for group in self.groups[:done] for name in group.hooked}
        for name in {n for group in self.groups[done:] for n in group.hooked} & finished:
            self.loop.originals[name] = self.modules[name].weight.detach().clone()  # dense, before the restore
        self.loop.removed_cols = {k: set(v) for k, v in saved["removed_cols"].items()}
        self.loop.records = {r.name: r for r in report.layers}

    def work(self, group: Group, accs: dict | None) -> Work:
        items, modules, state, accs = group.items, self.modules, self.loop, accs or {}
        comps = reader_components(items)
        for name in group.hooked:  # dense copies for the error records
            state.originals.setdefault(name, modules[name].weight.detach().clone())
        device = self.model.denoiser.device

        def solve(c: int) -> _ComponentResult:
            idx, readers = comps[c]
            return _remove_component_(items, idx, readers, accs, modules, device, self.prune, state)

        def tensors(c: int) -> list[torch.Tensor]:
            idx, readers = comps[c]
            return list(_changed_tensors(modules, [items[i][0] for i in idx], readers).values())

        return Work([readers for _, readers in comps], solve, tensors)

    def apply_(self, index: int, group: Group, results: list[_ComponentResult], report: PruneReport) -> None:
        structures, records = {}, {}
        for result in results:
            structures |= result.structures
            records |= result.records
            for name, cols in result.removed_cols.items():
                self.loop.removed_cols.setdefault(name, set()).update(cols)
        for name in group.hooked:  # in forward order, as a single process inserts them
            self.loop.records[name] = records[name]
        report.structures.extend(structures[i] for i in range(len(group.items)))
        later = {name for g in self.groups[index + 1:] for name in g.hooked}
        for name in set(group.hooked) - later:
            self.loop.originals.pop(name, None)
        report.layers = list(self.loop.records.values())

    def changed(self, group: Group) -> dict[str, torch.Tensor]:
        return _changed_tensors(self.modules, [g for g, _ in group.items], group.hooked)

    def state(self) -> dict:
        return {"planned": {g.name: n for g, n in self.planned},
                "removed_cols": {k: sorted(v) for k, v in self.loop.removed_cols.items()}}

    def finish(self, report: PruneReport) -> None:
        active = [g for g, _ in report_active(report, self.planned)]
        shrink_(self.model.denoiser, active, report_kept(report))
        after = model_stats(self.model)
        report.model_stats = {"before": self.before, "after": after,
                              "parameter_ratio": after["parameters"] / self.before["parameters"],
                              "flop_ratio": after["flops_per_forward"] / self.before["flops_per_forward"]}
        report.shrink_plan = plan_to_json(active, report_kept(report))
