"""Cached-block calibration (`--calibration-mode cached`): same Hessians as a pipeline pass where the two
modes must agree, the frontier carried through pruned blocks, refusal where the denoiser is not a chain."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import obsdiff.pruning.prune as P
from obsdiff.calibration.calibrate import CachedCalibrator, Calibrator, make_calibrator
from obsdiff.calibration.hooks import InputCapture, StepCounter
from obsdiff.cli import cli
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.errors import ConfigError, UnsupportedModelError
from obsdiff.runs.loading import as_loaded
from tests.conftest import tiny_flux, tiny_sd3, tiny_sdxl

CALIB = dict(num_prompts=4, steps=3, guidance=2.0, batch_size=2)
BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux}


def calibrators(model, mode: str, workdir=None, **calib):
    prune = PruneConfig(sparsity=0.5)
    cfg = resolve_calib(CalibConfig(**(CALIB | calib), mode=mode), None, "obs-diff")
    blocks = model.family.blocks(model.denoiser)
    return make_calibrator(model, prune, cfg, blocks, progress=False, workdir=workdir)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dense_hessians_equal_the_pipeline_pass(family):
    """On the unpruned model both modes see the same inputs: every Hessian must agree (Flux: the chain
    crosses from double to single blocks)."""
    model = as_loaded(BUILDERS[family]())
    units, _ = P.plan_units(model, PruneConfig(sparsity=0.5))
    linears = [u[0] for u in units]
    rerun, _ = calibrators(model, "rerun").hessians(linears, "rerun")
    cached_cal = calibrators(model, "cached")
    assert isinstance(cached_cal, CachedCalibrator)
    cached, _ = cached_cal.hessians(linears, "cached")
    for name in linears:
        torch.testing.assert_close(cached[name].H, rerun[name].H, rtol=1e-4, atol=1e-6, msg=name)
        assert cached[name].calls == rerun[name].calls
    assert cached_cal.stats()["captures"] == 1 and cached_cal.stats()["cache_bytes"] > 0


def _block_inputs(model, block, calib_cfg):
    """Keyword inputs of `block` for every denoiser call of one pipeline pass over the current model."""
    from obsdiff.calibration.calibrate import encode_batches, run_pass
    from obsdiff.calibration.prompts import calibration_prompts

    counter = StepCounter()
    batches = encode_batches(model, calibration_prompts(calib_cfg, None), calib_cfg)
    with InputCapture(block.module, counter, torch.device("cpu")) as capture:
        run_pass(model, batches, calib_cfg, counter, progress=False)
    return capture.calls


def test_frontier_is_carried_through_pruned_blocks():
    """After block 0 is pruned, the cached inputs of block 1 are what the pruned model computes from the
    dense trajectory: equal to a fresh pass at step 0 (same initial latents), different later on (a fresh
    pass follows the pruned model's own trajectory: that is the difference between the modes)."""
    model = as_loaded(tiny_sd3())
    cal = calibrators(model, "cached")
    blocks = cal.blocks
    first_block = [n for n in cal.block_of if cal.block_of[n] == 0 and n.endswith("attn.to_q")]
    cal.hessians(first_block, "block 0")
    with torch.no_grad():
        for lin in model.family.prunable_linears(blocks[0]).values():
            lin.weight.mul_((torch.rand_like(lin.weight) > 0.5).float())
    second_block = [n for n in cal.block_of if cal.block_of[n] == 1 and n.endswith("attn.to_q")]
    cal.hessians(second_block, "block 1")
    assert cal.frontier == 1 and cal.stats()["captures"] == 1
    fresh = _block_inputs(model, blocks[1], cal.calib)
    assert len(fresh) == len(cal.cache)
    for (kw_cached, step), (kw_fresh, step_fresh) in zip(cal.cache, fresh, strict=True):
        assert step == step_fresh
        same = torch.allclose(kw_cached["hidden_states"], kw_fresh["hidden_states"], rtol=1e-4, atol=1e-5)
        assert same == (step == 0), f"step {step}"


def test_asking_for_an_earlier_block_captures_again():
    model = as_loaded(tiny_sd3())
    cal = calibrators(model, "cached")
    names = list(cal.block_of)
    last = [n for n in names if cal.block_of[n] == 1 and n.endswith("attn.to_q")]
    first = [n for n in names if cal.block_of[n] == 0 and n.endswith("attn.to_q")]
    h1, _ = cal.hessians(first, "a")
    cal.hessians(last, "b")
    h2, _ = cal.hessians(first, "c")
    assert cal.stats()["captures"] == 2
    torch.testing.assert_close(h1[first[0]].H, h2[first[0]].H)


def test_cached_prune_defaults_to_one_group_per_block_and_is_recorded():
    model = as_loaded(tiny_sd3(num_layers=3))
    report = P.prune_(model, PruneConfig(sparsity=0.5), CalibConfig(**CALIB, mode="cached"), progress=False)
    assert len(report.groups) == 3 and report.calib["groups"] == 3
    assert report.calibration["mode"] == "cached" and report.calibration["captures"] == 1
    assert all(abs(r.sparsity - 0.5) < 0.01 for r in report.pruned_layers)
    for g in report.groups:  # every group's units lie in one block
        assert len({u[0].split(".")[1] for u in g.units}) == 1


def test_sparsegpt_cached_is_block_by_block_and_rerun_is_one_pass():
    cached = resolve_calib(CalibConfig(mode="cached"), None, "sparsegpt")
    rerun = resolve_calib(CalibConfig(), None, "sparsegpt")
    assert cached.groups is None and rerun.groups == 1
    assert resolve_calib(CalibConfig(mode="cached", groups=2), None, "obs-diff").groups == 2


def test_structured_cached_with_sensitivity_allocation_shrinks(monkeypatch):
    from obsdiff.pruning.allocation import structure_params
    from tests.obsdiff.test_structured import ShrinkSpy, removed_counts, uniform_counts

    model = as_loaded(tiny_sd3(num_layers=2, num_heads=4))
    modules = dict(model.denoiser.named_modules())
    groups = [g for b in model.family.blocks(model.denoiser) for g in model.family.structure_groups(b)]
    unit = {g.name: structure_params(g, modules) for g in groups}
    spy = ShrinkSpy(monkeypatch)
    cfg = PruneConfig(sparsity_type="structured", sparsity=0.5, allocation="sensitivity", ffn_per_round=4)
    report = P.prune_(model, cfg, CalibConfig(**CALIB, mode="cached"), progress=False)
    assert report.calibration["captures"] == 2  # the allocation sweep, then the prune sweep from block 0
    removed = removed_counts(report)
    assert removed == {k: n for k, n in report.allocation["removed"].items() if n}
    for kind in ("heads", "ffn"):  # each kind's parameter budget is uniform removal's, spent up to one structure
        members = [g for g in groups if g.kind == kind]
        budget = sum(n * unit[name] for name, n in uniform_counts(members, 0.5).items())
        spent = sum(removed.get(g.name, 0) * unit[g.name] for g in members)
        assert budget - max(unit[g.name] for g in members) < spent <= budget, kind
    stats = report.model_stats
    assert stats["before"]["parameters"] - stats["after"]["parameters"] == sum(n * unit[k] for k, n in removed.items())
    spy.assert_zeroed_and_equal(model.denoiser, model.family.example_inputs(model.denoiser, batch=1, text_len=16))


def test_rerun_mode_stays_the_default_calibrator():
    """Neither the library nor the command line asks for a mode: both calibrate by re-running the pipeline."""
    model = as_loaded(tiny_sd3())
    cfg = resolve_calib(CalibConfig(**CALIB), None, "obs-diff")
    cal = make_calibrator(model, PruneConfig(sparsity=0.5), cfg, model.family.blocks(model.denoiser), progress=False)
    assert cfg.mode == "rerun" and type(cal) is Calibrator
    option = next(p for p in cli.commands["prune"].params if p.name == "calibration_mode")
    assert option.default == "rerun"


def test_sdxl_refuses_cached_mode_before_encoding():
    model = as_loaded(tiny_sdxl())
    with pytest.raises(UnsupportedModelError, match="calibration-mode rerun"):
        calibrators(model, "cached")


def test_cache_device_needs_cached_mode():
    with pytest.raises(ConfigError, match="cache-device"):
        CalibConfig(cache_device="cpu")
    with pytest.raises(ConfigError, match="calibration-mode"):
        CalibConfig(mode="fast")


def test_cli_cached_mode_writes_the_stats(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    args = ["prune", "--model", str(tiny_sd3_dir), "--sparsity", "0.5", "--num-prompts", "2", "--steps", "2",
            "--batch-size", "2", "--calibration-mode", "cached", "--cache-device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "cached block inputs (MiB)" in res.output
    record = json.loads((out / "obsdiff.json").read_text())
    assert record["calibration"]["mode"] == "cached"
    assert record["calib"]["mode"] == "cached"


def test_cli_cached_mode_on_sdxl_fails_cleanly(tmp_path):
    sdxl_dir = tmp_path / "sdxl"
    tiny_sdxl().save_pretrained(sdxl_dir)
    out = tmp_path / "run"
    args = ["prune", "--model", str(sdxl_dir), "--sparsity", "0.5", "--calibration-mode", "cached", "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2
    assert "calibration-mode rerun" in res.output and not out.exists()


def test_a_cache_that_cannot_fit_is_refused_at_the_first_call(monkeypatch):
    import obsdiff.calibration.calibrate as C

    monkeypatch.setattr(C, "available_bytes", lambda device: 1000)
    model = as_loaded(tiny_sd3())
    cal = calibrators(model, "cached")
    with pytest.raises(ConfigError, match="cache-device cpu"):
        cal.hessians(["transformer_blocks.0.attn.to_q"], "x")
    assert not any(m._forward_pre_hooks for m in model.denoiser.modules())


def test_free_bytes_reads_available_ram():
    from obsdiff.devices import available_bytes

    free = available_bytes(torch.device("cpu"))
    if not Path("/proc/meminfo").is_file():
        pytest.skip("reads /proc/meminfo, which this system lacks")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert free == pytest.approx(available, rel=0.1)  # what the kernel reports, not a guess


def test_block_range_caches_the_first_selected_block():
    model = as_loaded(tiny_sd3(num_layers=3))
    dense = {n: p.clone() for n, p in model.denoiser.named_parameters()}
    report = P.prune_(model, PruneConfig(sparsity=0.5, blocks=(1, 2)), CalibConfig(**CALIB, mode="cached"),
                      progress=False)
    assert len(report.groups) == 1 and report.calibration["captures"] == 1
    changed = {n.split(".")[1] for n, p in model.denoiser.named_parameters()
               if n.startswith("transformer_blocks.") and not torch.equal(p, dense[n])}
    assert changed == {"1"}


def test_flux_cached_prune_covers_double_and_single_blocks():
    model = as_loaded(tiny_flux())
    report = P.prune_(model, PruneConfig(sparsity_type="2:4"), CalibConfig(**CALIB, mode="cached"), progress=False)
    blocks = {u[0].rsplit(".", 2)[0].split(".attn")[0] for g in report.groups for u in g.units}
    assert any(b.startswith("single_transformer_blocks") for b in blocks)
    assert len(report.groups) == 4 and report.calibration["captures"] == 1
    assert all(r.sparsity == 0.5 for r in report.pruned_layers)


def per_block_hessians(model, cal, prune: bool = True):
    """Hessians of every unit, one group per block in forward order; each block is pruned (half its weights
    zeroed) after its group, so later groups read a frontier carried through pruned blocks."""
    units, _ = P.plan_units(model, PruneConfig(sparsity=0.5))
    modules = dict(model.denoiser.named_modules())
    out = {}
    for b in range(len(cal.blocks)):
        names = [u[0] for u in units if cal.block_of[u[0]] == b]
        accs, _ = cal.hessians(names, f"block {b}")
        out |= {n: a.H.clone() for n, a in accs.items()}
        if prune:
            with torch.no_grad():
                for unit in units:
                    for n in unit:
                        if cal.block_of[n] == b:
                            modules[n].weight.mul_((torch.arange(modules[n].weight.numel()) % 2).view_as(
                                modules[n].weight).float())
    return out


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_spilled_cache_gives_bitwise_identical_hessians_and_is_deleted(family, tmp_path):
    in_memory = calibrators(as_loaded(BUILDERS[family]()), "cached")
    expected = per_block_hessians(in_memory.model, in_memory)
    model = as_loaded(BUILDERS[family]())
    cfg = resolve_calib(CalibConfig(**CALIB, mode="cached", cache_spill="always"), None, "obs-diff")
    with make_calibrator(model, PruneConfig(sparsity=0.5), cfg, model.family.blocks(model.denoiser),
                         progress=False, workdir=tmp_path) as cal:
        got = per_block_hessians(model, cal)
        stats = cal.stats()
        path = stats["cache_location"]
        assert path.startswith(str(tmp_path)) and (tmp_path / path.rsplit("/", 1)[1]).exists()
        assert stats["cache_bytes"] >= in_memory.stats()["cache_bytes"] > 0 and stats["captures"] == 1
    assert list(tmp_path.iterdir()) == []  # closing deleted the file
    assert in_memory.stats()["cache_location"] == "memory"
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_spilled_capture_that_fails_leaves_no_file(tmp_path):
    model = as_loaded(tiny_sd3())
    cal = calibrators(model, "cached", cache_spill="always", workdir=tmp_path)
    calls = {"n": 0}

    def fail_on_third_call(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    handle = cal.blocks[1].module.register_forward_pre_hook(fail_on_third_call, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cal.hessians(["transformer_blocks.0.attn.to_q"], "x")
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == [] and cal.cache is None


def test_a_failing_sweep_and_garbage_collection_delete_the_file(tmp_path):
    import gc

    model = as_loaded(tiny_sd3())
    with pytest.raises(RuntimeError, match="boom"), calibrators(model, "cached", cache_spill="always",
                                                                 workdir=tmp_path) as cal:
        cal.capture()
        assert len(list(tmp_path.iterdir())) == 1 and cal.frontier == 0 and len(cal.cache) == 2 * 3
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    cal = calibrators(model, "cached", cache_spill="always", workdir=tmp_path)
    cal.capture()
    assert len(list(tmp_path.iterdir())) == 1
    del cal
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_auto_spills_when_memory_is_short_and_refuses_without_room(monkeypatch, tmp_path):
    import obsdiff.calibration.calibrate as C

    monkeypatch.setattr(C, "available_bytes", lambda device: 1000)
    model = as_loaded(tiny_sd3())
    name = ["transformer_blocks.0.attn.to_q"]
    with calibrators(model, "cached", workdir=tmp_path) as cal:  # cache_spill "auto"
        cal.hessians(name, "x")
        assert cal.stats()["cache_location"].startswith(str(tmp_path))
    for kwargs in ({}, {"cache_spill": "never", "workdir": tmp_path}):  # no workdir / spilling forbidden
        with pytest.raises(ConfigError, match=r"GiB of block inputs .* but cpu has 0.0 GiB free") as info:
            calibrators(model, "cached", **kwargs).hessians(name, "x")
        assert "\n" not in str(info.value)
    monkeypatch.setattr(C.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(ConfigError, match=f"and {tmp_path} 0.0 GiB"):
        calibrators(model, "cached", workdir=tmp_path).hessians(name, "x")
    assert list(tmp_path.iterdir()) == []


def test_cache_spill_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="cache-spill"):
        CalibConfig(mode="cached", cache_spill="sometimes")
    with pytest.raises(ConfigError, match="only applies to --calibration-mode cached"):
        CalibConfig(cache_spill="always")
    with pytest.raises(ConfigError, match="needs a working directory"):
        calibrators(as_loaded(tiny_sd3()), "cached", cache_spill="always")


def test_public_capture_then_groups_advance_from_block_0():
    """`capture()` caches block 0's inputs of the model as it is; a later group advances from there, as a
    capture started by `hessians` for that group would compute directly."""
    model = as_loaded(tiny_sd3(num_layers=3))
    name = ["transformer_blocks.2.attn.to_q"]
    direct = calibrators(model, "cached")
    expected, _ = direct.hessians(name, "direct")
    assert direct.frontier == 2 and direct.stats()["captures"] == 1
    cal = calibrators(model, "cached")
    cal.capture()
    assert cal.frontier == 0
    got, _ = cal.hessians(name, "advanced")
    assert cal.frontier == 2 and cal.stats()["captures"] == 1
    torch.testing.assert_close(got[name[0]].H, expected[name[0]].H, rtol=1e-5, atol=1e-6)
