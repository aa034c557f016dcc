"""ONNX -> TensorRT engine, for TensorRT 10.x and 11.x, with 2:4 sparse weights and a sparse-layer report.

    build_engine("runs/x/onnx/transformer.onnx", "transformer.plan", EngineConfig()) -> sidecar dict
    check_engine("transformer.plan")  # refuses a stale engine (ONNX, TensorRT or GPU changed)

Versions are told apart by what the `tensorrt` module offers, never by its version string: TensorRT 10
has precision flags (`BuilderFlag.FP16`/`BF16`) for weakly typed networks; TensorRT 11 dropped them and
builds strongly typed networks whose precision is the ONNX file's. The pure parts (profiles here; stale
detection in `engine_record`; flag selection and build-log reading in `trt_rules`) take plain values so
they are tested without TensorRT. `trt_runtime.TrtEngine` runs a built engine.

Each engine gets `<engine>.json` (TensorRT version, GPU, flags, profiles, build time, which layers were
eligible for sparse math and which picked a sparse kernel, the ONNX hash) and `<engine>.log` (the build
log at INFO level).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from obsdiff.artifacts import machine, staged_file, versions, write_json
from obsdiff.errors import ConfigError, MissingDependencyError, ObsdiffError, OutputExistsError

from .engine_record import (  # noqa: F401 (part of this module's API)
    EngineError,
    StaleEngineError,
    check_engine,
    dense_twin_path,
    engine_sidecar_path,
    onnx_hashes,
    read_engine_sidecar,
    stale_reasons,
)
from .sidecar import OnnxSpec, Shape, format_shape, read_onnx_sidecar, sidecar_path
from .trt_rules import (  # noqa: F401 (part of this module's API)
    FlagPlan,
    dtype_from_network_inputs,
    parse_build_log,
    select_flags,
    sparse_layers_from_inspector,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORRT_INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt"


class NoGpuError(ObsdiffError):
    """A CUDA GPU is needed (TensorRT builds and runs engines on the GPU that will use them)."""


# ------------------------------------------------------------------------------------------ environment


def require_tensorrt():
    """The `tensorrt` module, or a one-line error that says how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed (no `tensorrt` Python module); install it from NVIDIA's index: "
            f"`{TENSORRT_INSTALL}` (Linux or Windows with an NVIDIA GPU and driver)") from None
    return tensorrt


