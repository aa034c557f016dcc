"""ONNX -> TensorRT engine through Polygraphy's TensorRT backend, for TensorRT 10.x and 11.x, with 2:4 sparse
weights and a sparse-layer report.

    build_engine("runs/x/onnx/transformer.onnx", "transformer.plan", EngineConfig()) -> sidecar dict
    engine_record.check_engine("transformer.plan")  # refuses a stale engine (ONNX, TensorRT or GPU changed)

The build is a short sequence of steps, each a function of its own:

    read_inputs       the ONNX file and its export sidecar (precision, shape profile, N:M pruning)
    resolve_profiles  the optimization profile {input: (min, opt, max)}, explicit or from the sidecar
    build_targets     what to build: the engine, and its dense twin with `also_dense`
    refuse_existing   outputs that exist without `force` (before TensorRT is touched)
    -- with TensorRT and a GPU:
    read_onnx_quantization  the graph's QuantizeLinear/DequantizeLinear nodes (a Q/DQ graph builds strongly typed)
    -- per target (`_build_one`):
    model_precision   the ONNX precision (the sidecar's, else the parsed network's inputs)
    select_flags      builder flags for this TensorRT generation and graph (`trt_rules`, by feature detection)
    parse_network     Polygraphy's `network_from_onnx_path`, strongly typed where the flags say
    network_profile   the profile checked against the parsed network's inputs
    config_options    Polygraphy's `CreateConfig` arguments (`trt_rules`): sparse weights, profile, timing
                      cache, optimization level, workspace pool
    build             `engine_from_network` with the log captured and a progress line (`build_monitor`)
    sparse_report     the build log's eligible / picked sparse layers, cross-checked by the engine inspector
    engine_record     the sidecar, with the equivalent `trtexec` command line (every build, Q/DQ or not)
    write_outputs     `<engine>`, `<engine>.json`, `<engine>.log`, staged then renamed together

Versions are told apart by what the `tensorrt` module offers, never by its version string: TensorRT 10
has precision flags (`BuilderFlag.FP16`/`BF16`) for weakly typed networks; TensorRT 11 dropped them and
builds strongly typed networks whose precision is the ONNX file's. A graph with Q/DQ nodes builds strongly typed
on both (TensorRT 10: `NetworkDefinitionCreationFlag.STRONGLY_TYPED`), never with FP16/INT8 flags.
`trt_runtime.TrtEngine` runs a built engine with Polygraphy's `TrtRunner`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from obsdiff.errors import ConfigError, OutputExistsError
from obsdiff.runs.artifacts import check_writable, machine, staged_file, versions, write_json

from . import trt_env
from .build_monitor import build_progress, captured_build_log
from .engine_record import EngineError, dense_twin_path, engine_sidecar_path, onnx_hashes
from .sidecar import OnnxSpec, Shape, format_shape, read_onnx_quantization, read_onnx_sidecar, sidecar_path
from .trt_rules import (
    TRT_DTYPE_NAMES,
    FlagPlan,
    config_options,
    dtype_from_network_inputs,
    network_profile,
    parse_build_log,
    select_flags,
    sparse_layers_from_inspector,
    trtexec_command,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: built through Polygraphy, with the trtexec line and engine I/O; 3: the ONNX's Q/DQ nodes


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class EngineConfig:
    """How to build. Shapes are {input name: shape}; explicit shapes override the export sidecar's profile.

    `sparse_weights` None: on when the sidecar says the model was N:M pruned. `strongly_typed` None: strongly
    typed for a Q/DQ graph and where TensorRT has no precision flags (11.x), else weakly typed with them (10.x).
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


def profile_source(spec: OnnxSpec | None, cfg: EngineConfig) -> str:
    """Where the engine's optimization profile comes from, for its sidecar: the explicit shapes, or the export
    sidecar with the reason the export recorded for its ranges (e.g. the TensorRT diffusion demo's defaults)."""
    if cfg.explicit_shapes:
        return "explicit shapes (--min-shapes/--opt-shapes/--max-shapes)"
    if spec is None or not cfg.profile_from_sidecar:
        return "none: static shapes"
    why = spec.profile_source
    return f"export sidecar {sidecar_path(spec.path).name}" + (f" ({why})" if why else "")


# ---------------------------------------------------------------------------------------------- build


def read_inputs(onnx_path: Path, cfg: EngineConfig) -> OnnxSpec | None:
    """The export sidecar of `onnx_path` (required when the profile comes from it), or None without one."""
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist; export it with `obsdiff-export onnx MODEL --out DIR`")
    if cfg.profile_from_sidecar and not cfg.explicit_shapes:
        return read_onnx_sidecar(onnx_path)
    return read_onnx_sidecar(onnx_path) if sidecar_path(onnx_path).is_file() else None


