"""Pure TensorRT rules, testable without TensorRT: which flags to set (Q/DQ graphs strongly typed), how a profile
fits the parsed network, how flags become Polygraphy's `CreateConfig` arguments and the equivalent `trtexec` command
line, and what a build log says about sparsity (both wordings TensorRT has used)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from obsdiff.errors import ConfigError

from .sidecar import format_shape

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
                 strongly_typed: bool | None = None, qdq: dict | None = None) -> FlagPlan:
    """Choose flags from what `trt_ns.BuilderFlag` / `trt_ns.NetworkDefinitionCreationFlag` offer.

    `trt_ns` is the `tensorrt` module (or anything with those two attributes); `model_dtype` is the exported
    precision (fp32, fp16, bf16). TensorRT with precision flags (10.x) builds weakly typed with the flag of
    the ONNX precision unless `strongly_typed`; without them (11.x) the network is strongly typed. A graph with
    Q/DQ nodes (`qdq`, from `sidecar.qdq_summary`, with "qdq" True) always builds strongly typed: its Q/DQ nodes
    and the ONNX types fix every precision, and precision flags (FP16, INT8) are never set with strong typing.
    """
    bflags, nflags = trt_ns.BuilderFlag, trt_ns.NetworkDefinitionCreationFlag
    has_precision_flags = hasattr(bflags, "FP16")
    notes: list[str] = []
    builder: list[str] = []
    network: list[str] = []
    quantized = bool(qdq and qdq.get("qdq"))
    if quantized and strongly_typed is False:
        raise ConfigError("the ONNX has QuantizeLinear/DequantizeLinear nodes: it builds strongly typed (its Q/DQ "
                          "nodes set the precisions); drop --weakly-typed")
    if strongly_typed is None:
        strongly_typed = quantized or not has_precision_flags
    if strongly_typed:
        typing = "strong"
        if hasattr(nflags, "STRONGLY_TYPED"):
            network.append("STRONGLY_TYPED")
        elif has_precision_flags:
            raise ConfigError("this TensorRT has no strongly typed networks (NetworkDefinitionCreationFlag."
                              "STRONGLY_TYPED); " + ("a Q/DQ ONNX needs TensorRT 10 or newer" if quantized else
                                                     "build weakly typed (strongly_typed=None) or upgrade TensorRT"))
        notes.append(f"strongly typed: layer precisions come from the ONNX ({model_dtype})")
        if quantized:
            notes.append(_qdq_note(qdq))
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
        if quantized:
            notes.append("sparse INT8 tactics win only where a GEMM stays INT8 in and out (a QuantizeLinear on its "
                         "output); a GEMM that dequantizes its output keeps the dense kernel")
        elif model_dtype == "fp32":
            notes.append("sparse weights with an fp32 ONNX: 2:4 kernels need fp16/bf16/int8 (or TF32) GEMMs; "
                         "export with --dtype fp16 for sparse tensor cores")
    if strict_nans:
        if not hasattr(bflags, "STRICT_NANS"):
            raise ConfigError("this TensorRT has no BuilderFlag.STRICT_NANS; drop --strict-nans or upgrade TensorRT")
        builder.append("STRICT_NANS")
    return FlagPlan(tuple(builder), tuple(network), typing, tuple(notes))


def _qdq_note(qdq: dict) -> str:
    types = ", ".join(qdq.get("types") or []) or "types not stated"
    custom = ", ".join(f"{n} {op}" for op, n in (qdq.get("custom_ops") or {}).items())
    return (f"Q/DQ graph ({qdq.get('quantize_linear', 0)} QuantizeLinear, {qdq.get('dequantize_linear', 0)} "
            f"DequantizeLinear; {types}{'; ' + custom if custom else ''}): explicit quantization, no precision flags")


def dtype_from_network_inputs(type_names: Iterable[str]) -> str:
    """The model precision from the TensorRT dtype names of the network inputs (HALF -> fp16, BF16 -> bf16)."""
    names = {str(n).upper().rsplit(".", 1)[-1] for n in type_names}
    if "BF16" in names:
        return "bf16"
    if "HALF" in names:
        return "fp16"
    return "fp32"


def network_profile(inputs: list[tuple[str, tuple[int, ...]]], profiles: dict, onnx_name: str) -> dict:
    """{input: {"min", "opt", "max"}} for the parsed network's `inputs` [(name, shape with -1 for dynamic)].

    Every dynamic input needs a profile, and a profile's rank must be the input's.
    """
    used = {}
    for name, shape in inputs:
        if name in profiles:
            lo, opt, hi = profiles[name]
            if len(opt) != len(shape):
                raise ConfigError(f"input {name} has rank {len(shape)} in the ONNX, the profile gives "
                                  f"{format_shape(opt)}")
            used[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        elif any(d < 0 for d in shape):
            raise ConfigError(f"input {name} of {onnx_name} is dynamic {shape} and has no profile; "
                              "give it in --opt-shapes")
    return used


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


# TensorRT's INFO report of a build with sparse weights, in two wordings:
#   8.x-10.x:  (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
#              (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
#   10.x (Myelin-compiled graphs):  (Sparsity) Found 39 layer(s) eligible to use sparse tactics[: names]
#                                   (Sparsity) Chose 0 layer(s) using sparse tactics[: names]
_ELIGIBLE = (re.compile(r"layers eligible for sparse math\s*:?(?P<names>.*)$", re.IGNORECASE),
             re.compile(r"found\s+(?P<count>\d+)\s+layers?(?:\(s\))?\s+eligible\s+(?:to\s+use|for)\s+sparse\s+"
                        r"(?:tactics|math)\s*:?(?P<names>.*)$", re.IGNORECASE))
_PICKED = (re.compile(r"picked sparse implementation for layers\s*:?(?P<names>.*)$", re.IGNORECASE),
           re.compile(r"chose\s+(?P<count>\d+)\s+layers?(?:\(s\))?\s+(?:using|with)\s+sparse\s+tactics\s*:?"
                      r"(?P<names>.*)$", re.IGNORECASE))
_OPEN, _CLOSE = "[{(", "]})"


def _wrapped(text: str) -> bool:
    """Whether `text` is one bracketed list, "[a, b]" (not "[a], [b]" or "{ForeignNode[a...b]}, c")."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in _OPEN) - (ch in _CLOSE)
        if depth == 0 and i < len(text) - 1:
            return False
    return True


