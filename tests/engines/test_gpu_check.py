"""tools/gpu_check.sh in its CPU dry-run mode (the GPU run itself needs an NVIDIA GPU)."""

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
