"""Run a built TensorRT engine on PyTorch CUDA tensors (`execute_async_v3` on the current stream)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .trt import EngineError, require_cuda_gpu, require_tensorrt


class TrtEngine:
    """A deserialized engine with one execution context; call with {input name: CUDA tensor}."""

    _TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}

    def __init__(self, plan: str | Path):
        import torch

        trt = require_tensorrt()
        require_cuda_gpu()
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load engine {plan}; check it with check_engine() and rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {}
        for n in names:
            kind = self.engine.get_tensor_dtype(n).name
            if kind not in self._TORCH:
                raise EngineError(f"engine tensor {n} has type {kind}, which obsdiff cannot feed from PyTorch")
            self.dtypes[n] = getattr(torch, self._TORCH[kind])

    def __call__(self, feeds: Mapping[str, object]) -> dict:
        torch = self.torch
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise EngineError(f"engine input {missing[0]} was not given")
        keep = []
        for name in self.inputs:
            t = feeds[name].to(device="cuda", dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError("TensorRT execution failed; run with -vv for TensorRT's messages")
        return outs