def require_cuda_gpu() -> dict:
    """Name and compute capability of CUDA device 0, or a one-line error."""
    import torch

    if not torch.cuda.is_available():
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "no GPU or driver is visible to PyTorch")
        raise NoGpuError(f"TensorRT engines need a CUDA GPU and none is usable here ({why}); run on a machine with "
                         "an NVIDIA GPU, its driver and a CUDA build of PyTorch")
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def current_environment() -> dict:
    """What an engine built here is tied to: the TensorRT version and the GPU."""
    trt = require_tensorrt()
    gpu = require_cuda_gpu()
    return {"tensorrt": getattr(trt, "__version__", "unknown"), "gpu": gpu["name"],
            "compute_capability": gpu["compute_capability"]}


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class EngineConfig:
    """How to build. Shapes are {input name: shape}; explicit shapes override the export sidecar's profile.

    `sparse_weights` None: on when the sidecar says the model was N:M pruned. `strongly_typed` None: weakly
    typed with precision flags where TensorRT still has them (10.x), strongly typed otherwise (11.x).
    """

    sparse_weights: bool | None = None
    profile_from_sidecar: bool = True
    min_shapes: Mapping[str, Shape] = field(default_factory=dict)
    opt_shapes: Mapping[str, Shape] = field(default_factory=dict)
    max_shapes: Mapping[str, Shape] = field(default_factory=dict)
    workspace_gib: float = 8.0
    opt_level: int = 3
    timing_cache: Path | None = None
    strict_nans: bool = False
    also_dense: bool = False
    strongly_typed: bool | None = None
    verbose_log: bool = False

    def __post_init__(self):
        if not self.workspace_gib > 0:
            raise ConfigError(f"--workspace-gib {self.workspace_gib} must be positive, e.g. 8")
        if not 0 <= self.opt_level <= 5:
            raise ConfigError(f"--opt-level {self.opt_level} must be in 0..5 (3 is TensorRT's default)")
        if (self.min_shapes or self.max_shapes) and not self.opt_shapes:
            raise ConfigError("--min-shapes/--max-shapes need --opt-shapes (the shapes the engine is tuned for)")

    @property
    def explicit_shapes(self) -> bool:
        return bool(self.opt_shapes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return d


def resolve_profiles(spec: OnnxSpec | None, cfg: EngineConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimization profile {input: (min, opt, max)}: explicit shapes, else the export sidecar's.

    Explicit shapes: an input given only in --opt-shapes gets that shape as min and max too. Inputs of the
    sidecar that are dynamic must all be covered; every shape must satisfy min <= opt <= max per dimension.
    """
    if cfg.explicit_shapes:
        unknown = set(cfg.min_shapes) | set(cfg.max_shapes)
        unknown -= set(cfg.opt_shapes)
        if unknown:
            raise ConfigError(f"input {sorted(unknown)[0]} has a min/max shape but no --opt-shapes entry")
        profiles = {name: (tuple(cfg.min_shapes.get(name, opt)), tuple(opt), tuple(cfg.max_shapes.get(name, opt)))
                    for name, opt in cfg.opt_shapes.items()}
        if spec is not None:
            names = [t.name for t in spec.inputs]
            extra = [n for n in profiles if n not in names]
            if extra:
                raise ConfigError(f"--opt-shapes names {extra[0]!r}, which is not an input of {spec.path.name} "
                                  f"(inputs: {', '.join(names)})")
            missing = [t.name for t in spec.inputs if t.name not in profiles and None in t.shape]
            if missing:
                raise ConfigError(f"input {missing[0]} of {spec.path.name} has dynamic dimensions and no shape; add "
                                  f"it to --opt-shapes (or drop the explicit shapes to use the sidecar's profile)")
    elif not cfg.profile_from_sidecar:
        dynamic = [t.name for t in spec.inputs if None in t.shape] if spec is not None else []
        if dynamic:
            raise ConfigError(f"input {dynamic[0]} is dynamic and --no-profile-from-sidecar was given without "
                              "--opt-shapes; give the shapes or drop --no-profile-from-sidecar")
        profiles = {}  # static graph (or unknown without a sidecar: the network check names a dynamic input)
    else:
        if spec is None:
            raise ConfigError("no shape profile: give --opt-shapes (and --min-shapes/--max-shapes) or use the "
                              "export sidecar (--profile-from-sidecar)")
        profiles = spec.profiles()
        missing = [t.name for t in spec.inputs if t.name not in profiles and None in t.shape]
        if missing:
            raise ConfigError(f"the sidecar of {spec.path.name} has no profile for dynamic input {missing[0]}; "
                              "give --opt-shapes/--min-shapes/--max-shapes")
    for name, (lo, opt, hi) in profiles.items():
        if not len(lo) == len(opt) == len(hi):
            raise ConfigError(f"input {name}: min/opt/max shapes {format_shape(lo)}, {format_shape(opt)}, "
                              f"{format_shape(hi)} have different ranks")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ConfigError(f"input {name}: shapes must satisfy min <= opt <= max in every dimension, got "
                              f"{format_shape(lo)}, {format_shape(opt)}, {format_shape(hi)}")
    return profiles


# ---------------------------------------------------------------------------------------------- build


_SEVERITY_TAG = {"VERBOSE": "V", "INFO": "I", "WARNING": "W", "ERROR": "E", "INTERNAL_ERROR": "F"}


def _collecting_logger(trt, verbose: bool):
    """A `trt.ILogger` that keeps the build log (INFO and up; VERBOSE too when asked) and forwards problems."""

    class Collector(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):
            sev = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1]
            if sev == "VERBOSE" and not verbose:
                return
            self.lines.append(f"[{_SEVERITY_TAG.get(sev, sev)}] {msg}")
            if sev in ("ERROR", "INTERNAL_ERROR"):
                log.error("TensorRT: %s", msg)
            elif sev == "WARNING":
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Collector()


def _check_inputs(onnx_path: Path, cfg: EngineConfig) -> OnnxSpec | None:
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist; export it with `obsdiff-export onnx MODEL --out DIR`")
    if cfg.profile_from_sidecar and not cfg.explicit_shapes:
        return read_onnx_sidecar(onnx_path)  # required: the profile comes from it
    return read_onnx_sidecar(onnx_path) if sidecar_path(onnx_path).is_file() else None


def build_engine(onnx_path: str | Path, out: str | Path, config: EngineConfig | None = None,
                 force: bool = False) -> dict:
    """Build a TensorRT engine from `onnx_path` into `out` (+ `<out>.json`, `<out>.log`); returns the sidecar.

    With `config.also_dense`, the same network is also built without sparse weights into
    `<stem>.dense.plan`; its sidecar is under the key "dense_twin". Inputs and outputs are checked before
    TensorRT is touched: missing ONNX or sidecar, existing `out` without `force`.
    """
    cfg = config or EngineConfig()
    onnx_path, out = Path(onnx_path), Path(out)
    spec = _check_inputs(onnx_path, cfg)
    profiles = resolve_profiles(spec, cfg)
    sparse = cfg.sparse_weights if cfg.sparse_weights is not None else bool(spec is not None and spec.nm)
    targets = [(out, sparse)]
    if cfg.also_dense:
        targets.append((dense_twin_path(out), False))
    for path, _ in targets:
        if path.exists() and not force:
            raise OutputExistsError(f"{path} already exists{_staleness(path, onnx_path)}; pass --force to rebuild "
                                    "it or choose another --out")
    trt = require_tensorrt()
    gpu = require_cuda_gpu()
    hashes = onnx_hashes(onnx_path)
    records = [_build_one(trt, gpu, onnx_path, path, spec, profiles, cfg, s, hashes) for path, s in targets]
    main = records[0]
    if cfg.also_dense:
        main["dense_twin"] = records[1]
        with staged_file(engine_sidecar_path(out), force=True) as tmp:
            write_json(tmp, main)
    return main


def _staleness(plan: Path, onnx_path: Path) -> str:
    """How an existing engine relates to `onnx_path`, for the refusal message (TensorRT and GPU not judged)."""
    try:
        built = json.loads(engine_sidecar_path(plan).read_text()).get("onnx") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    now = onnx_hashes(onnx_path)
    if all(built.get(k) == v for k, v in now.items()):
        return " (built from this ONNX)"
    return " and is stale (built from another version of the ONNX)"


def _load_timing_cache(trt, config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)
    return cache


def _build_one(trt, gpu: dict, onnx_path: Path, out: Path, spec: OnnxSpec | None, profiles: dict,
               cfg: EngineConfig, sparse: bool, hashes: dict) -> dict:
    t0 = time.perf_counter()
    logger = _collecting_logger(trt, cfg.verbose_log)
    builder = trt.Builder(logger)
    # the precision decides the flags, and without a sidecar it is read off the parsed network: parse first
    # with the flags TensorRT allows for either typing, then re-create if the plan says strongly typed
    model_dtype = spec.dtype if spec is not None and spec.dtype else None
    if model_dtype is None:
        probe = builder.create_network(0)
        _parse(trt, probe, onnx_path, logger)
        dtypes = [probe.get_input(i).dtype for i in range(probe.num_inputs)]
        model_dtype = dtype_from_network_inputs(getattr(d, "name", str(d)) for d in dtypes)
    plan = select_flags(trt, model_dtype, sparse, cfg.strict_nans, cfg.strongly_typed)
    net_bits = 0
    for name in plan.network_flags:
        net_bits |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_bits)
    parser = _parse(trt, network, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * 2**30))
    config.builder_optimization_level = cfg.opt_level
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports sparse weights
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    used = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if tensor.name in profiles:
            lo, opt, hi = profiles[tensor.name]
            if len(opt) != len(shape):
                raise ConfigError(f"input {tensor.name} has rank {len(shape)} in the ONNX, the profile gives "
                                  f"{format_shape(opt)}")
            profile.set_shape(tensor.name, lo, opt, hi)
            used[tensor.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        elif any(d < 0 for d in shape):
            raise ConfigError(f"input {tensor.name} of {onnx_path.name} is dynamic {shape} and has no profile; "
                              "give it in --opt-shapes")
    if used:
        config.add_optimization_profile(profile)
    cache = _load_timing_cache(trt, config, cfg.timing_cache)
    log.info("building %s from %s (%s typed, flags %s)", out, onnx_path, plan.typing, ", ".join(plan.builder_flags))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [line for line in logger.lines if line.startswith(("[E]", "[F]"))]
        raise EngineError(f"TensorRT could not build {onnx_path.name}: {errors[-1] if errors else 'no error logged'}; "
                          "run with -vv for the whole log")
    build_seconds = time.perf_counter() - t0
    blob = bytes(serialized)
    sparse_report = parse_build_log(logger.lines) | {"requested": sparse}
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        sparse_report["inspector_sparse_layers"] = sparse_layers_from_inspector(info)
        del engine
    except Exception as exc:  # the inspector is a cross-check only
        sparse_report["inspector_sparse_layers"] = None
        log.debug("engine inspector unavailable: %s", exc)
    if sparse and not sparse_report["reported"]:
        log.warning("sparse weights were enabled but the build log has no sparsity report")
    record = {
        "format": FORMAT_VERSION,
        "artifact": "tensorrt-engine",
        "file": out.name,
        "bytes": len(blob),
        "onnx": {"path": str(onnx_path.resolve()), **hashes,
                 "sidecar": str(sidecar_path(onnx_path).resolve()) if spec is not None else None,
                 "source_run_sparsity": spec.sparsity_type if spec is not None else None},
        "tensorrt": getattr(trt, "__version__", "unknown"),
        "gpu": gpu,
        "typing": plan.typing,
        "model_dtype": model_dtype,
        "builder_flags": list(plan.builder_flags),
        "network_flags": list(plan.network_flags),
        "notes": list(plan.notes),
        "profiles": used,
        "workspace_gib": cfg.workspace_gib,
        "opt_level": cfg.opt_level,
        "timing_cache": str(cfg.timing_cache) if cfg.timing_cache else None,
        "build_seconds": build_seconds,
        "sparse": sparse_report,
        "config": cfg.to_dict(),
        "versions": versions(),
        "machine": machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del parser
    with staged_file(out, force=True) as tmp_plan, staged_file(engine_sidecar_path(out), force=True) as tmp_json, \
            staged_file(out.with_name(out.name + ".log"), force=True) as tmp_log:
        tmp_plan.write_bytes(blob)
        write_json(tmp_json, record)
        tmp_log.write_text("\n".join(logger.lines) + "\n")
    if cfg.timing_cache is not None:
        with staged_file(cfg.timing_cache, force=True) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    del cache
    return record


def _parse(trt, network, onnx_path: Path, logger):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}: "
                          f"{errors[0].splitlines()[0] if errors else 'no error given'}"
                          + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    return parser
