"""Plots of a run's report (obsdiff.json), written next to it: `layer_errors.png` and, for structured runs,
`structures.png`. matplotlib is optional and imported only here, inside the functions that draw."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from obsdiff.errors import MissingDependencyError, ModelLoadError

log = logging.getLogger(__name__)

LAYER_ERRORS = "layer_errors.png"
STRUCTURES = "structures.png"
# The block a layer belongs to: the longest prefix ending in `...blocks.N` (SD3/Flux `transformer_blocks.3`,
# Flux `single_transformer_blocks.7`, SDXL `down_blocks.1.attentions.0.transformer_blocks.0`).
_BLOCK = re.compile(r"^(.*blocks\.\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """The block of a layer or structure name (its parent module when no `blocks.N` is in the name)."""
    match = _BLOCK.match(name)
    return match.group(1) if match else name.rpartition(".")[0] or name


def short_block(block: str) -> str:
    """A tick label: `transformer_blocks.3` -> `3`, `single_transformer_blocks.7` -> `single 7`,
    SDXL's `down_blocks.1.attentions.0.transformer_blocks.0` -> `down 1.0.0`."""
    numbers = ".".join(re.findall(r"\d+", block))
    head = block.split(".")[0]
    if head == "transformer_blocks":
        return numbers
    for suffix in ("_transformer_blocks", "_blocks", "_block"):
        head = head.removesuffix(suffix)
    return f"{head} {numbers}".strip()


def layer_errors(layers: list[dict]) -> dict:
    """Per pruned layer, in report order: names, blocks, relative output error with the mask alone and after
    OBS compensation. Skipped layers (no error) are left out."""
    kept = [r for r in layers if r.get("error") is not None]
    return {"names": [r["name"] for r in kept], "blocks": [block_of(r["name"]) for r in kept],
            "mask_only": [r.get("error_no_compensation") for r in kept], "compensated": [r["error"] for r in kept]}


def _local(name: str) -> str:
    """A structure group's name inside its block: `transformer_blocks.3.ff_context` -> `ff_context`."""
    return name[len(block_of(name)) + 1:] or name


