"""TensorRT engine building: the parts that need no TensorRT (flags, profiles, build log, staleness, errors)
run everywhere; builds and inference are marked `tensorrt` and skip without it."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from obsdiff.engines import engine_record as ER
from obsdiff.engines import trt as T
from obsdiff.engines import trt_env
from obsdiff.engines import trt_rules as TR
from obsdiff.engines.build_monitor import build_progress, captured_build_log
from obsdiff.engines.sidecar import SidecarError, parse_shapes, parse_sidecar, read_onnx_sidecar
from obsdiff.errors import ConfigError, MissingDependencyError, OutputExistsError
from tests.engines.conftest import SD3_INPUTS, export_sidecar

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA GPU (not installable on this machine)")


def enum(*names):
    return SimpleNamespace(**{n: i for i, n in enumerate(names)})


# BuilderFlag / NetworkDefinitionCreationFlag members as the Python bindings list them.
TRT10_BUILDER = ("FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
                 "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
                 "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
                 "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL",
                 "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY", "FP4",
                 "EDITABLE_TIMING_CACHE", "DISTRIBUTIVE_INDEPENDENCE")
TRT10_0_BUILDER = TRT10_BUILDER[:TRT10_BUILDER.index("STRICT_NANS")]  # 10.0 had no STRICT_NANS yet
TRT10_NETWORK = ("EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS")
TRT11_BUILDER = ("DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE",
                 "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "ERROR_ON_TIMING_CACHE_MISS",
                 "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "REFIT_INDIVIDUAL",
                 "STRICT_NANS", "MONITOR_MEMORY", "EDITABLE_TIMING_CACHE", "DISTRIBUTIVE_INDEPENDENCE",
                 "REQUIRE_USER_ALLOCATION")


def trt_ns(builder, network):
    return SimpleNamespace(BuilderFlag=enum(*builder), NetworkDefinitionCreationFlag=enum(*network),
                           MemoryPoolType=enum("WORKSPACE", "DLA_MANAGED_SRAM"),
                           ProfilingVerbosity=enum("LAYER_NAMES_ONLY", "NONE", "DETAILED"))


TRT10 = trt_ns(TRT10_BUILDER, TRT10_NETWORK)
TRT10_0 = trt_ns(TRT10_0_BUILDER, TRT10_NETWORK)
TRT11 = trt_ns(TRT11_BUILDER, ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"))
TRT11_ALWAYS_STRONG = trt_ns(TRT11_BUILDER, ("PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"))


def tiny_onnx(quant: str | None = None, opset: int = 19):
    """A real ONNX model: X @ W, plain (None), with INT8 Q/DQ on the activation and a DQ'd int8 weight ("int8"),
    with FP8 E4M3 Q/DQ ("fp8"), or with Model Optimizer's custom FP8 ops ("trt-fp8")."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])]
    if quant == "int8":
        inits += [helper.make_tensor("zp", TensorProto.INT8, [], [0]),
                  helper.make_tensor("W_q", TensorProto.INT8, [8, 4], [1, -2] * 16),
                  helper.make_tensor("s_w", TensorProto.FLOAT, [4], [0.01] * 4)]
        nodes += [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["X_q"]),
                  helper.make_node("DequantizeLinear", ["X_q", "s", "zp"], ["X_dq"]),
                  helper.make_node("DequantizeLinear", ["W_q", "s_w"], ["W"], axis=1)]
    elif quant == "fp8":
        inits += [helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
                  helper.make_tensor("W", TensorProto.FLOAT, [8, 4], [0.5] * 32)]
        nodes += [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["X_q"], saturate=1),
                  helper.make_node("DequantizeLinear", ["X_q", "s", "zp"], ["X_dq"])]
    elif quant == "trt-fp8":
        inits += [helper.make_tensor("W", TensorProto.FLOAT, [8, 4], [0.5] * 32)]
        nodes += [helper.make_node("TRT_FP8QuantizeLinear", ["X", "s"], ["X_q"], domain="trt"),
                  helper.make_node("TRT_FP8DequantizeLinear", ["X_q", "s"], ["X_dq"], domain="trt")]
    else:
        inits += [helper.make_tensor("W", TensorProto.FLOAT, [8, 4], [0.5] * 32)]
    nodes.append(helper.make_node("MatMul", ["X_dq" if quant else "X", "W"], ["Y"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])], inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("trt", 1)] if quant == "trt-fp8" else [])
    model = helper.make_model(graph, opset_imports=imports)
    if quant != "trt-fp8":
        onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("dtype, precision", [("fp16", ("FP16",)), ("bf16", ("BF16",)), ("fp32", ())])
def test_tensorrt10_is_weakly_typed_with_the_onnx_precision_flag(dtype, precision):
    plan = TR.select_flags(TRT10, dtype, sparse_weights=True)
    assert plan.typing == "weak" and plan.network_flags == ()
    assert plan.builder_flags == ("TF32", *precision, "SPARSE_WEIGHTS")  # TF32: TensorRT's default, kept


