"""Configurations of a prune: what to remove (`PruneConfig`) and how to calibrate (`CalibConfig`).

Frozen dataclasses validated on construction; CLI flags map 1:1 to fields. `None` calibration fields are
filled from the model's defaults by `resolve_calib` (smaller for the embedded digits model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from obsdiff.errors import ConfigError
from obsdiff.solver.hessian import WEIGHTINGS
from obsdiff.solver.methods import METHODS, Method, get_method

SPARSITY_TYPES = ("unstructured", "2:4", "4:8", "structured", "none")  # any N:M pattern is accepted too
CALIBRATION_MODES = ("rerun", "cached")
CACHE_SPILL = ("auto", "always", "never")


def _check_device(option: str, name: str | None) -> None:
    """A ConfigError unless `name` is None or spells a real device (cpu, cuda, cuda:1, mps, ...)."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{option} {name!r} is not a device name; use cpu, cuda, cuda:N or another torch "
                          "device") from None
    if device.type == "meta":
        raise ConfigError(f"{option} {name!r} holds no data; use cpu or an accelerator")


def _nm(sparsity_type: str) -> tuple[int, int] | None:
    from obsdiff.solver.obs import parse_nm

    if sparsity_type == "none":
        return None
    try:
        return parse_nm(sparsity_type)
    except ValueError as exc:
        raise ConfigError(f"--sparsity-type {sparsity_type!r}: {exc}; use unstructured, 2:4, 4:8, N:M, structured "
                          "or none (with --quant)") from None


