import copy
import json

import pytest


def export_sidecar(inputs, dtype="fp32", sparsity_type=None, sha256="0" * 64):
    """A sidecar dict with the keys `obsdiff-export onnx` writes (the subset the engines read, plus noise)."""
    source = {"model": "runs/x" if sparsity_type else "builtin:digits", "family": "sd3"}
    if sparsity_type:
        source["run"] = {"path": "/abs/runs/x", "denoiser_sha256": "a" * 64,
                         "prune": {"method": "obs-diff", "sparsity_type": sparsity_type}}
    return {
        "format": 1, "artifact": "onnx", "component": "transformer", "kind": "transformer", "file": "transformer.onnx",
        "sha256": sha256, "dtype": dtype, "opset": 18,
        "inputs": [{"name": n, "dtype": d, "shape": list(s), "feeds": n, "profile": copy.deepcopy(p)}
                   for n, d, s, p in inputs],
        "outputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}],
        "source": source,
    }


SD3_INPUTS = [
    ("hidden_states", "float16", ["batch", 16, "height", "width"],
     {"min": [1, 16, 64, 64], "opt": [2, 16, 128, 128], "max": [8, 16, 192, 192]}),
    ("encoder_hidden_states", "float16", ["batch", 333, 4096],
     {"min": [1, 333, 4096], "opt": [2, 333, 4096], "max": [8, 333, 4096]}),
    ("pooled_projections", "float16", ["batch", 2048], {"min": [1, 2048], "opt": [2, 2048], "max": [8, 2048]}),
    ("timestep", "float32", ["batch"], {"min": [1], "opt": [2], "max": [8]}),
]


@pytest.fixture
def onnx_with_sidecar(tmp_path):
    """A stand-in .onnx file (bytes only) with an export sidecar describing SD3 inputs; returns a writer."""

    def make(inputs=SD3_INPUTS, dtype="fp16", sparsity_type="2:4", name="transformer"):
        onnx = tmp_path / f"{name}.onnx"
        onnx.write_bytes(b"onnx graph bytes " + name.encode())
        onnx.with_suffix(".json").write_text(json.dumps(export_sidecar(inputs, dtype, sparsity_type)))
        return onnx

    return make


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_sd3_dir, tmp_path_factory):
    """A real fp32 export of the tiny SD3 denoiser: batch 1-4, the default latent sizes (8..32, tuned for 8) and
    the pipeline's text length."""
    from obsdiff.export.config import ExportConfig
    from obsdiff.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx") / "onnx"
    export_onnx(str(tiny_sd3_dir), out, ExportConfig(dtype="fp32", batch=(1, 2, 4), parity=False))
    return out


@pytest.fixture(scope="session")
def tiny_run_24(tiny_sd3_dir, tmp_path_factory):
    """The tiny SD3 pruned 2:4 by magnitude (no calibration), saved as a run directory."""
    from obsdiff.config import PruneConfig
    from obsdiff.pruning.prune import prune_
    from obsdiff.runs.io import save_run
    from obsdiff.runs.loading import load_pipeline

    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
    return save_run(model, report.to_dict(), tmp_path_factory.mktemp("runs") / "tiny-24")
