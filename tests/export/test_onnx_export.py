"""ONNX export end to end on CPU: every family, dense and pruned runs, precisions, and the checks' verdicts.

Dynamo exports of the tiny models take 3-10 s each on a 2-core CPU; tests share them through fixtures.
The SDXL UNet through dynamo (10-60 s depending on load) is marked `slow`; SDXL's fast path is the legacy
exporter.
"""

import contextlib
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.export import checks as C
from obsdiff.export.cli import cli
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import ExportCheckError, export_onnx
from obsdiff.pruning.prune import prune_
from obsdiff.runs.artifacts import sha256_file
from obsdiff.runs.io import RunRecord, save_run
from obsdiff.runs.loading import as_loaded, load_pipeline
from tests.conftest import tiny_flux, tiny_sdxl

CALIB = CalibConfig(num_prompts=4, steps=3, guidance=2.0, batch_size=2, groups=2)
SMALL_TEXT = (8, 16, 32)


def sidecar(out, name="transformer"):
    return json.loads((out / f"{name}.json").read_text())


def nm_holds(w: np.ndarray, n: int, m: int) -> bool:
    """N:M along the torch input dim of a torch-layout (out, in) weight."""
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


@pytest.fixture(scope="module")
def sd3_runs(tiny_sd3_dir, tmp_path_factory):
    """2:4 and structured runs of the tiny SD3 pipeline, exported in fp32 with the default dynamo exporter."""
    root = tmp_path_factory.mktemp("sd3_runs")
    runs = {}
    for name, cfg in [("24", PruneConfig(sparsity_type="2:4")),
                      ("structured", PruneConfig(sparsity_type="structured", sparsity=0.5))]:
        model = load_pipeline(str(tiny_sd3_dir))
        report = prune_(model, cfg, CALIB, progress=False)
        run = save_run(model, report.to_dict(), root / name)
        out = root / f"{name}_onnx"
        export_onnx(str(run), out, ExportConfig(dtype="fp32", text_len=SMALL_TEXT))
        runs[name] = (run, out)
    return runs


