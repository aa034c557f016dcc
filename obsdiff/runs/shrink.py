"""Physical removal of structures: smaller `nn.Linear` modules and the attributes that follow their shapes.

A shrink plan is `{group name: kept structure indices}` over the family's `StructureGroup`s, in the dense
model's layout. Applying it slices every affected linear once (rows for writers, columns for readers,
biases with the rows) and sets `heads` / `inner_dim` of the attentions whose heads were removed, so the
attention processors split heads correctly. The same function replays a saved plan on a freshly built
(meta-device) model before its weights are loaded.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from obsdiff.errors import ModelLoadError
from obsdiff.models import StructureGroup


def structure_columns(group: StructureGroup, offset: int, device=None) -> torch.Tensor:
    """(count, size) indices of each structure's rows/columns, starting at `offset`."""
    return offset + torch.arange(group.count * group.size, device=device).view(group.count, group.size)


def structure_indices(group: StructureGroup, offset: int, structures: list[int]) -> list[int]:
    """Row/column indices of the given structures in a linear where structure 0 starts at `offset`."""
    return [offset + i * group.size + j for i in sorted(structures) for j in range(group.size)]


def removed_indices(group: StructureGroup, offset: int, kept: list[int]) -> list[int]:
    return structure_indices(group, offset, sorted(set(range(group.count)) - set(kept)))


def _replace_linear(root: nn.Module, name: str, rows: list[int] | None, cols: list[int] | None) -> None:
    old: nn.Linear = root.get_submodule(name)
    w = old.weight
    keep_r = torch.tensor(rows, device=w.device) if rows is not None else None
    keep_c = torch.tensor(cols, device=w.device) if cols is not None else None
    new = nn.Linear(len(cols) if cols is not None else old.in_features,
                    len(rows) if rows is not None else old.out_features,
                    bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        weight = w if keep_r is None else w.index_select(0, keep_r)
        weight = weight if keep_c is None else weight.index_select(1, keep_c)
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias if keep_r is None else old.bias.index_select(0, keep_r))
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def shrink_(denoiser: nn.Module, groups: list[StructureGroup], kept: dict[str, list[int]]) -> None:
    """Remove every structure not in `kept[group.name]`, in place. Groups missing from `kept` stay whole."""
    drop_rows: dict[str, set[int]] = defaultdict(set)
    drop_cols: dict[str, set[int]] = defaultdict(set)
    for g in groups:
        if g.name not in kept:
            continue
        keep = kept[g.name]
        if not keep:
            raise ValueError(f"{g.name}: at least one structure must remain")
        for s in g.writers:
            drop_rows[s.linear] |= set(removed_indices(g, s.offset, keep))
        for s in g.readers:
            drop_cols[s.linear] |= set(removed_indices(g, s.offset, keep))
    for name in sorted(set(drop_rows) | set(drop_cols)):
        lin = denoiser.get_submodule(name)
        rows = [i for i in range(lin.out_features) if i not in drop_rows[name]] if drop_rows[name] else None
        cols = [i for i in range(lin.in_features) if i not in drop_cols[name]] if drop_cols[name] else None
        _replace_linear(denoiser, name, rows, cols)
    for g in groups:
        if g.kind == "heads" and g.attention and g.name in kept:
            attn = denoiser.get_submodule(g.attention)
            heads = len(kept[g.name])
            # diffusers' processors derive head_dim from these; stale values silently mix heads up.
            attn.heads = heads
            for attr in ("inner_dim", "inner_kv_dim"):
                if hasattr(attn, attr):
                    setattr(attn, attr, heads * g.size)


def plan_to_json(groups: list[StructureGroup], kept: dict[str, list[int]]) -> list[dict]:
    return [{"name": g.name, "kind": g.kind, "count": g.count, "size": g.size, "kept": sorted(kept[g.name])}
            for g in groups if g.name in kept]


def replay_plan_(denoiser: nn.Module, groups: list[StructureGroup], plan: list[dict]) -> None:
    """Apply a saved plan to a dense model of the same base; refuse one that does not fit."""
    by_name = {g.name: g for g in groups}
    kept = {}
    for op in plan:
        g = by_name.get(op["name"])
        if g is None or (g.kind, g.count, g.size) != (op["kind"], op["count"], op["size"]):
            have = f"{g.kind} x{g.count} of size {g.size}" if g else "nothing"
            raise ModelLoadError(f"the shrink plan does not fit this base model: {op['name']} is {op['kind']} "
                                 f"x{op['count']} of size {op['size']} in the plan, the base has {have}")
        kept[op["name"]] = op["kept"]
    shrink_(denoiser, groups, kept)
