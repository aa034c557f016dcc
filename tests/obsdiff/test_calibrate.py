"""Calibrators: where Hessians accumulate (`hessian_device`), the recorded time split, rerun passes."""

import pytest
import torch

from obsdiff.calibrate import make_calibrator
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.errors import ConfigError
from obsdiff.loading import as_loaded
from tests.conftest import tiny_sd3

CALIB = dict(num_prompts=4, steps=3, guidance=2.0, batch_size=2)
LINEARS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn.add_q_proj"]


@pytest.fixture(scope="module")
def model():
    return as_loaded(tiny_sd3())


def calibrator(model, **calib):
    cfg = resolve_calib(CalibConfig(**(CALIB | calib)), None, "obs-diff")
    return make_calibrator(model, PruneConfig(sparsity=0.5), cfg, model.family.blocks(model.denoiser),
                           progress=False)


@pytest.mark.parametrize("mode", ["rerun", "cached"])
def test_hessians_on_the_cpu_are_the_model_device_ones(model, mode):
    default, _ = calibrator(model, mode=mode).hessians(LINEARS, "a")
    cal = calibrator(model, mode=mode, hessian_device="cpu")
    on_cpu, _ = cal.hessians(LINEARS, "b")
    for name in LINEARS:
        assert on_cpu[name].H.device == torch.device("cpu")
        assert torch.equal(on_cpu[name].H, default[name].H), name
    assert cal.stats()["hessian_device"] == "cpu"


@pytest.mark.parametrize("name,match", [("meta", "holds no data"), ("gpu0", "not a device name"),
                                        ("cuda:x", "not a device name")])
def test_unusable_hessian_devices_are_refused_in_one_line(name, match):
    with pytest.raises(ConfigError, match=match) as info:
        CalibConfig(hessian_device=name)
    assert "\n" not in str(info.value) and repr(name) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_encoding(model):
    with pytest.raises(ConfigError, match="hessian-device 'cuda' is not usable") as info:
        calibrator(model, hessian_device="cuda")
    assert "\n" not in str(info.value)


def test_stats_split_the_calibration_time(model):
    cal = calibrator(model)
    _, seconds = cal.hessians(LINEARS, "a")
    _, seconds2 = cal.hessians(LINEARS[:1], "b")
    stats = cal.stats()
    assert stats["mode"] == "rerun" and stats["pipeline_runs"] == 2
    assert stats["hessian_seconds"] > 0 and stats["forward_seconds"] > 0
    assert stats["forward_seconds"] + stats["hessian_seconds"] == pytest.approx(seconds + seconds2)


def test_rerun_hessians_follow_the_pruned_model(model):
    """Each rerun pass sees the current weights: pruning block 0 changes block 1's Hessian."""
    cal = calibrator(model)
    name = "transformer_blocks.1.attn.to_q"
    before, _ = cal.hessians([name], "a")
    w = dict(model.denoiser.named_modules())["transformer_blocks.0.ff.net.2"].weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(0.5)
        after, _ = cal.hessians([name], "b")
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not torch.allclose(before[name].H, after[name].H)
    assert after[name].calls == before[name].calls == 2 * 3  # 2 batches x 3 steps, the last step cut short


def test_cached_stats_split_capture_and_sweeps(model):
    cal = calibrator(model, mode="cached")
    _, s0 = cal.hessians(LINEARS[:2], "block 0")  # the capture run fills these
    _, s1 = cal.hessians(LINEARS[2:], "block 1")  # a sweep: advance block 0, hooks in block 1
    stats = cal.stats()
    assert stats["pipeline_runs"] == stats["captures"] == 1 and stats["advance_seconds"] > 0
    assert stats["hessian_seconds"] > 0 and stats["io_seconds"] >= 0 and stats["cache_location"] == "memory"
    total = stats["forward_seconds"] + stats["hessian_seconds"] + stats["io_seconds"]
    assert total == pytest.approx(s0 + s1, rel=0.05)
    assert stats["capture_seconds"] <= s0