@pytest.mark.parametrize("ns", [TRT11, TRT11_ALWAYS_STRONG], ids=["11-with-flag", "11-always-strong"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_tensorrt11_is_strongly_typed_without_precision_flags(ns, dtype):
    plan = TR.select_flags(ns, dtype, sparse_weights=True, strict_nans=True)
    assert plan.typing == "strong"
    assert plan.builder_flags == ("SPARSE_WEIGHTS", "STRICT_NANS")
    assert plan.network_flags == (("STRONGLY_TYPED",) if ns is TRT11 else ())
    assert not set(plan.builder_flags) & {"FP16", "BF16", "INT8"}


def test_tensorrt10_can_be_asked_for_strong_typing_and_dense_builds_have_no_sparse_flag():
    plan = TR.select_flags(TRT10, "fp16", sparse_weights=False, strongly_typed=True)
    assert plan.typing == "strong" and plan.network_flags == ("STRONGLY_TYPED",) and plan.builder_flags == ()


def test_flags_a_tensorrt_lacks_are_one_line_errors():
    with pytest.raises(ConfigError, match="STRICT_NANS"):
        TR.select_flags(TRT10_0, "fp16", sparse_weights=False, strict_nans=True)
    assert "STRICT_NANS" in TR.select_flags(TRT10, "fp16", False, strict_nans=True).builder_flags
    with pytest.raises(ConfigError, match="strongly typed"):
        TR.select_flags(TRT11, "fp16", sparse_weights=False, strongly_typed=False)
    no_sparse = trt_ns([f for f in TRT10_BUILDER if f != "SPARSE_WEIGHTS"], TRT10_NETWORK)
    with pytest.raises(ConfigError, match="--no-sparse-weights"):
        TR.select_flags(no_sparse, "fp16", sparse_weights=True)


INT8_QDQ = {"qdq": True, "quantize_linear": 1, "dequantize_linear": 2, "types": ["int8"], "custom_ops": {}}


@pytest.mark.parametrize("ns", [TRT10, TRT11, TRT11_ALWAYS_STRONG], ids=["10", "11-with-flag", "11-always-strong"])
def test_a_qdq_graph_builds_strongly_typed_without_precision_flags(ns):
    plan = TR.select_flags(ns, "fp16", sparse_weights=True, qdq=INT8_QDQ)
    assert plan.typing == "strong" and plan.builder_flags == ("SPARSE_WEIGHTS",)  # no FP16, INT8, TF32
    assert plan.network_flags == (() if ns is TRT11_ALWAYS_STRONG else ("STRONGLY_TYPED",))
    assert any("Q/DQ graph (1 QuantizeLinear, 2 DequantizeLinear; int8)" in n for n in plan.notes)
    assert any("INT8 in and out" in n for n in plan.notes)  # why sparse INT8 kernels may still not be picked
    dense = TR.select_flags(ns, "fp16", sparse_weights=False, qdq=INT8_QDQ)
    assert dense.builder_flags == () and not any("INT8 in and out" in n for n in dense.notes)
    assert TR.select_flags(ns, "fp16", False, qdq={"qdq": False}).typing == ("weak" if ns is TRT10 else "strong")


def test_a_qdq_graph_refuses_weak_typing_and_a_tensorrt_without_strong_typing():
    with pytest.raises(ConfigError, match="QuantizeLinear/DequantizeLinear nodes.*drop --weakly-typed"):
        TR.select_flags(TRT10, "fp16", sparse_weights=True, strongly_typed=False, qdq=INT8_QDQ)
    trt8 = trt_ns(TRT10_BUILDER, ("EXPLICIT_BATCH",))  # precision flags, no strongly typed networks (TensorRT 8.x)
    with pytest.raises(ConfigError, match="a Q/DQ ONNX needs TensorRT 10 or newer"):
        TR.select_flags(trt8, "fp16", sparse_weights=False, qdq=INT8_QDQ)


def test_precision_from_network_input_types():
    assert TR.dtype_from_network_inputs(["DataType.HALF", "DataType.FLOAT"]) == "fp16"
    assert TR.dtype_from_network_inputs(["BF16", "FLOAT"]) == "bf16"
    assert TR.dtype_from_network_inputs(["FLOAT", "INT64"]) == "fp32"


# ------------------------------------------------------------------------------------------ build log


BUILD_LOG = """\
[11/28/2026-10:02:11] [I] [TRT] Local timing cache in use. Profiling results in this builder pass will not be stored.
[11/28/2026-10:02:40] [I] [TRT] (Sparsity) Layers eligible for sparse math: /transformer_blocks.0/attn/to_q/MatMul, \
/transformer_blocks.0/attn/to_k/MatMul, \
/transformer_blocks.0/ff/net.0/proj/MatMul + /transformer_blocks.0/ff/net.0/Gelu, /transformer_blocks.0/ff/net.2/MatMul
[11/28/2026-10:02:40] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: \
/transformer_blocks.0/ff/net.0/proj/MatMul + /transformer_blocks.0/ff/net.0/Gelu, /transformer_blocks.0/ff/net.2/MatMul
[11/28/2026-10:02:41] [I] [TRT] Total Activation Memory: 1073741824 bytes
""".splitlines()


def test_build_log_names_eligible_and_picked_layers():
    report = TR.parse_build_log(BUILD_LOG)
    assert report["reported"] and report["eligible_count"] == 4 and report["picked_count"] == 2
    assert report["picked"] == ["/transformer_blocks.0/ff/net.0/proj/MatMul + /transformer_blocks.0/ff/net.0/Gelu",
                                "/transformer_blocks.0/ff/net.2/MatMul"]
    assert report["eligible_not_picked"] == ["/transformer_blocks.0/attn/to_q/MatMul",
                                             "/transformer_blocks.0/attn/to_k/MatMul"]


def test_build_log_from_the_python_logger_without_prefix_and_with_nothing_picked():
    lines = ["[I] (Sparsity) Layers eligible for sparse math: node_MatMul_12, node_MatMul_40",
             "[I] (Sparsity) TRT inference plan picked sparse implementation for layers: ",
             "[W] Detected layernorm nodes in FP16."]
    report = TR.parse_build_log(lines)
    assert report["reported"] and report["eligible"] == ["node_MatMul_12", "node_MatMul_40"]
    assert report["picked"] == [] and report["picked_count"] == 0
    assert not TR.parse_build_log(["[I] Engine built in 3.2 seconds"])["reported"]


# TensorRT's developer guide (structured sparsity), as trtexec prints it
GUIDE_LOG = ["[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3",
             "[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
             "conv2, conv3"]
# TensorRT 8 through its Python logger (NVIDIA/TensorRT#1403), nothing picked
PYTHON_LOGGER_LOG = ["[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: Conv_0",
                     "[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:"]
# fused layer names (NVIDIA/TensorRT#4054, shortened)
FUSED_LOG = ["[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, "
             "Conv_619 + Relu_620, Conv_621 + Add_627 + Relu_628",
             "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
             "Conv_621 + Add_627 + Relu_628"]
# TensorRT 10's Myelin wording: counts only (a public Jetson build log, trtexec --sparsity=enable)
COUNT_LOG = ["[05/02/2026-09:12:40] [I] [TRT] (Sparsity) Found 39 layer(s) eligible to use sparse tactics",
             "[05/02/2026-09:12:40] [I] [TRT] (Sparsity) Chose 0 layer(s) using sparse tactics"]


@pytest.mark.parametrize("lines, eligible, picked", [
    (GUIDE_LOG, ["conv1", "conv2", "conv3"], ["conv2", "conv3"]),
    (PYTHON_LOGGER_LOG, ["Conv_0"], []),
    (FUSED_LOG, ["MatMul_401", "Conv_619 + Relu_620", "Conv_621 + Add_627 + Relu_628"],
     ["Conv_621 + Add_627 + Relu_628"]),
], ids=["developer-guide", "python-logger", "fused-names"])
def test_build_log_layer_lists(lines, eligible, picked):
    report = TR.parse_build_log(lines)
    assert report["reported"] and report["eligible"] == eligible and report["picked"] == picked
    assert (report["eligible_count"], report["picked_count"]) == (len(eligible), len(picked))
    assert report["eligible_not_picked"] == [n for n in eligible if n not in picked]


def test_build_log_counts_of_the_myelin_wording():
    report = TR.parse_build_log(["[V] [TRT] a verbose line", *COUNT_LOG, "[I] [TRT] Engine built"])
    assert report["reported"] and (report["eligible_count"], report["picked_count"]) == (39, 0)
    assert report["eligible"] == [] and report["reports"] == [{"eligible_count": 39, "eligible": [],
                                                               "picked_count": 0, "picked": []}]


def test_build_log_myelin_wording_with_lists_and_one_pair_per_subgraph():
    """Model Optimizer documents the wording as `Found N layer(s) eligible to use sparse tactics: ...`; Myelin
    prints a pair per compiled subgraph, with bracketed names whose commas are not separators."""
    lines = ["[I] [TRT] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: /l.0/attn/to_q/MatMul, "
             "{ForeignNode[/l.0/ff/net.0/proj/MatMul.../l.0/ff/net.2/MatMul]}",
             "[I] [TRT] (Sparsity) Chose 1 layer(s) using sparse tactics: "
             "{ForeignNode[/l.0/ff/net.0/proj/MatMul.../l.0/ff/net.2/MatMul]}",
             "[I] [TRT] (Sparsity) Found 3 layer(s) eligible to use sparse tactics: [/l.1/a, /l.1/b[0, 1], /l.1/c].",
             "[I] [TRT] (Sparsity) Chose 2 layer(s) using sparse tactics: '/l.1/a', '/l.1/c'"]
    report = TR.parse_build_log(lines)
    assert report["eligible"] == ["/l.0/attn/to_q/MatMul", "{ForeignNode[/l.0/ff/net.0/proj/MatMul.../l.0/ff/"
                                  "net.2/MatMul]}", "/l.1/a", "/l.1/b[0, 1]", "/l.1/c"]
    assert report["picked"][1:] == ["/l.1/a", "/l.1/c"] and report["eligible_not_picked"] == [
        "/l.0/attn/to_q/MatMul", "/l.1/b[0, 1]"]
    assert (report["eligible_count"], report["picked_count"]) == (5, 3)
    assert [(r["eligible_count"], r["picked_count"]) for r in report["reports"]] == [(2, 1), (3, 2)]
    # counts larger than the names listed (a truncated list) win
    assert TR.parse_build_log(["(Sparsity) Found 7 layer(s) eligible to use sparse tactics: a, b"])[
        "eligible_count"] == 7


def test_inspector_json_lists_layers_with_sparse_weights():
    info = json.dumps({"Layers": [{"Name": "gemm_q", "LayerType": "Gemm", "HasSparseWeights": 1},
                                  {"Name": "gemm_k", "LayerType": "Gemm", "HasSparseWeights": 0},
                                  {"Name": "softmax", "LayerType": "SoftMax"}], "Bindings": ["x", "y"]})
    assert TR.sparse_layers_from_inspector(info) == ["gemm_q"]


# ------------------------------------------------------------------------------------------ profiles


def test_profile_comes_from_the_export_sidecar(onnx_with_sidecar):
    spec = read_onnx_sidecar(onnx_with_sidecar())
    profiles = T.resolve_profiles(spec, T.EngineConfig())
    assert profiles["hidden_states"] == ((1, 16, 64, 64), (2, 16, 128, 128), (8, 16, 192, 192))
    assert profiles["timestep"] == ((1,), (2,), (8,))
    assert spec.nm == (2, 4) and spec.dtype == "fp16" and [t.feeds for t in spec.inputs][0] == "hidden_states"


def test_explicit_shapes_override_the_sidecar_and_default_to_opt(onnx_with_sidecar):
    spec = read_onnx_sidecar(onnx_with_sidecar())
    opt = parse_shapes("hidden_states:2x16x128x128,encoder_hidden_states:2x333x4096,pooled_projections:2x2048,"
                       "timestep:2", "--opt-shapes")
    cfg = T.EngineConfig(opt_shapes=opt, max_shapes={"hidden_states": (4, 16, 128, 128)})
    profiles = T.resolve_profiles(spec, cfg)
    assert profiles["hidden_states"] == ((2, 16, 128, 128), (2, 16, 128, 128), (4, 16, 128, 128))
    assert profiles["timestep"] == ((2,), (2,), (2,))


@pytest.mark.parametrize("opt, match", [
    ("hidden_state:2x16x128x128", "not an input"),
    ("hidden_states:2x16x128x128", "encoder_hidden_states .*no shape"),
])
def test_explicit_shapes_are_checked_against_the_inputs(onnx_with_sidecar, opt, match):
    spec = read_onnx_sidecar(onnx_with_sidecar())
    with pytest.raises(ConfigError, match=match):
        T.resolve_profiles(spec, T.EngineConfig(opt_shapes=parse_shapes(opt, "--opt-shapes")))


def test_bad_profiles_and_shape_strings_are_one_line_errors(onnx_with_sidecar):
    inputs = [("x", "float32", ["batch", 4], {"min": [4, 4], "opt": [2, 4], "max": [8, 4]})]
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        T.resolve_profiles(read_onnx_sidecar(onnx_with_sidecar(inputs)), T.EngineConfig())
    with pytest.raises(ConfigError, match="NAME:DxDx"):
        parse_shapes("hidden_states=1x4", "--opt-shapes")
    with pytest.raises(ConfigError, match="need --opt-shapes"):
        T.EngineConfig(min_shapes={"x": (1,)})


def test_sidecar_without_a_needed_key_says_which(tmp_path):
    data = export_sidecar(SD3_INPUTS)
    del data["inputs"][1]["dtype"]
    with pytest.raises(SidecarError, match=r"inputs\[1\]\.'dtype'"):
        parse_sidecar(data, tmp_path / "transformer.json")
    data = export_sidecar(SD3_INPUTS)
    del data["inputs"][0]["profile"]["max"]
    with pytest.raises(SidecarError, match="profile.'max'"):
        parse_sidecar(data, tmp_path / "transformer.json")


def test_sidecar_sparsity_type_is_parsed_as_the_prune_parses_it(tmp_path):
    assert [parse_sidecar(export_sidecar(SD3_INPUTS, sparsity_type=t)).nm for t in ("4:8", "structured", None)] \
        == [(4, 8), None, None]
    with pytest.raises(SidecarError, match=r"sparsity_type '4:2' is not a sparsity type"):  # once read as (4, 2)
        parse_sidecar(export_sidecar(SD3_INPUTS, sparsity_type="4:2"), tmp_path / "transformer.json")


def test_real_export_sidecar_gives_a_profile(tiny_onnx_dir):
    spec = read_onnx_sidecar(tiny_onnx_dir / "transformer.onnx")
    profiles = T.resolve_profiles(spec, T.EngineConfig())
    assert set(profiles) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    lo, opt, hi = profiles["hidden_states"]
    assert lo[0] == 1 and opt[0] == 2 and hi[0] == 4 and lo[2] <= opt[2] == 8 <= hi[2]
    assert spec.outputs[0].name == "latent" and spec.nm is None and spec.sha256


# ------------------------------------------------------------------------------------------ Polygraphy config


def test_config_options_for_tensorrt10_fp16_sparse_with_strict_nans():
    plan = TR.select_flags(TRT10, "fp16", sparse_weights=True, strict_nans=True)
    kwargs, extra = TR.config_options(TRT10, plan, 8 * 2**30, 4, "cache.bin")
    assert kwargs == {"tf32": True, "fp16": True, "sparse_weights": True,
                      "memory_pool_limits": {TRT10.MemoryPoolType.WORKSPACE: 8 * 2**30},
                      "builder_optimization_level": 4, "load_timing_cache": "cache.bin",
                      "profiling_verbosity": TRT10.ProfilingVerbosity.DETAILED}
    assert extra == ("STRICT_NANS",)  # CreateConfig has no argument for it: set on the config afterwards


def test_config_options_for_tensorrt11_carry_no_precision_arguments():
    plan = TR.select_flags(TRT11, "bf16", sparse_weights=True)
    kwargs, extra = TR.config_options(TRT11, plan, 2**30, 3, None)
    assert not {"fp16", "bf16", "tf32", "int8", "fp8"} & set(kwargs)
    assert kwargs["sparse_weights"] is True and "load_timing_cache" not in kwargs and extra == ()


def test_trtexec_line_for_a_weakly_typed_sparse_build():
    plan = TR.select_flags(TRT10, "fp16", sparse_weights=True)
    profiles = {"hidden_states": {"min": [1, 16, 64, 64], "opt": [2, 16, 128, 128], "max": [8, 16, 128, 128]},
                "timestep": {"min": [1], "opt": [2], "max": [8]}}
    line = TR.trtexec_command("runs/x/onnx/transformer.onnx", "out dir/t.plan", plan, profiles, 8 * 2**30, 3,
                             "tc.bin")
    assert line == ("trtexec --onnx=runs/x/onnx/transformer.onnx '--saveEngine=out dir/t.plan' --fp16 "
                    "--sparsity=enable --minShapes=hidden_states:1x16x64x64,timestep:1 "
                    "--optShapes=hidden_states:2x16x128x128,timestep:2 --maxShapes=hidden_states:8x16x128x128,"
                    "timestep:8 --builderOptimizationLevel=3 --memPoolSize=workspace:8192M "
                    "--profilingVerbosity=detailed --skipInference --timingCacheFile=tc.bin")


def test_trtexec_line_for_a_strongly_typed_static_build_names_what_trtexec_lacks():
    plan = TR.select_flags(TRT11, "bf16", sparse_weights=False, strict_nans=True)
    line = TR.trtexec_command("m.onnx", "m.plan", plan, {}, 1.5 * 2**30, 5)
    assert line.startswith("trtexec --onnx=m.onnx --saveEngine=m.plan --stronglyTyped --builderOptimizationLevel=5 "
                           "--memPoolSize=workspace:1536M")
    assert "--bf16" not in line and "Shapes" not in line and "--sparsity" not in line
    assert line.endswith("# also set BuilderFlag STRICT_NANS (no trtexec option)")


def test_trtexec_line_for_a_qdq_sparse_build():
    plan = TR.select_flags(TRT10, "fp16", sparse_weights=True, qdq=INT8_QDQ)
    profiles = {"hidden_states": {"min": [1, 16, 64, 64], "opt": [2, 16, 128, 128], "max": [4, 16, 128, 128]}}
    line = TR.trtexec_command("q/transformer.onnx", "q/t.plan", plan, profiles, 8 * 2**30, 3)
    assert line == ("trtexec --onnx=q/transformer.onnx --saveEngine=q/t.plan --stronglyTyped --sparsity=enable "
                    "--minShapes=hidden_states:1x16x64x64 --optShapes=hidden_states:2x16x128x128 "
                    "--maxShapes=hidden_states:4x16x128x128 --builderOptimizationLevel=3 "
                    "--memPoolSize=workspace:8192M --profilingVerbosity=detailed --skipInference")


@pytest.mark.parametrize("quant, expected", [
    (None, {"qdq": False, "quantize_linear": 0, "dequantize_linear": 0, "types": []}),
    ("int8", {"qdq": True, "quantize_linear": 1, "dequantize_linear": 2, "types": ["int8"]}),
    ("fp8", {"qdq": True, "quantize_linear": 1, "dequantize_linear": 1, "types": ["float8e4m3fn"]}),
])
def test_qdq_detection_reads_the_graph_not_its_external_data(tmp_path, quant, expected):
    import onnx
    from onnx import numpy_helper

    from obsdiff.engines.sidecar import read_onnx_quantization

    path = tmp_path / "m.onnx"
    model = tiny_onnx(quant)
    for init in model.graph.initializer:  # as raw bytes: only those move to the external file
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()  # the graph alone says whether it is quantized
    summary = read_onnx_quantization(path)
    assert {k: summary[k] for k in expected} == expected and summary["custom_ops"] == {}


def test_qdq_detection_in_subgraphs_and_custom_quantize_ops():
    from onnx import TensorProto, helper

    from obsdiff.engines.sidecar import qdq_summary

    custom = qdq_summary(tiny_onnx("trt-fp8"))
    assert custom["qdq"] and custom["custom_ops"] == {"trt::TRT_FP8QuantizeLinear": 1,
                                                      "trt::TRT_FP8DequantizeLinear": 1}
    body = tiny_onnx("int8").graph
    branch = helper.make_graph(list(body.node), "then", [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                                                           None)])
    outer = helper.make_graph([helper.make_node("If", ["c"], ["Y"], then_branch=branch, else_branch=branch)],
                              "outer", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], list(body.initializer))
    nested = qdq_summary(helper.make_model(outer, opset_imports=[helper.make_opsetid("", 19)]))
    assert nested["qdq"] and (nested["quantize_linear"], nested["dequantize_linear"]) == (2, 4)
    assert nested["types"] == ["int8"]


