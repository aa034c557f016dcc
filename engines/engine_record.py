"""What a built engine is tied to, and whether it still fits: engine sidecars and stale-engine detection.

Pure file and JSON work (TensorRT is imported only to learn this machine's environment when none is given),
so it is tested and usable on any machine; `trt` builds engines and re-exports these names.
"""

from __future__ import annotations

from pathlib import Path

from obsdiff.errors import ObsdiffError
from obsdiff.runs.artifacts import read_json, sha256_file

from .trt_env import current_environment


class EngineError(ObsdiffError):
    """An engine could not be built or loaded."""


class StaleEngineError(ObsdiffError):
    """An engine does not match its ONNX file, the installed TensorRT or this GPU."""


def engine_sidecar_path(plan: str | Path) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def dense_twin_path(plan: str | Path) -> Path:
    plan = Path(plan)
    return plan.with_name(f"{plan.stem}.dense{plan.suffix or '.plan'}")


def onnx_hashes(onnx_path: str | Path) -> dict:
    """sha256 of the ONNX graph file and of its external data file when there is one."""
    onnx_path = Path(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    return {"sha256": sha256_file(onnx_path), "data_sha256": sha256_file(data) if data.is_file() else None}


def stale_reasons(record: dict, environment: dict, onnx: dict | None) -> list[str]:
    """Why an engine built as `record` says cannot be used here ([] if it can).

    `environment`: {"tensorrt", "gpu", "compute_capability"} of this machine; `onnx`: current hashes of the
    source ONNX ({"sha256", "data_sha256"}) or None when the ONNX file is not available to compare.
    """
    reasons = []
    built = record.get("onnx") or {}
    if onnx is not None:
        for key, what in (("sha256", "ONNX graph"), ("data_sha256", "ONNX external data")):
            if built.get(key) != onnx.get(key):
                old, new = (built.get(key) or "none")[:12], (onnx.get(key) or "none")[:12]
                reasons.append(f"the {what} changed since the build (sha256 {old}... -> {new}...)")
    if record.get("tensorrt") != environment.get("tensorrt"):
        reasons.append(f"it was built with TensorRT {record.get('tensorrt')}, this is TensorRT "
                       f"{environment.get('tensorrt')} (engines do not carry across versions)")
    gpu = record.get("gpu") or {}
    if (gpu.get("name"), gpu.get("compute_capability")) != (environment.get("gpu"),
                                                             environment.get("compute_capability")):
        reasons.append(f"it was built for {gpu.get('name')} (sm {gpu.get('compute_capability')}), this GPU is "
                       f"{environment.get('gpu')} (sm {environment.get('compute_capability')})")
    return reasons


def read_engine_sidecar(plan: str | Path) -> dict:
    plan = Path(plan)
    if not plan.is_file():
        raise EngineError(f"engine {plan} does not exist; build it with `obsdiff-export build-engine MODEL.onnx "
                          f"--out {plan}`")
    path = engine_sidecar_path(plan)
    if not path.exists():
        raise StaleEngineError(f"engine {plan} has no sidecar {path.name}, so it cannot be checked against its "
                               "ONNX, TensorRT and GPU; rebuild it with `obsdiff-export build-engine ... --force`")
    return read_json(path, "engine sidecar", fix="rebuild the engine with --force", error=StaleEngineError)


def check_engine(plan: str | Path, onnx_path: str | Path | None = None, environment: dict | None = None) -> dict:
    """The engine's sidecar if `plan` is usable here; `StaleEngineError` naming every reason otherwise.

    The ONNX (`onnx_path`, else the recorded path if it still exists) is re-hashed; `environment` defaults
    to this machine's TensorRT and GPU (which requires both).
    """
    record = read_engine_sidecar(plan)
    source = Path(onnx_path) if onnx_path else Path((record.get("onnx") or {}).get("path") or "")
    hashes = onnx_hashes(source) if source.name and source.is_file() else None
    if onnx_path and hashes is None:
        raise EngineError(f"ONNX file {onnx_path} does not exist")
    if environment is None:
        environment = current_environment()  # needs TensorRT and a GPU; the rest of this module does not
    reasons = stale_reasons(record, environment, hashes)
    if reasons:
        rebuild = f"obsdiff-export build-engine {source if source.name else 'MODEL.onnx'} --out {plan} --force"
        raise StaleEngineError(f"engine {plan} is stale: {'; '.join(reasons)}; rebuild it: {rebuild}")
    return record
