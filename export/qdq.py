"""Quantized denoisers as standard QDQ ONNX graphs: each `QuantLinear` as QuantizeLinear/DequantizeLinear ops.

The exporter traces every `QuantLinear` as the plain linear of its dequantized weight (`plain_linears`: no
fake-quant arithmetic in the trace), then `quantize_graph` rewrites each such GEMM into what TensorRT's ONNX
parser reads in strongly typed mode (and what Model Optimizer writes for INT8):

    x -> [Mul pre_quant_scale] -> [QuantizeLinear -> DequantizeLinear] -> MatMul/Gemm -> [+ bias]
                                     input_scale, per tensor               |   -> [QuantizeLinear -> DequantizeLinear]
                      DequantizeLinear(codes, weight_scale) --------------'           output_scale, per tensor

The float weight initializer becomes its codes (`QuantLinear.weight_codes`, in the initializer's layout: torch's
(d_out, d_in) for Gemm transB=1, (d_in, d_out) for MatMul) behind a DequantizeLinear whose output keeps the
initializer's name, so every consumer is untouched. Weight scales are per output channel (`axis` = the d_out
axis) or, for grouped schemes (w4a16), blocked along the input axis (`block_size` = group size, opset 21);
codes are INT8, INT4 (opset 21) or FLOAT8E4M3FN (opset 19). Scales are in the float type the weight had in the
graph (fp32, fp16 or bf16): a DequantizeLinear's output type is its scale's type. Activation quantizers carry an
explicit zero point (0 of type INT8 or FLOAT8E4M3FN): it fixes QuantizeLinear's output type. Output quantizers
sit after the bias Add when the bias is a separate Add: INT8 in and INT8 out is what lets TensorRT pick sparse
INT8 GEMM tactics.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from obsdiff.errors import ConfigError, ObsdiffError
from obsdiff.solver.qlinear import QuantLinear, quantized_layers

from . import graph as G

GEMMS = ("MatMul", "Gemm")
FOLLOWED = ("Cast", "Identity", "Transpose")  # ops between a weight initializer and its GEMM
EMBED_LIMIT = 1024  # initializers up to this many bytes stay in the .onnx file


class QDQError(ObsdiffError):
    """A quantized layer could not be written as QDQ."""


def format_opset(layer: QuantLinear) -> tuple[int, str]:
    """The lowest opset whose QuantizeLinear/DequantizeLinear take this layer's formats, and why."""
    if layer.scheme.weights.name == "int4" or layer.scheme_group_size is not None:
        return 21, "INT4 and blocked (per-group) DequantizeLinear need opset 21"
    if layer.scheme.weights.is_float or (layer.scheme.activations and layer.scheme.activations.is_float):
        return 19, "FLOAT8E4M3FN QuantizeLinear/DequantizeLinear need opset 19"
    return 13, "per-channel INT8 DequantizeLinear needs opset 13"


def required_opset(module: nn.Module | None) -> tuple[int, str] | None:
    """The lowest opset the quantized layers of `module` need (None: it has none), and why."""
    layers = quantized_layers(module) if module is not None else {}
    return max((format_opset(layer) for layer in layers.values()), default=None)


def check_opset(opset: int, module: nn.Module) -> None:
    """Refuse, in one line, an opset too low for the quantized layers of `module`."""
    need = required_opset(module)
    if need is not None and opset < need[0]:
        raise ConfigError(f"--opset {opset} cannot write this quantized model: {need[1]}; pass --opset {need[0]} "
                          "or leave --opset out (auto)")


@contextlib.contextmanager
def plain_linears(module: nn.Module):
    """Every `QuantLinear` inside `module` computes a plain linear on its dequantized weight while this lasts (its
    class is `nn.Linear`), so exporters trace one MatMul/Gemm per layer for `quantize_graph` to rewrite. The
    classes are restored on the way out, also when the export fails."""
    layers = list(quantized_layers(module).values())
    for layer in layers:
        layer.__class__ = nn.Linear
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = QuantLinear


@contextlib.contextmanager
def output_quantizers(module: nn.Module, keep: bool = True):
    """Without `keep`, the quantized layers of `module` skip their output quantizers while this lasts: the torch
    model a graph exported with `output_quant=False` computes, so that its parity check compares like with like."""
    layers = [layer for layer in quantized_layers(module).values() if layer.output_scale is not None]
    saved = [layer.output_scale for layer in layers] if not keep else []
    for layer in layers if not keep else []:
        layer.output_scale = None
    try:
        yield
    finally:
        for layer, scale in zip(layers if not keep else [], saved, strict=True):
            layer.output_scale = scale