@dataclass(frozen=True)
class QuantConfig:
    """Quantization in the same prune (docs/method.md#quantization): `obsdiff prune --quant SCHEME`."""

    scheme: str = "w8a8"  # obsdiff.solver.quant.SCHEMES
    method: str = "obs"  # "obs": inside the OBS sweep (joint); "rtn": round to nearest after pruning
    group_size: int | None = None  # weights in groups of this many inputs (None: the scheme's own, w4a16: 128)
    clip: str = "search"  # weight scales: "absmax", or "search" (the clipping that minimises the rounding error)
    act_steps: str = "max"  # per-step activation maxima -> one range: "max", "mean" or "percentile"
    act_percentile: float = 99.0  # with act_steps "percentile": the percentile over steps
    smoothquant: float | None = None  # SmoothQuant migration strength alpha in [0, 1]; None: off
    # output quantizers (the condition for TensorRT's sparse INT8 tactics): "auto" on N:M + INT8 layers, "on", "off"
    output_quant: str = "auto"

    def __post_init__(self):
        from obsdiff.solver.quant import SCHEMES, STEP_COMBINE

        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown --quant {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        for flag, value, allowed in (("--quant-method", self.method, ("obs", "rtn")),
                                     ("--quant-clip", self.clip, ("absmax", "search")),
                                     ("--act-steps", self.act_steps, STEP_COMBINE),
                                     ("--output-quant", self.output_quant, ("auto", "on", "off"))):
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
        spec = SCHEMES[self.scheme]
        if self.group_size is not None:
            if self.group_size < 1:
                raise ConfigError(f"--quant-group-size {self.group_size} must be positive, e.g. 128")
            if spec.weights.name != "int4":
                raise ConfigError(f"--quant-group-size applies to w4a16 only ({self.scheme} scales each output row)")
        if not 0 < self.act_percentile <= 100:
            raise ConfigError(f"--act-percentile {self.act_percentile} must be in (0, 100]")
        if self.smoothquant is not None:
            if not 0 <= self.smoothquant <= 1:
                raise ConfigError(f"--smoothquant {self.smoothquant} must be in [0, 1], typically 0.5")
            if spec.activations is None:
                raise ConfigError(f"--smoothquant moves activation outliers into the weights; {self.scheme} leaves "
                                  "activations unquantized: drop it or use w8a8 / fp8")
        if self.output_quant == "on" and spec.activations is None:
            raise ConfigError(f"--output-quant on needs quantized activations; {self.scheme} has none")

    @property
    def spec(self):
        """The scheme with this config's group size (`obsdiff.solver.quant.Scheme`)."""
        from obsdiff.solver.qlinear import scheme_for

        return scheme_for(self.scheme, self.group_size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PruneConfig:
    method: str = "obs-diff"
    sparsity: float | None = None
    sparsity_type: str = "unstructured"
    percdamp: float = 0.01
    block_size: int = 128
    compensate: bool = True
    blocks: tuple[int, int] | None = None  # [start, end) block indices
    on_indivisible: str = "error"  # N:M layer whose d_in is not a multiple of M: "error" or "skip"
    compute_dtype: str = "fp32"  # solver precision: fp32 or fp64
    # structured only: fractions of heads / FFN neurons removed per block (default: `sparsity` for both)
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    structure_cost: str = "exact"  # "exact" block OBS cost or the reference "diag" approximation
    joint_scoring: str = "sum"  # MMDiT joint heads: "sum" of both streams' costs or reference "rrf"
    ffn_per_round: int = 64  # FFN neurons removed per greedy round (heads: one per round)
    allocation: str = "uniform"  # structured: "uniform" ratio per block, or "sensitivity" (same parameter budget)
    quant: QuantConfig | None = None  # quantize in the same prune (None: weights stay in the model dtype)

    def __post_init__(self):
        for check in PRUNE_CHECKS:  # one sequence for every sparsity type: each check says where it applies
            check(self)

    @property
    def method_spec(self) -> Method:
        """What the method needs and how it prunes (`obsdiff.solver.methods`)."""
        return get_method(self.method)

    @property
    def structured(self) -> bool:
        return self.sparsity_type == "structured"

    def ratio(self, kind: str) -> float:
        """Fraction of structures of `kind` ("heads" or "ffn") to remove in each block."""
        explicit = self.head_ratio if kind == "heads" else self.ffn_ratio
        return float(self.sparsity if explicit is None else explicit)

    @property
    def nm(self) -> tuple[int, int] | None:
        return _nm(self.sparsity_type)

    @property
    def needs_calibration(self) -> bool:
        return self.method_spec.calibration

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("blocks") is not None:
            d["blocks"] = tuple(d["blocks"])
        if isinstance(d.get("quant"), dict):
            d["quant"] = QuantConfig(**d["quant"])
        return cls(**d)


# ------------------------------------------------------------------------------ PruneConfig's checks, in order

# options that only structured pruning reads: CLI flag per field (a changed default elsewhere is a mistake)
STRUCTURED_ONLY = {"head_ratio": "--head-ratio", "ffn_ratio": "--ffn-ratio", "structure_cost": "--structure-cost",
                   "joint_scoring": "--joint-scoring", "ffn_per_round": "--ffn-per-round",
                   "allocation": "--allocation"}
# closed choices: field -> (flag, allowed values)
PRUNE_CHOICES = {"on_indivisible": ("on_indivisible", ("error", "skip")),
                 "compute_dtype": ("--solver-precision", ("fp32", "fp64")),
                 "structure_cost": ("--structure-cost", ("exact", "diag")),
                 "joint_scoring": ("--joint-scoring", ("sum", "rrf")),
                 "allocation": ("--allocation", ("uniform", "sensitivity"))}


def check_method(cfg: PruneConfig) -> None:
    get_method(cfg.method)


def check_sparsity_type(cfg: PruneConfig) -> None:
    _nm(cfg.sparsity_type)


def check_structured_variant(cfg: PruneConfig) -> None:
    if cfg.structured and cfg.method_spec.structured is None:
        able = [m.name for m in METHODS.values() if m.structured]
        raise ConfigError(f"{cfg.method} has no structured variant; use {', '.join(able)} "
                          "(magnitude scores by L1 norm)")


def check_structured_only_options(cfg: PruneConfig) -> None:
    if cfg.structured:
        return
    defaults = {f.name: f.default for f in fields(cfg)}
    changed = [flag for name, flag in STRUCTURED_ONLY.items() if getattr(cfg, name) != defaults[name]]
    if changed:
        many = len(changed) > 1
        raise ConfigError(f"{' / '.join(changed)} {'apply' if many else 'applies'} to --sparsity-type structured "
                          f"only; drop {'them' if many else 'it'} or prune structured")


def check_sparsity_given(cfg: PruneConfig) -> None:
    nm = cfg.nm
    if cfg.sparsity_type == "none":
        if cfg.quant is None:
            raise ConfigError("--sparsity-type none prunes nothing; add --quant SCHEME (quantization alone) or "
                              "choose a sparsity type")
        if cfg.sparsity is not None:
            raise ConfigError(f"--sparsity {cfg.sparsity} contradicts --sparsity-type none; drop one of them")
    elif nm is not None:
        implied = (nm[1] - nm[0]) / nm[1]
        if cfg.sparsity is not None and abs(cfg.sparsity - implied) > 1e-9:
            raise ConfigError(f"--sparsity {cfg.sparsity} contradicts --sparsity-type {cfg.sparsity_type} "
                              f"(which removes {implied:g}); drop --sparsity or set it to {implied:g}")
    elif cfg.structured:
        if cfg.sparsity is None and (cfg.head_ratio is None or cfg.ffn_ratio is None):
            raise ConfigError("structured pruning needs --sparsity, or both --head-ratio and --ffn-ratio")
    elif cfg.sparsity is None:
        raise ConfigError("--sparsity is required for unstructured pruning, e.g. --sparsity 0.5")


def check_sparsity_range(cfg: PruneConfig) -> None:
    if cfg.sparsity is not None and not 0 < cfg.sparsity < 1:
        what = "heads and FFN neurons of each block" if cfg.structured else "weights"
        raise ConfigError(f"--sparsity {cfg.sparsity} is outside (0, 1); e.g. 0.5 removes half the {what}")


def check_ratios(cfg: PruneConfig) -> None:
    for flag, value in (("--head-ratio", cfg.head_ratio), ("--ffn-ratio", cfg.ffn_ratio)):
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"{flag} {value} must be in [0, 1): at least one head and one neuron remain")


def check_percdamp(cfg: PruneConfig) -> None:
    if not 0 <= cfg.percdamp < 1:
        raise ConfigError(f"--percdamp {cfg.percdamp} must be in [0, 1), typically 0.01")


def check_block_size(cfg: PruneConfig) -> None:
    if cfg.block_size < 1:
        raise ConfigError(f"--block-size {cfg.block_size} must be positive")
    if cfg.nm is not None and cfg.block_size % cfg.nm[1]:
        raise ConfigError(f"--block-size {cfg.block_size} must be a multiple of M={cfg.nm[1]} "
                          f"(--sparsity-type {cfg.sparsity_type})")


def check_choices(cfg: PruneConfig) -> None:
    for name, (flag, allowed) in PRUNE_CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


def check_ffn_per_round(cfg: PruneConfig) -> None:
    if cfg.ffn_per_round < 1:
        raise ConfigError(f"--ffn-per-round {cfg.ffn_per_round} must be at least 1")


def check_allocation_method(cfg: PruneConfig) -> None:
    if cfg.allocation == "sensitivity" and cfg.method_spec.hessian != "full":
        able = [m.name for m in METHODS.values() if m.hessian == "full" and m.structured]
        raise ConfigError(f"--allocation sensitivity needs OBS cost curves, which {cfg.method} has not; use it "
                          f"with {' or '.join(able)}")


def check_compensation(cfg: PruneConfig) -> None:
    if not cfg.compensate and not cfg.method_spec.compensation:
        able = [m.name for m in METHODS.values() if m.compensation]
        raise ConfigError(f"--no-compensate: {cfg.method} never updates weights; it applies to {', '.join(able)}")


def check_quant(cfg: PruneConfig) -> None:
    q = cfg.quant
    if q is None:
        return
    if q.method == "obs" and cfg.method_spec.hessian != "full":
        raise ConfigError(f"--quant-method obs quantizes inside the OBS sweep, which {cfg.method} has not; use "
                          "--quant-method rtn, or --method obs-diff")
    if q.spec.activations is not None and not cfg.method_spec.calibration:
        raise ConfigError(f"--quant {q.scheme} needs activation ranges from calibration, which {cfg.method} skips; "
                          "use obs-diff, sparsegpt or wanda, or a weight-only scheme (w8a16, w4a16)")
    if q.method == "obs" and not cfg.compensate:
        raise ConfigError("--no-compensate with --quant-method obs: joint OBS compensates; use --quant-method rtn")


def check_blocks(cfg: PruneConfig) -> None:
    if cfg.blocks is not None and not (0 <= cfg.blocks[0] < cfg.blocks[1]):
        raise ConfigError(f"--blocks {cfg.blocks[0]}:{cfg.blocks[1]} is empty; use START:END with START < END")


PRUNE_CHECKS = (check_method, check_sparsity_type, check_structured_variant, check_structured_only_options,
                check_sparsity_given, check_sparsity_range, check_ratios, check_percdamp, check_block_size,
                check_choices, check_ffn_per_round, check_allocation_method, check_compensation, check_quant,
                check_blocks)


@dataclass(frozen=True)
class CalibConfig:
    prompts: str = "builtin"  # "builtin" or a text file, one prompt per line
    num_prompts: int | None = None
    steps: int | None = None
    guidance: float | None = None
    batch_size: int | None = None
    groups: int | None = None
    timestep_weighting: str = "log_decrease"
    alpha_min: float = 0.8
    alpha_max: float = 1.2
    seed: int = 0
    max_tokens: int | None = None  # per-call token subsample for the Hessians
    height: int | None = None  # calibration image pixels; None: the model's generation default
    width: int | None = None
    # "rerun": every group re-runs the whole pipeline (the paper's method); "cached": one pipeline run caches
    # the first block's inputs, then groups propagate them block by block (docs/method.md#cached-mode, faster)
    mode: str = "rerun"
    cache_device: str | None = None  # where cached block inputs live (None: the model's device; "cpu" offloads)
    # cached mode, a cache too big for cache_device's free memory: "auto" spills it to a file in the prune's
    # working directory, "always" spills whatever its size, "never" refuses (the pre-spill behaviour)
    cache_spill: str = "auto"
    # where the group's Hessians accumulate (None: the model's device; "cpu" keeps them out of accelerator memory)
    hessian_device: str | None = None

    def __post_init__(self):
        for check in CALIB_CHECKS:
            check(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CalibConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------ CalibConfig's checks, in order


def check_mode(calib: CalibConfig) -> None:
    if calib.mode not in CALIBRATION_MODES:
        raise ConfigError(f"unknown --calibration-mode {calib.mode!r}; choose rerun or cached")


def check_cached_only_options(calib: CalibConfig) -> None:
    if calib.cache_spill not in CACHE_SPILL:
        raise ConfigError(f"unknown --cache-spill {calib.cache_spill!r}; choose one of {', '.join(CACHE_SPILL)}")
    if calib.mode != "cached":
        for flag, changed in (("--cache-device", calib.cache_device is not None),
                              ("--cache-spill", calib.cache_spill != "auto")):
            if changed:
                raise ConfigError(f"{flag} only applies to --calibration-mode cached")


def check_devices(calib: CalibConfig) -> None:
    for option, name in (("--cache-device", calib.cache_device), ("--hessian-device", calib.hessian_device)):
        _check_device(option, name)


def check_weighting(calib: CalibConfig) -> None:
    if calib.timestep_weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown --timestep-weighting {calib.timestep_weighting!r}; "
                          f"choose one of {', '.join(WEIGHTINGS)}")
    if not 0 < calib.alpha_min <= calib.alpha_max:
        raise ConfigError(f"timestep weights need 0 < a_min <= a_max, got {calib.alpha_min}, {calib.alpha_max}")


def check_counts(calib: CalibConfig) -> None:
    for name in ("num_prompts", "steps", "batch_size", "groups", "max_tokens", "height", "width"):
        value = getattr(calib, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be at least 1")


CALIB_CHECKS = (check_mode, check_cached_only_options, check_devices, check_weighting, check_counts)


# The paper's reference settings, and scaled-down ones for the embedded model (a prune in ~1 min on CPU);
# docs/method.md#default-settings.
DEFAULT_CALIB = {"num_prompts": 100, "steps": 25, "guidance": 7.0, "batch_size": 4, "groups": 4}
DIGITS_CALIB = {"num_prompts": 64, "steps": 20, "guidance": 3.0, "batch_size": 16, "groups": 4}


def resolve_calib(calib: CalibConfig, builtin: str | None, method: str) -> CalibConfig:
    """Fill unset fields with the model's defaults, then apply the method's own calibration (`obsdiff.solver.methods`:
    SparseGPT and Wanda weight steps uniformly and calibrate in one group).

    In cached mode an unset `groups` stays None, meaning one group per block: each extra group costs only
    a pass over its own blocks there, so the fully sequential schedule is the natural default (for
    SparseGPT too: it is the original algorithm's block-by-block schedule).
    """
    defaults = DIGITS_CALIB if builtin == "digits" else DEFAULT_CALIB
    fill = {k: v for k, v in defaults.items() if getattr(calib, k) is None}
    if calib.mode == "cached":
        fill.pop("groups", None)
    calib = replace(calib, **fill)
    spec = get_method(method)
    if spec.step_weighting is not None:
        calib = replace(calib, timestep_weighting=spec.step_weighting)
    if calib.mode in spec.one_group_modes:
        calib = replace(calib, groups=1)
    return calib
