"""Checks of QDQ graphs (`qdq.quantize_graph`): N:M patterns on the weight codes, how onnxruntime must run them,
and the parity bound a quantized graph is held to.

Parity bound (`parity_bound`). The graph and the torch module (`QuantLinear`, fake quantization on) compute the
same quantizers with the same scales and the same weight codes; they differ by float arithmetic (summation order,
kernels), which the unquantized check allows as `tol` = `checks.TOLERANCES[dtype]` relative to max |ref|. An
activation quantizer turns such a tiny difference into a whole code step when its input lies within it of a
rounding boundary: that element then differs by exactly one step. Take the two inputs of a quantizer to agree to
one rounding in the exported precision, u = 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16) relative (unquantized fp32
graphs agree to ~1e-7). For a quantizer with scale s in a format whose values are at most `r` of their own steps
(int8: r 127; fp8 E4M3: r 16, three mantissa bits) and whose largest step is `m` codes (int8: 1; E4M3: 32, the
spacing in [256, 448]):

- an element lies within u |x| of a rounding boundary with probability <= 2 r u, so a row of d inputs is taken
  to have k = min(d, max(1, ceil(2 d r u))) flips, the expected count rounded up (fp32: one; fp16: 4 for
  d = 32; bf16: about every element);
- one flipped input i moves every output j of its row by m s |W_ji| <= m s max|W|: the input quantizer moves the
  layer's output by at most k m s_in max|W|;
- one flipped output element moves by m s_out (flips of other elements do not add up in one element);
- each layer's perturbation reaches the model output with unit gain (residual stream; the layer norms see hidden
  states of order one): an assumption, not a proof.

The bound is `tol * max|ref| + sum over layers (k m s_in max|W| + m s_out)`; layers without activation
quantizers (w4a16, w8a16) add nothing, nor do output quantizers an export leaves out (`--no-output-quant`: its
torch reference leaves them out too, `qdq.output_quantizers`). It is a worst case for the flips (every flip at
the top step, all of one sign) but not for the gain: a layer feeding adaLN modulations can amplify. It is loose
for fp8 and for half precision, where it only catches gross errors. A wrong scale moves a whole layer output by
a fraction of its magnitude, far beyond one step per row.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from obsdiff.solver.obs import holds_nm
from obsdiff.solver.qlinear import QuantLinear, quantized_layers

from . import graph as G
from .qdq import gemm_weights

GEMM_WEIGHT_OPS = ("Cast", "Identity", "Transpose", "DequantizeLinear")
# per format: codes below the largest value in steps (r), largest step in codes (m); see the module docstring
STEPS = {"int8": (127, 1), "int4": (7, 1), "fp8": (16, 32)}
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
ORT_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)",
             6: "tensor(int32)", 9: "tensor(bool)"}


def code_types() -> set[int]:
    onnx = G.require("onnx")
    T = onnx.TensorProto
    return {T.INT8, T.UINT8, T.INT4, T.UINT4, T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ}


def is_codes(tensor) -> bool:
    """Whether an initializer holds quantized codes (integer or float8) rather than float weights."""
    return tensor.data_type in code_types()


def graph_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """What the graph stores for a linear's weight, in torch layout: the codes of a `QuantLinear` (as float32,
    exact), the weight of any other linear."""
    if isinstance(linear, QuantLinear):
        return linear.weight_codes().float()
    return linear.weight.detach()


def code_weights(model) -> list:
    """Every code initializer a MatMul/Gemm reads through a DequantizeLinear, with the axis its GEMM reduces
    over (where an N:M pattern runs): [namespace(name, axis)]. Polygraphy's walk finds them but skips
    non-float types; this is the same walk for the codes."""
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for name, out_in, _ in gemm_weights(model, GEMM_WEIGHT_OPS).values():
        if is_codes(inits[name]) and len(inits[name].dims) == 2:
            found[name] = SimpleNamespace(name=name, axis=1 if out_in else 0)
    return list(found.values())


def add_layer_patterns(record: dict, model, base_dir, prefix: str, mods: dict, names, nm) -> None:
    """Add to a `check_pruned_weights` record, per quantized layer, the codes' type and whether their N:M
    pattern holds (read from the graph, one tensor at a time)."""
    layers = [n for n in names if isinstance(mods.get(n), QuantLinear)]
    if not layers:
        return
    refs = G.linear_weights(model, prefix)
    by_name = {t.name: t for t in model.graph.initializer}
    per_layer = {}
    for name in layers:
        ref = refs.get(name)
        if ref is None or not is_codes(by_name[ref.initializer]):
            per_layer[name] = {"codes": None, "holds": False}
            continue
        arr = G.read_initializer(by_name[ref.initializer], base_dir).astype(np.float32)
        arr = arr if ref.out_in else arr.T
        per_layer[name] = {"codes": G.elem_type_name(by_name[ref.initializer].data_type),
                           "pattern": f"{nm[0]}:{nm[1]}" if nm else None,
                           "holds": holds_nm(arr, nm) if nm else None, "zero_fraction": float((arr == 0).mean())}
    record["quantized"] = {"values": "weight codes behind DequantizeLinear", "layers": per_layer}


# ----------------------------------------------------------------------------------------------- parity


def quantized_session_options(opts, model) -> str:
    """Set onnxruntime options for a graph with QDQ; returns a note for the parity record ("" without QDQ).

    Graphs with QuantizeLinear run at ORT_ENABLE_BASIC: ORT_ENABLE_ALL fuses INT8 QDQ into a u8s8 kernel that
    saturates on CPUs without VNNI (14 % error). Blocked INT4 weights become MatMulNBits: in fp32 arithmetic
    (accuracy level 1), not with the int8 activations of its default level."""
    ort = G.require("onnxruntime")
    ops = {n.op_type for n in model.graph.node}
    if "DequantizeLinear" not in ops:
        return ""
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if "QuantizeLinear" in ops:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return " (QDQ graph: ORT_ENABLE_BASIC, no fused integer kernels)"
    return " (QDQ weights: MatMulNBits in fp32)"


class _Reference:
    """`onnx.reference.ReferenceEvaluator` with the few onnxruntime session methods `check_parity` calls."""

    def __init__(self, path):
        from onnx.reference import ReferenceEvaluator

        onnx = G.require("onnx")
        model = onnx.load(str(path))
        self._inputs = [SimpleNamespace(name=i.name, type=ORT_TYPES.get(i.type.tensor_type.elem_type, "tensor(float)"))
                        for i in model.graph.input]
        self._outputs = [SimpleNamespace(name=o.name) for o in model.graph.output]
        self._evaluator = ReferenceEvaluator(model)

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def run(self, names, feed):
        return self._evaluator.run(names, feed)


def reference_session(path, native_error: str | None):
    """A session on `path` for graphs with QDQ ops onnxruntime has no kernel for (ReferenceEvaluator is slow:
    small graphs only), with its mode; re-raises onnxruntime's error for other graphs."""
    onnx = G.require("onnx")
    head = onnx.load(str(path), load_external_data=False)
    if not any(n.op_type == "DequantizeLinear" for n in head.graph.node):
        raise RuntimeError(native_error)
    return _Reference(path), f"onnx.reference.ReferenceEvaluator (onnxruntime: {native_error})"


