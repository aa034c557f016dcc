"""`QuantLinear`: a linear that computes what its deployed QDQ graph computes (fake quantization).

    x -> [x * pre_quant_scale] -> [Q/DQ with input_scale] -> x W^T + b -> [Q/DQ with output_scale] -> y

`weight` holds the dequantized weight (`codes * weight_scale`, in the model dtype), so everything that reads a
linear's weight (evaluation, N:M checks, the ONNX exporter) sees the deployed values. The buffers hold the
scales, in float32: `weight_scale` (d_out, 1) per row or (d_out, d_in / g) per group, `input_scale` and
`output_scale` () per tensor, `pre_quant_scale` (d_in,) SmoothQuant's `1 / s`. A buffer the layer does not use
is absent from its state dict. `quant_spec()` is the layer's entry in a run record; `quantize_linear_` with the
same spec rebuilds the layer (with placeholder buffers for `load_state_dict` to fill).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from obsdiff.solver.quant import SCHEMES, Scheme, codes, expand_groups, fake_quant

BUFFERS = ("weight_scale", "input_scale", "output_scale", "pre_quant_scale")


class QuantLinear(nn.Linear):
    """See the module docstring; made from an `nn.Linear` in place by `quantize_linear_`."""

    scheme: Scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.scheme.activations
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.input_scale is not None:
            x = fake_quant(x, self.input_scale, act)
        y = F.linear(x, self.weight, self.bias)
        if self.output_scale is not None:
            y = fake_quant(y, self.output_scale, act)
        return y

    def _apply(self, fn, recurse: bool = True):
        # a cast of the model (`.to(torch.float16)`) moves the scales but keeps them float32: they are the deployed
        # graph's constants, and rounded ones would change every dequantized value
        scales = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            after = self._buffers[name]
            self._buffers[name] = after.float() if before.is_meta else before.to(after.device)
        return self

    def weight_codes(self) -> torch.Tensor:
        """The stored weight codes (d_out, d_in) in the format's storage dtype (int4 codes in int8)."""
        return codes(self.weight, expand_groups(self.weight_scale, self.in_features), self.scheme.weights)

    def quant_spec(self) -> dict:
        """What a run records to rebuild this layer: the scheme and which optional scales it has."""
        return {"scheme": self.scheme.name, "group_size": self.scheme.group_size,
                "smooth": self.pre_quant_scale is not None, "input": self.input_scale is not None,
                "output": self.output_scale is not None}

    @property
    def scheme_group_size(self) -> int | None:
        """Inputs per weight scale as stored: None when one scale covers the row (also a single group)."""
        groups = self.weight_scale.shape[1]
        return None if groups == 1 else self.in_features // groups

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}"


def scheme_for(name: str, group_size: int | None = None) -> Scheme:
    """The scheme `name` with its group size overridden (weights in groups) where given."""
    base = SCHEMES[name]
    if group_size is None or group_size == base.group_size:
        return base
    return Scheme(base.name, base.weights, base.activations, group_size, base.description)


def quantize_linear_(lin: nn.Linear, scheme: Scheme, weight_scale: torch.Tensor,
                     input_scale: float | torch.Tensor | None = None, output_scale: float | torch.Tensor | None = None,
                     pre_quant_scale: torch.Tensor | None = None) -> QuantLinear:
    """Make `lin` a `QuantLinear` in place and return it. Its weight must already hold quantized values.

    In place (the object keeps its identity) because hooks, a prune's module table and distributed solves hold
    references to the linear. Scales are stored in float32 on the weight's device.
    """
    device = lin.weight.device

    def buf(value):
        if value is None:
            return None
        return torch.as_tensor(value, dtype=torch.float32).to(device).clone()

    lin.__class__ = QuantLinear
    lin.scheme = scheme
    lin.register_buffer("weight_scale", buf(weight_scale))
    lin.register_buffer("input_scale", buf(input_scale))
    lin.register_buffer("output_scale", buf(output_scale))
    lin.register_buffer("pre_quant_scale", buf(pre_quant_scale))
    return lin


def placeholder_(lin: nn.Linear, spec: dict) -> QuantLinear:
    """`quantize_linear_` with empty buffers shaped by a run record's `spec`, for `load_state_dict` to fill."""
    scheme = scheme_for(spec["scheme"], spec.get("group_size"))
    device = lin.weight.device
    groups = 1 if scheme.group_size is None else lin.in_features // scheme.group_size
    scalar = torch.empty((), device=device)
    return quantize_linear_(lin, scheme, torch.empty(lin.out_features, groups, device=device),
                            scalar if spec.get("input") else None, scalar if spec.get("output") else None,
                            torch.empty(lin.in_features, device=device) if spec.get("smooth") else None)


def dequantize_(lin: QuantLinear) -> nn.Linear:
    """Back to a plain `nn.Linear` holding the dequantized weight, in place; activation quantizers are dropped,
    SmoothQuant's input scale is folded into the weight (`W diag(1 / s)` on unscaled inputs)."""
    with torch.no_grad():
        if lin.pre_quant_scale is not None:
            lin.weight.mul_(lin.pre_quant_scale.to(lin.weight.dtype)[None, :])
    for name in BUFFERS:
        delattr(lin, name)
    del lin.scheme
    lin.__class__ = nn.Linear
    return lin


def quantized_layers(module: nn.Module) -> dict[str, QuantLinear]:
    """Every `QuantLinear` inside `module`, by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}
