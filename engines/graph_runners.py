"""Runners over exported graphs: onnxruntime and TensorRT. Denoiser keyword arguments reach the graph
inputs through the export sidecar (`inputs[i].feeds`); without a graph they export (and build) one on the
fly into a temporary directory that `close()` removes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from obsdiff.devices import DTYPES, dtype_name
from obsdiff.errors import ConfigError, ObsdiffError, first_line
from obsdiff.solver.obs import holds_nm

from .runner_base import InputRanges, Runner, RunnerUnavailable, model_param, register_runner

ONNX_INSTALL = 'pip install "obsdiff[onnx]"'
# preferred first; onnxruntime falls back down the list for nodes (or whole graphs) a provider cannot take
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")



def onnx_file(onnx: str | Path, model) -> Path:
    """The denoiser's .onnx: `onnx` itself, or `<onnx>/<denoiser attr>.onnx` for an export directory."""
    path = Path(onnx)
    if path.is_dir():
        path = path / f"{model.family.denoiser_attr}.onnx"
    if not path.is_file():
        raise ConfigError(f"ONNX file {path} does not exist; export it with `obsdiff-export onnx MODEL --out DIR`")
    return path


def export_denoiser(model, ranges: InputRanges, out_dir: Path) -> Path:
    """Export `model`'s denoiser with obsdiff's exporter for `ranges`; RunnerUnavailable if there is none."""
    try:
        from obsdiff.export.config import ExportConfig
        from obsdiff.export.onnx_export import export_onnx
    except ImportError as exc:
        raise RunnerUnavailable(f"no ONNX file given and the ONNX exporter is not available ({first_line(exc)}); "
                                "pass --onnx DIR from `obsdiff-export onnx`") from None
    dtype = dtype_name(model_param(model).dtype)
    dtype = dtype if dtype in DTYPES else "fp32"
    opset = 22 if dtype == "bf16" else 18
    cfg = ExportConfig(component="transformer", dtype=dtype, opset=opset, batch=ranges.batch, height=ranges.height,
                       width=ranges.width, text_len=ranges.text, parity=False,
                       device=str(model_param(model).device), polygraphy_max_weights=0)
    export_onnx(model, out_dir, cfg)
    return out_dir / f"{model.family.denoiser_attr}.onnx"


def check_onnx_matches(spec, model) -> None:
    """Refuse an ONNX exported from another pruned run than `model` (by the recorded denoiser hash)."""
    src_run = ((spec.raw.get("source") or {}).get("run") or {}) if spec.raw else {}
    a, b = src_run.get("denoiser_sha256"), model.run.denoiser_sha256 if model.run else None
    if a and b and a != b:
        raise ConfigError(f"{spec.path} was exported from another run (denoiser sha256 {a[:12]}...) than "
                          f"{model.ref} ({b[:12]}...); re-export or pass the matching --onnx")
    if model.run and not src_run:
        raise ConfigError(f"{spec.path} was exported from a dense model, but {model.ref} is a pruned run; "
                          "export the run itself")
    if src_run and model.run is None and model.ref != src_run.get("path"):
        raise ConfigError(f"{spec.path} was exported from the pruned run {src_run.get('path')}, but {model.ref} is "
                          "not that run; pass the matching --onnx")