def build_targets(out: Path, spec: OnnxSpec | None, cfg: EngineConfig) -> list[tuple[Path, bool]]:
    """[(engine path, sparse weights)]: the engine (sparse for N:M runs unless told), then the dense twin."""
    sparse = cfg.sparse_weights if cfg.sparse_weights is not None else bool(spec is not None and spec.nm)
    return [(out, sparse)] + ([(dense_twin_path(out), False)] if cfg.also_dense else [])


def refuse_existing(targets: list[tuple[Path, bool]], onnx_path: Path, force: bool) -> None:
    for path, _ in targets:
        if path.exists() and not force:
            raise OutputExistsError(f"{path} already exists{_staleness(path, onnx_path)}; pass --force to rebuild "
                                    "it or choose another --out")
        check_writable(path, force=True)  # a path the OS refuses fails now, not after a long build


def build_engine(onnx_path: str | Path, out: str | Path, config: EngineConfig | None = None,
                 force: bool = False, progress: bool = False) -> dict:
    """Build a TensorRT engine from `onnx_path` into `out` (+ `<out>.json`, `<out>.log`); returns the sidecar.

    With `config.also_dense`, the same network is also built without sparse weights into
    `<stem>.dense.plan`; its sidecar is under the key "dense_twin". Inputs and outputs are checked before
    TensorRT is touched: missing ONNX or sidecar, existing `out` without `force`. `progress` shows a
    progress line on stderr while TensorRT builds.
    """
    cfg = config or EngineConfig()
    onnx_path, out = Path(onnx_path), Path(out)
    spec = read_inputs(onnx_path, cfg)
    profiles = resolve_profiles(spec, cfg)
    targets = build_targets(out, spec, cfg)
    refuse_existing(targets, onnx_path, force)
    trt = trt_env.require_tensorrt()
    gpu = trt_env.require_cuda_gpu()
    poly = trt_env.require_polygraphy_trt()
    hashes = onnx_hashes(onnx_path)
    quant = read_onnx_quantization(onnx_path)
    records = [_build_one(trt, poly, gpu, onnx_path, path, spec, profiles, cfg, sparse, (hashes, quant), progress)
               for path, sparse in targets]
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


def _polygraphy_error(what: str, onnx_path: Path, build_log, exc: BaseException) -> EngineError:
    errors = build_log.errors()
    detail = (errors[0] if errors else str(exc)).strip().splitlines()
    return EngineError(f"TensorRT could not {what} {onnx_path.name}: {detail[0] if detail else 'no error logged'}"
                       + (f" (+{len(errors) - 1} more errors)" if len(errors) > 1 else "")
                       + "; run with -vv for the whole log")


def model_precision(poly, spec: OnnxSpec | None, onnx_path: Path) -> str:
    """fp32, fp16 or bf16: the export sidecar's, else read off the parsed network's input types."""
    if spec is not None and spec.dtype:
        return spec.dtype
    _, network, _ = poly.network_from_onnx_path(str(onnx_path))
    return dtype_from_network_inputs(getattr(network.get_input(i).dtype, "name", str(network.get_input(i).dtype))
                                     for i in range(network.num_inputs))


def parse_network(poly, onnx_path: Path, plan: FlagPlan):
    """(builder, network, parser) from Polygraphy; strongly typed when the plan sets the network flag."""
    return poly.network_from_onnx_path(str(onnx_path), strongly_typed="STRONGLY_TYPED" in plan.network_flags)


def _build_one(trt, poly, gpu: dict, onnx_path: Path, out: Path, spec: OnnxSpec | None, profiles: dict,
               cfg: EngineConfig, sparse: bool, graph: tuple[dict, dict], progress: bool) -> dict:
    """One engine; `graph` is (the ONNX's hashes, its Q/DQ summary)."""
    from polygraphy.exception import PolygraphyException

    t0 = time.perf_counter()
    with captured_build_log(cfg.verbose_log) as build_log:
        try:
            model_dtype = model_precision(poly, spec, onnx_path)
            plan = select_flags(trt, model_dtype, sparse, cfg.strict_nans, cfg.strongly_typed, qdq=graph[1])
            builder, network, parser = parse_network(poly, onnx_path, plan)
        except PolygraphyException as exc:
            raise _polygraphy_error("parse", onnx_path, build_log, exc) from None
        inputs = [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]
        used = network_profile(inputs, profiles, onnx_path.name)
        cache = str(cfg.timing_cache) if cfg.timing_cache is not None else None
        kwargs, extra_flags = config_options(trt, plan, int(cfg.workspace_gib * 2**30), cfg.opt_level, cache)
        create = poly.CreateConfig(profiles=[_polygraphy_profile(poly, used)] if used else None, **kwargs)
        if extra_flags:  # flags CreateConfig has no argument for (STRICT_NANS)
            create = poly.PostprocessConfig(create, _flag_setter(trt, extra_flags))
        log.info("building %s from %s (%s typed, flags %s)", out, onnx_path, plan.typing, ", ".join(plan.builder_flags))
        try:
            with build_progress(f"building {out.name}", enabled=progress):
                engine = poly.engine_from_network((builder, network, parser), config=create, save_timing_cache=cache)
        except PolygraphyException as exc:
            raise _polygraphy_error("build", onnx_path, build_log, exc) from None
    build_seconds = time.perf_counter() - t0
    report = sparse_report(trt, engine, build_log.lines, sparse)
    record = engine_record(trt, gpu, onnx_path, out, spec, graph, cfg, plan, model_dtype, used, report,
                           build_seconds, engine_io(trt, engine))
    write_outputs(poly, engine, out, record, build_log.lines)
    return record


