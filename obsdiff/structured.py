"""Structured OBS-Diff: remove heads and FFN neurons, then shrink the model (docs/method.md#structured-selection).

The family's structure groups of the selected blocks are split into G contiguous calibration groups.
For each: calibrate the current model (earlier groups already pruned) with Hessians for this group's
reader linears only, remove structures greedily with the block OBS update, and zero the writers' rows
of removed structures so later passes see the pruned model. Finally every linear is sliced once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from obsdiff import obs
from obsdiff.calibrate import block_positions, make_calibrator
from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.distributed import World, owners_by_cost
from obsdiff.errors import ConfigError
from obsdiff.flops import count_flops, parameter_count
from obsdiff.loading import LoadedModel
from obsdiff.memory import text_encoders_parked
from obsdiff.models import StructureGroup
from obsdiff.records import LayerRecord, PruneError, PruneReport, calibration_chunks, select_blocks
from obsdiff.resume import Checkpoint
from obsdiff.shrink import plan_to_json, shrink_, structure_columns, structure_indices

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


def cost_curve(readers: list[obs.ReaderState], cols: list[torch.Tensor], max_remove: int, per_round: int,
               cfg: PruneConfig) -> list[float]:
    """Relative output error after removing 0, 1, ..., max_remove structures greedily (on copies).

    The error is `tr(dW H dW^T) / tr(W H W^T)` summed over the group's readers, measured after each greedy
    round and interpolated linearly in between.
    """
    states = [obs.ReaderState(r.W.clone(), r.H.clone(), r.damp) for r in readers]
    norms = [max(float(((r.W @ r.H) * r.W).sum()), 1e-30) for r in readers]
    gone = torch.zeros(cols[0].shape[0], dtype=torch.bool, device=cols[0].device)
    points = {0: 0.0}
    while int(gone.sum()) < max_remove:
        k = min(per_round, max_remove - int(gone.sum()))
        removed = obs.remove_structures_(states, cols, k, k, cfg.structure_cost, cfg.joint_scoring,
                                         cfg.compensate, exclude=gone)
        gone[removed] = True
        points[int(gone.sum())] = sum(float((((s.W - r.W) @ r.H) * (s.W - r.W)).sum()) / n
                                      for s, r, n in zip(states, readers, norms, strict=True))
    xs = sorted(points)
    curve = []
    for n in range(max_remove + 1):
        lo = max(x for x in xs if x <= n)
        hi = min(x for x in xs if x >= n)
        t = 0.0 if hi == lo else (n - lo) / (hi - lo)
        curve.append(points[lo] + t * (points[hi] - points[lo]))
    return curve


def allocate(curves: dict[str, list[float]], unit_params: dict[str, int], budget: int) -> dict[str, int]:
    """Spend a parameter `budget` on removals with the smallest marginal relative error per parameter.

    A greedy knapsack over the groups' cost curves; stops before exceeding the budget.
    """
    import heapq

    taken = dict.fromkeys(curves, 0)
    heap = [((c[1] - c[0]) / unit_params[name], name) for name, c in curves.items() if len(c) > 1]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, name = heapq.heappop(heap)
        if spent + unit_params[name] > budget:
            continue
        spent += unit_params[name]
        taken[name] += 1
        c, k = curves[name], taken[name]
        if k + 1 < len(c):
            heapq.heappush(heap, ((c[k + 1] - c[k]) / unit_params[name], name))
    return taken


def structure_params(group: StructureGroup, modules: dict) -> int:
    """Parameters one structure of the group carries (writer rows with bias, reader columns)."""
    n = 0
    for s in group.writers:
        lin = modules[s.linear]
        n += group.size * (lin.in_features + (1 if lin.bias is not None else 0))
    for s in group.readers:
        n += group.size * modules[s.linear].out_features
    return n


def sensitivity_allocation(planned: list[tuple[StructureGroup, int]], cfg: PruneConfig, calibrator,
                           modules: dict, chunk: Callable[[list], list[list]], progress: bool,
                           world: World | None = None) -> list[tuple[StructureGroup, int]]:
    """Non-uniform per-block counts with the uniform plan's parameter budget, per structure kind.

    Each group's OBS cost curve is measured on the dense model (up to twice its uniform count) and the
    budget goes where the marginal relative output error per removed parameter is smallest.
    """
    world = world or World()
    curves, unit = {}, {}
    chunks = chunk(planned)
    for i, part in enumerate(chunks):
        readers = list(dict.fromkeys(s.linear for g, _ in part for s in g.readers))
        with world.failures():
            accs, _ = calibrator.hessians(readers, f"sensitivity {i + 1}/{len(chunks)}")
        comps = reader_components(part)
        owners, reader_owner = _owners(comps, modules, world)
        world.reduce_hessians_(accs, reader_owner)
        mine = {}
        with world.failures():
            for c, (idx, comp_readers) in enumerate(comps):
                if owners[c] != world.rank:
                    continue
                states = {name: obs.ReaderState.create(modules[name].weight.detach(), accs[name].H, cfg.percdamp)
                          for name in comp_readers}
                for g, n in (part[j] for j in idx):
                    per_round = 1 if g.kind == "heads" else cfg.ffn_per_round
                    max_remove = min(g.count - 1, max(2 * n, n + 1))
                    cols = [structure_columns(g, s.offset, states[s.linear].W.device) for s in g.readers]
                    mine[g.name] = cost_curve([states[s.linear] for s in g.readers], cols, max_remove, per_round,
                                              cfg)
        for found in world.all_gather(mine):
            curves |= found
        unit |= {g.name: structure_params(g, modules) for g, _ in part}
        del accs
    counts = {}
    for kind in {g.kind for g, _ in planned}:
        members = [(g, n) for g, n in planned if g.kind == kind]
        budget = sum(n * unit[g.name] for g, n in members)
        counts |= allocate({g.name: curves[g.name] for g, _ in members}, unit, budget)
    return [(g, counts[g.name]) for g, _ in planned]


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


def prune_structured_(model: LoadedModel, cfg: PruneConfig, calib: CalibConfig, progress: bool,
                      t_start: float, checkpoint: Checkpoint | None = None, world: World | None = None
                      ) -> PruneReport:
    world = world or World()
    denoiser = model.denoiser
    planned, warnings = plan_structures(model, cfg)
    for w in warnings:
        log.warning(w)
    report = PruneReport(prune=cfg.to_dict(), calib=calib.to_dict(), family=model.family.name,
                         base_model=model.ref, warnings=warnings)
    before = model_stats(model)
    blocks = select_blocks(model.family.blocks(denoiser), cfg.blocks)
    calibrator = None
    if cfg.needs_calibration:
        with world.failures():
            calibrator = make_calibrator(model, cfg, calib, blocks, progress,
                                         workdir=checkpoint.path if checkpoint else None, rank=world.rank,
                                         world_size=world.size)
    with contextlib.ExitStack() as stack:
        if calibrator is not None:
            stack.enter_context(calibrator)
            stack.enter_context(text_encoders_parked(model))
        report = _prune_groups(model, cfg, calib, calibrator, planned, report, blocks, progress, checkpoint, world)
    shrink_(denoiser, [g for g, _ in report_active(report, planned)], report_kept(report))
    after = model_stats(model)
    report.model_stats = {"before": before, "after": after,
                          "parameter_ratio": after["parameters"] / before["parameters"],
                          "flop_ratio": after["flops_per_forward"] / before["flops_per_forward"]}
    report.shrink_plan = plan_to_json([g for g, _ in report_active(report, planned)], report_kept(report))
    report.distributed = world.record() if world.distributed else None
    report.total_seconds = time.perf_counter() - t_start
    return report


def structure_chunks(active: list[tuple[StructureGroup, int]], cfg: PruneConfig, calib: CalibConfig,
                     positions: dict[str, int]) -> list[list[tuple[StructureGroup, int]]]:
    """The groups the loop removes the `active` (group, count) items in (the planner plans these): contiguous
    calibration groups (one per block with `calib.groups` None), or all at once for a method that calibrates
    nothing. `positions`: block position of every reader linear (`calibrate.block_positions`)."""
    if not cfg.needs_calibration:
        return [active]
    return calibration_chunks(active, calib.groups, lambda item: positions[item[0].readers[0].linear])


def readers_of(chunk: list[tuple[StructureGroup, int]]) -> list[str]:
    """The reader linears of one group's items, each once, in order: the Hessians that group accumulates."""
    return list(dict.fromkeys(s.linear for g, _ in chunk for s in g.readers))


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
    kept: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _ComponentResult:
    """What the owner of one reader component found, for every rank to apply."""

    structures: dict[int, dict] = field(default_factory=dict)  # position in the calibration group -> entry
    removed_cols: dict[str, list[int]] = field(default_factory=dict)
    records: dict[str, LayerRecord] = field(default_factory=dict)