class _GraphRunner(Runner):
    """Shared by onnxruntime and TensorRT: where the graph comes from and how kwargs become graph inputs."""

    def _graph(self, model, ranges: InputRanges | None) -> Path:
        from .sidecar import read_onnx_sidecar

        onnx = self.opts.get("onnx")
        if onnx is not None:
            path = onnx_file(onnx, model)
            self.details["onnx"] = str(path)
        else:
            if ranges is None:
                raise RunnerUnavailable("no ONNX file given and no input ranges to export for")
            self._tmp = Path(tempfile.mkdtemp(prefix="obsdiff-onnx-"))
            path = export_denoiser(model, ranges, self._tmp / "onnx")
            self.details["onnx"] = "exported on the fly"
        self.spec = read_onnx_sidecar(path)
        check_onnx_matches(self.spec, model)
        self.feeds = [(t.name, t.feeds or t.name, t.dtype) for t in self.spec.inputs]
        self.output = self.spec.outputs[0].name
        return path

    def _inputs(self, kwargs: dict) -> dict[str, torch.Tensor]:
        fed = {feed.split(".")[0] for _, feed, _ in self.feeds}
        extra = [k for k, v in kwargs.items()
                 if k not in fed and k != "return_dict" and v is not None and not (isinstance(v, dict) and not v)]
        if extra:
            raise ConfigError(f"the {self.name} graph has no input for the denoiser argument {extra[0]!r}")
        out = {}
        for name, feed, dtype in self.feeds:
            value = kwargs
            for key in feed.split("."):
                if not isinstance(value, dict) or key not in value:
                    raise ConfigError(f"graph input {name} needs the denoiser argument {feed!r}, which was not given")
                value = value[key]
            # the sidecar's dtype names are numpy's, which torch shares (float16, bfloat16, int64, bool, ...)
            target = getattr(torch, dtype, None)
            out[name] = value.detach().to(target if isinstance(target, torch.dtype) else torch.float32)
        return out

    def close(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None


@register_runner
class OnnxRuntimeRunner(_GraphRunner):
    """onnxruntime on an exported graph (`onnx`: export dir or .onnx; None: export into a temporary dir).

    Providers default to every one of TensorRT, CUDA, CPU that this onnxruntime build has (`providers`
    overrides); threads follow torch's setting so CPU comparisons with PyTorch are fair.
    """

    name = "onnxruntime"

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return ("onnx", "providers", "threads")

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, f"onnxruntime is not installed; {ONNX_INSTALL}"
        return True, ""

    def prepare(self, model, ranges=None) -> None:
        import onnxruntime as ort

        self._adopt(model)
        if self.opts.get("onnx") is None and self.dtype == torch.bfloat16:
            raise RunnerUnavailable("the model is bf16, which onnxruntime's numpy interface cannot feed; load it in "
                                    "fp16/fp32 or pass an fp16/fp32 export with --onnx")
        path = self._graph(model, ranges)
        if any(dtype == "bfloat16" for _, _, dtype in self.feeds):
            raise RunnerUnavailable("the graph takes bfloat16 inputs, which onnxruntime's numpy interface cannot "
                                    "feed; export with --dtype fp16 or fp32 for onnxruntime")
        have = ort.get_available_providers()
        wanted = self.opts.get("providers") or [p for p in PROVIDERS if p in have]
        missing = [p for p in wanted if p not in have]
        if missing:
            raise RunnerUnavailable(f"onnxruntime here has no {missing[0]} (it has {', '.join(have)})")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(self.opts.get("threads") or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ORT threads spin for a while after each run and would slow the next (interleaved) variant
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=list(wanted))
        self.details |= {"providers": self.session.get_providers(), "threads": so.intra_op_num_threads,
                         "graph_dtype": self.spec.dtype}

    def __call__(self, **kwargs) -> torch.Tensor:
        feeds = {k: v.cpu().numpy() for k, v in self._inputs(kwargs).items()}
        out = self.session.run([self.output], feeds)[0]
        return torch.from_numpy(out).to(self.device, self.dtype)


@register_runner
class TensorRTRunner(_GraphRunner):
    """A TensorRT engine run by Polygraphy's `TrtRunner`: `engine` (a .plan, checked for staleness) or built
    from `onnx` / an export on the fly.

    `engine_config` (an `EngineConfig`) controls on-the-fly builds; sparse weights follow the model.
    """

    name = "tensorrt"

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return ("engine", "onnx", "engine_config")

    def available(self) -> tuple[bool, str]:
        from .trt_env import require_cuda_gpu, require_polygraphy_trt, require_tensorrt

        try:
            require_tensorrt()
            require_polygraphy_trt()
            require_cuda_gpu()
        except ObsdiffError as exc:
            return False, str(exc)
        return True, ""

    def prepare(self, model, ranges=None) -> None:
        from .engine_record import check_engine
        from .trt import EngineConfig, build_engine
        from .trt_runtime import TrtEngine

        self._adopt(model)
        plan = self.opts.get("engine")
        if plan is not None:
            record = check_engine(plan)
            sidecar = (record.get("onnx") or {}).get("sidecar")
            if not sidecar:
                raise RunnerUnavailable(f"engine {plan} was built without an export sidecar; the mapping of "
                                        "denoiser arguments to engine inputs is unknown")
            self.opts = {**self.opts, "onnx": Path(sidecar).with_suffix(".onnx")}
            self._graph(model, ranges)
            self.details["engine"] = str(plan)
        else:
            onnx = self._graph(model, ranges)
            self._tmp = getattr(self, "_tmp", None) or Path(tempfile.mkdtemp(prefix="obsdiff-trt-"))
            plan = self._tmp / "denoiser.plan"
            cfg = self.opts.get("engine_config")
            if cfg is None:  # in-memory models have no run record: look at the weights themselves
                sparse = any(holds_nm(m.weight.detach(), (2, 4)) for m in model.denoiser.modules()
                             if isinstance(m, nn.Linear))
                cfg = EngineConfig(sparse_weights=sparse or None)
            record = build_engine(onnx, plan, cfg, force=True)
            self.details["engine"] = "built on the fly"
        self.engine = TrtEngine(plan)
        self.details |= {"tensorrt": record.get("tensorrt"), "builder_flags": record.get("builder_flags"),
                         "sparse_layers_picked": (record.get("sparse") or {}).get("picked_count")}

    def __call__(self, **kwargs) -> torch.Tensor:
        out = self.engine(self._inputs(kwargs))[self.output]
        return out.to(self.device, self.dtype)

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
            self.engine = None
        super().close()