# ------------------------------------------------------------------------------------------- tensors


_TORCH = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}


def _raw_tensor(name: str, t: torch.Tensor, elem_type: int, dims=None):
    """A TensorProto holding `t`'s bytes as they are (little-endian), typed `elem_type`."""
    onnx = G.require("onnx")
    proto = onnx.TensorProto(name=name, data_type=elem_type)
    proto.dims.extend(list(t.shape) if dims is None else dims)
    proto.raw_data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return proto


def float_tensor(name: str, value, elem_type: int):
    """`value` (a tensor or number) as an initializer of float type `elem_type` (FLOAT, FLOAT16, BFLOAT16)."""
    onnx = G.require("onnx")
    dtype = _TORCH[onnx.TensorProto.DataType.Name(elem_type)]
    return _raw_tensor(name, torch.as_tensor(value).detach().float().to(dtype), elem_type)


def codes_tensor(name: str, codes: torch.Tensor, fmt_name: str):
    """Weight codes (int8 storage for int8 and int4, float8_e4m3fn for fp8) as an INT8, INT4 or FLOAT8E4M3FN
    initializer; INT4 packs two codes per byte, the first in the low nibble."""
    onnx = G.require("onnx")
    if fmt_name == "int4":
        flat = codes.reshape(-1).to(torch.uint8) & 0x0F
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        packed = flat[0::2] | (flat[1::2] << 4)
        return _raw_tensor(name, packed, onnx.TensorProto.INT4, dims=list(codes.shape))
    elem = onnx.TensorProto.FLOAT8E4M3FN if fmt_name == "fp8" else onnx.TensorProto.INT8
    return _raw_tensor(name, codes, elem)


def zero_point(name: str, fmt_name: str):
    """The activation quantizers' zero point 0, whose type is the quantized type."""
    onnx = G.require("onnx")
    elem = onnx.TensorProto.FLOAT8E4M3FN if fmt_name == "fp8" else onnx.TensorProto.INT8
    return _raw_tensor(name, torch.zeros((), dtype=torch.uint8), elem, dims=[])


# ------------------------------------------------------------------------------------------- rewrite


def _trace_weight(name: str, inits: dict, producer: dict, out_in: bool, through: tuple[str, ...] = FOLLOWED
                  ) -> tuple[str | None, bool, int | None]:
    """Follow a GEMM's B input back to its initializer through `through` ops: (initializer, its layout is (out, in),
    the float type the GEMM sees when a Cast sits in between)."""
    cast_to = None
    while name not in inits and name in producer and producer[name].op_type in through:
        p = producer[name]
        if p.op_type == "Transpose":
            if next((list(a.ints) for a in p.attribute if a.name == "perm"), [1, 0]) != [1, 0]:
                return None, out_in, None
            out_in = not out_in
        elif p.op_type == "Cast" and cast_to is None:
            cast_to = next(a.i for a in p.attribute if a.name == "to")
        name = p.input[0]
    return (name if name in inits else None), out_in, cast_to


def gemm_weights(model, through: tuple[str, ...] = FOLLOWED) -> dict[int, tuple[str, bool, int | None]]:
    """{index of a MatMul/Gemm node: (its weight initializer, layout (out, in), cast type)} for every GEMM whose
    B input is an initializer, reached through `through` ops."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type in GEMMS and len(node.input) >= 2:
            out_in = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
            name, out_in, cast_to = _trace_weight(node.input[1], inits, producer, out_in, through)
            if name is not None:
                found[i] = (name, out_in, cast_to)
    return found


class _Names:
    """Fresh value and node names derived from a layer's module path."""

    def __init__(self, model):
        self.taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        self.taken |= {n.name for n in model.graph.node} | {i.name for i in model.graph.input}

    def __call__(self, base: str) -> str:
        base = re.sub(r"[^\w.:/-]", "_", base)
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _weight_dq(layer: QuantLinear, module: str, init, out_in: bool, names: _Names):
    """The codes and scale initializers and the DequantizeLinear that replace the float weight `init`."""
    onnx = G.require("onnx")
    fmt = layer.scheme.weights
    codes = layer.weight_codes().detach().cpu()
    scale = layer.weight_scale.detach().cpu()  # (d_out, groups)
    group = layer.scheme_group_size
    if not out_in:
        codes, scale = codes.T, scale.T
    if tuple(codes.shape) != tuple(init.dims):
        raise QDQError(f"{module}: the graph's weight {init.name} is {list(init.dims)}, its codes are "
                       f"{list(codes.shape)}; try --linear-as-gemm")
    attrs = {"axis": 0 if out_in else 1}
    if group is None:
        scale = scale.reshape(-1)
    else:  # blocked along the input axis: the scale has the codes' rank, input axis divided by the group size
        attrs = {"axis": 1 if out_in else 0, "block_size": group}
    codes_init = codes_tensor(names(f"{module}.weight_codes"), codes, fmt.name)
    scale_init = float_tensor(names(f"{module}.weight_scale"), scale, init.data_type)
    node = onnx.helper.make_node("DequantizeLinear", [codes_init.name, scale_init.name], [init.name],
                                 name=names(f"{module}/weight_dequantize"), **attrs)
    return [codes_init, scale_init], node