def reader_components(items: list[tuple[StructureGroup, int]]) -> list[tuple[list[int], list[str]]]:
    """The items split into independent solves: groups that share a reader linear (e.g. Flux's `proj_out`
    reads heads and FFN neurons) belong together. (item positions, readers), in order of first appearance."""
    comp_of: dict[str, int] = {}
    members: list[list[int]] = []
    for i, (g, _) in enumerate(items):
        hits = sorted({comp_of[s.linear] for s in g.readers if s.linear in comp_of})
        if not hits:
            members.append([])
            hits = [len(members) - 1]
        keep = hits[0]
        for other in hits[1:]:  # merge components joined by this group
            members[keep] += members[other]
            members[other] = []
        members[keep].append(i)
        for name, c in comp_of.items():
            if c in hits:
                comp_of[name] = keep
        for s in g.readers:
            comp_of[s.linear] = keep
    comps = []
    for idx in members:
        if idx:
            idx = sorted(idx)
            comps.append((idx, list(dict.fromkeys(s.linear for i in idx for s in items[i][0].readers))))
    return sorted(comps, key=lambda c: c[0][0])


def _owners(comps: list[tuple[list[int], list[str]]], modules: dict, world: World) -> tuple[list[int], dict[str, int]]:
    owners = owners_by_cost([readers for _, readers in comps], modules, world.size)
    return owners, {r: owners[c] for c, (_, readers) in enumerate(comps) for r in readers}


