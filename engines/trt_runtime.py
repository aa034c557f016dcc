"""Run a built TensorRT engine on PyTorch CUDA tensors with Polygraphy's `TrtRunner`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .engine_record import EngineError
from .trt_env import require_cuda_gpu, require_polygraphy_trt, require_tensorrt
from .trt_rules import TRT_DTYPE_NAMES


class TrtEngine:
    """A deserialized engine behind an active `TrtRunner`; call with {input name: tensor} -> {output: CUDA tensor}.

    Inputs are cast to the engine's input types on the GPU first (the export keeps timesteps in fp32 while
    latents may be fp16), so the runner never copies through the host.
    """

    def __init__(self, plan: str | Path):
        import torch

        trt = require_tensorrt()
        require_cuda_gpu()
        poly = require_polygraphy_trt()
        from polygraphy.exception import PolygraphyException

        self.torch = torch
        try:
            engine = poly.engine_from_bytes(Path(plan).read_bytes())
        except PolygraphyException:
            engine = None
        if engine is None:
            raise EngineError(f"TensorRT could not load engine {plan}; check it with check_engine() and rebuild")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {}
        for n in names:
            kind = engine.get_tensor_dtype(n).name
            if kind not in TRT_DTYPE_NAMES:
                raise EngineError(f"engine tensor {n} has type {kind}, which obsdiff cannot feed from PyTorch")
            self.dtypes[n] = getattr(torch, TRT_DTYPE_NAMES[kind])
        self.runner = poly.TrtRunner(engine)
        self.runner.activate()

    def __call__(self, feeds: Mapping[str, object]) -> dict:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise EngineError(f"engine input {missing[0]} was not given")
        feed = {name: feeds[name].to(device="cuda", dtype=self.dtypes[name]).contiguous() for name in self.inputs}
        return dict(self.runner.infer(feed, copy_outputs_to_host=False))

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()