def _qdq_pair(x: str, y: str, scale_name: str, zp_name: str, where: str, names: _Names) -> list:
    onnx = G.require("onnx")
    q = names(f"{where}_q")
    return [onnx.helper.make_node("QuantizeLinear", [x, scale_name, zp_name], [q], name=names(f"{where}/quantize")),
            onnx.helper.make_node("DequantizeLinear", [q, scale_name, zp_name], [y], name=names(f"{where}/dequantize"))]


def _output_target(model, index: int, node, d_out: int, inits: dict) -> int:
    """The node whose output the output quantizer follows: the bias Add that alone consumes a MatMul's output,
    else the GEMM itself."""
    if node.op_type != "MatMul":
        return index
    users = [(i, n) for i, n in enumerate(model.graph.node) if node.output[0] in n.input]
    if len(users) == 1 and users[0][1].op_type == "Add":
        other = [v for v in users[0][1].input if v != node.output[0]]
        if len(other) == 1 and other[0] in inits and list(inits[other[0]].dims) in ([d_out], [1, d_out]):
            return users[0][0]
    return index


def _input_chain(layer: QuantLinear, name: str, x: str, elem: int, names: _Names, rec: dict):
    """The nodes and initializers in front of one quantized GEMM: [Mul pre_quant_scale] -> [Q -> DQ input_scale];
    returns them and the value the GEMM then reads."""
    onnx = G.require("onnx")
    nodes, inits = [], []
    if layer.pre_quant_scale is not None:
        pqs = float_tensor(names(f"{name}.pre_quant_scale"), layer.pre_quant_scale, elem)
        y = names(f"{name}/smoothed")
        nodes.append(onnx.helper.make_node("Mul", [x, pqs.name], [y], name=names(f"{name}/pre_quant_scale")))
        inits.append(pqs)
        x, rec["smooth"] = y, True
    if layer.input_scale is not None:
        s = float_tensor(names(f"{name}.input_scale"), layer.input_scale, elem)
        zp = zero_point(names(f"{name}.input_zero_point"), layer.scheme.activations.name)
        y = names(f"{name}/input_dq")
        nodes += _qdq_pair(x, y, s.name, zp.name, f"{name}/input", names)
        inits += [s, zp]
        x, rec["input_quant"] = y, True
    return nodes, inits, x


def _output_pair(layer: QuantLinear, name: str, producer, elem: int, names: _Names):
    """Q -> DQ with `output_scale` after `producer`, whose output the DQ takes over (consumers stay as they are)."""
    y = producer.output[0]
    producer.output[0] = names(f"{name}/output")
    s = float_tensor(names(f"{name}.output_scale"), layer.output_scale, elem)
    zp = zero_point(names(f"{name}.output_zero_point"), layer.scheme.activations.name)
    return _qdq_pair(producer.output[0], y, s.name, zp.name, f"{name}/output", names), [s, zp]


def _record(layer: QuantLinear, codes_name: str, out_in: bool) -> dict:
    return {"scheme": layer.scheme.name, "weights": layer.scheme.weights.name, "group_size": layer.scheme_group_size,
            "weight_codes": codes_name, "weight_layout": "out,in" if out_in else "in,out", "smooth": False,
            "input_quant": False, "output_quant": False, "nodes": 0}