def test_qdq_detection_of_a_torch_exported_fake_quant_linear(tmp_path):
    """torch's exporter writes fake quantization as QuantizeLinear/DequantizeLinear with Constant zero points."""
    from obsdiff.engines.sidecar import read_onnx_quantization

    class FakeQuantLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x):
            x = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
            w = torch.fake_quantize_per_channel_affine(self.lin.weight, torch.full((8,), 0.01),
                                                       torch.zeros(8, dtype=torch.int32), 0, -128, 127)
            return torch.nn.functional.linear(x, w, self.lin.bias)

    path = tmp_path / "fq.onnx"
    with pytest.warns(DeprecationWarning):  # the legacy exporter: dynamo has no fake-quant export
        torch.onnx.export(FakeQuantLinear(), (torch.randn(2, 16),), str(path), dynamo=False, opset_version=13)
    summary = read_onnx_quantization(path)
    assert summary["qdq"] and (summary["quantize_linear"], summary["dequantize_linear"]) == (2, 2)
    assert summary["types"] == ["int8"]


def test_qdq_detection_of_a_file_that_is_not_onnx_is_one_line(tmp_path):
    from obsdiff.engines.sidecar import read_onnx_quantization

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not a protobuf \xff\xff")
    with pytest.raises(ConfigError, match=r"bad.onnx is not a readable ONNX model \(.*\); export it again") as err:
        read_onnx_quantization(bad)
    assert "\n" not in str(err.value)


