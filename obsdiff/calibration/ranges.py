"""Activation ranges for static quantization, collected by the Hessian hooks in the calibration pass that
already runs (docs/method.md#activation-ranges): no extra pipeline pass.

Per denoising step, the largest |x| of every input channel of a hooked linear (SmoothQuant needs channels; the
per-tensor range of the smoothed input is derived from them), and optionally the largest |y| of the outputs of
the linears that read that input (INT8 output quantizers). Outputs are those of the weights at calibration
time, i.e. before this group is pruned: the pruned layer's output range is taken to be the dense one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from obsdiff.solver.quant import combine_steps


class ActivationRanges:
    """Per-step maxima of one input tensor (by channel) and of the outputs of `outputs` (per tensor)."""

    def __init__(self, outputs: list[nn.Linear] | None = None):
        self.outputs = list(outputs or [])
        self.channels: dict[int, torch.Tensor] = {}  # step -> (d_in,) float32, on the input's device
        self.output_max: list[dict[int, torch.Tensor]] = [{} for _ in self.outputs]

    def add(self, x: torch.Tensor, step: int) -> None:
        """Take one call's input (..., d_in) at denoising step `step` (no host sync: maxima stay on device)."""
        with torch.no_grad():
            a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
            prev = self.channels.get(step)
            self.channels[step] = a if prev is None else torch.maximum(prev, a)
            for lin, maxima in zip(self.outputs, self.output_max, strict=True):
                y = F.linear(x, lin.weight, lin.bias).abs().amax().float()
                maxima[step] = y if step not in maxima else torch.maximum(maxima[step], y)

    @property
    def steps(self) -> list[int]:
        return sorted(self.channels)

    def channel_amax(self) -> torch.Tensor:
        """max |x_j| over every call (d_in,), float32 on the CPU."""
        return torch.stack([self.channels[k] for k in self.steps]).amax(0).cpu()

    def input_range(self, how: str = "max", percentile: float = 99.0, smooth: torch.Tensor | None = None) -> float:
        """The input's per-tensor range: per step the largest |x_j / s_j| (s: SmoothQuant factors, or 1), then
        the steps combined (`quant.combine_steps`)."""
        per_step = torch.stack([self.channels[k].cpu() for k in self.steps])
        if smooth is not None:
            per_step = per_step / smooth.float()[None, :]
        return combine_steps(per_step.amax(1), how, percentile)

    def output_range(self, index: int, how: str = "max", percentile: float = 99.0) -> float:
        """The per-tensor range of the output of `outputs[index]`."""
        maxima = self.output_max[index]
        return combine_steps(torch.stack([maxima[k].cpu() for k in sorted(maxima)]), how, percentile)
