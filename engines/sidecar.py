"""Read the JSON sidecar that `obsdiff-export onnx` writes next to every `<component>.onnx`.

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

from obsdiff.errors import ObsdiffError
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
    from obsdiff.errors import ConfigError

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
