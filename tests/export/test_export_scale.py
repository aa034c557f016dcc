"""What keeps a real-size export within memory: only the denoiser is loaded (in the export precision) and freed
before onnxruntime runs, graphs are retyped through external data, and the N:M cross-check streams weights.

Real sizes are measured by bench/export_scale.py; here tiny models and hand-built graphs take the same code
paths (the in-memory size limit lowered to 0 where a path is only taken above it).
"""

import gc
import json
import shutil
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from obsdiff.config import PruneConfig
from obsdiff.export import checks as C
from obsdiff.export import graph as G
from obsdiff.export import onnx_export as E
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from obsdiff.pruning.prune import prune_
from obsdiff.runs.io import save_run
from obsdiff.runs.loading import load_denoiser, load_pipeline

SMALL_TEXT = (8, 16, 32)


@pytest.fixture(scope="module")
def run_without_encoders(tiny_sd3_dir, tmp_path_factory):
    """A 2:4 magnitude run whose base pipeline has lost its text encoders and VAE (only the denoiser is left)."""
    root = tmp_path_factory.mktemp("no_encoders")
    base = root / "base"
    shutil.copytree(tiny_sd3_dir, base)
    model = load_pipeline(str(base))
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
    run = save_run(model, report.to_dict(), root / "run")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        shutil.rmtree(base / part)
    return run


def test_load_denoiser_loads_the_denoiser_alone_in_the_asked_dtype(run_without_encoders, tiny_sd3_dir):
    found = load_denoiser(str(run_without_encoders), "fp16")
    denoiser = found.denoiser
    assert found.family.name == "sd3" and type(denoiser).__name__ == "SD3Transformer2DModel"
    assert {p.dtype for p in denoiser.parameters()} == {torch.float16}
    assert found.run.sparsity_type == "2:4" and found.tokenizer_max_length["tokenizer"] > 0
    w = denoiser.transformer_blocks[0].attn.to_q.weight
    assert float((w == 0).float().mean()) == 0.5  # the pruned weights, not the base ones
    plain = load_denoiser(str(tiny_sd3_dir), "bf16")
    assert {p.dtype for p in plain.denoiser.parameters()} == {torch.bfloat16} and plain.run is None
    meta = load_denoiser(str(tiny_sd3_dir), weights=False)
    assert all(p.is_meta for p in meta.denoiser.parameters())


def test_run_exports_without_text_encoders_and_frees_torch_before_onnxruntime(run_without_encoders, tmp_path,
                                                                               monkeypatch):
    loaded = {}
    real_load, real_parity = E._load, C.check_parity

    def load(model, cfg):
        result = real_load(model, cfg)
        loaded["denoiser"] = weakref.ref(result[0].denoiser)
        loaded["dtype"] = result[0].denoiser.dtype
        loaded["parts"] = sorted(vars(result[0].pipeline))
        return result

    def parity(*args, **kwargs):
        gc.collect()
        loaded["alive_at_parity"] = loaded["denoiser"]() is not None
        return real_parity(*args, **kwargs)

    monkeypatch.setattr(E, "_load", load)
    monkeypatch.setattr(C, "check_parity", parity)
    export_onnx(str(run_without_encoders), tmp_path / "onnx", ExportConfig(dtype="fp16", text_len=SMALL_TEXT))
    s = json.loads((tmp_path / "onnx" / "transformer.json").read_text())
    assert loaded["dtype"] == torch.float16 and s["dtype"] == "fp16" and s["inputs"][0]["dtype"] == "float16"
    assert loaded["parts"] == ["tokenizer", "tokenizer_2", "tokenizer_3", "transformer"]  # configs, no encoders
    assert loaded["alive_at_parity"] is False
    checks = s["checks"]
    assert checks["parity"]["status"] == checks["pruned_weights"]["status"] == "passed"
    cross = checks["nm_crosscheck"]
    assert cross["status"] == "passed" and cross["sparse_tensors"] >= cross["expected_at_least"] == 21
    assert cross["tool"].startswith("polygraphy") and cross["weights"] > 0 and cross["seconds"] > 0
    assert cross["pattern"] == "2:4" and cross["sparse_2_4_tensors"] == cross["sparse_tensors"] <= cross["tensors"]


def test_bf16_parity_through_external_data_when_over_the_limit(run_without_encoders, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "EXTERNAL_COPY_BYTES", 0)
    export_onnx(str(run_without_encoders), tmp_path / "onnx",
                ExportConfig(dtype="bf16", opset=22, text_len=SMALL_TEXT))
    s = json.loads((tmp_path / "onnx" / "transformer.json").read_text())
    parity = s["checks"]["parity"]
    assert parity["status"] == "passed" and parity["max_rel"] < 5e-2
    assert all("cast at run time from external data" in r["mode"] for r in parity["runs"])
    assert not list((tmp_path / "onnx").glob(".*fp32view*"))  # the views are removed
    assert s["checks"]["nm_crosscheck"]["status"] == "passed"


