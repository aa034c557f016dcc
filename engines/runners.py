"""One interface over every way to run a denoiser: PyTorch eager, torch.compile, 2:4 sparse tensor cores,
onnxruntime and TensorRT.

    runner = make_runner("onnxruntime", onnx="runs/x/onnx")
    ok, why = runner.available()          # cheap: libraries and devices, nothing loaded
    runner.prepare(loaded_model, ranges)  # may export / build / convert; raises RunnerUnavailable
    latent = runner(**denoiser_kwargs)    # the denoiser's output tensor, on the model's device and dtype

`denoiser_kwargs` are the keyword arguments of the diffusers denoiser's forward (what
`family.example_inputs` makes and what pipelines pass); graph backends map them to graph inputs through
the export sidecar (`inputs[i].feeds`). `RunnerModule` puts a runner in a pipeline in the denoiser's place.
"""

from __future__ import annotations

import copy
import logging
import shutil

import torch
from torch import nn

from obsdiff.errors import ConfigError, first_line
from obsdiff.solver.obs import holds_nm

from . import graph_runners  # noqa: F401 (registers onnxruntime and tensorrt)
from .runner_base import RUNNERS, Runner, RunnerUnavailable, register_runner

log = logging.getLogger(__name__)

def make_runner(name: str, **options) -> Runner:
    """A runner by backend name; `options` go to its constructor (e.g. onnx=DIR, providers=[...])."""
    try:
        cls = RUNNERS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(RUNNERS)}") from None
    return cls(**options)


def _call_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "return_dict"}


# ---------------------------------------------------------------------------------------------- PyTorch


@register_runner
class TorchRunner(Runner):
    """PyTorch eager: the model as loaded (the reference every other backend is compared with)."""

    name = "torch"

    def prepare(self, model, ranges=None) -> None:
        self._adopt(model)
        self.module = model.denoiser.eval()

    def __call__(self, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(**_call_kwargs(kwargs), return_dict=False)[0]


def compiler_available(device_type: str) -> tuple[bool, str]:
    """torch.compile's default backend needs a C++ compiler on CPU and Triton on CUDA."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "torch.compile on CUDA needs triton, which is not installed (pip install triton)"
        return True, ""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cc", "gcc")):
        return False, "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH"
    return True, ""


@register_runner
class CompileRunner(Runner):
    """`torch.compile` (inductor); on CUDA with CUDA graphs (mode reduce-overhead) unless `cuda_graphs=False`."""

    name = "torch-compile"
    min_warmup = 3  # compile, then CUDA graph warm-up and capture

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return ("cuda_graphs", "mode", "backend", "dynamic")

    def available(self) -> tuple[bool, str]:
        if not hasattr(torch, "compile"):
            return False, f"torch {torch.__version__} has no torch.compile"
        if self.opts.get("backend", "inductor") != "inductor":
            return True, ""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return compiler_available(device)

    def prepare(self, model, ranges=None) -> None:
        self._adopt(model)
        if self.opts.get("backend", "inductor") == "inductor":
            ok, why = compiler_available(self.device.type)
            if not ok:
                raise RunnerUnavailable(why)
        wanted = self.opts.get("cuda_graphs")
        self.cuda_graphs = self.device.type == "cuda" and wanted is not False
        mode = self.opts.get("mode") or ("reduce-overhead" if self.cuda_graphs else None)
        self.module = torch.compile(model.denoiser.eval(), mode=mode, backend=self.opts.get("backend", "inductor"),
                                    dynamic=self.opts.get("dynamic", False))
        self.details = {"mode": mode or "default", "backend": self.opts.get("backend", "inductor"),
                        "cuda_graphs": self.cuda_graphs}
        if wanted and not self.cuda_graphs:
            self.details["note"] = "CUDA graphs need a CUDA model; compiled without them"

    def __call__(self, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.module(**_call_kwargs(kwargs), return_dict=False)[0]
        # CUDA graph outputs live in a buffer the next replay overwrites
        return out.clone() if self.cuda_graphs else out


@register_runner
class Sparse24Runner(Runner):
    """PyTorch with the 2:4 linears' weights as `torch.sparse.to_sparse_semi_structured` tensors.

    Runs on sparse tensor cores (cuSPARSELt or CUTLASS) of Ampere and newer GPUs, fp16/bf16 models. Works on a
    copy of the denoiser; linears whose weights are not 2:4 (adaLN, embedders) stay dense.
    """

    name = "torch-sparse24"

    def available(self) -> tuple[bool, str]:
        from obsdiff.info import sparse_tensor_cores

        ok, why = sparse_tensor_cores()
        return ok, "" if ok else f"2:4 sparse tensor cores are not reachable: {why}"

    def prepare(self, model, ranges=None) -> None:
        self._adopt(model)
        if self.device.type != "cuda":
            raise RunnerUnavailable(f"the model is on {self.device.type}; 2:4 sparse kernels run on CUDA "
                                    "(load it with --device cuda)")
        from torch.sparse import to_sparse_semi_structured

        module = copy.deepcopy(model.denoiser).eval()
        linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        eligible = [(n, m) for n, m in linears if holds_nm(m.weight.detach(), (2, 4))]
        if not eligible:
            raise RunnerUnavailable("no linear of this model has 2:4 weights: nothing for sparse tensor cores")
        failed = {}
        for name, lin in eligible:
            try:
                lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
            except Exception as exc:  # shape or dtype limits of the sparse kernels
                failed[name] = first_line(exc)
        converted = len(eligible) - len(failed)
        if not converted:
            first = next(iter(failed.items()))
            raise RunnerUnavailable(f"no 2:4 linear could be converted ({first[0]}: {first[1]})")
        self.module = module
        force_cutlass = getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", None)
        self.details = {"linears": len(linears), "eligible": len(eligible), "converted": converted,
                        "failed": dict(list(failed.items())[:5]),
                        "kernels": "CUTLASS" if force_cutlass else "cuSPARSELt (CUTLASS fallback)"}

    def __call__(self, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(**_call_kwargs(kwargs), return_dict=False)[0]


# ------------------------------------------------------------------------------------------- pipelines


class RunnerModule(nn.Module):
    """Stands in for a pipeline's denoiser: same config, dtype and device; the forward calls the runner.

    `on_call(seconds)` (optional) is told how long each call took, with the runner synchronised.
    """

    def __init__(self, runner: Runner, original: nn.Module, clock=None):
        super().__init__()
        self.runner = runner
        self.config = original.config
        self._dtype, self._device = original.dtype, original.device
        self.clock = clock

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if args:
            raise ConfigError("the denoiser stand-in takes keyword arguments only")
        out = self.clock(self.runner, kwargs) if self.clock is not None else self.runner(**kwargs)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)