def test_network_profile_checks_ranks_and_dynamic_inputs():
    profiles = {"x": ((1, 4), (2, 4), (8, 4))}
    assert TR.network_profile([("x", (-1, 4)), ("y", (3,))], profiles, "m.onnx") == {
        "x": {"min": [1, 4], "opt": [2, 4], "max": [8, 4]}}
    with pytest.raises(ConfigError, match="input x has rank 3 in the ONNX"):
        TR.network_profile([("x", (-1, 4, 4))], profiles, "m.onnx")
    with pytest.raises(ConfigError, match="input y of m.onnx is dynamic .*--opt-shapes"):
        TR.network_profile([("x", (-1, 4)), ("y", (-1,))], profiles, "m.onnx")


def test_build_targets_follow_the_run_and_the_dense_twin(onnx_with_sidecar, tmp_path):
    spec = read_onnx_sidecar(onnx_with_sidecar())  # a 2:4 run
    out = tmp_path / "t.plan"
    assert T.build_targets(out, spec, T.EngineConfig()) == [(out, True)]
    assert T.build_targets(out, spec, T.EngineConfig(sparse_weights=False, also_dense=True)) == [
        (out, False), (tmp_path / "t.dense.plan", False)]
    dense = read_onnx_sidecar(onnx_with_sidecar(sparsity_type=None, name="dense"))
    assert T.build_targets(out, dense, T.EngineConfig()) == [(out, False)]


