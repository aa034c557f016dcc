"""tools/gpu_check.sh in its CPU dry-run mode (the GPU run itself needs an NVIDIA GPU), with its quantized-format
section (tools/gpu_quant.py): CPU kernels measured at tiny shapes, the GPU-only ones skipped with the reason."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prunes_three_variants_and_reports_gpu_backends_as_skipped(tmp_path, capsys):
    tool = load_tool()
    rc = tool.main(["--dry-run", "--out", str(tmp_path), "--backends", "torch,torch-sparse24,tensorrt",
                    "--no-compile", "--iters", "2", "--warmup", "0"])
    assert rc == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["dry_run"] and data["pruning"]["2:4"]["sparsity"] == pytest.approx(0.5)
    assert data["quant"]["gemms"] and data["quant"]["blocks"]  # the format section ran first, recorded here too
    assert (tmp_path / "gpu_check_quant.json").is_file()
    assert data["pruning"]["structured 30%"]["model_stats"]["flop_ratio"] < 0.85
    phase = data["phases"][0]
    rows = {(r["model"], r["backend"]): r for r in phase["rows"]}
    assert {m for m, _ in rows} == {"dense", "2:4", "structured 30%"}
    assert all(rows[(m, "torch")]["status"] == "ok" for m in ("dense", "2:4", "structured 30%"))
    assert phase["models"]["structured 30%"]["flop_ratio"] < 0.85
    if not data["environment"]["sparse_tensor_cores"]["usable"]:
        assert rows[("2:4", "torch-sparse24")]["status"] == "skipped"
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("wrote ") and "magnitude scores" in "\n".join(out)
    assert (tmp_path / "gpu_check.md").read_text().startswith("| model")


@pytest.mark.slow
def test_the_shell_script_dry_run_with_every_cpu_backend(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable, "OUT": str(tmp_path)}
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["phase"] for p in data["phases"]] == ["eager", "compile"]
    statuses = {(row["model"], row["backend"]): row["status"] for p in data["phases"] for row in p["rows"]}
    for model in ("dense", "2:4", "structured 30%"):
        assert statuses[(model, "onnxruntime")] == "ok" and statuses[(model, "torch-compile")] == "ok"
    assert r.stdout.strip().splitlines()[-1].startswith("wrote ")


@pytest.fixture
def quant_tools(monkeypatch):
    """tools/gpu_quant.py and gpu_quant_formats.py, imported as gpu_check imports them."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import gpu_quant
    import gpu_quant_formats

    return gpu_quant, gpu_quant_formats


