"""Resumable prunes: a killed prune continues from its last finished group and ends bitwise identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from obsdiff.cli import cli
from obsdiff.config import CalibConfig, PruneConfig, QuantConfig
from obsdiff.errors import ConfigError, OutputExistsError
from obsdiff.pruning.distributed import World
from obsdiff.pruning.prune import open_checkpoint, prune_
from obsdiff.pruning.resume import (
    Checkpoint,
    CheckpointLike,
    CheckpointView,
    SharedCheckpoint,
    first_difference,
    staging_dir,
)
from obsdiff.solver.qlinear import quantized_layers
from tests.conftest import tiny_flux, tiny_sd3

TIMINGS = {"seconds", "calib_seconds", "prune_seconds", "encode_seconds", "total_seconds", "solve_seconds",
           "error_seconds", "capture_seconds", "advance_seconds", "forward_seconds", "hessian_seconds"}


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS and "seconds" not in k}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def weights(run):
    files = sorted((run / "denoiser").glob("*.safetensors"))
    out = {}
    for f in files:
        out |= load_file(str(f))
    return out


def prune_cmd(out, *extra):
    return [sys.executable, "-m", "obsdiff", "prune", "--model", "builtin:digits", "--sparsity", "0.5",
            "--num-prompts", "8", "--steps", "4", "--batch-size", "4", "--groups", "6", "--out", str(out), *extra]


def test_sigkill_after_the_second_group_then_resume_is_bitwise_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(prune_cmd(reference), env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(prune_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = staging_dir(killed) / "state.json"
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(state.read_text())["groups_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the prune finished before it could be killed"
    assert not killed.exists()
    kept = json.loads(state.read_text())["groups_done"]
    assert 2 <= kept < 6

    again = subprocess.run(prune_cmd(killed), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1

    resumed = subprocess.run(prune_cmd(killed, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert not staging_dir(killed).exists()
    ref_w, got_w = weights(reference), weights(killed)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k
    ref_r = json.loads((reference / "obsdiff.json").read_text())
    got_r = json.loads((killed / "obsdiff.json").read_text())
    for key in ("layers", "groups", "prune", "calib", "sparsity", "peak_hessian_bytes"):
        assert without_timings(got_r[key]) == without_timings(ref_r[key]), key


class Stop(Exception):
    pass


def interrupted_then_resumed(make_model, prune, calib, out, stop_after: int, monkeypatch):
    """Prune with a checkpoint, stop it when group `stop_after` asks for Hessians, resume in a fresh model."""
    from obsdiff.calibration.calibrate import CachedCalibrator, Calibrator

    model = make_model()
    ckpt = open_checkpoint(model, prune, calib, out)
    calls = {"n": 0}
    for cls in (Calibrator, CachedCalibrator):
        original = cls.hessians

        def counting(self, *args, _original=original, **kwargs):
            if calls["n"] == stop_after:
                raise Stop("interrupted")
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "hessians", counting)
    with pytest.raises(Stop, match="interrupted"):
        prune_(model, prune, calib, progress=False, checkpoint=ckpt)
    monkeypatch.undo()
    assert ckpt.done >= 1
    fresh = make_model()
    report = prune_(fresh, prune, calib, progress=False,
                    checkpoint=open_checkpoint(fresh, prune, calib, out, resume=True))
    return fresh, report


@pytest.mark.parametrize("mode,prune", [
    ("rerun", PruneConfig(sparsity_type="2:4")),
    ("cached", PruneConfig(sparsity=0.5)),
    ("rerun", PruneConfig(sparsity_type="structured", sparsity=0.5)),
    ("cached", PruneConfig(sparsity_type="structured", sparsity=0.5, allocation="sensitivity")),
    ("rerun", PruneConfig(sparsity_type="2:4", quant=QuantConfig("w8a8", smoothquant=0.5))),
    ("cached", PruneConfig(sparsity_type="none", quant=QuantConfig("w4a16", group_size=8))),
    ("rerun", PruneConfig(sparsity_type="structured", sparsity=0.5, quant=QuantConfig("fp8"))),
])
def test_interrupted_prune_resumes_to_the_same_model(mode, prune, tmp_path, monkeypatch):
    calib = CalibConfig(num_prompts=4, steps=3, batch_size=2, guidance=2.0, groups=3 if mode == "rerun" else None,
                        mode=mode)
    reference = tiny_sd3(num_layers=3)
    ref_report = prune_(reference, prune, calib, progress=False)
    stop = 2 if prune.allocation == "uniform" else 4  # sensitivity: 3 chunks of cost curves come first
    if prune.structured and prune.quant is not None:
        stop = 4  # in the quantization sweep, after the structured groups (3) and its first group
    resumed, report = interrupted_then_resumed(lambda: tiny_sd3(num_layers=3), prune, calib, tmp_path / "r",
                                               stop, monkeypatch)
    ref_state, got_state = reference.transformer.state_dict(), resumed.transformer.state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    assert without_timings(report.to_dict())["layers"] == without_timings(ref_report.to_dict())["layers"]
    assert report.shrink_plan == ref_report.shrink_plan
    # equal models prove nothing if nothing was pruned: both really are
    if prune.structured:
        removed = {s["name"]: (len(s["removed"]), s["count"]) for s in report.structures}
        assert report.shrink_plan and sum(n for n, _ in removed.values()) > len(removed) > 0
        if prune.allocation == "uniform":
            assert all(n == min(round(0.5 * count), count - 1) for n, count in removed.values())
        dense = tiny_sd3(num_layers=3).transformer.state_dict()
        assert sum(v.numel() for v in got_state.values()) < sum(v.numel() for v in dense.values())
    elif prune.quant is None:
        assert len(report.pruned_layers) == 12 + 12 + 9 and all(r.sparsity == 0.5 for r in report.pruned_layers)
    if prune.quant is not None:  # resumed quantized layers are quantized layers again, scales restored
        layers = quantized_layers(resumed.transformer)
        assert len(layers) == 12 + 12 + 9 and sorted(layers) == sorted(report.quantized)


def test_flux_cached_resume_across_double_and_single_blocks(tmp_path, monkeypatch):
    prune, calib = PruneConfig(sparsity=0.5), CalibConfig(num_prompts=2, steps=2, batch_size=2, mode="cached")
    reference = tiny_flux()
    prune_(reference, prune, calib, progress=False)
    resumed, report = interrupted_then_resumed(tiny_flux, prune, calib, tmp_path / "f", 3, monkeypatch)
    for k, v in reference.transformer.state_dict().items():
        assert torch.equal(v, resumed.transformer.state_dict()[k]), k
    layers = dict(resumed.transformer.named_modules())
    assert len(report.pruned_layers) == 2 * 12 + 2 * 5  # double and single blocks
    for r in report.pruned_layers:
        assert r.sparsity == 0.5 == float((layers[r.name].weight == 0).float().mean()), r.name


def test_resume_with_other_settings_names_the_difference(tmp_path):
    model = tiny_sd3()
    prune = PruneConfig(sparsity=0.5)
    open_checkpoint(model, prune, CalibConfig(steps=3), tmp_path / "r").save_group(0, {}, {})
    with pytest.raises(ConfigError, match=r"calib\.steps was 3 and is now 4"):
        open_checkpoint(model, prune, CalibConfig(steps=4), tmp_path / "r", resume=True)
    with pytest.raises(OutputExistsError, match="--resume to continue it, or --force"):
        open_checkpoint(model, prune, CalibConfig(steps=3), tmp_path / "r")
    fresh = open_checkpoint(model, prune, CalibConfig(steps=4), tmp_path / "r", force=True)
    assert fresh.done == 0


def test_first_difference_walks_nested_settings():
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ("a.c", 2, 3)
    assert first_difference({"a": 1}, {"a": 1}) is None
    assert first_difference({"a": 1}, {"a": 1, "z": None}) is None  # a new setting at its default


def test_checkpoint_groups_must_finish_in_order(tmp_path):
    ckpt = Checkpoint.open(tmp_path / "x", {"k": 1})
    with pytest.raises(RuntimeError, match="out of order"):
        ckpt.save_group(1, {}, {})


def test_every_checkpoint_a_prune_takes_has_the_whole_interface(tmp_path):
    ckpt = Checkpoint.open(tmp_path / "x", {"k": 1})
    view = CheckpointView(World(), {"done": 0, "report": None, "extra": {}})
    for c in (ckpt, SharedCheckpoint(World(), ckpt), view):
        assert isinstance(c, CheckpointLike), type(c).__name__
        assert (c.done, c.report, c.extra) == (0, None, {})
    assert view.path is None and SharedCheckpoint(World(), ckpt).path == ckpt.path
    assert not isinstance(object(), CheckpointLike)


def test_cli_refuses_a_leftover_staging_directory_before_loading(tmp_path):
    out = tmp_path / "run"
    staging_dir(out).mkdir()
    (staging_dir(out) / "state.json").write_text(json.dumps({"groups_done": 3}))
    r = CliRunner().invoke(cli, ["prune", "--model", "does-not-exist", "--sparsity", "0.5", "--out", str(out)])
    assert r.exit_code == 2
    assert "interrupted prune left" in r.output and "(3 groups finished)" in r.output


def test_a_leftover_without_finished_groups_is_simply_replaced(tmp_path):
    Checkpoint.open(tmp_path / "x", {"k": 1})  # created, then the process died before its first group
    again = Checkpoint.open(tmp_path / "x", {"k": 2})
    assert again.done == 0 and again.settings == {"k": 2}