def test_build_log_capture_keeps_tensorrt_info_lines_and_restores_polygraphy():
    from polygraphy.logger import G_LOGGER

    before = (G_LOGGER.module_severity.get(), G_LOGGER.use_python_logging_system)
    with captured_build_log() as build_log:
        # TensorRT's INFO messages reach Polygraphy's logger at VERBOSE (polygraphy.backend.trt.util)
        G_LOGGER.verbose("(Sparsity) Layers eligible for sparse math: gemm_a, gemm_b")
        G_LOGGER.extra_verbose("a TensorRT VERBOSE line, not kept by default")
        G_LOGGER.error("Could not find any implementation for node gemm_a")
    assert TR.parse_build_log(build_log.lines)["eligible"] == ["gemm_a", "gemm_b"]
    assert len(build_log.lines) == 2 and build_log.errors() == ["Could not find any implementation for node gemm_a"]
    assert (G_LOGGER.module_severity.get(), G_LOGGER.use_python_logging_system) == before


def test_build_progress_refreshes_while_the_block_runs():
    import io
    import time

    out = io.StringIO()
    with build_progress("building t.plan", interval=0.01, file=out) as state:
        time.sleep(0.2)
    ticks = state["ticks"]
    assert ticks >= 3
    time.sleep(0.05)
    assert state["ticks"] == ticks  # stopped with the block
    assert "building t.plan" in out.getvalue()