def test_quant_dry_run_measures_every_format_it_can_and_records_why_not(tmp_path, capsys, quant_tools):
    gq, qf = quant_tools
    rc = load_tool().main(["--dry-run", "--quant-only", "--out", str(tmp_path), "--quant-rounds", "2"])
    assert rc == 0 and not (tmp_path / "gpu_check.json").exists()  # --quant-only: the format section alone
    data = json.loads((tmp_path / "gpu_check_quant.json").read_text())
    env = data["environment"]
    assert data["dry_run"] and env["device"] == "cpu" and env["gpu"] is None
    assert env["torch"] and env["date"][:4].isdigit() and data["versions"]["torch"]
    assert {w: (d["tokens"], d["m"]) for w, d in data["widths"].items()} == {"sd3-medium": (61, 64),
                                                                           "flux": (64, 64)}
    gemms = {(r["width"], r["gemm"], r["format"]): r for r in data["gemms"]}
    quantized = ["int8", "int8 +q/dq", "fp8", "fp8 +q"]
    for width in ("sd3-medium", "flux"):
        for gemm in ("q/k/v/out", "ff up", "ff down"):
            rows = {f: gemms[(width, gemm, f)] for f in ["bf16", *quantized]}
            assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["tflops"] > 0 for r in rows.values())
            assert rows["bf16"]["speedup_vs_bf16"] == pytest.approx(1.0)
            assert rows["bf16"]["rel_err"] < 5e-3 and rows["int8"]["rel_err"] < 3e-2 and rows["fp8"]["rel_err"] < 8e-2
            assert rows["int8"]["out_dtype"] == "int32" and rows["int8 +q/dq"]["out_dtype"] == "bfloat16"
            for fmt in ("bf16 2:4", "int8 2:4", "int8 2:4 fused", "fp8 2:4"):
                row = gemms[(width, gemm, fmt)]
                assert row["status"] == "skipped" and "need an NVIDIA GPU" in row["reason"] and "median_ms" not in row
    assert {(r["m"], r["k"], r["n"]) for r in data["gemms"] if r["width"] == "flux"} == {(64, 128, 128),
                                                                                       (64, 128, 512), (64, 512, 128)}
    blocks = {(r["width"], r["format"]): r for r in data["blocks"]}
    assert set(blocks) == {(w, f.label) for w in ("sd3-medium", "flux") for f in qf.BLOCK_FORMATS}
    for width in ("sd3-medium", "flux"):
        for fmt in ("bf16", "int8", "fp8"):
            row = blocks[(width, fmt)]
            assert row["status"] == "ok" and row["block_ms"] > 0 and row["linears_ms"] > 0
            assert row["attention_ms"] == blocks[(width, "bf16")]["attention_ms"] > 0
            kernels = {g: gemms[(width, g, fmt)]["median_ms"] for g in ("q/k/v/out", "ff up", "ff down")}
            assert row["gemm_kernels_ms"] == pytest.approx(4 * kernels["q/k/v/out"] + kernels["ff up"]
                                                           + kernels["ff down"])
        for fmt in ("bf16 2:4", "int8 2:4", "fp8 2:4"):
            row = blocks[(width, fmt)]
            assert row["status"] == "skipped" and "NVIDIA GPU" in row["reason"] and row.get("block_ms") is None
    md = (tmp_path / "gpu_check_quant.md").read_text()
    for headers in (gq.GEMM_HEADERS, gq.BLOCK_HEADERS):
        assert "| " + " | ".join(headers) + " |" in "\n".join(" ".join(line.split()) for line in md.splitlines())
    assert "skipped: 2:4 sparse kernels" in md and "GPU none (cpu)" in md
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("wrote ")


def test_a_format_that_raises_is_recorded_as_unsupported_with_its_reason(quant_tools, monkeypatch):
    """With the CPU skip lifted, the 2:4 formats reach torch.sparse, which refuses CPU tensors: recorded, not fatal."""
    gq, qf = quant_tools
    monkeypatch.setattr(qf, "skip_reason", lambda fmt, device, caps: None)
    dims = gq.DRY_WIDTHS["sd3-medium"]
    timer = gq.Timer("cpu", reps=1, warmup=0)
    rows = gq.gemm_rows("sd3-medium", dims, 64, "cpu", timer, 2, qf.capabilities("cpu"))
    by = {(r["gemm"], r["format"]): r for r in rows}
    sparse = by[("ff up", "int8 2:4")]
    assert sparse["status"] == "unsupported" and sparse["reason"].startswith("RuntimeError: ")
    assert "CUDA" in sparse["reason"] and by[("ff up", "int8")]["status"] == "ok"

    def boom():
        raise NotImplementedError("no kernel for this dtype\nlong dump")

    timed = gq.measure({"ok": lambda: None, "broken": boom}, timer, rounds=3)
    assert timed["broken"] == {"status": "unsupported", "reason": "NotImplementedError: no kernel for this dtype"}
    assert timed["ok"]["status"] == "ok" and timed["ok"]["samples"] == 3


def test_token_counts_of_a_1024px_image_round_up_for_the_gemm_kernels(quant_tools):
    gq, _ = quant_tools
    assert gq.padded_tokens(gq.WIDTHS["sd3-medium"]) == (4429, 4480)
    assert gq.padded_tokens(gq.WIDTHS["flux"]) == (4608, 4608)
    assert gq.padded_tokens(gq.WIDTHS["sd3-medium"], batch=2) == (8858, 8896)
    assert [(n, k, nn) for n, _, k, nn in gq.gemm_shapes(gq.WIDTHS["flux"])] == [
        ("q/k/v/out", 3072, 3072), ("ff up", 3072, 12288), ("ff down", 12288, 3072)]
