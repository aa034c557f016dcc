"""Symmetric quantizers: formats, schemes, scales and round-to-nearest. Pure math: tensors in, tensors out.

Every format is symmetric with its zero point at 0, so a pruned weight stays exactly zero after quantization
and every sparsity pattern survives it (docs/method.md#quantization). `fake_quant` is what the deployed graph
computes for a tensor that goes through QuantizeLinear -> DequantizeLinear: `clamp(round(x / s)) * s`, with
round-half-to-even for the integer formats and the float8 cast's own rounding for E4M3, saturating.

Scales: weights get one scale per output row (`group_size` None) or per row and group of `group_size`
consecutive inputs; activations one per tensor. A scale is `amax / qmax`, or with the clipping search
`p * amax / qmax` with the shrink `p` per row/group that minimises `sum |w - q(w)|^2.4` (GPTQ's grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantFormat:
    """A number format a tensor is quantized to."""

    name: str  # "int8", "int4", "fp8"
    qmin: float
    qmax: float  # the largest code: amax maps here
    storage: torch.dtype  # how codes are stored (int4 codes in int8)
    is_float: bool = False

    @property
    def bits(self) -> int:
        return 8 if self.name != "int4" else 4


FORMATS = {
    "int8": QuantFormat("int8", -128, 127, torch.int8),
    "int4": QuantFormat("int4", -8, 7, torch.int8),
    "fp8": QuantFormat("fp8", -448.0, 448.0, torch.float8_e4m3fn, is_float=True),
}


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme by the name users know it from (llm-compressor, Model Optimizer)."""

    name: str
    weights: QuantFormat
    activations: QuantFormat | None  # per tensor, static; None: activations stay in the model dtype
    group_size: int | None = None  # weights: None = one scale per output row; else per row and input group
    description: str = ""


SCHEMES = {s.name: s for s in (
    Scheme("w8a8", FORMATS["int8"], FORMATS["int8"], description="INT8 weights per channel, INT8 activations"),
    Scheme("fp8", FORMATS["fp8"], FORMATS["fp8"], description="FP8 E4M3 weights per channel and activations"),
    Scheme("w4a16", FORMATS["int4"], None, 128, description="INT4 weights in groups of 128 inputs"),
    Scheme("w8a16", FORMATS["int8"], None, description="INT8 weights per channel, activations unquantized"),
)}
STEP_COMBINE = ("max", "mean", "percentile")  # how per-step activation maxima become one range
CLIP_GRID = 20  # shrink factors tried by the clipping search, from 1 down to CLIP_MIN
CLIP_MIN = 0.5
CLIP_NORM = 2.4  # GPTQ's error norm for the search: between MSE and max error
SEARCH_ROWS = 32  # rows per chunk of the clipping search (a chunk of a 6144-wide layer stays in cache)
SCALE_FLOOR = 1e-12  # an all-zero row/tensor gets this scale (its codes are zero anyway)