def test_two_four_run_keeps_its_pattern_in_the_graph(sd3_runs):
    run, out = sd3_runs["24"]
    s = sidecar(out)
    record = json.loads((run / "obsdiff.json").read_text())
    checks = s["checks"]
    assert checks["onnx_checker"]["status"] == "passed" and checks["no_float64"]["count"] == 0
    assert checks["parity"]["status"] == "passed" and checks["parity"]["max_rel"] < 1e-4
    pruned = checks["pruned_weights"]
    assert pruned["checked"] == len(record["layers"]) == 21 and pruned["missing"] == pruned["violating"] == 0
    assert pruned["found_via"]["name_scopes"] == 21 and pruned["zero_fraction"] == pytest.approx(0.5)
    poly = checks["nm_crosscheck"]
    assert poly["sparse_2_4_tensors"] >= 21 and poly["agrees"]
    assert s["source"]["run"]["denoiser_sha256"] == record["denoiser_sha256"]
    assert s["source"]["run"]["prune"]["sparsity_type"] == "2:4"
    # independent of the check: MatMul initializers of the FFN up projections (16 -> 64, stored transposed
    # as (in, out)) hold the 2:4 pattern along the torch input dim
    model = onnx.load(out / "transformer.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].shape == (16, 64)]
    assert len(weights) == 3 and all(nm_holds(w.T, 2, 4) for w in weights)


def test_structured_run_has_shrunk_shapes(sd3_runs):
    run, out = sd3_runs["structured"]
    s = sidecar(out)
    shapes = s["checks"]["structured_shapes"]
    assert shapes["status"] == "passed" and shapes["mismatched"] == shapes["missing"] == 0
    assert shapes["checked"] == shapes["shrunk"] == 21  # every prunable linear reads or writes heads or neurons
    to_q = load_pipeline(str(run)).denoiser.transformer_blocks[0].attn.to_q
    assert to_q.out_features == 8  # one of two heads of 8 removed
    assert shapes["examples"]["transformer_blocks.0.attn.to_q"] == {"dense": [16, 16], "onnx": [8, 16]}
    assert s["checks"]["parity"]["status"] == "passed" and s["checks"]["parity"]["max_rel"] < 1e-4
    assert s["checks"]["pruned_weights"]["status"] == "passed"  # compensated readers exported as they are


@pytest.fixture(scope="module")
def digits_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "onnx"
    r = CliRunner().invoke(cli, ["onnx", "builtin:digits", "--out", str(out), "--dtype", "fp32", "--batch", "1:2:8",
                                 "--height", "4:8:16", "--width", "4:8:16", "--text-len", "8:16:32"])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_digits_transformer_sidecar(digits_fp32):
    out, output = digits_fp32
    assert "transformer" in output and "parity passed" in output
    s = sidecar(out)
    assert [i["name"] for i in s["inputs"]] == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                "timestep"]
    assert [o["name"] for o in s["outputs"]] == ["latent"] and s["outputs"][0]["shape"] == ["batch", 4, "height",
                                                                                             "width"]
    hidden = s["inputs"][0]
    assert hidden["shape"] == ["batch", 4, "height", "width"] and hidden["dtype"] == "float32"
    # the given ranges: 8x8 latents (4..16, patch multiples), text 16 = 8 CLIP + 8 T5 (8..32)
    assert hidden["profile"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    assert s["inputs"][1]["profile"]["opt"] == [2, 16, 64] and s["dims"]["text"] == {"min": 8, "opt": 16, "max": 32,
                                                                                      "multiple": 1}
    assert s["dims"]["height"]["multiple"] == 2
    assert s["sha256"] == sha256_file(out / "transformer.onnx") and s["external_data"] is None
    assert s["bytes"] == (out / "transformer.onnx").stat().st_size > 1e6
    assert s["source"]["model"] == "builtin:digits" and len(s["source"]["weights_sha256"]) == 1
    assert s["versions"]["onnx"] and s["versions"]["torch"] and s["machine"]["cpu_count"]
    assert s["export_seconds"] > 0 and s["opset"] == 18 and s["exporter"] == "dynamo"
    parity = s["checks"]["parity"]
    assert parity["max_rel"] < 1e-4 and parity["reference"] == "torch fp32 on cpu"
    example = {"batch": 2, "height": 8, "width": 8, "text": 16}  # the traced shape, also the tuned one
    assert parity["points"] == [{"batch": 1, "height": 4, "width": 4, "text": 8},
                                {"batch": 1, "height": 10, "width": 10, "text": 17},
                                {"batch": 3, "height": 4, "width": 4, "text": 8}, example]
    assert s["graph"]["einsum_to_transpose"] == 1 and s["graph"]["initializers_renamed"] > 0
    model = onnx.load(out / "transformer.onnx")
    assert not [n for n in model.graph.node if n.op_type == "Einsum"]
    assert any(t.name == "pos_embed.proj.weight" for t in model.graph.initializer)  # torch names, no wrapper prefix
    report = json.loads((out / "export.json").read_text())
    assert report["components"]["transformer"]["checks"]["parity"] == "passed"


def test_digits_all_components_fp16(tmp_path):
    out = tmp_path / "onnx"
    report = export_onnx("builtin:digits", out, ExportConfig(component="all", dtype="fp16", batch=(1, 2, 4),
                                                             height=(4, 8, 16), width=(4, 8, 16)))
    assert set(report["components"]) == {"transformer", "vae_decoder", "text_encoder", "text_encoder_2",
                                         "text_encoder_3"}
    t = sidecar(out)
    assert t["dtype"] == "fp16" and t["inputs"][0]["dtype"] == "float16" and t["inputs"][3]["dtype"] == "float32"
    assert t["checks"]["parity"]["reference"] == "torch fp16 on cpu"
    assert t["checks"]["parity"]["max_rel"] < 2e-2 and t["checks"]["parity"]["tolerance_rel"] == 2e-2
    assert t["checks"]["no_float64"]["status"] == "passed"
    vae = sidecar(out, "vae_decoder")
    assert vae["dtype"] == "fp32" and vae["requested_dtype"] == "fp16" and "force_upcast" in vae["notes"][0]
    assert vae["choices"]["dtype"] == {"value": "fp32", "requested": "fp16", "why": vae["notes"][0]}
    assert vae["choices"]["profile"]["ranges"]["batch"] == [1, 2, 4] and vae["choices"]["profile"]["given"] == [
        "batch", "height", "width"]
    assert [i["name"] for i in vae["inputs"]] == ["latent"] and vae["outputs"][0]["name"] == "images"
    assert vae["inputs"][0]["profile"]["max"] == [4, 4, 16, 16] and vae["checks"]["parity"]["max_rel"] < 1e-4
    assert vae["module"]["scaling_factor"] == pytest.approx(0.8561, abs=1e-4)
    clip = sidecar(out, "text_encoder")
    assert [o["name"] for o in clip["outputs"]] == ["text_embeddings", "hidden_states", "pooled_output"]
    assert clip["inputs"][0] | {"profile": None} == {"name": "input_ids", "dtype": "int64", "shape": ["batch", 8],
                                                      "feeds": "input_ids", "profile": None}
    t5 = sidecar(out, "text_encoder_3")
    assert any("wo" in n and "fp32" in n for n in t5["notes"]) and t5["checks"]["parity"]["status"] == "passed"


def test_in_memory_pipeline_is_not_cast_in_place(tiny_sd3_dir, tmp_path):
    pipe = load_pipeline(str(tiny_sd3_dir)).pipeline
    export_onnx(pipe, tmp_path / "onnx", ExportConfig(dtype="fp16", exporter="legacy", text_len=SMALL_TEXT))
    assert pipe.transformer.dtype == torch.float32
    s = sidecar(tmp_path / "onnx")
    assert s["dtype"] == "fp16" and s["checks"]["parity"]["max_rel"] < 2e-2


def test_sd3_legacy_linear_as_gemm_and_external_data(tiny_sd3_dir, tmp_path):
    out = tmp_path / "onnx"
    export_onnx(str(tiny_sd3_dir), out, ExportConfig(dtype="fp32", exporter="legacy", linear_as_gemm=True,
                                                     external_data=True, text_len=SMALL_TEXT))
    s = sidecar(out)
    assert s["external_data"] == ["transformer.onnx.data"] and (out / "transformer.onnx.data").stat().st_size > 1e5
    assert s["external_data_sha256"] == {"transformer.onnx.data": sha256_file(out / "transformer.onnx.data")}
    assert s["bytes"] == sum((out / f).stat().st_size for f in ("transformer.onnx", "transformer.onnx.data"))
    model = onnx.load(out / "transformer.onnx", load_external_data=False)
    gemm_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    assert "transformer_blocks.0.attn.to_q.weight" in gemm_weights  # named, torch layout (transB=1)
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in
                {t.name for t in model.graph.initializer}]
    assert s["outputs"][0]["shape"] == ["batch", 4, "height", "width"]
    assert s["checks"]["parity"]["max_rel"] < 1e-4 and s["linear_as_gemm"]