def _flag_setter(trt, names: tuple[str, ...]):
    def set_flags(_builder, _network, config) -> None:
        for name in names:
            config.set_flag(getattr(trt.BuilderFlag, name))

    return set_flags


def _polygraphy_profile(poly, used: dict):
    profile = poly.Profile()
    for name, p in used.items():
        profile.add(name, min=tuple(p["min"]), opt=tuple(p["opt"]), max=tuple(p["max"]))
    return profile


def sparse_report(trt, engine, log_lines: list[str], requested: bool) -> dict:
    """The build log's sparse-layer report, with the engine inspector's list of layers with sparse weights."""
    report = parse_build_log(log_lines) | {"requested": requested}
    try:
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        report["inspector_sparse_layers"] = sparse_layers_from_inspector(info)
    except Exception as exc:  # the inspector is a cross-check only
        report["inspector_sparse_layers"] = None
        log.debug("engine inspector unavailable: %s", exc)
    if requested and not report["reported"]:
        log.warning("sparse weights were enabled but the build log has no sparsity report")
    return report


def engine_io(trt, engine) -> dict:
    """{"inputs": [{name, dtype}], "outputs": [...]} of a built engine (dtype names as in numpy)."""
    io = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
        dtype = getattr(engine.get_tensor_dtype(name), "name", "")
        io[kind].append({"name": name, "dtype": TRT_DTYPE_NAMES.get(dtype, dtype.lower())})
    return io


def engine_record(trt, gpu: dict, onnx_path: Path, out: Path, spec: OnnxSpec | None, graph: tuple[dict, dict],
                  cfg: EngineConfig, plan: FlagPlan, model_dtype: str, used: dict, sparse: dict,
                  build_seconds: float, io: dict) -> dict:
    """The engine sidecar: what it was built from, with what, how, and the trtexec line that repeats it."""
    workspace = int(cfg.workspace_gib * 2**30)
    command = trtexec_command(str(onnx_path), str(out), plan, used, workspace, cfg.opt_level,
                              str(cfg.timing_cache) if cfg.timing_cache else None)
    return {
        "format": FORMAT_VERSION,
        "artifact": "tensorrt-engine",
        "file": out.name,
        "onnx": {"path": str(onnx_path.resolve()), **graph[0],
                 "sidecar": str(sidecar_path(onnx_path).resolve()) if spec is not None else None,
                 "source_run_sparsity": spec.sparsity_type if spec is not None else None},
        "tensorrt": getattr(trt, "__version__", "unknown"),
        "gpu": gpu,
        "builder": "polygraphy",
        "trtexec": command,
        "typing": plan.typing,
        "quantization": graph[1],
        "model_dtype": model_dtype,
        "builder_flags": list(plan.builder_flags),
        "network_flags": list(plan.network_flags),
        "notes": list(plan.notes),
        "profiles": used,
        "profile_source": profile_source(spec, cfg),
        **io,
        "workspace_gib": cfg.workspace_gib,
        "opt_level": cfg.opt_level,
        "timing_cache": str(cfg.timing_cache) if cfg.timing_cache else None,
        "build_seconds": build_seconds,
        "sparse": sparse,
        "config": cfg.to_dict(),
        "versions": versions(),
        "machine": machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_outputs(poly, engine, out: Path, record: dict, log_lines: list[str]) -> None:
    """The engine, its sidecar and its build log, each staged and renamed into place together."""
    with staged_file(out, force=True) as tmp_plan, staged_file(engine_sidecar_path(out), force=True) as tmp_json, \
            staged_file(out.with_name(out.name + ".log"), force=True) as tmp_log:
        poly.save_engine(engine, str(tmp_plan))
        record["bytes"] = tmp_plan.stat().st_size
        write_json(tmp_json, record)
        tmp_log.write_text("\n".join(log_lines) + "\n")
