"""Pure TensorRT rules, testable without TensorRT: which flags to set, how they become Polygraphy's `CreateConfig`
arguments and the equivalent `trtexec` command line, and what a build log says about sparsity."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from obsdiff.errors import ConfigError

# ------------------------------------------------------------------------------------------------ flags


@dataclass(frozen=True)
class FlagPlan:
    """What to set: builder flag names, network creation flag names, and the typing mode they imply."""

    builder_flags: tuple[str, ...]
    network_flags: tuple[str, ...]
    typing: str  # "weak" (precision flags) or "strong" (precision from the ONNX)
    notes: tuple[str, ...] = ()


_PRECISION_FLAG = {"fp16": "FP16", "bf16": "BF16"}
# TensorRT DataType names -> numpy / torch dtype names (the engine sidecar's and the runtime's)
TRT_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                   "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def select_flags(trt_ns, model_dtype: str, sparse_weights: bool, strict_nans: bool = False,
                 strongly_typed: bool | None = None) -> FlagPlan:
    """Choose flags from what `trt_ns.BuilderFlag` / `trt_ns.NetworkDefinitionCreationFlag` offer.

    `trt_ns` is the `tensorrt` module (or anything with those two attributes); `model_dtype` is the exported
    precision (fp32, fp16, bf16). TensorRT with precision flags (10.x) builds weakly typed with the flag of
    the ONNX precision unless `strongly_typed`; without them (11.x) the network is strongly typed.
    """
    bflags, nflags = trt_ns.BuilderFlag, trt_ns.NetworkDefinitionCreationFlag
    has_precision_flags = hasattr(bflags, "FP16")
    notes: list[str] = []
    builder: list[str] = []
    network: list[str] = []
    if strongly_typed is None:
        strongly_typed = not has_precision_flags
    if strongly_typed:
        typing = "strong"
        if hasattr(nflags, "STRONGLY_TYPED"):
            network.append("STRONGLY_TYPED")
        elif has_precision_flags:
            raise ConfigError("this TensorRT has no strongly typed networks (NetworkDefinitionCreationFlag."
                              "STRONGLY_TYPED); build weakly typed (strongly_typed=None) or upgrade TensorRT")
        notes.append(f"strongly typed: layer precisions come from the ONNX ({model_dtype})")
    else:
        if not has_precision_flags:
            raise ConfigError("this TensorRT has no precision flags (TensorRT 11 builds strongly typed networks "
                              "only); leave strongly_typed unset")
        typing = "weak"
        if hasattr(bflags, "TF32"):  # TensorRT's (and trtexec's) default; Polygraphy clears it unless asked
            builder.append("TF32")
        flag = _PRECISION_FLAG.get(model_dtype)
        if flag is not None:
            if not hasattr(bflags, flag):
                raise ConfigError(f"this TensorRT has no BuilderFlag.{flag} for the {model_dtype} ONNX; export in "
                                  "fp16 or upgrade TensorRT")
            builder.append(flag)
        elif model_dtype != "fp32":
            raise ConfigError(f"unknown ONNX precision {model_dtype!r}; expected fp32, fp16 or bf16")
        notes.append(f"weakly typed with {flag or 'no precision flag (fp32, TF32 allowed)'}")
    if sparse_weights:
        if not hasattr(bflags, "SPARSE_WEIGHTS"):
            raise ConfigError("this TensorRT has no BuilderFlag.SPARSE_WEIGHTS; use --no-sparse-weights")
        builder.append("SPARSE_WEIGHTS")
        if model_dtype == "fp32":
            notes.append("sparse weights with an fp32 ONNX: 2:4 kernels need fp16/bf16/int8 (or TF32) GEMMs; "
                         "export with --dtype fp16 for sparse tensor cores")
    if strict_nans:
        if not hasattr(bflags, "STRICT_NANS"):
            raise ConfigError("this TensorRT has no BuilderFlag.STRICT_NANS; drop --strict-nans or upgrade TensorRT")
        builder.append("STRICT_NANS")
    return FlagPlan(tuple(builder), tuple(network), typing, tuple(notes))


def dtype_from_network_inputs(type_names: Iterable[str]) -> str:
    """The model precision from the TensorRT dtype names of the network inputs (HALF -> fp16, BF16 -> bf16)."""
    names = {str(n).upper().rsplit(".", 1)[-1] for n in type_names}
    if "BF16" in names:
        return "bf16"
    if "HALF" in names:
        return "fp16"
    return "fp32"


# ------------------------------------------------------------------------------------------ Polygraphy

# builder flags that are keyword arguments of Polygraphy's CreateConfig; any other flag is set on the config
# afterwards (PostprocessConfig). Precision keywords are passed only when set: TensorRT 11 has no such flags.
_CREATE_CONFIG_KEYWORDS = {"FP16": "fp16", "BF16": "bf16", "TF32": "tf32", "SPARSE_WEIGHTS": "sparse_weights"}


def config_options(trt_ns, plan: FlagPlan, workspace_bytes: int, opt_level: int,
                   timing_cache: str | None) -> tuple[dict, tuple[str, ...]]:
    """(keyword arguments for `polygraphy.backend.trt.CreateConfig` except `profiles`, flags to set afterwards).

    `trt_ns` is the `tensorrt` module (for `MemoryPoolType` and `ProfilingVerbosity`). DETAILED profiling
    verbosity makes the engine inspector report which layers run with sparse weights.
    """
    kwargs: dict = {_CREATE_CONFIG_KEYWORDS[f]: True for f in plan.builder_flags if f in _CREATE_CONFIG_KEYWORDS}
    kwargs |= {"memory_pool_limits": {trt_ns.MemoryPoolType.WORKSPACE: int(workspace_bytes)},
               "builder_optimization_level": int(opt_level)}
    if timing_cache is not None:
        kwargs["load_timing_cache"] = timing_cache
    if hasattr(trt_ns, "ProfilingVerbosity"):
        kwargs["profiling_verbosity"] = trt_ns.ProfilingVerbosity.DETAILED
    extra = tuple(f for f in plan.builder_flags if f not in _CREATE_CONFIG_KEYWORDS)
    return kwargs, extra


# ------------------------------------------------------------------------------------------ trtexec

_TRTEXEC_FLAG = {"FP16": "--fp16", "BF16": "--bf16", "SPARSE_WEIGHTS": "--sparsity=enable"}


def _shape_list(profiles: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in p[which])}" for name, p in profiles.items())


def trtexec_command(onnx: str, engine: str, plan: FlagPlan, profiles: dict, workspace_bytes: int,
                    opt_level: int, timing_cache: str | None = None) -> str:
    """The `trtexec` command line that builds the same engine, to repeat a build inside a TensorRT or
    Triton container. `profiles` is {input: {"min", "opt", "max"}} as the engine sidecar records it.

    STRICT_NANS has no trtexec option: it is named in a trailing shell comment instead.
    """
    import shlex

    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}"]
    if "STRONGLY_TYPED" in plan.network_flags:
        args.append("--stronglyTyped")
    args += [_TRTEXEC_FLAG[f] for f in plan.builder_flags if f in _TRTEXEC_FLAG]
    if plan.typing == "weak" and "TF32" not in plan.builder_flags:
        args.append("--noTF32")
    if profiles:
        args += [f"--{which}Shapes={_shape_list(profiles, which)}" for which in ("min", "opt", "max")]
    args += [f"--builderOptimizationLevel={opt_level}",
             f"--memPoolSize=workspace:{max(1, round(workspace_bytes / 2**20))}M",
             "--profilingVerbosity=detailed", "--skipInference"]
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    line = " ".join(shlex.quote(a) for a in args)
    unmatched = [f for f in plan.builder_flags if f not in _TRTEXEC_FLAG and f != "TF32"]
    return line + (f"  # also set BuilderFlag {', '.join(unmatched)} (no trtexec option)" if unmatched else "")


# ------------------------------------------------------------------------------------------ build log


_ELIGIBLE = re.compile(r"layers eligible for sparse math:\s*(.*)$", re.IGNORECASE)
_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)$", re.IGNORECASE)


def _layer_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(", ") if name.strip()]


def parse_build_log(lines: Iterable[str]) -> dict:
    """Which layers TensorRT found eligible for sparse math and which picked a sparse kernel.

    Reads TensorRT's INFO lines `(Sparsity) Layers eligible for sparse math: A, B + C, ...` and
    `(Sparsity) TRT inference plan picked sparse implementation for layers: ...` (with or without trtexec's
    `[date] [I] [TRT]` prefix). `reported` is False when the log has neither line (sparsity not enabled, or
    the log level hid INFO).
    """
    eligible: list[str] = []
    picked: list[str] = []
    reported = False
    for line in lines:
        line = line.rstrip("\n")
        for pattern, into in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            m = pattern.search(line)
            if m:
                reported = True
                into.extend(n for n in _layer_list(m.group(1)) if n not in into)
    not_picked = [n for n in eligible if n not in picked]
    return {"reported": reported, "eligible": eligible, "picked": picked, "eligible_not_picked": not_picked,
            "eligible_count": len(eligible), "picked_count": len(picked)}


def sparse_layers_from_inspector(info: str | dict) -> list[str]:
    """Layer names with `HasSparseWeights` set in the engine inspector's JSON (built with DETAILED verbosity)."""
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return [str(layer.get("Name")) for layer in layers
            if isinstance(layer, dict) and str(layer.get("HasSparseWeights", "0")).lower() in ("1", "true")]
