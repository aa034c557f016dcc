"""Read the JSON sidecar that `obsdiff-export onnx` writes next to every `<component>.onnx`, and what the graph
itself says about quantization (its QuantizeLinear / DequantizeLinear nodes: `read_onnx_quantization`).

Only the few keys the engines need are read, each in one place, so a change of the export format breaks
here with a message that names the missing key instead of deep inside an engine build:

    inputs[i].name / .dtype / .feeds / .shape / .profile.{min,opt,max}   graph inputs and TensorRT profile
    outputs[i].name / .dtype                                              graph outputs
    sha256, dtype, component                                             the graph file and its precision
    source.run.prune.sparsity_type                                        "2:4" for N:M-pruned runs
    choices.profile.source                                                why the profile has its ranges (optional)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from obsdiff.errors import ConfigError, MissingDependencyError, ObsdiffError, first_line
from obsdiff.runs.artifacts import read_json

Shape = tuple[int, ...]


class SidecarError(ObsdiffError):
    """The export sidecar of an ONNX file is missing, unreadable or lacks a key the engines need."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` has None for dynamic dims; `profile` is (min, opt, max) shapes."""

    name: str
    dtype: str  # numpy-style: float32, float16, bfloat16, int64, ...
    shape: tuple[int | None, ...] = ()
    feeds: str | None = None  # the denoiser keyword argument an input feeds (dotted for nested dicts)
    profile: tuple[Shape, Shape, Shape] | None = None


@dataclass(frozen=True)
class OnnxSpec:
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str | None = None
    dtype: str | None = None  # the exported precision: fp32, fp16 or bf16
    component: str | None = None
    sparsity_type: str | None = None  # the pruned run's sparsity type (None: not a pruned run)
    profile_source: str | None = None  # why the export chose the profile, e.g. the TensorRT demo's defaults
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) when the source run was N:M pruned, else None."""
        from obsdiff.solver.obs import parse_nm

        return parse_nm(self.sparsity_type)  # checked by `parse_sidecar`

    def profiles(self) -> dict[str, tuple[Shape, Shape, Shape]]:
        """{input name: (min, opt, max)} for every input that has a profile."""
        return {t.name: t.profile for t in self.inputs if t.profile is not None}


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def _need(d: dict, key: str, where: str, path: Path):
    if not isinstance(d, dict) or key not in d:
        raise SidecarError(f"{path} has no {where}{key!r}; it was not written by `obsdiff-export onnx` of this "
                           "version: re-export the model")
    return d[key]


def _shape(value, key: str, path: Path) -> Shape:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise SidecarError(f"{path}: {key} {value!r} is not a list of integers; re-export the model") from None


def _check_sparsity_type(sparsity_type, path: Path) -> None:
    from obsdiff.solver.obs import parse_nm

    try:
        parse_nm(sparsity_type)
    except (ValueError, TypeError, AttributeError):
        raise SidecarError(f"{path}: source.run.prune.sparsity_type {sparsity_type!r} is not a sparsity type "
                           "obsdiff writes (unstructured, structured or N:M); re-export the model") from None


def parse_sidecar(data: dict, path: str | Path = "sidecar") -> OnnxSpec:
    """An `OnnxSpec` from a loaded sidecar dict (the pure part of `read_onnx_sidecar`)."""
    path = Path(path)
    inputs = []
    for i, rec in enumerate(_need(data, "inputs", "", path)):
        where = f"inputs[{i}]."
        name = _need(rec, "name", where, path)
        profile = None
        if rec.get("profile") is not None:
            prof = rec["profile"]
            profile = tuple(_shape(_need(prof, k, f"{where}profile.", path), f"{name} profile {k}", path)
                            for k in ("min", "opt", "max"))
            if len({len(s) for s in profile}) != 1:
                raise SidecarError(f"{path}: the profile of input {name} has shapes of different ranks {profile}")
        shape = tuple(v if isinstance(v, int) else None for v in rec.get("shape", ()))
        inputs.append(TensorSpec(name, str(_need(rec, "dtype", where, path)), shape, rec.get("feeds"), profile))
    outputs = [TensorSpec(_need(rec, "name", f"outputs[{i}].", path), str(rec.get("dtype", "float32")),
                          tuple(v if isinstance(v, int) else None for v in rec.get("shape", ())))
               for i, rec in enumerate(_need(data, "outputs", "", path))]
    if not inputs:
        raise SidecarError(f"{path} lists no inputs; re-export the model")
    run = (data.get("source") or {}).get("run") or {}
    sparsity_type = (run.get("prune") or {}).get("sparsity_type") if run else None
    _check_sparsity_type(sparsity_type, path)
    profile = (data.get("choices") or {}).get("profile") if isinstance(data.get("choices"), dict) else None
    why = profile.get("source") if isinstance(profile, dict) else None
    return OnnxSpec(path=path, inputs=tuple(inputs), outputs=tuple(outputs), sha256=data.get("sha256"),
                    dtype=data.get("dtype"), component=data.get("component"), sparsity_type=sparsity_type,
                    profile_source=why if isinstance(why, str) else None, raw=data)


def read_onnx_sidecar(onnx_path: str | Path) -> OnnxSpec:
    """The sidecar `<stem>.json` next to `onnx_path`, parsed; one-line errors when missing or incomplete."""
    onnx_path = Path(onnx_path)
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise SidecarError(f"no export sidecar {path} next to {onnx_path}; export with `obsdiff-export onnx` "
                           "(it writes <component>.json), or give the shapes with --min-shapes/--opt-shapes/"
                           "--max-shapes")
    data = read_json(path, "export sidecar", fix="re-export the model", error=SidecarError)
    return replace(parse_sidecar(data, path), path=onnx_path)


def format_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def parse_shapes(value: str | None, flag: str) -> dict[str, Shape]:
    """trtexec-style `name:1x4x64x64,other:1x77x768` -> {name: (1, 4, 64, 64), ...}."""
    if not value:
        return {}
    out = {}
    for item in value.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 0:
            raise ConfigError(f"{flag} {item!r} is not NAME:DxDx...; e.g. {flag} hidden_states:1x16x128x128")
        out[name] = shape
    return out


# ------------------------------------------------------------------------------------------------ Q/DQ

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_ONNX_DOMAINS = ("", "ai.onnx")


def _tensor_type_name(data_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(data_type).lower()


def _quantized_type(node, consts: dict) -> str | None:
    """The quantized side's element type of a Q/DQ node: QuantizeLinear's `output_dtype` or zero point (uint8 when
    it has neither, as ONNX defines), DequantizeLinear's input or zero point, where they are constants."""
    if node.op_type == "QuantizeLinear":
        out = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), None)
        if out:
            return _tensor_type_name(out)
        zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return consts.get(zero) if zero else "uint8"
    for name in (node.input[0], node.input[2] if len(node.input) > 2 else ""):
        if name in consts:
            return consts[name]
    return None