def round_codes(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """`x / s` (already divided) onto the format's grid, saturating, as float values of the codes."""
    x = x.clamp(fmt.qmin, fmt.qmax)
    if fmt.is_float:
        return x.to(fmt.storage).to(x.dtype)
    return torch.round(x)  # half to even, as QuantizeLinear


def codes(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The stored codes of `x` (float32 math) in the format's storage dtype; `scale` broadcasts against x."""
    return round_codes(x.float() / scale.float(), fmt).to(fmt.storage)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """`dequantize(quantize(x))` in float32, returned in x's dtype; `scale` broadcasts against x."""
    scale = scale.float()
    return (round_codes(x.float() / scale, fmt) * scale).to(x.dtype)


def expand_groups(scale: torch.Tensor, d_in: int) -> torch.Tensor:
    """Per-row (d_out, 1) or per-group (d_out, d_in / g) weight scales as a (d_out, d_in) or broadcastable tensor."""
    if scale.shape[1] in (1, d_in):
        return scale
    return scale.repeat_interleave(d_in // scale.shape[1], dim=1)


def _grouped_amax(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    d_out, d_in = W.shape
    if group_size is None:
        return W.abs().amax(1, keepdim=True)
    return W.abs().reshape(d_out, d_in // group_size, group_size).amax(2)


def weight_scales(W: torch.Tensor, fmt: QuantFormat, group_size: int | None = None, search: bool = False
                  ) -> torch.Tensor:
    """Scales of W (d_out, d_in): (d_out, 1) per row, or (d_out, d_in / group_size), float32.

    `search`: per row/group, the shrink of the absmax scale (grid of `CLIP_GRID` from 1 to `CLIP_MIN`) with the
    smallest `sum |w - q(w)|^CLIP_NORM`; clipping a few outliers buys a finer step for all other weights.
    """
    W = W.float()
    d_out, d_in = W.shape
    if group_size is not None and d_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {d_in}")
    amax = _grouped_amax(W, group_size).clamp_min(SCALE_FLOOR)
    base = amax / fmt.qmax
    if not search:
        return base
    G = W.reshape(d_out, -1, group_size or d_in)  # (rows, groups, members)
    best = base.clone()
    # a few rows at a time, with one scratch buffer: every shrink of the grid then reads them from cache
    for r0 in range(0, d_out, SEARCH_ROWS):
        g, b = G[r0:r0 + SEARCH_ROWS], base[r0:r0 + SEARCH_ROWS, :, None]
        scratch, best_err = torch.empty_like(g), torch.full(b.shape[:2], math.inf, device=W.device)
        for k in range(CLIP_GRID):
            s = b * (1.0 - (1.0 - CLIP_MIN) * k / (CLIP_GRID - 1))
            torch.div(g, s, out=scratch).clamp_(fmt.qmin, fmt.qmax)
            if fmt.is_float:
                scratch.copy_(scratch.to(fmt.storage))
            else:
                scratch.round_()
            err = scratch.mul_(s).sub_(g).abs_().pow_(CLIP_NORM).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0:r0 + SEARCH_ROWS] = torch.where(better, s[..., 0], best[r0:r0 + SEARCH_ROWS])
    return best


@dataclass(frozen=True)
class WeightQuantizer:
    """Fixed weight scales (`weight_scales`) for quantizing a layer one input column at a time (joint OBS)."""

    scale: torch.Tensor  # (d_out, 1) or (d_out, d_in / group_size)
    fmt: QuantFormat
    group_size: int | None = None

    def to(self, dtype: torch.dtype, device: torch.device | None = None) -> WeightQuantizer:
        return WeightQuantizer(self.scale.to(device or self.scale.device, dtype), self.fmt, self.group_size)

    def column_(self, w: torch.Tensor, j: int, out: torch.Tensor) -> torch.Tensor:
        """Column j (d_out,) of the weight, quantized into `out` (w's dtype; the scale must be in that dtype).

        Few kernels per column (the sweep calls this d_in times): codes = w / s on the grid, times s."""
        s = self.scale[:, 0 if self.group_size is None else j // self.group_size]
        torch.div(w, s, out=out).clamp_(self.fmt.qmin, self.fmt.qmax)
        if self.fmt.is_float:
            out.copy_(out.to(self.fmt.storage))
        else:
            out.round_()
        return out.mul_(s)


@dataclass(frozen=True)
class ScaleRule:
    """How a layer's weight scales are chosen; called on the weights to quantize, gives their quantizer."""

    fmt: QuantFormat
    group_size: int | None = None
    search: bool = True

    def __call__(self, W: torch.Tensor) -> WeightQuantizer:
        return WeightQuantizer(weight_scales(W, self.fmt, self.group_size, self.search), self.fmt, self.group_size)


def rtn(W: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round to nearest: every weight of W (d_out, d_in) quantized alone with `scale` (`weight_scales`)."""
    return fake_quant(W, expand_groups(scale, W.shape[1]), fmt)


def activation_scale(amax: float, fmt: QuantFormat) -> float:
    """The per-tensor scale of an activation whose range is `amax`."""
    return max(float(amax), SCALE_FLOOR) / fmt.qmax


def combine_steps(step_maxima: torch.Tensor, how: str = "max", percentile: float = 99.0) -> float:
    """One range from per-denoising-step maxima (steps,): their max, their mean, or a percentile over steps
    (Model Optimizer's diffusion calibration offers the same three)."""
    if how == "max":
        return float(step_maxima.max())
    if how == "mean":
        return float(step_maxima.float().mean())
    if how == "percentile":
        return float(torch.quantile(step_maxima.double(), percentile / 100.0))
    raise ValueError(f"unknown step combination {how!r}; choose one of {', '.join(STEP_COMBINE)}")


def smooth_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors `s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)` (d_in,).

    The layer computes `(X / s) (W s)^T`: activation outliers move into the weights. Channels that are dead in
    either tensor keep s = 1.
    """
    a, w = act_amax.double(), weight_amax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).float()