# ------------------------------------------------------------------------------------------ staleness


ENV = {"tensorrt": "10.8.0.43", "gpu": "NVIDIA H200", "compute_capability": "9.0"}


def engine_record(onnx_hashes, **over):
    record = {"tensorrt": ENV["tensorrt"], "gpu": {"name": ENV["gpu"], "compute_capability": "9.0"},
              "onnx": {"path": "/x/transformer.onnx", **onnx_hashes}}
    return record | over


def test_stale_reasons_name_what_changed():
    hashes = {"sha256": "1" * 64, "data_sha256": None}
    assert ER.stale_reasons(engine_record(hashes), ENV, hashes) == []
    assert ER.stale_reasons(engine_record(hashes), ENV, None) == []  # ONNX gone: nothing to compare
    changed = ER.stale_reasons(engine_record(hashes), ENV, {"sha256": "2" * 64, "data_sha256": None})
    assert len(changed) == 1 and "ONNX graph changed" in changed[0]
    other_trt = ER.stale_reasons(engine_record(hashes, tensorrt="10.3.0"), ENV, hashes)
    assert len(other_trt) == 1 and "TensorRT 10.3.0" in other_trt[0] and "10.8.0.43" in other_trt[0]
    other_gpu = ER.stale_reasons(engine_record(hashes, gpu={"name": "NVIDIA A100", "compute_capability": "8.0"}),
                                ENV, hashes)
    assert len(other_gpu) == 1 and "NVIDIA A100" in other_gpu[0] and "H200" in other_gpu[0]


