"""Graph passes and lookups on hand-built ONNX graphs (no exporter involved), and profile points."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from obsdiff.errors import ConfigError
from obsdiff.export import checks as C
from obsdiff.export import graph as G
from obsdiff.export.components import example_point, parity_points
from obsdiff.export.config import ExportConfig, parse_range
from obsdiff.export.onnx_export import linear_as_gemm
from obsdiff.models.registry import OnnxDim, OnnxInput, OnnxIO


def model_of(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model, **feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_einsum_permutation_becomes_transpose():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = model_of([helper.make_node("Einsum", ["x"], ["y"], equation="nhwc->nchw", name="e")], [x], [y])
    data = np.random.rand(2, 3, 4, 5).astype(np.float32)
    (before,) = run(m, x=data)
    assert G.einsum_permutations_to_transpose(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Transpose"]
    assert list(m.graph.node[0].attribute[0].ints) == [0, 3, 1, 2]
    (after,) = run(m, x=data)
    assert np.array_equal(before, after) and after.shape == (2, 5, 3, 4)
    two = model_of([helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,jk->ik")], [x], [y])
    assert G.einsum_permutations_to_transpose(two) == 0  # a real contraction stays


def test_float64_uses_finds_casts_initializers_and_values():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    nodes = [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to64"),
             helper.make_node("Add", ["xd", "c"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    c = numpy_helper.from_array(np.ones(3, np.float64), "c")
    m = onnx.shape_inference.infer_shapes(model_of(nodes, [x], [y], [c]))
    uses = G.float64_uses(m)
    assert "initializer c" in uses and "Cast node to64" in uses and "value s" in uses
    assert C.check_no_float64(m)["status"] == "failed"
    clean = model_of([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    assert G.float64_uses(clean) == [] and C.check_no_float64(clean) == {"status": "passed", "count": 0}


def test_linear_weights_follow_transposes_and_gemm_layouts():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.zeros((3, 4), np.float32), "w")  # torch layout (out, in)
    v = numpy_helper.from_array(np.zeros((4, 3), np.float32), "v")  # MatMul layout (in, out)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["a"], name="/model/blocks.0/attn/to_q/MatMul"),
             helper.make_node("MatMul", ["x", "v"], ["b"], name="/model/blocks.0/ff/net.2/MatMul"),
             helper.make_node("Gemm", ["x", "w"], ["c"], name="/model/proj/Gemm", transB=1),
             helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    refs = G.linear_weights(model_of(nodes, [x], [y], [w, v]), "model.")
    assert refs["blocks.0.attn.to_q"].initializer == "w" and refs["blocks.0.attn.to_q"].out_in
    assert refs["blocks.0.ff.net.2"].initializer == "v" and not refs["blocks.0.ff.net.2"].out_in
    assert refs["proj"].out_in and refs["proj"].op_type == "Gemm"


def test_pruned_weight_check_counts_missing_mismatched_and_violating(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    good = torch.tensor([[1.0, 0, 2, 0] * 2, [0, 0, 3, 4] * 2])  # 2:4 along the input dim
    bad = torch.tensor([[1.0, 1, 2, 0] * 2, [0, 0, 3, 4] * 2])
    inits = [numpy_helper.from_array(good.numpy().T.copy(), "g"), numpy_helper.from_array(bad.numpy().T.copy(), "b")]
    nodes = [helper.make_node("MatMul", ["x", "g"], ["a"], name="/model/good/MatMul"),
             helper.make_node("MatMul", ["x", "b"], ["c"], name="/model/bad/MatMul"),
             helper.make_node("Add", ["a", "c"], ["y"])]
    m = model_of(nodes, [x], [y], inits)
    rec = C.check_pruned_weights(m, tmp_path, "model.", {"good": good, "bad": bad}, (2, 4))
    assert (rec["checked"], rec["violating"], rec["missing"], rec["status"]) == (2, 1, 0, "failed")
    assert "violate 2:4 (first: bad)" in rec["reason"]
    other = good.clone()
    other[0, 0] = 5.0
    rec = C.check_pruned_weights(m, tmp_path, "model.", {"good": other, "absent": torch.zeros(3, 5)}, (2, 4))
    assert (rec["missing"], rec["mismatched"]) == (1, 1)
    # without metadata or names the weight is still found by value
    for n in m.graph.node:
        n.name = ""
    rec = C.check_pruned_weights(m, tmp_path, "model.", {"good": good}, (2, 4))
    assert rec["status"] == "passed" and rec["found_via"] == {"name_scopes": 0, "value": 1}


def test_upcast_copy_runs_a_half_graph_in_fp32():
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])
    w16 = helper.make_tensor("w16", TensorProto.BFLOAT16, [2, 2], vals=[1.0, 2.0, 3.0, 4.0])
    m = model_of([helper.make_node("MatMul", ["x", "w16"], ["y"])], [x], [y], [w16])
    up = G.upcast_copy(m, TensorProto.BFLOAT16)
    onnx.checker.check_model(up, full_check=True)
    (out,) = run(up, x=np.eye(2, dtype=np.float32))
    assert np.allclose(out, [[1, 2], [3, 4]])


def test_parse_range_and_points():
    assert parse_range("1:2:8", "--batch") == (1, 2, 8) and parse_range("16", "--text-len") == (16, 16, 16)
    with pytest.raises(ConfigError, match="MIN <= OPT <= MAX"):
        parse_range("8:2:1", "--batch")
    assert ExportConfig(component="unet").component == "transformer"
    b, h = OnnxDim("batch", 1, 1, 4), OnnxDim("height", 2, 4, 16, multiple=2)
    io = OnnxIO((OnnxInput("x", "x", (b, 3, h)),), ranges=(b, h))
    assert example_point(io) == {"batch": 2, "height": 4}  # never trace at 1 (torch.export specializes it)
    # minima; the next valid value above each optimum but the batch's; another batch at the minima; the optima
    # (the engine's tuned shape)
    assert parity_points(io) == [{"batch": 1, "height": 2}, {"batch": 1, "height": 6}, {"batch": 2, "height": 2},
                                 {"batch": 1, "height": 4}]
    at_min = OnnxIO((), ranges=(OnnxDim("batch", 1, 1, 4),))
    assert parity_points(at_min) == [{"batch": 1}, {"batch": 2}]  # the optima are the minima: checked once
    with pytest.raises(ConfigError, match="too small to stay dynamic"):
        example_point(OnnxIO((), ranges=(OnnxDim("height", 2, 2, 3, multiple=2),)))


def test_linear_as_gemm_is_exact_and_restored():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    ref = lin(x)
    with linear_as_gemm(lin):
        assert "forward" in vars(lin)
        assert torch.allclose(lin(x), ref, atol=1e-6)
    assert "forward" not in vars(lin)
