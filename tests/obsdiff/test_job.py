"""`obsdiff.run_prune`: the whole of `obsdiff prune` from Python (plan, checkpoint, interruption, resume, save)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import obsdiff
from obsdiff.calibration.calibrate import Calibrator
from obsdiff.calibration.prompts import calibration_prompts
from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import ConfigError, ObsdiffError, OutputExistsError
from obsdiff.pruning.resume import staging_dir
from tests.obsdiff.test_resume import without_timings

PRUNE = PruneConfig(sparsity=0.5)
CALIB = CalibConfig(num_prompts=4, steps=3, batch_size=2, guidance=2.0, groups=2)
CPU = dict(device="cpu", dtype="fp32", progress=False, plots=False)


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def weights(run):
    return {k: v for f in sorted((run / "denoiser").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_plan_only_loads_nothing_and_writes_nothing(tiny_sd3_dir, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a plan loads no weights")

    monkeypatch.setattr("obsdiff.runs.loading.load_pipeline", no_load)
    result = obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, tmp_path / "run", dry_run=True, **CPU)
    assert result.report is None and result.out is None and result.is_main
    assert len(result.plan.groups) == 2 and result.plan.peak["cpu"] > 0
    assert files(tmp_path) == []
    # plan-only needs no run directory; a prune does
    assert len(obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, dry_run=True, **CPU).plan.groups) == 2
    with pytest.raises(ConfigError, match="needs out"):
        obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, **CPU)


def test_interrupted_after_the_first_group_then_resumed_is_bitwise_identical(tiny_sd3_dir, tmp_path, monkeypatch):
    reference = obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, tmp_path / "reference", **CPU)
    assert reference.out == tmp_path / "reference" and len(reference.report.groups) == 2

    out = tmp_path / "run"
    plan = obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, out, dry_run=True, **CPU).plan
    assert len(plan.groups) == 2
    original, calls = Calibrator.hessians, []

    def ctrl_c_in_the_second_group(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Calibrator, "hessians", ctrl_c_in_the_second_group)
    with pytest.raises(obsdiff.PruneInterrupted, match="resume=True") as stopped:
        obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, out, **CPU)
    monkeypatch.undo()
    assert stopped.value.exit_code == 130 and stopped.value.done == 1 and stopped.value.path == staging_dir(out)
    assert not out.exists() and json.loads((staging_dir(out) / "state.json").read_text())["groups_done"] == 1
    with pytest.raises(OutputExistsError, match="1 groups finished"):  # kept work is never silently dropped
        obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, out, **CPU)

    resumed = obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, out, resume=True, **CPU)
    assert resumed.out == out and not staging_dir(out).exists()
    ref_w, got_w = weights(reference.out), weights(out)
    assert ref_w.keys() == got_w.keys() and ref_w
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k
    got = without_timings(resumed.report.to_dict())
    assert got["layers"] == without_timings(reference.report.to_dict())["layers"]
    assert all(r["sparsity"] == 0.5 for r in got["layers"])  # equal because both really are pruned
    record = json.loads((out / "obsdiff.json").read_text())
    assert record["memory_measured"] == resumed.measured and resumed.measured["cpu"] > 2**20
    assert record["memory_plan"]["peak"] == resumed.plan.to_dict()["peak"]


def test_max_memory_refusal_is_an_obsdiff_error_before_anything_is_written(tiny_sd3_dir, tmp_path):
    with pytest.raises(ObsdiffError, match=r"--max-memory 0.0001 GiB is too small"):
        obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, CALIB, tmp_path / "run", max_memory=1e-4, **CPU)
    assert files(tmp_path) == []


def test_a_loaded_model_is_pruned_where_it_is(tmp_path):
    from tests.conftest import tiny_sd3

    with pytest.raises(ConfigError, match="device and dtype apply to a model reference"):
        obsdiff.run_prune(tiny_sd3(), PRUNE, CALIB, tmp_path / "run", device="cpu")
    result = obsdiff.run_prune(tiny_sd3(), PRUNE, CALIB, tmp_path / "run", progress=False, plots=False)
    assert result.report.device == "cpu" and result.report.dtype == "fp32"
    assert (tmp_path / "run" / "obsdiff.json").is_file() and not staging_dir(tmp_path / "run").exists()


def test_a_prompts_file_that_is_not_utf8_is_one_config_error_for_every_reader(tiny_sd3_dir, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe a cat \xc3\x28\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        calibration_prompts(CalibConfig(prompts=str(bad), num_prompts=2), None)
    calib = CalibConfig(**{**CALIB.to_dict(), "prompts": str(bad)})
    with pytest.raises(ConfigError, match=f"prompts file {bad} is unreadable"):
        obsdiff.run_prune(str(tiny_sd3_dir), PRUNE, calib, tmp_path / "run", dry_run=True, **CPU)
    assert files(tmp_path) == ["prompts.txt"]