def test_check_engine_refuses_a_stale_engine(tmp_path, onnx_with_sidecar):
    onnx = onnx_with_sidecar()
    plan = tmp_path / "transformer.plan"
    plan.write_bytes(b"engine")
    record = engine_record(ER.onnx_hashes(onnx)) | {"onnx": {"path": str(onnx), **ER.onnx_hashes(onnx)}}
    ER.engine_sidecar_path(plan).write_text(json.dumps(record))
    assert ER.check_engine(plan, environment=ENV)["tensorrt"] == ENV["tensorrt"]
    onnx.write_bytes(b"re-exported graph")
    with pytest.raises(ER.StaleEngineError) as err:
        ER.check_engine(plan, environment=ENV | {"tensorrt": "11.0.0"})
    msg = str(err.value)
    assert "\n" not in msg and "ONNX graph changed" in msg and "TensorRT 11.0.0" in msg and "--force" in msg


def test_check_engine_without_sidecar_or_plan(tmp_path):
    with pytest.raises(ER.EngineError, match="does not exist"):
        ER.check_engine(tmp_path / "none.plan", environment=ENV)
    plan = tmp_path / "foreign.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(ER.StaleEngineError, match="no sidecar foreign.plan.json"):
        ER.check_engine(plan, environment=ENV)


# ------------------------------------------------------------------------------------------ errors


def test_build_engine_checks_inputs_before_tensorrt(tmp_path, onnx_with_sidecar):
    with pytest.raises(ConfigError, match="does not exist"):
        T.build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"graph")
    with pytest.raises(SidecarError, match="no export sidecar .*bare.json.*--opt-shapes"):
        T.build_engine(bare, tmp_path / "m.plan")
    onnx = onnx_with_sidecar()
    (tmp_path / "exists.plan").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--force"):
        T.build_engine(onnx, tmp_path / "exists.plan")
    (tmp_path / "ok.dense.plan").write_bytes(b"old twin")
    with pytest.raises(OutputExistsError, match="ok.dense.plan"):
        T.build_engine(onnx, tmp_path / "ok.plan", T.EngineConfig(also_dense=True))