def _flips(d: int, r: int, u: float) -> int:
    return min(d, max(1, math.ceil(2 * d * r * u)))


def parity_bound(module, dtype: str, tolerance: float, output_quant: bool = True) -> dict | None:
    """The absolute slack quantizer rounding flips may add to a parity check of `module`'s QDQ graph, derived in
    the module docstring, with the terms it sums (None: no quantized layer). `output_quant` False: neither the
    graph nor its reference has output quantizers (`ExportConfig.output_quant`)."""
    layers = quantized_layers(module) if module is not None else {}
    if not layers:
        return None
    terms = {}
    for name, layer in layers.items():
        act = layer.scheme.activations
        if act is None:
            continue
        r, m = STEPS[act.name]
        w_max = float(layer.weight.detach().abs().max())
        k = _flips(layer.in_features, r, UNIT_ROUNDOFF[dtype])
        term_in = k * m * float(layer.input_scale) * w_max if layer.input_scale is not None else 0.0
        term_out = m * float(layer.output_scale) if layer.output_scale is not None and output_quant else 0.0
        terms[name] = {"flips_per_row": k, "input": term_in, "output": term_out}
    total = sum(t["input"] + t["output"] for t in terms.values())
    largest = dict(sorted(terms.items(), key=lambda kv: -(kv[1]["input"] + kv[1]["output"]))[:5])
    return {"quantization_abs": total, "tolerance_rel": tolerance, "unit_roundoff": UNIT_ROUNDOFF[dtype],
            "layers_with_activation_quantizers": len(terms),
            "largest_terms": largest,
            "output_quantizers_in_graph": output_quant,
            "derivation": "tol * max|ref| + sum over layers of (k m s_in max|W| + m s_out): k rounding flips per "
                          "row at an input quantizer, each one step m s; one step at an output quantizer; unit "
                          "gain to the output (obsdiff.export.qdq_checks)"}
