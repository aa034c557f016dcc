"""Passes over a freshly exported graph that make it readable: initializer names without the export wrapper's
attribute, the profile's names for symbolic dimensions, declared output shapes. They change names and
declarations only, never values, and work on graphs loaded without their external data."""

from __future__ import annotations

from .graph import all_graphs


def strip_initializer_prefix(model, prefix: str) -> int:
    """Rename initializers `prefix + name` to `name` (the wrapper module's attribute), in every use."""
    renames = {t.name: t.name[len(prefix):] for t in model.graph.initializer if t.name.startswith(prefix)}
    taken = {t.name for t in model.graph.initializer} - set(renames)
    renames = {old: new for old, new in renames.items() if new and new not in taken}
    if not renames:
        return 0
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for g in all_graphs(model.graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        for vi in g.value_info:
            vi.name = renames.get(vi.name, vi.name)
    return len(renames)


def rename_dims(model, input_dims: dict[str, list[str | None]]) -> dict[str, str]:
    """Give the graph's symbolic dimensions the profile names (`batch`, `height`, ...).

    `input_dims[input][axis]` is the wanted name of a dynamic axis (None: static). Exporters name dims
    after their own symbols (`s0`, `2*height_div2`); each such symbol seen on an input is renamed
    wherever it appears (outputs, value_info). Returns {old: new}.
    """
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        wanted = input_dims.get(vi.name)
        if wanted is None:
            continue
        for dim, name in zip(vi.type.tensor_type.shape.dim, wanted, strict=False):
            if name is not None and dim.dim_param and dim.dim_param != name:
                mapping.setdefault(dim.dim_param, name)
    if not mapping:
        return mapping
    for g in all_graphs(model.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type"):
                for dim in vi.type.tensor_type.shape.dim:
                    if dim.dim_param in mapping:
                        dim.dim_param = mapping[dim.dim_param]
    return mapping


def copy_shape(model, source: str, target: str) -> None:
    """Give graph output `target` the declared shape of graph input `source` (same rank only)."""
    src = next(vi for vi in model.graph.input if vi.name == source).type.tensor_type.shape
    dst = next(vi for vi in model.graph.output if vi.name == target).type.tensor_type.shape
    if len(src.dim) == len(dst.dim):
        for s, d in zip(src.dim, dst.dim, strict=True):
            d.CopyFrom(s)