def quantize_graph(model, prefix: str, module: nn.Module, output_quant: bool = True) -> dict | None:
    """Rewrite the GEMMs of `module`'s quantized layers in `model` (exported under `plain_linears`, loaded without
    external data) as QDQ, in place. `prefix`: the export wrapper's attribute with its dot. Returns the record for
    the sidecar ({"layers": {name: ...}, "count", "schemes", "output_quantizers", "opset"}), None without
    quantized layers."""
    layers = quantized_layers(module)
    if not layers:
        return None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    check_opset(opset, module)
    refs = G.linear_weights(model, prefix)
    inits = {t.name: t for t in model.graph.initializer}
    owner = {refs[name].initializer: name for name in layers if name in refs}
    gemms = {i: w for i, w in gemm_weights(model).items() if w[0] in owner}
    layout = {w[0]: w[1] for w in gemms.values()}
    missing = [name for name in layers if name not in refs or refs[name].initializer not in layout]
    if missing:
        raise QDQError(f"quantized layer {missing[0]} has no MatMul/Gemm weight in the exported graph "
                       f"({len(missing)} of {len(layers)} missing); try --linear-as-gemm")
    names = _Names(model)
    new_inits, first, before, after, records = [], [], {}, {}, {}
    for init_name, name in owner.items():  # the weights: codes behind a DequantizeLinear, ahead of every node
        tensors, dq = _weight_dq(layers[name], name, inits[init_name], layout[init_name], names)
        new_inits += tensors
        first.append(dq)
        records[name] = _record(layers[name], tensors[0].name, layout[init_name])
    for index, (init_name, _, cast_to) in sorted(gemms.items()):  # the activations, per GEMM node
        name = owner[init_name]
        layer, node, rec = layers[name], model.graph.node[index], records[name]
        elem = cast_to or inits[init_name].data_type  # the float type the GEMM computes in
        rec["nodes"] += 1
        before[index], tensors, node.input[0] = _input_chain(layer, name, node.input[0], elem, names, rec)
        new_inits += tensors
        if layer.output_scale is not None and output_quant:
            target = _output_target(model, index, node, layer.out_features, inits)
            pair, tensors = _output_pair(layer, name, model.graph.node[target], elem, names)
            after[target] = after.get(target, []) + pair
            new_inits += tensors
            rec["output_quant"] = True
    nodes = list(first)
    for i, node in enumerate(model.graph.node):
        nodes += before.get(i, []) + [node] + after.get(i, [])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in owner]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept + new_inits)
    return summary(records, opset, output_quant)


def summary(records: dict, opset: int, output_quant: bool) -> dict:
    schemes: dict[str, int] = {}
    for rec in records.values():
        schemes[rec["scheme"]] = schemes.get(rec["scheme"], 0) + 1
    return {"count": len(records), "schemes": schemes, "opset": opset, "output_quant_requested": output_quant,
            "output_quantizers": sum(r["output_quant"] for r in records.values()),
            "input_quantizers": sum(r["input_quant"] for r in records.values()), "layers": records}


def describe(record: dict) -> str:
    """One line for the export summary: how many layers, which schemes, output quantizers, opset."""
    schemes = ", ".join(f"{k} {v}" for k, v in sorted(record["schemes"].items()))
    out = record["output_quantizers"]
    why = "" if record["output_quant_requested"] else " (--no-output-quant)"
    return (f"{record['count']} quantized linears as QDQ ({schemes}); output quantizers on {out}{why}; "
            f"opset {record['opset']}")


def save_compacted(model, path: str | Path) -> None:
    """Save `model` (loaded without its external data) with a fresh `<file>.data`: tensors still in the old data
    files are copied one at a time, embedded ones over `EMBED_LIMIT` bytes move out, and the bytes of the float
    weights `quantize_graph` replaced are left behind with the old files."""
    onnx = G.require("onnx")
    path = Path(path)
    location = path.name + ".data"
    old = set(G.external_files(model))
    tmp = path.parent / f".{location}.tmp"
    with open(tmp, "wb") as out:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                with open(path.parent / info["location"], "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    data = f.read(int(info.get("length", -1)))
            elif len(t.raw_data) > EMBED_LIMIT:
                data = t.raw_data
                t.ClearField("raw_data")
            else:
                continue
            offset = out.tell()
            out.write(data)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=key, value=value)
    os.replace(tmp, path.parent / location)
    for name in old - {location}:
        (path.parent / name).unlink(missing_ok=True)
    onnx.save_model(model, str(path))
