"""Quantization inside the prune (docs/method.md#quantization): one unit's linears pruned and quantized with the
Hessian and the activation ranges of the same calibration pass.

Per unit (the linears that read one input): SmoothQuant factors `s` from the input's channel maxima and the
unit's weights (one `s` per input, so the linears keep sharing it), the Hessian of the smoothed input
`S^-1 H S^-1` (exact: no second pass), and the input's per-tensor scale. Per linear: weight scales fixed before
the sweep, then joint OBS (mask and quantize each column in one sweep) or the method's own prune followed by
round-to-nearest; the result is installed as a `QuantLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from obsdiff.calibration.ranges import ActivationRanges
from obsdiff.config import PruneConfig
from obsdiff.errors import ConfigError
from obsdiff.pruning.records import Unit
from obsdiff.solver import obs
from obsdiff.solver.qlinear import quantize_linear_
from obsdiff.solver.quant import ScaleRule, activation_scale, rtn, smooth_factors, weight_scales


def output_quant(cfg: PruneConfig) -> bool:
    """Whether quantized layers get output quantizers: "auto" puts them on N:M + INT8 layers, where they decide
    whether TensorRT runs the GEMM on sparse INT8 tensor cores."""
    q = cfg.quant
    act = q.spec.activations if q is not None else None
    if act is None or q.output_quant == "off":
        return False
    return q.output_quant == "on" or (cfg.nm is not None and act.name == "int8")


def range_requests(units: list[Unit], cfg: PruneConfig) -> dict[str, list[str]] | None:
    """What calibration must record besides the Hessians: hooked linear -> linears whose outputs it ranges."""
    q = cfg.quant
    if q is None or q.spec.activations is None:
        return None
    outputs = output_quant(cfg)
    return {unit[0]: list(unit) if outputs else [] for unit in units}


def check_widths(unit: Unit, modules: dict[str, nn.Module], cfg: PruneConfig) -> None:
    """Refuse a group size that does not divide a layer's input width (before any calibration)."""
    g = cfg.quant.spec.group_size if cfg.quant is not None else None
    d_in = modules[unit[0]].in_features
    if g is not None and d_in % g:
        raise ConfigError(f"layer {unit[0]}: --quant-group-size {g} does not divide its input width {d_in}; "
                          "use a divisor such as 64 or 32")


def layer_spec(lin: nn.Linear, cfg: PruneConfig) -> dict:
    """The `QuantLinear.quant_spec()` every linear of this prune gets, known before its solve (from the settings)."""
    q = cfg.quant
    spec = q.spec
    return {"scheme": spec.name, "group_size": spec.group_size, "smooth": q.smoothquant is not None,
            "input": spec.activations is not None, "output": output_quant(cfg)}


@dataclass
class UnitQuant:
    """What a unit's linears share: the smoothing factors, the (smoothed) Hessian, the input range."""

    H: torch.Tensor | None
    smooth: torch.Tensor | None  # s (d_in,) in the compute dtype; None without SmoothQuant
    input_range: float | None
    ranges: ActivationRanges | None


def prepare_unit(weights: list[torch.Tensor], H: torch.Tensor | None, ranges: ActivationRanges | None,
                 cfg: PruneConfig) -> UnitQuant:
    q = cfg.quant
    smooth = None
    if q.smoothquant is not None:
        w_amax = torch.stack([w.detach().abs().amax(0).float().cpu() for w in weights]).amax(0)
        smooth = smooth_factors(ranges.channel_amax(), w_amax, q.smoothquant)
        if H is not None:
            inv = (1.0 / smooth).to(H.device, H.dtype)
            H = H * inv[:, None] * inv[None, :]  # the Hessian of X / s, exactly
    input_range = None
    if q.spec.activations is not None:
        input_range = ranges.input_range(q.act_steps, q.act_percentile, smooth)
    return UnitQuant(H, smooth, input_range, ranges)


def solve_layer(W: torch.Tensor, prep: UnitQuant, cfg: PruneConfig
                ) -> tuple[torch.Tensor, torch.Tensor, float | None, torch.Tensor]:
    """(quantized weight, weight scales, damping used, the weight it approximates) in the compute dtype. With
    SmoothQuant both weights are `W diag(s)`, so errors against `prep.H` are the layer's own output errors."""
    q, spec = cfg.quant, cfg.quant.spec
    fmt, group = spec.weights, spec.group_size
    dtype = torch.float64 if cfg.compute_dtype == "fp64" else torch.float32
    W = W.detach().to(dtype)
    H = prep.H.to(W.device, dtype) if prep.H is not None else None
    if prep.smooth is not None:
        W = W * prep.smooth.to(W.device, dtype)[None, :]
    sparsity = None if cfg.nm else (0.0 if cfg.sparsity_type == "none" else cfg.sparsity)
    search = q.clip == "search"
    if q.method == "obs":
        res = obs.obs_prune(W, H, sparsity, cfg.nm, cfg.block_size, cfg.percdamp, True, ScaleRule(fmt, group, search))
        return res.weight, res.scale, res.damp, W
    pruned, damp = (W, None) if cfg.sparsity_type == "none" else cfg.method_spec.solve(W, H, sparsity, cfg)
    scale = weight_scales(pruned, fmt, group, search)
    return rtn(pruned, scale.to(pruned.device), fmt), scale, damp, W


def install_(lin: nn.Linear, W_new: torch.Tensor, scale: torch.Tensor, prep: UnitQuant, output_index: int | None,
             cfg: PruneConfig) -> dict:
    """Write the quantized weight into `lin`, make it a `QuantLinear`; returns its record (spec and ranges)."""
    q, act = cfg.quant, cfg.quant.spec.activations
    with torch.no_grad():
        lin.weight.copy_(W_new.to(lin.weight.dtype))
    input_scale = activation_scale(prep.input_range, act) if act is not None else None
    output_range = None
    if output_index is not None and prep.ranges is not None and prep.ranges.outputs:
        output_range = prep.ranges.output_range(output_index, q.act_steps, q.act_percentile)
    output_scale = activation_scale(output_range, act) if output_range is not None else None
    pre = (1.0 / prep.smooth) if prep.smooth is not None else None
    quantize_linear_(lin, cfg.quant.spec, scale, input_scale, output_scale, pre)
    return {**lin.quant_spec(), "method": q.method, "input_range": prep.input_range, "output_range": output_range}