def kept_structures(structures: list[dict], removed: dict[str, int] | None = None
                    ) -> tuple[list[str], dict[str, list[float | None]]]:
    """Blocks in forward order and, per structure kind within a block (`attn heads`, `ff neurons`,
    `ff_context neurons`, ...), the fraction kept in each block.

    `structures` lists only the groups that lost something; `removed` (the sensitivity allocation's count per
    group, forward order) also names those that lost nothing: they count as fully kept. None where nothing is
    known (no such group in that block, e.g. the last SD3 block's text FFN).
    """
    kinds = {_local(s["name"]): s["kind"] for s in structures}
    fractions = {s["name"]: s["kept"] / s["count"] for s in structures}
    for name, n in (removed or {}).items():
        if n == 0 and _local(name) in kinds:
            fractions.setdefault(name, 1.0)
    names = [n for n in (removed or {}) if n in fractions] + [n for n in fractions if n not in (removed or {})]
    blocks = list(dict.fromkeys(block_of(n) for n in names))
    kept: dict[str, dict[str, float]] = {}
    for name in names:
        local = _local(name)
        label = f"{local} {'heads' if kinds[local] == 'heads' else 'neurons'}"
        kept.setdefault(label, {})[block_of(name)] = fractions[name]
    return blocks, {label: [per.get(b) for b in blocks] for label, per in kept.items()}


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas: no pyplot, so no global backend state and no display needed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plots need matplotlib, which is not installed; pip install matplotlib "
                                     "(or obsdiff[dev])") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _block_ticks(ax, blocks: list[str]) -> None:
    """One tick per block at its first layer, with faint separators: layers of a block read as one group."""
    starts = [i for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="0.85", linewidth=0.8, zorder=0)
    step = max(1, len(starts) // 30)  # at most ~30 labels, whatever the depth
    _set_ticks(ax, starts[::step], [short_block(blocks[i]) for i in starts[::step]])


def _set_ticks(ax, positions, labels: list[str]) -> None:
    ax.set_xticks(positions, labels, rotation=90 if max(map(len, labels), default=0) > 3 else 0, fontsize=7)


def plot_layer_errors(report: dict, path: Path) -> None:
    """Per-layer relative output error (log scale), mask only and after OBS compensation, across blocks."""
    data = layer_errors(report.get("layers", []))
    if not data["names"]:
        raise ValueError("the report has no pruned layers with an error to plot")
    n = len(data["names"])
    fig = _figure(min(4 + 0.08 * n, 20), 4.2)
    ax = fig.add_subplot()
    x = range(n)
    mask = [(i, e) for i, e in zip(x, data["mask_only"], strict=True) if e is not None]
    if mask and report.get("prune", {}).get("compensate", True):
        ax.plot(*zip(*mask, strict=True), "o", ms=3, color="tab:red", label="mask only (no compensation)")
    ax.plot(x, data["compensated"], "o", ms=3, color="tab:blue", label="after OBS compensation")
    ax.set_yscale("log")
    ax.set_ylabel("relative output error")
    ax.set_xlabel("block (each point is one pruned linear layer, in forward order)")
    _block_ticks(ax, data["blocks"])
    prune = report.get("prune", {})
    ax.set_title(f"{prune.get('method', '')} {prune.get('sparsity_type', '')} {_sparsity_text(report)}: "
                 f"per-layer error", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.savefig(path, format="png")


def _sparsity_text(report: dict) -> str:
    """Structured runs by their parameter ratio (their zero fraction covers only the sliced layers)."""
    stats = report.get("model_stats") or {}
    if "parameter_ratio" in stats:
        return f"(parameters x{stats['parameter_ratio']:.3f})"
    value = report.get("sparsity")
    return f"(sparsity {value:.1%})" if isinstance(value, int | float) else ""


def plot_structures(report: dict, path: Path) -> None:
    """Fraction of heads and FFN neurons kept per block (structured runs), one bar per structure group."""
    blocks, kept = kept_structures(report.get("structures", []), (report.get("allocation") or {}).get("removed"))
    if not blocks:
        raise ValueError("the report has no structures to plot (not a structured run)")
    fig = _figure(min(4 + 0.35 * len(blocks) * len(kept), 20), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(kept)
    for k, (label, values) in enumerate(kept.items()):
        xs = [i + (k - (len(kept) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    _set_ticks(ax, range(len(blocks)), [short_block(b) for b in blocks])
    ax.set_ylim(0, 1.2)  # room for the legend above the bars
    ax.set_ylabel("fraction kept")
    ax.set_xlabel("block")
    ax.set_title(f"heads and FFN neurons kept per block {_sparsity_text(report)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=len(kept))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png")


def write_run_plots(run: str | Path, out: str | Path | None = None, force: bool = False) -> list[Path]:
    """Draw the plots of a run directory into `out` (default: next to its obsdiff.json), each written atomically;
    returns the paths. Refuses existing plots without `force`, before drawing anything."""
    from obsdiff.runs.artifacts import check_writable, staged_file
    from obsdiff.runs.io import RUN_FILE, read_run

    run = Path(run)
    if not (run / RUN_FILE).is_file():
        raise ModelLoadError(f"{run} has no {RUN_FILE}; pass a run directory written by obsdiff prune")
    record = read_run(run)
    out = Path(out) if out is not None else run
    todo = [(out / LAYER_ERRORS, plot_layer_errors)]
    if record.structures:
        todo.append((out / STRUCTURES, plot_structures))
    for path, _ in todo:
        check_writable(path, force)
    _figure(1, 1)  # a missing matplotlib fails here, before any file is touched
    written = []
    for path, draw in todo:
        with staged_file(path, force=force) as tmp:
            draw(record.to_dict(), tmp)
        written.append(path)
    return written
