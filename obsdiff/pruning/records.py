"""What a prune reports, and the group bookkeeping both prune paths share (unstructured and structured).

A leaf module: `prune.py` and `structured.py` both build these records, so they live apart from either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from obsdiff.errors import ConfigError, ObsdiffError

if TYPE_CHECKING:
    from obsdiff.models import Block
    from obsdiff.solver.hessian import HessianAccumulator

Unit = tuple[str, ...]  # linears (dotted names in the denoiser) that read one input tensor


class PruneError(ObsdiffError):
    """A layer could not be pruned (indefinite Hessian after all damping, non-finite result)."""


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float  # achieved fraction of zero weights
    error_no_compensation: float | None  # relative output error with the mask alone
    error: float | None  # relative output error after OBS compensation (what is kept)
    percdamp: float | None  # damping actually used (escalated if the Cholesky factorisation failed)
    seconds: float  # solve_seconds + error_seconds (+ write-back)
    skipped: str | None = None
    solve_seconds: float = 0.0  # the pruning solve (OBS: factorisations, column sweep)
    error_seconds: float = 0.0  # the two reconstruction errors
    quant: dict | None = None  # quantized: the layer's scheme, scales present, ranges (`pruning.quantize.install_`)


@dataclass
class GroupRecord:
    index: int
    units: list[list[str]]
    calib_seconds: float
    prune_seconds: float
    hessian_bytes: int
    calib_calls: int


@dataclass
class PruneReport:
    prune: dict
    calib: dict
    family: str
    base_model: str
    layers: list[LayerRecord] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    encode_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_hessian_bytes: int = 0
    structures: list[dict] = field(default_factory=list)  # structured: per group kept/removed
    shrink_plan: list[dict] | None = None  # structured: what `shrink.replay_plan_` needs to rebuild the model
    model_stats: dict = field(default_factory=dict)  # structured: parameters and FLOPs before/after
    warnings: list[str] = field(default_factory=list)
    allocation: dict | None = None  # structured, --allocation sensitivity: per-group counts and seconds
    quantization: dict | None = None  # structured + --quant: the quantization sweep over the shrunk model
    calibration: dict = field(default_factory=dict)  # mode; cached mode: captures, cache bytes, seconds
    distributed: dict | None = None  # torchrun: world size, per-rank seconds, bytes communicated
    device: str | None = None  # where the model ran ("cuda:0", "cpu"), as resolved from --device
    dtype: str | None = None  # the model's dtype while pruning ("bf16", "fp32"); Hessians are fp32 regardless

    def add_group(self, index: int, units: list[list[str]], calib_seconds: float, prune_seconds: float,
                  accs: dict[str, HessianAccumulator]) -> None:
        hessian_bytes = sum(a.nbytes for a in accs.values())
        calls = max((a.calls for a in accs.values()), default=0)
        self.groups.append(GroupRecord(index, units, calib_seconds, prune_seconds, hessian_bytes, calls))
        self.peak_hessian_bytes = max(self.peak_hessian_bytes, hessian_bytes)

    @property
    def quantized(self) -> list[str]:
        """The quantized linears (structured: every linear of the quantization sweep, writers too)."""
        if self.quantization is not None:
            return [r["name"] for r in self.quantization["layers"] if r.get("quant")]
        return [r.name for r in self.layers if r.quant is not None]

    @property
    def pruned_layers(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.skipped is None]

    @property
    def sparsity(self) -> float:
        """Zero fraction over all pruned linears' weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.pruned_layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.pruned_layers)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruneReport:
        """The report back from `to_dict` (e.g. a checkpoint's JSON): records as dataclasses, shapes as tuples."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in d.pop("layers", [])]
        groups = [GroupRecord(**g) for g in d.pop("groups", [])]
        return cls(**d, layers=layers, groups=groups)


def select_blocks(blocks: list[Block], span: tuple[int, int] | None) -> list[Block]:
    if span is None:
        return blocks
    start, end = span
    if end > len(blocks):
        raise ConfigError(f"--blocks {start}:{end} is outside the model, which has {len(blocks)} blocks "
                          f"(valid: 0:{len(blocks)})")
    return blocks[start:end]


def calibration_chunks(items: list, groups: int | None, block_of: Callable[[object], int]) -> list[list]:
    """The items (in forward order) split into `groups` contiguous groups, or, with `groups` None (cached
    calibration's default), one group per block: `block_of(item)` is the item's block position."""
    if groups is not None:
        return split_groups(items, groups)
    chunks, current = [], None
    for item in items:
        b = block_of(item)
        if not chunks or b != current:
            chunks.append([])
            current = b
        chunks[-1].append(item)
    return chunks


def split_groups(units: list[Unit], groups: int) -> list[list[Unit]]:
    """G contiguous groups of (nearly) equal size; G is capped at the number of units."""
    g = min(groups, len(units))
    base, extra = divmod(len(units), g)
    out, start = [], 0
    for i in range(g):
        size = base + (1 if i < extra else 0)
        out.append(units[start:start + size])
        start += size
    return out