def test_flux_export_has_no_float64(flux_export):
    s = sidecar(flux_export)
    assert [i["name"] for i in s["inputs"]] == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                "timestep", "img_ids", "txt_ids"]
    assert s["inputs"][4]["shape"] == ["image_tokens", 3] and s["inputs"][0]["shape"] == ["batch", "image_tokens", 64]
    assert s["dims"]["image_tokens"] == {"min": 4, "opt": 16, "max": 64, "multiple": 1}
    assert s["checks"]["no_float64"] == {"status": "passed", "count": 0}
    assert s["checks"]["parity"]["max_rel"] < 1e-4
    model = onnx.load(flux_export / "transformer.onnx")
    assert not C.G.float64_uses(onnx.shape_inference.infer_shapes(model))


def test_flux_float64_left_fails_and_leaves_nothing(tmp_path, monkeypatch):
    from obsdiff.models.flux import FluxFamily

    monkeypatch.setattr(FluxFamily, "onnx_export_context", lambda self, denoiser: contextlib.nullcontext())
    out = tmp_path / "onnx"
    with pytest.raises(ExportCheckError, match="no_float64 check: .* float64 .*TensorRT has no FP64"):
        export_onnx(tiny_flux(), out, ExportConfig(dtype="fp16", height=(4, 8, 8), width=(4, 8, 8),
                                                   text_len=(8, 16, 16), parity=False))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_flux_legacy_exporter_fails_cleanly(tmp_path):
    with pytest.raises(Exception, match="legacy exporter cannot export transformer .*rms_norm.*--exporter dynamo"):
        export_onnx(tiny_flux(), tmp_path / "x", ExportConfig(dtype="fp32", exporter="legacy", height=(4, 8, 8),
                                                              width=(4, 8, 8), text_len=(8, 16, 16)))
    assert list(tmp_path.iterdir()) == []


