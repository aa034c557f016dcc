"""Every quantization scheme with every sparsity type, from the prune to the exported QDQ graph: the run exports,
passes parity against its fake-quantization module, and a 2:4 run's integer codes hold 2:4 in the graph."""

from __future__ import annotations

import json

import onnx
import pytest

from obsdiff.config import CalibConfig, PruneConfig, QuantConfig
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from obsdiff.pruning.prune import prune_
from obsdiff.runs.io import save_run
from obsdiff.runs.loading import load_pipeline

SCHEMES = {"w8a8": {}, "fp8": {}, "w4a16": {"group_size": 8}, "w8a16": {}}  # 8: structured leaves 8-wide inputs
SPARSITY = {"none": {"sparsity_type": "none"}, "unstructured": {"sparsity": 0.5}, "2:4": {"sparsity_type": "2:4"},
            "structured": {"sparsity_type": "structured", "sparsity": 0.5}}
CALIB = CalibConfig(num_prompts=2, steps=2, batch_size=2, guidance=2.0, groups=1)
SIZES = dict(text_len=(8, 8, 8), height=(8, 8, 16), width=(8, 8, 16), batch=(1, 2, 2))


@pytest.mark.parametrize("sparsity", list(SPARSITY))
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_with_every_sparsity_type_exports_and_passes(scheme, sparsity, tiny_sd3_dir, tmp_path):
    model = load_pipeline(str(tiny_sd3_dir))
    prune = PruneConfig(quant=QuantConfig(scheme, **SCHEMES[scheme]), **SPARSITY[sparsity])
    report = prune_(model, prune, CALIB, progress=False)
    run = save_run(model, report.to_dict(), tmp_path / "run")
    out = tmp_path / "onnx"
    exporter = "dynamo" if scheme == "w4a16" else "legacy"  # blocked INT4 needs opset 21, past the legacy exporter
    export_onnx(str(run), out, ExportConfig(dtype="fp32", exporter=exporter, **SIZES), progress=False)
    sidecar = json.loads((out / "transformer.json").read_text())
    checks = sidecar["checks"]
    assert checks["parity"]["status"] == "passed" and checks["pruned_weights"]["status"] == "passed"
    quantized = sidecar["quantization"]
    n = len(report.quantized)  # 21: the last block has no text-stream output projection and FFN
    assert quantized["count"] == n == 21 and quantized["schemes"] == {scheme: n}
    ops = [n.op_type for n in onnx.load(str(out / "transformer.onnx"), load_external_data=False).graph.node]
    act = scheme in ("w8a8", "fp8")
    outputs = act and sparsity == "2:4" and scheme == "w8a8"  # the default output quantizers: 2:4 INT8 layers
    assert ops.count("QuantizeLinear") == n * (act + outputs)
    assert ops.count("DequantizeLinear") == n * (1 + act + outputs)
    if sparsity == "2:4":
        layers = checks["pruned_weights"]["quantized"]["layers"]  # the check read the codes
        assert len(layers) == n and all(r["holds"] and r["pattern"] == "2:4" for r in layers.values())
        codes = {"fp8": "float8_e4m3fn", "w4a16": "int4"}.get(scheme, "int8")
        assert {r["codes"] for r in layers.values()} == {codes}