def _layer_list(text: str) -> list[str]:
    """Layer names of a report line: split at commas outside brackets (Myelin's `{ForeignNode[a...b]}` names keep
    theirs), a list wrapped in one pair of brackets unwrapped, quotes and a final period dropped."""
    text = text.strip().rstrip(".").strip()
    if _wrapped(text):
        text = text[1:-1]
    names, depth, current = [], 0, []
    for ch in text:
        depth = max(0, depth + (ch in _OPEN) - (ch in _CLOSE))
        if ch == "," and depth == 0:
            names.append("".join(current))
            current = []
        else:
            current.append(ch)
    names.append("".join(current))
    return [n.strip().strip("'\"").strip() for n in names if n.strip().strip("'\"").strip()]


def _match(patterns: tuple, line: str) -> tuple[int | None, list[str]] | None:
    for pattern in patterns:
        m = pattern.search(line)
        if m:
            count = m.groupdict().get("count")
            return (int(count) if count is not None else None), _layer_list(m.group("names"))
    return None


def parse_build_log(lines: Iterable[str]) -> dict:
    """How many layers TensorRT found eligible for sparse math and how many picked a sparse kernel, with their names
    where the log lists them.

    Reads both wordings of TensorRT's INFO report (above), with or without trtexec's `[date] [I] [TRT]` or
    Polygraphy's `[V]` prefix. A log can hold several eligible/picked pairs (Myelin reports per compiled subgraph
    or tactic pass): each is kept under `reports`; names are the union over the pairs, counts the larger of the
    union's size and the largest count a line states (as Model Optimizer's sparse-INT8 example reads the log).
    `reported` is False when the log has no such line (sparse weights off, or INFO hidden by the log level).
    """
    reports: list[dict] = []
    for line in lines:
        eligible, picked = _match(_ELIGIBLE, line), _match(_PICKED, line)
        if eligible:
            count, names = eligible
            reports.append({"eligible_count": len(names) if count is None else count, "eligible": names,
                            "picked_count": None, "picked": []})
        elif picked:
            count, names = picked
            if not reports or reports[-1]["picked_count"] is not None:
                reports.append({"eligible_count": None, "eligible": [], "picked_count": None, "picked": []})
            reports[-1].update(picked_count=len(names) if count is None else count, picked=names)
    eligible = list(dict.fromkeys(n for r in reports for n in r["eligible"]))
    picked = list(dict.fromkeys(n for r in reports for n in r["picked"]))

    def count(key: str, names: list[str]) -> int:
        return max([len(names)] + [r[key] for r in reports if r[key] is not None])

    return {"reported": bool(reports), "eligible": eligible, "picked": picked,
            "eligible_not_picked": [n for n in eligible if n not in picked],
            "eligible_count": count("eligible_count", eligible), "picked_count": count("picked_count", picked),
            "reports": reports}


def sparse_layers_from_inspector(info: str | dict) -> list[str]:
    """Layer names with `HasSparseWeights` set in the engine inspector's JSON (built with DETAILED verbosity)."""
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return [str(layer.get("Name")) for layer in layers
            if isinstance(layer, dict) and str(layer.get("HasSparseWeights", "0")).lower() in ("1", "true")]
