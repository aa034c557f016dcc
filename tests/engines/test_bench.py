"""Benchmarks: statistics, the result schema, ratios, skipped backends, pipeline stages, CLI outputs."""

import json

import pytest
import torch
from click.testing import CliRunner

from obsdiff.engines import bench as B
from obsdiff.engines.bench_config import BenchConfig
from obsdiff.engines.cli import cli
from obsdiff.engines.report import format_bench
from obsdiff.engines.timing import summarize
from obsdiff.errors import ConfigError


def test_summary_statistics():
    s = summarize([0.004, 0.001, 0.003, 0.002, 0.010])
    assert s["median"] == pytest.approx(3.0) and s["min"] == pytest.approx(1.0) and s["n"] == 5
    assert s["p90"] == pytest.approx(7.6)  # between 4 and 10 ms at rank 3.6
    assert s["iqr"] == pytest.approx(2.0) and s["mean"] == pytest.approx(4.0)
    assert summarize([0.002])["stdev"] == 0.0


def test_config_validation():
    assert BenchConfig(backends="torch, onnxruntime").backends == ("torch", "onnxruntime")
    with pytest.raises(ConfigError, match="unknown backend 'trt'"):
        BenchConfig(backends="torch,trt")
    with pytest.raises(ConfigError, match="--iters 0"):
        BenchConfig(iters=0)


@pytest.fixture(scope="module")
def denoiser_result(tiny_sd3_dir, tiny_run_24, tiny_onnx_dir):
    cfg = BenchConfig(backends=("torch", "onnxruntime", "torch-sparse24", "tensorrt"), warmup=1, iters=4)
    return B.run_bench({"dense": str(tiny_sd3_dir), "2:4": str(tiny_run_24)}, cfg, reference="dense",
                       onnx={"dense": tiny_onnx_dir})


def test_denoiser_bench_schema_and_ratios(denoiser_result):
    r = denoiser_result
    assert r["schema"] == "obsdiff.bench" and r["schema_version"] == 1 and r["scope"] == "denoiser"
    assert r["baseline"] == {"model": "dense", "backend": "torch"} and r["reference"] == "dense"
    assert set(r["inputs"]) >= {"batch", "height", "width", "latent_height", "latent_width", "text_len"}
    assert r["models"]["dense"]["flop_ratio"] == 1.0 and r["models"]["2:4"]["sparsity_type"] == "2:4"
    assert r["models"]["2:4"]["flop_ratio"] == pytest.approx(1.0)  # zeros are still multiplied
    rows = {(row["model"], row["backend"]): row for row in r["rows"]}
    assert len(rows) == 8  # every (model, backend), nothing dropped
    for key in [("dense", "torch"), ("dense", "onnxruntime"), ("2:4", "torch"), ("2:4", "onnxruntime")]:
        row = rows[key]
        assert row["status"] == "ok", row
        s = row["latency_ms"]
        assert s["n"] == 4 and 0 < s["min"] <= s["median"] <= s["p90"]
        base = rows[("dense", "torch")]["latency_ms"]
        assert row["ratio"]["median"] == pytest.approx(s["median"] / base["median"])
        assert row["speedup"] == pytest.approx(1 / row["ratio"]["median"])
        same = rows[("dense", key[1])]["latency_ms"]
        assert row["ratio_same_backend"]["median"] == pytest.approx(s["median"] / same["median"])
        assert row["max_abs_diff_vs_torch"] < 1e-4
    assert rows[("dense", "torch")]["ratio"]["median"] == 1.0
    assert rows[("dense", "onnxruntime")]["details"]["onnx"].endswith("transformer.onnx")
    assert rows[("2:4", "onnxruntime")]["details"]["onnx"] == "exported on the fly"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_gpu_backends_are_listed_as_skipped_with_the_reason(denoiser_result):
    rows = {(row["model"], row["backend"]): row for row in denoiser_result["rows"]}
    for model in ("dense", "2:4"):
        assert rows[(model, "torch-sparse24")]["status"] == "skipped"
        assert "no CUDA GPU" in rows[(model, "torch-sparse24")]["reason"]
        assert rows[(model, "tensorrt")]["status"] == "skipped"
        assert "tensorrt" in rows[(model, "tensorrt")]["reason"]
        assert "latency_ms" not in rows[(model, "tensorrt")]
    text = format_bench(denoiser_result)
    assert "skipped: 2:4 sparse tensor cores are not reachable" in text and "x dense same backend" in text


def test_pipeline_scope_times_every_stage(tiny_sd3_dir):
    cfg = BenchConfig(backends=("torch",), scope="pipeline", steps=2, batch=2, warmup=0, iters=2)
    r = B.run_bench(str(tiny_sd3_dir), cfg)
    row = r["rows"][0]
    assert row["status"] == "ok" and row["denoiser_calls"] == 2 and row["max_abs_diff_vs_torch"] == 0
    stages = row["stages"]
    assert set(stages) == set(B.STAGES)
    assert all(stages[s]["latency_ms"]["median"] > 0 for s in ("text_encoders", "denoiser", "vae_decode"))
    assert stages["total"]["latency_ms"]["median"] == pytest.approx(row["latency_ms"]["median"])
    assert row["images_per_s"] == pytest.approx(2 / (row["latency_ms"]["median"] / 1e3))
    text = format_bench(r)
    assert "| Module" in text and "denoiser x 2" in text and "images/s" in text


def test_bench_cli_writes_json_and_png(tiny_sd3_dir, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", str(tiny_sd3_dir), "--backend", "torch,tensorrt", "--warmup", "0", "--iters", "2",
            "--json", str(out), "--plot", str(png)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "| Module" not in r.output and "skipped" in r.output and "| pipeline | torch" in r.output
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and [row["status"] for row in data["rows"]] == ["ok", "skipped"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and again.output.startswith("error: ") and "--force" in again.output
    assert again.output.count("\n") == 1