def test_an_existing_engine_is_refused_and_its_staleness_named(tmp_path, onnx_with_sidecar):
    onnx = onnx_with_sidecar()
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    ER.engine_sidecar_path(plan).write_text(json.dumps(engine_record(ER.onnx_hashes(onnx))))
    with pytest.raises(OutputExistsError, match=r"built from this ONNX\); pass --force"):
        T.build_engine(onnx, plan)
    onnx.write_bytes(b"re-exported")
    with pytest.raises(OutputExistsError, match="is stale .*--force"):
        T.build_engine(onnx, plan)


def test_no_profile_from_sidecar_needs_explicit_shapes_for_dynamic_inputs(onnx_with_sidecar):
    spec = read_onnx_sidecar(onnx_with_sidecar())
    with pytest.raises(ConfigError, match="hidden_states is dynamic.*--opt-shapes"):
        T.resolve_profiles(spec, T.EngineConfig(profile_from_sidecar=False))
    static = [("x", "float32", [1, 4], None)]
    assert T.resolve_profiles(read_onnx_sidecar(onnx_with_sidecar(static)), T.EngineConfig(profile_from_sidecar=False)
                              ) == {}


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_build_says_how_to_install(tmp_path, onnx_with_sidecar):
    with pytest.raises(MissingDependencyError) as err:
        T.build_engine(onnx_with_sidecar(), tmp_path / "m.plan")
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt" in str(err.value)
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_without_a_gpu_build_says_so(tmp_path, onnx_with_sidecar, monkeypatch):
    monkeypatch.setattr(trt_env, "require_tensorrt", lambda: SimpleNamespace(__version__="10.8.0"))
    with pytest.raises(trt_env.NoGpuError, match="need a CUDA GPU"):
        T.build_engine(onnx_with_sidecar(), tmp_path / "m.plan")


# ------------------------------------------------------------------------------------------ TensorRT


@pytest.mark.tensorrt
@needs_trt
def test_real_tensorrt_flags_match_its_generation():
    import tensorrt

    plan = TR.select_flags(tensorrt, "fp16", sparse_weights=True)
    assert "SPARSE_WEIGHTS" in plan.builder_flags
    assert plan.typing == ("weak" if hasattr(tensorrt.BuilderFlag, "FP16") else "strong")


@pytest.mark.tensorrt
@needs_trt
def test_build_check_and_run_a_tiny_engine(tiny_onnx_dir, tiny_sd3_dir, tmp_path):
    from obsdiff.engines.runners import make_runner
    from obsdiff.runs.loading import load_pipeline

    plan = tmp_path / "transformer.plan"
    record = T.build_engine(tiny_onnx_dir / "transformer.onnx", plan, T.EngineConfig(sparse_weights=True,
                                                                                     also_dense=True))
    assert plan.is_file() and ER.dense_twin_path(plan).is_file()
    assert record["dense_twin"]["sparse"]["requested"] is False
    assert record["sparse"]["requested"] and record["profiles"]["hidden_states"]["opt"][0] == 2
    assert ER.check_engine(plan)["onnx"]["sha256"] == record["onnx"]["sha256"]
    model = load_pipeline(str(tiny_sd3_dir), device="cuda")
    runner = make_runner("tensorrt", engine=plan)
    runner.prepare(model)
    kw = model.family.example_inputs(model.denoiser, batch=2, text_len=264, generator=torch.Generator().manual_seed(0))
    kw = {k: v.cuda() for k, v in kw.items()}
    with torch.no_grad():
        ref = model.denoiser(**kw, return_dict=False)[0]
    assert float((runner(**kw) - ref).abs().max()) < 1e-2


@pytest.mark.tensorrt
@needs_trt
def test_real_tensorrt_builds_a_qdq_onnx_strongly_typed(tmp_path):
    import onnx
    import tensorrt

    path = tmp_path / "q.onnx"
    onnx.save(tiny_onnx("int8"), str(path))
    cfg = T.EngineConfig(min_shapes={"X": (1, 8)}, opt_shapes={"X": (4, 8)}, max_shapes={"X": (16, 8)})
    record = T.build_engine(path, tmp_path / "q.plan", cfg)
    assert record["typing"] == "strong" and record["quantization"]["types"] == ["int8"]
    assert not {"FP16", "BF16", "INT8", "FP8"} & set(record["builder_flags"])
    assert ("--stronglyTyped" in record["trtexec"]) == hasattr(tensorrt.NetworkDefinitionCreationFlag,
                                                                "STRONGLY_TYPED")
    assert "--fp16" not in record["trtexec"] and "--int8" not in record["trtexec"]
