"""The benchmark scripts run end to end in their --quick form and write what the README quotes from."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.with_suffix(".md").read_text().strip()
    data = json.loads(out.read_text())
    assert {"date", "seconds", "versions", "machine"} <= set(data)
    return data


def test_calibration_modes_bench(tmp_path):
    data = run_script("calibration_modes.py", tmp_path / "modes.json")
    modes = {r["mode"]: r for r in data["rows"]}
    assert set(modes) == {"rerun, 4 groups", "cached, per block"}
    assert modes["cached, per block"]["calibration"]["mode"] == "cached"
    assert modes["cached, per block"]["groups"] == 6  # builtin:digits has 6 blocks
    # both modes keep the model: the quick run's accuracies stay close to the dense model's
    assert all(r["digit_accuracy"] > 0.9 for r in data["rows"])
    scaling = {r["calibration"]: r for r in data["scaling"]}
    assert scaling["cached, per block"]["capture_seconds"] > 0
    cached, rerun = scaling["cached, per block"], scaling["rerun, 1 group"]
    assert math.isclose(cached["mean_layer_error"], rerun["mean_layer_error"], rel_tol=0.05)


def test_latency_bench(tmp_path):
    data = run_script("latency.py", tmp_path / "latency.json")
    titles = [s["title"] for s in data["sections"]]
    assert len(titles) == 4 and sum("pipeline" in t for t in titles) == 2
    wide_pipe = data["sections"][-1]["result"]
    assert wide_pipe["scope"] == "pipeline" and wide_pipe["inputs"]["steps"] == 2
    ok = [r for r in wide_pipe["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"torch", "onnxruntime"}
    for r in ok:  # every stage timed, and they add up to the total
        parts = ("text_encoders", "denoiser", "vae_decode", "other")
        assert set(r["stages"]) == {*parts, "total"}
        mean = {k: v["latency_ms"]["mean"] for k, v in r["stages"].items()}
        median = {k: v["latency_ms"]["median"] for k, v in r["stages"].items()}
        assert all(mean[k] > 0 for k in ("text_encoders", "denoiser", "vae_decode")) and mean["other"] >= 0
        assert sum(mean[k] for k in parts) == pytest.approx(mean["total"], rel=1e-9)  # per call: exact
        assert sum(median[k] for k in parts) == pytest.approx(median["total"], rel=0.05)
        assert median["total"] == r["latency_ms"]["median"]
        assert r["denoiser_calls"] == 2  # one call per step: CFG's two halves share a batch


def test_calibration_speed_bench(tmp_path):
    """Baseline checkout vs current code, both modes: times, ratios, the profile split and equal quality."""
    if not Path("/tmp/obsdiff-baseline/obsdiff").is_dir():
        known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "7b6eeef^{commit}"], capture_output=True)
        if known.returncode != 0:
            pytest.skip("the baseline commit 7b6eeef is not in this clone")
    data = run_script("calibration_speed.py", tmp_path / "speed.json")
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"rerun", "cached"}
    assert rows["cached"]["groups"] == 6 and rows["rerun"]["groups"] == 4
    for r in rows.values():
        assert r["seconds"]["ratio"] > 0 and r["calibration_seconds"]["current"] > 0
        stats = r["calibration_stats"]
        assert stats["forward_seconds"] > 0 and stats["hessian_seconds"] > 0
        base, cur = r["quality"]["baseline"], r["quality"]["current"]
        assert base["digit_accuracy"] > 0.9 and cur["digit_accuracy"] > 0.9
        assert abs(base["latent_rel_mse_vs_reference"] - cur["latent_rel_mse_vs_reference"]) < 0.01
        assert math.isclose(r["mean_layer_error"]["baseline"], r["mean_layer_error"]["current"], rel_tol=0.02)
    assert rows["cached"]["calibration_stats"]["cache_location"] == "memory"
    profiles = {(p["mode"], p["code"]): p for p in data["profiles"]}
    assert len(profiles) == 4
    for p in profiles.values():
        assert p["forwards"] > 0 and p["hessian"] > 0 and p["solve"] > 0


def test_scale_bench(tmp_path):
    data = run_script("scale.py", tmp_path / "scale.json")
    sizes = {h["model"]: h for h in data["hessians"]}
    assert sizes["sd3-medium"]["parameters"] == 2_028_328_000 and sizes["sd3-medium"]["input_widths"] == [1536, 6144]
    fits = {(r["model"], r["gpu_gib"]): r["recipe"] for r in data["gpu_table"]}
    assert fits[("sd3-medium", 80)] == "defaults (4 groups)" and fits[("flux.1-dev", 24)] is None
    (case,) = data["measured"]
    assert abs(case["error"]) < 0.5  # the tiny digits prune: planned and measured peak RSS of the same order


def test_distributed_bench(tmp_path):
    """One and two processes (torchrun) give the same masks with fp64 Hessians; the 8-GPU model adds up."""
    data = run_script("distributed.py", tmp_path / "distributed.json")
    one, two = data["measured"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["masks_identical"] and two["mask_differences"] == 0 and two["max_rel_weight_diff"] < 1e-4
    assert [r["rank"] for r in two["ranks"]] == [0, 1]
    assert all(r["calib_seconds"] > 0 and r["units_solved"] > 0 for r in two["ranks"])  # both calibrated and solved
    assert sum(r["units_solved"] for r in two["ranks"]) == one["ranks"][0]["units_solved"]
    assert two["bytes_communicated"] == sum(r["bytes_sent"] for r in two["ranks"]) > 0 == one["bytes_communicated"]
    assert one["metrics"]["digit_accuracy"] > 0.8 and two["metrics"]["digit_accuracy"] > 0.8
    model = {(r["model"], r["world_size"]): r for r in data["model"]}
    sd3 = model[("sd3-medium", 8)]
    assert (sd3["prompt_batches"], sd3["batches_per_rank_max"], sd3["calibration_speedup"]) == (25, 4, 6.25)
    # every unit's fp32 Hessian leaves W - 1 ranks: SD3-Medium's 24 blocks hold 8046 MiB of them
    assert model[("sd3-medium", 2)]["hessian_bytes"] == pytest.approx(8046 * 2**20, rel=1e-3)
    for name in ("sd3-medium", "flux.1-dev"):
        assert model[(name, 1)]["hessian_bytes"] == model[(name, 1)]["broadcast_bytes"] == 0
        assert model[(name, 8)]["hessian_bytes"] == 7 * model[(name, 2)]["hessian_bytes"]
        for w in (2, 4, 8):
            r = model[(name, w)]
            assert 1 <= r["solve_balance_mean"] <= r["solve_balance_worst"]
            assert r["solve_speedup"] == pytest.approx(w, rel=0.25) and r["solve_speedup"] <= w


def test_export_matrix_bench(tmp_path):
    """Narrow SD3-Medium, dense and 2:4, in its default precision and the other half precision: one child
    process per row, every row passing, and the table and JSON that the full-width run writes."""
    data = run_script("export_matrix.py", tmp_path / "matrix.json")
    assert data["width"] == "narrow" and set(data["prepared"]) == {"sd3-medium"}
    rows = {(r["kind"], r["dtype_is"]): r for r in data["rows"]}
    assert set(rows) == {(k, d) for k in ("dense", "2of4") for d in ("default", "other")}
    assert {r["dtype"] for r in data["rows"]} == {"fp16", "bf16"}
    for r in data["rows"]:
        assert r["ok"] and r["error"] is None and r["model"] == "sd3-medium"
        assert r["parity"] == "passed" and 0 < r["parity_max_rel"] <= r["parity_tolerance"]
        assert r["export_seconds"] > 0 and r["onnx_mib"] > 0 and 0 < r["peak_rss_gib"] < 8
        assert r["opset"] >= (22 if r["dtype"] == "bf16" else 18)
    for dtype in ("default", "other"):
        assert rows[("dense", dtype)]["pruned_weights"] is None and rows[("dense", dtype)]["nm_crosscheck"] is None
        pruned = rows[("2of4", dtype)]
        assert pruned["pruned_weights"] == pruned["nm_crosscheck"] == "passed"
        assert pruned["nm_sparse_tensors"] >= pruned["pruned_weights_checked"] > 0
    table = (tmp_path / "matrix.md").read_text()
    assert table.count("| sd3-medium | narrow |") == 4 and "FAIL" not in table


def test_quant_quality_bench(tmp_path):
    """The goals' rows, pruned and quantized with one calibration, each goal judged from the same run's rows."""
    data = run_script("quant_quality.py", tmp_path / "quant.json")
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "2:4 (obs-diff)", "2:4 then w8a8 rtn", "2:4 + w8a8 joint", "w4a16 rtn",
                          "w4a16 obs"]
    assert data["quick"] and data["calib"]["num_prompts"] == 16
    assert {r["prune"]["quant"]["method"] for k, r in rows.items() if "w4a16" in k} == {"rtn", "obs"}
    for name in ("2:4 (obs-diff)", "2:4 then w8a8 rtn", "2:4 + w8a8 joint"):
        assert 0.5 <= rows[name]["sparsity"] < 0.51  # quantization keeps the 2:4 zeros (and rounds a few to 0)
    drift = {k: r["latent_rel_mse_vs_reference"] for k, r in rows.items()}
    assert all(r["digit_accuracy"] > 0.8 and r["prune_seconds"] >= 0 for r in rows.values())
    # INT4 inside the sweep compensates its rounding: far less drift than rounding alone (~4x in this run)
    assert 0 < drift["w4a16 obs"] < 0.6 * drift["w4a16 rtn"]
    a, b = data["goals"]
    assert a["drift_ratio_vs_2_4"] == pytest.approx(drift["2:4 + w8a8 joint"] / drift["2:4 (obs-diff)"])
    assert b["drift_ratio"] == pytest.approx(drift["w4a16 obs"] / drift["w4a16 rtn"]) and b["verdict"] == "PASS"
    assert a["verdict"] == ("PASS" if all(a["checks"].values()) else "FAIL")
    table = (tmp_path / "quant.md").read_text()
    assert "goal (a)" in table and f"**{a['verdict']}**" in table and "| w4a16 obs " in table