def test_sdxl_legacy_dense_and_two_four(tmp_path):
    pipe = tiny_sdxl()
    cfg = ExportConfig(dtype="fp32", exporter="legacy", height=(4, 8, 16), width=(4, 8, 16))
    export_onnx(pipe, tmp_path / "dense", cfg)
    s = sidecar(tmp_path / "dense", "unet")
    assert [i["name"] for i in s["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                "time_ids"]
    assert s["inputs"][2]["shape"] == ["batch", 8, 64]  # CLIP's fixed length: static
    assert s["checks"]["parity"]["max_rel"] < 1e-4
    report = prune_(pipe, PruneConfig(sparsity_type="2:4"), CalibConfig(num_prompts=2, steps=2, batch_size=2,
                                                                         groups=1, guidance=3.0), progress=False)
    model = dataclasses.replace(as_loaded(pipe), run=RunRecord.from_dict(report.to_dict()))
    export_onnx(model, tmp_path / "pruned", cfg)
    checks = sidecar(tmp_path / "pruned", "unet")["checks"]
    pruned = checks["pruned_weights"]
    assert pruned["checked"] == len(report.pruned_layers) > 0 and pruned["violating"] == pruned["missing"] == 0
    assert pruned["found_via"]["name_scopes"] == pruned["checked"]  # legacy node names map back to modules
    assert checks["nm_crosscheck"]["agrees"] and checks["parity"]["status"] == "passed"


@pytest.mark.slow
def test_sdxl_dynamo_dense(tmp_path):
    export_onnx(tiny_sdxl(), tmp_path / "onnx", ExportConfig(dtype="fp32", height=(4, 8, 16), width=(4, 8, 16)))
    s = sidecar(tmp_path / "onnx", "unet")
    assert s["checks"]["parity"]["max_rel"] < 1e-4 and s["outputs"][0]["shape"] == ["batch", 4, "height", "width"]


def test_flux_two_four_fp16(tmp_path):
    pipe = tiny_flux()
    report = prune_(pipe, PruneConfig(sparsity_type="2:4"), CalibConfig(num_prompts=2, steps=2, batch_size=2, groups=1,
                                                                         guidance=3.0), progress=False)
    model = dataclasses.replace(as_loaded(pipe), run=RunRecord.from_dict(report.to_dict()))
    export_onnx(model, tmp_path / "onnx", ExportConfig(dtype="fp16", height=(4, 8, 16), width=(4, 8, 16),
                                                       text_len=(8, 16, 32)))
    checks = sidecar(tmp_path / "onnx")["checks"]
    pruned = checks["pruned_weights"]
    assert pruned["checked"] == len(report.pruned_layers) and pruned["violating"] == 0
    assert checks["no_float64"]["count"] == 0 and checks["parity"]["max_rel"] < 2e-2


def test_sd3_two_four_bf16_opset22(sd3_runs, tmp_path):
    run, _ = sd3_runs["24"]
    export_onnx(str(run), tmp_path / "onnx", ExportConfig(dtype="bf16", opset=22, text_len=SMALL_TEXT))
    s = sidecar(tmp_path / "onnx")
    assert s["inputs"][0]["dtype"] == "bfloat16" and s["checks"]["parity"]["tolerance_rel"] == 5e-2
    assert "retyped to fp32" in s["checks"]["parity"]["runs"][0]["mode"]
    assert s["checks"]["pruned_weights"]["violating"] == 0 and s["checks"]["nm_crosscheck"]["agrees"]


def test_failed_check_is_a_one_line_error_and_leaves_nothing(tiny_sd3_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(C.TOLERANCES, "fp32", 1e-12)
    r = CliRunner().invoke(cli, ["onnx", str(tiny_sd3_dir), "--out", str(tmp_path / "x"), "--exporter", "legacy",
                                 "--dtype", "fp32", "--text-len", "8:16:32"])
    seen = r.output.rsplit("\r", 1)[-1]  # what a terminal shows: the progress bar clears its line on the way out
    assert r.exit_code == 2 and seen.count("\n") == 1 and r.output.count("\n") == 1, r.output
    assert seen.startswith("error: transformer.onnx failed the parity check: latent max relative error")
    assert list(tmp_path.iterdir()) == []