def _reader_state(name: str, modules: dict, H: torch.Tensor, cfg: PruneConfig, removed: set[int]) -> obs.ReaderState:
    W = modules[name].weight.detach()
    gone = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    gone[list(removed)] = True
    try:
        return obs.ReaderState.create(W, H, cfg.percdamp, gone)
    except obs.CholeskyError as exc:
        raise PruneError(f"layer {name}: {exc}; raise --percdamp or use more calibration prompts") from None


def _remove_component_(items: list[tuple[StructureGroup, int]], idx: list[int], readers: list[str], accs: dict,
                       modules: dict, device: torch.device, cfg: PruneConfig, state: _LoopState) -> _ComponentResult:
    """Remove the structures of one reader component greedily (block OBS), zero its writers' rows and write its
    readers' compensated weights, in place; what was removed and the layer records."""
    result = _ComponentResult()
    seconds = dict.fromkeys(readers, 0.0)  # each reader's own solve time, for its LayerRecord
    states: dict[str, obs.ReaderState] = {}
    for name in readers:
        t0 = time.perf_counter()
        if name in accs:
            states[name] = _reader_state(name, modules, accs[name].H, cfg, state.removed_cols.get(name, set()))
        seconds[name] += time.perf_counter() - t0
    for i in idx:
        group, n = items[i]
        t1 = time.perf_counter()
        cols = [structure_columns(group, s.offset, device) for s in group.readers]
        if cfg.method == "magnitude":
            gone = obs.magnitude_structures([modules[s.linear].weight.detach() for s in group.readers], cols, n)
        else:
            per_round = 1 if group.kind == "heads" else cfg.ffn_per_round
            gone = obs.remove_structures_([states[s.linear] for s in group.readers], cols, n, per_round,
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


def _remove_chunk_(items: list[tuple[StructureGroup, int]], readers: list[str], accs: dict, modules: dict,
                   device: torch.device, cfg: PruneConfig, state: _LoopState, report: PruneReport,
                   world: World) -> None:
    """One calibration group's removals: each reader component on its owner rank, results shared by all."""
    comps = reader_components(items)
    owners, reader_owner = _owners(comps, modules, world)
    if accs:
        world.reduce_hessians_(accs, reader_owner)
    for name in readers:
        state.originals.setdefault(name, modules[name].weight.detach().clone())
    mine: dict[int, _ComponentResult] = {}
    t0 = time.perf_counter()
    with world.failures():
        for c, (idx, comp_readers) in enumerate(comps):
            if owners[c] == world.rank:
                mine[c] = _remove_component_(items, idx, comp_readers, accs, modules, device, cfg, state)
    world.stats.solve_seconds += time.perf_counter() - t0
    world.stats.units_solved += len(mine)
    for c, (idx, comp_readers) in enumerate(comps):
        world.broadcast_(list(_changed_tensors(modules, [items[i][0] for i in idx], comp_readers).values()),
                         src=owners[c])
    structures, records = {}, {}
    for part in world.all_gather(mine):
        for result in part.values():
            structures |= result.structures
            records |= result.records
            for name, cols in result.removed_cols.items():
                state.removed_cols.setdefault(name, set()).update(cols)
    for name in readers:  # in forward order, as a single process inserts them
        state.records[name] = records[name]
    for i in range(len(items)):
        entry = structures[i]
        state.kept[entry["name"]] = [k for k in range(entry["count"]) if k not in set(entry["removed"])]
        report.structures.append(entry)


def _resume_groups(checkpoint, calibrator, modules: dict, denoiser, chunk_readers: list[list[str]], report,
                   state: _LoopState) -> tuple[PruneReport, int]:
    """Restore a checkpoint's finished groups; the report and loop state as they were after them."""
    if calibrator is not None and calibrator.mode == "cached":
        calibrator.capture()  # on the dense model, as the uninterrupted run did
    start = checkpoint.done
    done_readers = {name for names in chunk_readers[:start] for name in names}
    for name in {n for names in chunk_readers[start:] for n in names} & done_readers:
        state.originals[name] = modules[name].weight.detach().clone()  # dense, before the restore
    checkpoint.restore_(denoiser)
    restored = PruneReport.from_dict(checkpoint.report)
    restored.encode_seconds = report.encode_seconds
    extra = checkpoint.extra
    state.removed_cols = {k: set(v) for k, v in extra["removed_cols"].items()}
    state.kept = extra["kept"]
    state.records = {r["name"]: LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in extra["records"]}
    return restored, start


def _prune_groups(model: LoadedModel, cfg: PruneConfig, calib: CalibConfig, calibrator, planned, report, blocks,
                  progress: bool, checkpoint: Checkpoint | None, world: World) -> PruneReport:
    """Remove structures group by group (calibrating each on the partly pruned model); writers' rows of removed
    structures are zeroed so later groups see the pruned model. Slicing happens afterwards, once."""
    denoiser = model.denoiser
    modules = dict(denoiser.named_modules())
    positions = block_positions(blocks, modules)

    def chunk(items: list) -> list[list]:  # (group, count) items in forward order -> calibration groups
        return calibration_chunks(items, calib.groups, lambda item: positions[item[0].readers[0].linear])

    report.encode_seconds = calibrator.encode_seconds if calibrator else 0.0
    resuming = checkpoint is not None and checkpoint.done > 0
    if resuming:
        counts = checkpoint.extra["planned"]
        planned = [(g, counts[g.name]) for g, _ in planned]
    elif cfg.allocation == "sensitivity":
        if calibrator is None:
            raise ConfigError("--allocation sensitivity needs Hessians; use it with obs-diff or sparsegpt")
        t0 = time.perf_counter()
        planned = sensitivity_allocation(planned, cfg, calibrator, modules, chunk, progress, world)
        report.allocation = {"seconds": time.perf_counter() - t0, "removed": {g.name: n for g, n in planned}}
    active = [(g, n) for g, n in planned if n > 0]
    chunks = structure_chunks(active, cfg, calib, positions)  # one, uncalibrated, without a calibrator
    report.calib["groups"] = len(chunks)
    chunk_readers = [readers_of(chunk) for chunk in chunks]
    state = _LoopState()
    start = 0
    if resuming:
        report, start = _resume_groups(checkpoint, calibrator, modules, denoiser, chunk_readers, report, state)
    bar = tqdm(total=len(chunks), initial=start, desc="groups", unit="group", disable=not progress)
    for gi in range(start, len(chunks)):
        readers = chunk_readers[gi]
        accs, t_calib = ({}, 0.0)
        if calibrator:
            with world.failures():
                accs, t_calib = calibrator.hessians(readers, f"calibrate group {gi + 1}/{len(chunks)}")
            world.stats.calib_seconds += t_calib
        t0 = time.perf_counter()
        _remove_chunk_(chunks[gi], readers, accs, modules, denoiser.device, cfg, state, report, world)
        later = {name for names in chunk_readers[gi + 1:] for name in names}
        for name in set(readers) - later:
            state.originals.pop(name, None)
        report.add_group(gi, [[g.name] for g, _ in chunks[gi]], t_calib, time.perf_counter() - t0, accs)
        del accs
        if checkpoint is not None:
            report.layers = list(state.records.values())
            changed = _changed_tensors(modules, [g for g, _ in chunks[gi]], readers)
            checkpoint.save_group(gi, changed, report.to_dict(), {
                "planned": {g.name: n for g, n in planned}, "kept": state.kept,
                "removed_cols": {k: sorted(v) for k, v in state.removed_cols.items()},
                "records": [asdict(r) for r in state.records.values()]})
        bar.update()
    bar.close()
    report.layers = list(state.records.values())
    report.calibration = calibrator.stats() if calibrator else {}
    return report