def qdq_summary(model) -> dict:
    """Q/DQ nodes of an ONNX `ModelProto` (graph, subgraphs and local functions): their counts, the quantized types
    where the graph states them, and custom-domain quantize ops (Model Optimizer's `trt::TRT_FP8QuantizeLinear`...).

    `qdq` is True when the graph has any: TensorRT then takes each tensor's precision from these nodes (explicit
    quantization), which a strongly typed network requires.
    """
    from obsdiff.export.graph import all_graphs

    nodes = [n for g in (model.graph, *model.functions) for sub in all_graphs(g) for n in sub.node]
    consts = {t.name: _tensor_type_name(t.data_type) for t in model.graph.initializer}
    consts |= {n.output[0]: _tensor_type_name(a.t.data_type) for n in nodes if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"}
    counts = {op: 0 for op in _QDQ_OPS}
    types, custom = set(), {}
    for node in nodes:
        if node.op_type in _QDQ_OPS and node.domain in _ONNX_DOMAINS:
            counts[node.op_type] += 1
            t = _quantized_type(node, consts)
            if t:
                types.add(t)
        elif node.op_type.endswith(_QDQ_OPS):
            key = f"{node.domain}::{node.op_type}"
            custom[key] = custom.get(key, 0) + 1
    return {"qdq": bool(sum(counts.values()) or custom), "quantize_linear": counts["QuantizeLinear"],
            "dequantize_linear": counts["DequantizeLinear"], "types": sorted(types), "custom_ops": custom}


def read_onnx_quantization(onnx_path: str | Path) -> dict:
    """`qdq_summary` of the ONNX file (the graph only: external weight data is not read)."""
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError('reading the ONNX graph needs the onnx package: pip install "obsdiff[onnx]"'
                                     ) from None
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ConfigError(f"{onnx_path} is not a readable ONNX model ({first_line(exc)}); export it again with "
                          "`obsdiff-export onnx`") from None
    return qdq_summary(model)
