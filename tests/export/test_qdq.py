"""Quantized denoisers (`QuantLinear` layers) exported as QDQ ONNX: graph structure, initializer types, N:M on
the codes, parity within the bound derived from the quantization step, and a wrong scale that fails it.

The models are the tiny SD3 (hidden 32, one block) with some linears quantized by hand; exports at small shapes
in fp32 (dynamo 4-7 s each, legacy about 1 s).
"""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from obsdiff.errors import ConfigError
from obsdiff.export import checks as C
from obsdiff.export import graph as G
from obsdiff.export import qdq
from obsdiff.export import qdq_checks as QC
from obsdiff.export.cli import cli
from obsdiff.export.components import BUILDERS, parity_points, resolve_ranges
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from obsdiff.runs.io import RunRecord
from obsdiff.runs.loading import as_loaded
from obsdiff.solver import qlinear, quant
from obsdiff.solver.obs import holds_nm
from tests.conftest import tiny_sd3

BLOCK = "transformer_blocks.0."
SIZES = dict(text_len=(8, 8, 8), height=(8, 8, 16), width=(8, 8, 16), batch=(1, 2, 2))
# module: (scheme, group size, output scale, SmoothQuant pre-scale)
MIXED = {
    BLOCK + "attn.to_q": ("w8a8", None, True, False),  # pruned 2:4 as well
    BLOCK + "attn.to_k": ("w8a8", None, False, False),
    BLOCK + "attn.to_v": ("fp8", None, True, False),
    BLOCK + "attn.to_out.0": ("w8a8", None, True, True),
    BLOCK + "ff.net.0.proj": ("w4a16", 16, False, False),
    BLOCK + "ff.net.2": ("w8a16", None, False, False),
    "time_text_embed.timestep_embedder.linear_2": ("w8a8", None, True, False),  # a 2-D input: Gemm
}
INT8_ONLY = {k: v for k, v in MIXED.items() if v[0] == "w8a8"}
WEIGHT_ONLY = {BLOCK + "ff.net.0.proj": ("w4a16", 16, False, False), BLOCK + "ff.net.2": ("w8a16", None, False, False)}


def prune_2_4(W: torch.Tensor) -> torch.Tensor:
    groups = W.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    return torch.zeros_like(groups).scatter(1, keep, groups.gather(1, keep)).reshape(W.shape)


def input_output_ranges(loaded, names) -> dict[str, tuple[float, float]]:
    """max |input| and max |output| of each named linear on one random denoiser call."""
    mods, found, hooks = dict(loaded.denoiser.named_modules()), {}, []
    for n in names:
        hooks.append(mods[n].register_forward_hook(
            lambda m, args, out, n=n: found.__setitem__(n, (float(args[0].abs().max()), float(out.abs().max())))))
    with torch.no_grad():
        loaded.denoiser(**loaded.family.example_inputs(loaded.denoiser, batch=2, text_len=8,
                                                       generator=torch.Generator().manual_seed(0)), return_dict=False)
    for h in hooks:
        h.remove()
    return found


def quantized_model(plan: dict, pruned: tuple[str, ...] = ()):
    """The tiny SD3 pipeline, as a LoadedModel, with the linears of `plan` quantized (round to nearest, scales from
    one call's ranges) and those in `pruned` pruned 2:4 first; a run record lists the pruned ones."""
    loaded = as_loaded(tiny_sd3(num_layers=1, head_dim=16))
    ranges = input_output_ranges(loaded, plan)
    mods = dict(loaded.denoiser.named_modules())
    for name, (scheme_name, group, with_output, smooth) in plan.items():
        lin, scheme = mods[name], qlinear.scheme_for(scheme_name, group)
        W, pre = lin.weight.data, None
        if name in pruned:
            W = prune_2_4(W)
        a_in, a_out = ranges[name]
        if smooth:  # SmoothQuant: the layer computes (x / s) (W s)^T
            s = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5
            W, pre, a_in = W * s, 1 / s, a_in * float((1 / s).max())
        scales = quant.weight_scales(W, scheme.weights, scheme.group_size)
        lin.weight.data = quant.rtn(W, scales, scheme.weights)
        act = scheme.activations
        qlinear.quantize_linear_(lin, scheme, scales, input_scale=quant.activation_scale(a_in, act) if act else None,
                                 output_scale=quant.activation_scale(a_out, act) if act and with_output else None,
                                 pre_quant_scale=pre)
    if pruned:
        run = RunRecord.from_dict({"prune": {"sparsity_type": "2:4"}, "layers": [{"name": n} for n in pruned]})
        loaded = dataclasses.replace(loaded, run=run)
    return loaded