def _matmul_graph(tmp_path, w: np.ndarray, elem=TensorProto.FLOAT16):
    """y = x @ w with `w` (in, out) stored as external data; returns the model path."""
    x = helper.make_tensor_value_info("x", elem, [2, w.shape[0]])
    y = helper.make_tensor_value_info("y", elem, [2, w.shape[1]])
    init = numpy_helper.from_array(w, "w")
    if elem == TensorProto.BFLOAT16:
        bits = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16
        init = helper.make_tensor("w", elem, w.shape, bits.tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_float_view_keeps_the_weights_in_their_file(tmp_path, elem):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float16)
    path = _matmul_graph(tmp_path, w, elem)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    view = tmp_path / ".m.fp32view.onnx"
    assert G.float_view(path, elem, view) == 1
    assert not (tmp_path / ".m.fp32view.onnx.data").exists()  # nothing copied: the Cast reads m.onnx.data
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before
    head = onnx.load(str(view), load_external_data=False)
    assert head.graph.node[0].op_type == "Cast" and head.graph.input[0].type.tensor_type.elem_type == 1
    onnx.checker.check_model(str(view))
    sess = ort.InferenceSession(str(view), providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"])
    x = rng.standard_normal((2, 64)).astype(np.float32)
    (out,) = sess.run(None, {"x": x})
    ref = x @ G.read_initializer(onnx.load(str(path), load_external_data=False).graph.initializer[0], tmp_path)
    assert np.allclose(out, ref, atol=1e-4)


def test_float_view_moves_embedded_weights_to_external_data(tmp_path):
    w = np.arange(64 * 32, dtype=np.float16).reshape(64, 32) / 1000
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 32])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "e.onnx"))
    view = tmp_path / ".e.fp32view.onnx"
    G.float_view(tmp_path / "e.onnx", TensorProto.FLOAT16, view)
    assert (tmp_path / ".e.fp32view.onnx.data").stat().st_size == w.nbytes
    (out,) = ort.InferenceSession(str(view), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 64), np.float32)})
    assert np.allclose(out, np.ones((2, 64)) @ w.astype(np.float32), rtol=1e-3)


def _two_four(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(in=rows, out=cols) MatMul weight, 2:4 along axis 0 (the torch input dim)."""
    rng = np.random.default_rng(seed)
    w = (rng.integers(1, 16, (rows, cols)) / 8).astype(np.float16)  # non-zero, exact in fp16 and bf16
    w.reshape(rows // 4, 4, cols)[:, :2, :] = 0
    return w


@pytest.mark.parametrize("python_limit", [0, 10**9])  # numpy scan, polygraphy's own per-tensor check
def test_streaming_crosscheck_finds_a_violation_planted_in_the_data_file(tmp_path, python_limit):
    w = _two_four(16, 8)
    path = _matmul_graph(tmp_path, w)
    rec = C.nm_crosscheck(path, (2, 4), expected=1, polygraphy_max_weights=python_limit)
    assert (rec["status"], rec["sparse_tensors"], rec["tensors"], rec["weights"]) == ("passed", 1, 1, 128)
    assert ("process_tensor" in rec["tool"]) == (python_limit > 0)
    # plant one non-zero where the pattern needs a zero: row 1 (in 0..3's group), column 5, in the file itself
    t = onnx.load(str(path), load_external_data=False).graph.initializer[0]
    offset = int({e.key: e.value for e in t.external_data}["offset"]) + (1 * 8 + 5) * 2
    with open(tmp_path / "m.onnx.data", "r+b") as f:
        f.seek(offset)
        f.write(np.float16(0.5).tobytes())
    rec = C.nm_crosscheck(path, (2, 4), expected=1, polygraphy_max_weights=python_limit)
    assert (rec["status"], rec["sparse_tensors"], rec["agrees"]) == ("failed", 0, False)
    assert "finds 0 2:4 weight tensors, fewer than the 1 pruned" in rec["reason"]


def test_read_initializer_reads_one_tensor_by_offset(tmp_path):
    w = _two_four(8, 4)
    path = _matmul_graph(tmp_path, w, TensorProto.BFLOAT16)
    t = onnx.load(str(path), load_external_data=False).graph.initializer[0]
    arr = G.read_initializer(t, tmp_path)
    assert arr.dtype == np.float32 and np.array_equal(arr, w.astype(np.float32))
    assert G.weight_bytes(onnx.load(str(path), load_external_data=False)) == 8 * 4 * 2


def test_vae_only_export_loads_no_denoiser_weights_and_no_text_encoders(tmp_path):
    cfg = ExportConfig(component="vae-decoder")
    loaded, owned = E._load("builtin:digits", cfg)
    assert owned and loaded.pipeline.text_encoder is None and loaded.pipeline.text_encoder_3 is None
    assert all(p.is_meta for p in loaded.denoiser.parameters())  # its config sets the default shapes only
    assert loaded.pipeline.vae is not None
    report = export_onnx("builtin:digits", tmp_path / "onnx", cfg)
    assert list(report["components"]) == ["vae_decoder"]
    assert report["components"]["vae_decoder"]["checks"]["parity"] == "passed"
