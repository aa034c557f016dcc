"""Where structured pruning removes how much: `--allocation sensitivity` (docs/method.md#structured-selection).

Also the split of structure groups into reader components, the independent work items of both the
allocation's cost curves and the removal loop (`structured.StructureStrategy`).
"""

from __future__ import annotations

import torch

from obsdiff.config import PruneConfig
from obsdiff.models import StructureGroup
from obsdiff.pruning.distributed import World, share_work
from obsdiff.runs.shrink import structure_columns
from obsdiff.solver import group_obs


def readers_of(chunk: list[tuple[StructureGroup, int]]) -> list[str]:
    """The reader linears of one group's items, each once, in order: the Hessians that group accumulates."""
    return list(dict.fromkeys(s.linear for g, _ in chunk for s in g.readers))


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


def cost_curve(readers: list[group_obs.ReaderState], cols: list[torch.Tensor], max_remove: int, per_round: int,
               cfg: PruneConfig) -> list[float]:
    """Relative output error after removing 0, 1, ..., max_remove structures greedily (on copies).

    The error is `tr(dW H dW^T) / tr(W H W^T)` summed over the group's readers, measured after each greedy
    round and interpolated linearly in between.
    """
    states = [group_obs.ReaderState(r.W.clone(), r.H.clone(), r.damp) for r in readers]
    norms = [max(float(((r.W @ r.H) * r.W).sum()), 1e-30) for r in readers]
    gone = torch.zeros(cols[0].shape[0], dtype=torch.bool, device=cols[0].device)
    points = {0: 0.0}
    while int(gone.sum()) < max_remove:
        k = min(per_round, max_remove - int(gone.sum()))
        removed = group_obs.remove_structures_(states, cols, k, k, cfg.structure_cost, cfg.joint_scoring,
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
                           modules: dict, chunks: list[list[tuple[StructureGroup, int]]], progress: bool,
                           world: World | None = None) -> list[tuple[StructureGroup, int]]:
    """Non-uniform per-block counts with the uniform plan's parameter budget, per structure kind.

    Each group's OBS cost curve is measured on the dense model (up to twice its uniform count) and the
    budget goes where the marginal relative output error per removed parameter is smallest. `chunks`: the
    `planned` items in calibration groups, one Hessian pass each; every reader component's curves are
    measured on its owner rank (`distributed.share_work`).
    """
    world = world or World()
    curves, unit = {}, {}
    for i, part in enumerate(chunks):
        desc = f"sensitivity {i + 1}/{len(chunks)}"
        with world.failures():
            accs, _ = calibrator.hessians(readers_of(part), desc)
        comps = reader_components(part)

        def solve(c: int, part=part, comps=comps, accs=accs) -> dict[str, list[float]]:
            idx, readers = comps[c]
            states = {name: group_obs.ReaderState.create(modules[name].weight.detach(), accs[name].H, cfg.percdamp)
                      for name in readers}
            found = {}
            for g, n in (part[j] for j in idx):
                per_round = 1 if g.kind == "heads" else cfg.ffn_per_round
                max_remove = min(g.count - 1, max(2 * n, n + 1))
                cols = [structure_columns(g, s.offset, states[s.linear].W.device) for s in g.readers]
                found[g.name] = cost_curve([states[s.linear] for s in g.readers], cols, max_remove, per_round, cfg)
            return found

        for found in share_work(world, [readers for _, readers in comps], modules, solve, accs=accs, desc=desc,
                                progress=progress):
            curves |= found
        unit |= {g.name: structure_params(g, modules) for g, _ in part}
        del accs
    counts = {}
    for kind in {g.kind for g, _ in planned}:
        members = [(g, n) for g, n in planned if g.kind == kind]
        budget = sum(n * unit[g.name] for g, n in members)
        counts |= allocate({g.name: curves[g.name] for g, _ in members}, unit, budget)
    return [(g, counts[g.name]) for g, _ in planned]