def sidecar(out) -> dict:
    return json.loads((out / "transformer.json").read_text())


def nodes_of(model, op_type):
    return [n for n in model.graph.node if n.op_type == op_type]


def consumers(model, value):
    return [n for n in model.graph.node if value in n.input]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every scheme in one graph (dynamo, auto opset), to_q pruned 2:4 and listed in a run record."""
    out = tmp_path_factory.mktemp("qdq") / "mixed"
    loaded = quantized_model(MIXED, pruned=(BLOCK + "attn.to_q",))
    report = export_onnx(loaded, out, ExportConfig(dtype="fp32", **SIZES), progress=False)
    return out, report, loaded


def test_mixed_graph_has_qdq_where_the_layers_quantize(mixed):
    out, report, _ = mixed
    model = onnx.load(out / "transformer.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    assert model.opset_import[0].version == 21  # auto: blocked INT4 needs 21
    assert len(nodes_of(model, "QuantizeLinear")) == 5 + 4  # inputs of the w8a8/fp8 layers + 4 output scales
    assert len(nodes_of(model, "DequantizeLinear")) == 7 + 9
    codes = {n: inits[f"{n}.weight_codes"] for n in MIXED}
    assert codes[BLOCK + "attn.to_q"].data_type == TensorProto.INT8
    assert codes[BLOCK + "attn.to_v"].data_type == TensorProto.FLOAT8E4M3FN
    assert codes[BLOCK + "ff.net.0.proj"].data_type == TensorProto.INT4
    assert codes[BLOCK + "ff.net.2"].data_type == TensorProto.INT8
    assert list(codes[BLOCK + "ff.net.0.proj"].dims) == [32, 128]  # MatMul layout (d_in, d_out)
    assert list(codes["time_text_embed.timestep_embedder.linear_2"].dims) == [32, 32]
    float_weights = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                     and list(t.dims) in ([32, 128], [128, 32])]
    assert float_weights == []  # the FFN's float weights are gone
    by_output = {o: n for n in model.graph.node for o in n.output}
    int4_dq = consumers(model, codes[BLOCK + "ff.net.0.proj"].name)[0]
    attrs = {a.name: a.i for a in int4_dq.attribute}
    assert attrs == {"axis": 0, "block_size": 16} and list(inits[int4_dq.input[1]].dims) == [2, 128]
    gemm_dq = consumers(model, codes["time_text_embed.timestep_embedder.linear_2"].name)[0]
    assert {a.name: a.i for a in gemm_dq.attribute} == {"axis": 0}  # Gemm transB: (d_out, d_in), channels on 0
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT for n in nodes_of(model, "DequantizeLinear"))
    zero_points = {inits[n.input[2]].data_type for n in nodes_of(model, "QuantizeLinear")}
    assert zero_points == {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
    # the w8a16 layer reads its input unquantized; the SmoothQuant layer multiplies before quantizing
    ff2 = consumers(model, consumers(model, codes[BLOCK + "ff.net.2"].name)[0].output[0])[0]
    assert by_output[ff2.input[0]].op_type != "DequantizeLinear"
    to_out = consumers(model, consumers(model, codes[BLOCK + "attn.to_out.0"].name)[0].output[0])[0]
    dq_in = by_output[to_out.input[0]]
    assert dq_in.op_type == "DequantizeLinear" and by_output[by_output[dq_in.input[0]].input[0]].op_type == "Mul"
    # to_q's output quantizer follows the bias Add; to_k (no output scale) ends in its Add
    to_q = consumers(model, consumers(model, codes[BLOCK + "attn.to_q"].name)[0].output[0])[0]
    (add,) = consumers(model, to_q.output[0])
    assert add.op_type == "Add" and [n.op_type for n in consumers(model, add.output[0])] == ["QuantizeLinear"]
    to_k = consumers(model, consumers(model, codes[BLOCK + "attn.to_k"].name)[0].output[0])[0]
    (add_k,) = consumers(model, to_k.output[0])
    assert "QuantizeLinear" not in [n.op_type for n in consumers(model, add_k.output[0])]


def test_mixed_sidecar_records_the_quantization(mixed):
    out, report, _ = mixed
    s = sidecar(out)
    q = s["quantization"]
    assert q["count"] == 7 and q["schemes"] == {"w8a8": 4, "fp8": 1, "w4a16": 1, "w8a16": 1}
    assert q["output_quantizers"] == 4 and q["input_quantizers"] == 5 and q["opset"] == 21 == s["opset"]
    assert q["layers"][BLOCK + "attn.to_out.0"]["smooth"] and not q["layers"][BLOCK + "attn.to_k"]["output_quant"]
    assert q["layers"][BLOCK + "ff.net.0.proj"]["group_size"] == 16
    assert s["choices"]["opset"]["value"] == 21 and "quantized" in s["choices"]["opset"]["why"]
    summary = report["components"]["transformer"]["quantization"]
    assert summary["count"] == 7 and "layers" not in summary
    assert qdq.describe(summary).startswith("7 quantized linears as QDQ (fp8 1, w4a16 1, w8a16 1, w8a8 4)")


def test_mixed_parity_within_the_derived_bound(mixed):
    out, _, loaded = mixed
    parity = sidecar(out)["checks"]["parity"]
    assert parity["status"] == "passed" and "ORT_ENABLE_BASIC" in parity["runs"][0]["mode"]
    bound = parity["bound"]
    assert bound["layers_with_activation_quantizers"] == 5 and parity["slack_abs"] == bound["quantization_abs"] > 0
    # fp32: one flip per row; the fp8 layer's terms are 32 steps (E4M3's spacing at the top of its range)
    to_v = bound["largest_terms"][BLOCK + "attn.to_v"]
    layer = dict(loaded.denoiser.named_modules())[BLOCK + "attn.to_v"]
    assert to_v["flips_per_row"] == 1 and to_v["output"] == pytest.approx(32 * float(layer.output_scale))
    assert parity["max_abs"] <= 1e-4 * parity["runs"][0]["outputs"]["latent"]["ref_max_abs"] + bound["quantization_abs"]


def test_nm_check_runs_on_the_integer_codes(mixed):
    out, _, loaded = mixed
    checks = sidecar(out)["checks"]
    pruned = checks["pruned_weights"]
    assert pruned["status"] == "passed" and pruned["checked"] == 1 and pruned["zero_fraction"] == pytest.approx(0.5)
    layer = pruned["quantized"]["layers"][BLOCK + "attn.to_q"]
    assert layer == {"codes": "int8", "pattern": "2:4", "holds": True, "zero_fraction": pytest.approx(0.5)}
    cross = checks["nm_crosscheck"]
    assert cross["status"] == "passed" and cross["sparse_2_4_tensors"] >= 1
    model = onnx.load(out / "transformer.onnx")
    codes = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer
                                            if t.name == BLOCK + "attn.to_q.weight_codes"))
    assert codes.dtype == np.int8 and holds_nm(codes.T, (2, 4)) and not holds_nm(codes, (2, 4))
    torch_codes = dict(loaded.denoiser.named_modules())[BLOCK + "attn.to_q"].weight_codes()
    assert np.array_equal(codes.T, torch_codes.numpy())


def test_reference_evaluator_runs_the_qdq_graph(mixed):
    out, _, _ = mixed
    path = out / "transformer.onnx"
    session, mode = QC.reference_session(path, "no kernel")
    assert mode.startswith("onnx.reference.ReferenceEvaluator")
    rng = np.random.default_rng(0)
    feed = {i["name"]: rng.standard_normal(i["profile"]["min"]).astype(np.float32) for i in sidecar(out)["inputs"]}
    opts = ort.SessionOptions()
    QC.quantized_session_options(opts, onnx.load(path))
    ort_out = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    ref_out = session.run(None, feed)[0]
    assert np.abs(ref_out - ort_out).max() <= 1e-3 * np.abs(ort_out).max()


def test_weight_only_graph_runs_through_matmulnbits_with_external_data(tmp_path):
    """w4a16 and w8a16 only (no QuantizeLinear): onnxruntime fuses the blocked INT4 weights into MatMulNBits;
    external data is rewritten without the float weights, and the INT4 codes are read back from it."""
    out = tmp_path / "onnx"
    loaded = quantized_model(WEIGHT_ONLY, pruned=(BLOCK + "ff.net.0.proj",))
    export_onnx(loaded, out, ExportConfig(dtype="fp32", external_data=True, **SIZES), progress=False)
    s = sidecar(out)
    assert s["external_data"] == ["transformer.onnx.data"] and s["quantization"]["input_quantizers"] == 0
    parity = s["checks"]["parity"]
    assert parity["status"] == "passed" and parity["max_rel"] < 1e-4 and "MatMulNBits" in parity["runs"][0]["mode"]
    assert "bound" not in parity or parity["bound"]["quantization_abs"] == 0.0
    assert s["checks"]["pruned_weights"]["quantized"]["layers"][BLOCK + "ff.net.0.proj"]["codes"] == "int4"
    assert s["checks"]["pruned_weights"]["quantized"]["layers"][BLOCK + "ff.net.0.proj"]["holds"]
    head = onnx.load(out / "transformer.onnx", load_external_data=False)
    data = (out / "transformer.onnx.data").stat().st_size
    assert data == sum(int(e.value) for t in head.graph.initializer for e in t.external_data if e.key == "length")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    QC.quantized_session_options(opts, head)
    ort.InferenceSession(str(out / "transformer.onnx"), opts, providers=["CPUExecutionProvider"])
    assert nodes_of(onnx.load(tmp_path / "optimized.onnx", load_external_data=False), "MatMulNBits")


@pytest.fixture(scope="module")
def int8_gemm(tmp_path_factory):
    """w8a8 layers only, legacy exporter with linears as Gemm, output quantizers dropped."""
    out = tmp_path_factory.mktemp("qdq") / "int8"
    loaded = quantized_model(INT8_ONLY)
    cfg = ExportConfig(dtype="fp32", exporter="legacy", linear_as_gemm=True, output_quant=False, **SIZES)
    export_onnx(loaded, out, cfg, progress=False)
    return out, loaded, cfg


def test_no_output_quant_drops_the_output_pairs(int8_gemm):
    out, _, _ = int8_gemm
    s = sidecar(out)
    q = s["quantization"]
    assert q["output_quantizers"] == 0 and not q["output_quant_requested"] and q["input_quantizers"] == 4
    assert s["opset"] == 18 and q["opset"] == 18  # INT8 per-channel QDQ needs nothing newer
    model = onnx.load(out / "transformer.onnx")
    assert len(nodes_of(model, "QuantizeLinear")) == 4
    for name in INT8_ONLY:
        (dq,) = consumers(model, f"{name}.weight_codes")
        (gemm,) = consumers(model, dq.output[0])
        assert gemm.op_type == "Gemm" and {a.name: a.i for a in dq.attribute} == {"axis": 0}
        assert [n.op_type for n in consumers(model, gemm.output[0])] != ["QuantizeLinear"]
    # the reference leaves the output quantizers out as well: the graph is exactly that model
    parity = s["checks"]["parity"]
    assert parity["status"] == "passed" and parity["max_rel"] < 1e-4
    assert parity["bound"]["largest_terms"][BLOCK + "attn.to_q"]["output"] == 0.0
    layer = dict(int8_gemm[1].denoiser.named_modules())[BLOCK + "attn.to_q"]
    assert layer.output_scale is not None  # restored after the reference


def _parity_of(path, loaded, cfg):
    """check_parity of the graph at `path` against the torch module, as the export runs it."""
    cfg, _ = cfg.resolve(None, (13, ""))
    ranges, _ = resolve_ranges(loaded, cfg)
    comp = BUILDERS["transformer"](loaded, cfg, ranges, False)[0]
    cases = [(p, comp.inputs_at(p, cfg.seed + 1 + k)) for k, p in enumerate(parity_points(comp.io))]
    wrapper = comp.wrapper()
    with torch.no_grad(), qdq.output_quantizers(comp.module, keep=cfg.output_quant):
        refs = [[wrapper(*args).numpy()] for _, args in cases]
    bound = QC.parity_bound(comp.module, "fp32", C.TOLERANCES["fp32"], cfg.output_quant)
    return C.check_parity(path, (refs, "torch"), cases, "fp32", slack=bound["quantization_abs"])


def test_a_wrong_scale_in_the_graph_fails_parity(int8_gemm, tmp_path):
    """The bound is a worst case (unit gain from every layer to the output): the exact graph is five orders of
    magnitude inside it, a weight scale twice too large on the timestep embedding (which feeds every adaLN)
    several times outside it."""
    out, loaded, cfg = int8_gemm
    good = _parity_of(out / "transformer.onnx", loaded, cfg)
    assert good["status"] == "passed" and good["max_abs"] < 1e-4 * good["slack_abs"]
    model = onnx.load(out / "transformer.onnx")
    (dq,) = consumers(model, "time_text_embed.timestep_embedder.linear_2.weight_codes")
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * np.float32(2), scale.name))
    onnx.save(model, tmp_path / "wrong.onnx")
    record = _parity_of(tmp_path / "wrong.onnx", loaded, cfg)
    assert record["status"] == "failed" and "max relative error" in record["reason"]
    assert record["max_abs"] > 2 * record["slack_abs"]


def test_fp16_scales_follow_the_graph_precision(tmp_path):
    plan = {BLOCK + "attn.to_v": ("fp8", None, True, False), BLOCK + "attn.to_k": ("w8a8", None, True, False)}
    out = tmp_path / "onnx"
    export_onnx(quantized_model(plan), out, ExportConfig(dtype="fp16", exporter="legacy", **SIZES), progress=False)
    s = sidecar(out)
    assert s["opset"] == 19 and s["checks"]["parity"]["status"] == "passed"
    model = onnx.load(out / "transformer.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    qdq_nodes = nodes_of(model, "QuantizeLinear") + nodes_of(model, "DequantizeLinear")
    assert len(qdq_nodes) == 2 * 2 + 2 * 2 + 2 and all(inits[n.input[1]].data_type == TensorProto.FLOAT16
                                                        for n in qdq_nodes)


def test_opset_too_low_for_the_formats_is_refused(tmp_path):
    need = (21, "INT4 and blocked (per-group) DequantizeLinear need opset 21")
    assert ExportConfig(dtype="fp32").resolve(None, need)[0].opset == 21
    with pytest.raises(ConfigError, match="--opset 20 cannot write this quantized model"):
        ExportConfig(dtype="fp32", opset=20).resolve(None, need)
    with pytest.raises(ConfigError, match="legacy exporter stops at opset 20"):
        ExportConfig(dtype="fp32", exporter="legacy").resolve(None, need)
    with pytest.raises(ConfigError, match="--opset 18 cannot write"):  # refused before anything is exported
        export_onnx(quantized_model(WEIGHT_ONLY), tmp_path / "x", ExportConfig(dtype="fp32", opset=18, **SIZES))
    assert not (tmp_path / "x").exists()


def test_plain_linears_restores_the_classes_even_on_failure():
    lin = torch.nn.Linear(8, 4)
    s = quant.weight_scales(lin.weight.data, quant.FORMATS["int8"])
    lin.weight.data = quant.rtn(lin.weight.data, s, quant.FORMATS["int8"])
    layer = qlinear.quantize_linear_(lin, quant.SCHEMES["w8a8"], s, input_scale=0.01)
    with pytest.raises(RuntimeError), qdq.plain_linears(torch.nn.Sequential(layer)):
        assert type(layer) is torch.nn.Linear
        raise RuntimeError("exporter failed")
    assert type(layer) is qlinear.QuantLinear
    x = torch.randn(3, 8)
    assert not torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # fake quant is back


def test_int4_codes_pack_two_per_byte_low_nibble_first():
    codes = torch.tensor([[1, -2, 3], [-8, 7, 0]], dtype=torch.int8)
    t = qdq.codes_tensor("w", codes, "int4")
    assert t.data_type == TensorProto.INT4 and list(t.dims) == [2, 3] and len(t.raw_data) == 3
    assert onnx.numpy_helper.to_array(t).astype(np.int8).tolist() == codes.tolist()
    assert G.read_initializer(t, ".").astype(np.int8).tolist() == codes.tolist()


def test_cli_has_the_no_output_quant_flag():
    r = CliRunner().invoke(cli, ["onnx", "--help"])
    assert r.exit_code == 0 and "--no-output-quant" in r.output


def test_digits_prune_24_w8a8_then_export_gives_int8_24_graph_that_onnxruntime_runs(tmp_path):
    """The command pair a user runs: `obsdiff prune --sparsity-type 2:4 --quant w8a8` on builtin:digits, then the
    default `obsdiff-export onnx` (fp16): Q/DQ on every pruned layer's input and output, 2:4 int8 weights, and
    onnxruntime's output within the bound of the torch fake-quant module."""
    from obsdiff.cli import cli as obsdiff_cli
    from obsdiff.runs.loading import load_pipeline

    run, out = tmp_path / "run", tmp_path / "onnx"
    r = CliRunner().invoke(obsdiff_cli, ["prune", "--model", "builtin:digits", "--sparsity-type", "2:4", "--quant",
                                         "w8a8", "--num-prompts", "4", "--steps", "2", "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert "69, w8a8 (obs)" in r.output
    r = CliRunner().invoke(cli, ["onnx", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out / "transformer.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 * 69 and ops.count("DequantizeLinear") == 3 * 69  # in, out, weight
    codes = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
             if i.data_type == TensorProto.INT8 and len(i.dims) == 2}  # zero points are scalars
    assert len(codes) == 69
    # MatMul weights are stored (d_in, d_out): 2:4 runs along the first axis; Gemm keeps torch's (d_out, d_in)
    assert all(holds_nm(c.T, (2, 4)) or holds_nm(c, (2, 4)) for c in codes.values())
    sidecar = json.loads((out / "transformer.json").read_text())
    parity = sidecar["checks"]["parity"]
    assert parity["status"] == "passed" and parity["max_abs"] <= parity["slack_abs"]
    assert sidecar["quantization"]["output_quantizers"] == 69
    denoiser = load_pipeline(str(run), dtype="fp32").denoiser
    assert len(qlinear.quantized_layers(denoiser)) == 69
