"""The pruning engine end to end on tiny random SD3 pipelines."""

import pytest
import torch

import obsdiff.calibration.calibrate as C
import obsdiff.pruning.prune as P
from obsdiff.calibration.calibrate import encode_batches, run_pass
from obsdiff.calibration.hooks import HessianHooks, StepCounter
from obsdiff.calibration.prompts import calibration_prompts
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.pruning.records import PruneError, split_groups
from obsdiff.runs.io import save_run
from obsdiff.runs.loading import load_pipeline
from obsdiff.solver.hessian import HessianAccumulator, timestep_weights
from tests.conftest import outputs_before_and_after_reload

CALIB = CalibConfig(num_prompts=4, steps=3, guidance=2.0, batch_size=2, groups=2)


@pytest.fixture
def model(tiny_sd3_dir):
    return load_pipeline(str(tiny_sd3_dir))


def no_hooks_left(module):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())


def pruned_weights(model, report):
    mods = dict(model.denoiser.named_modules())
    return {r.name: mods[r.name].weight.detach() for r in report.pruned_layers}


def test_unstructured_prune_is_exact_and_reduces_error(model):
    report = P.prune_(model, PruneConfig(sparsity=0.5), CALIB, progress=False)
    weights = pruned_weights(model, report)
    assert len(weights) == 21  # 12 linears in block 0, 9 in the context_pre_only last block
    for name, w in weights.items():
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    for r in report.pruned_layers:
        assert r.error <= r.error_no_compensation + 1e-9, r.name
        assert r.percdamp == 0.01
    assert len(report.groups) == 2 and report.peak_hessian_bytes > 0
    assert report.groups[0].calib_calls == 2 * 3  # 2 batches x 3 steps: prompts encoded once, no re-encoding
    assert no_hooks_left(model.denoiser)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_on_every_pruned_weight(model, pattern):
    n, m = map(int, pattern.split(":"))
    report = P.prune_(model, PruneConfig(sparsity_type=pattern), CALIB, progress=False)
    for name, w in pruned_weights(model, report).items():
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((groups <= n).all()), name


def _input_square_sums(model, name, calib, method):
    """Per input column of linear `name`, the sum of squares of its inputs over one calibration pass of the dense
    model with equal step weights (Wanda's), from a plain hook."""
    calib = resolve_calib(calib, None, method)
    batches = encode_batches(model, calibration_prompts(calib, None), calib)
    mod = dict(model.denoiser.named_modules())[name]
    sums = torch.zeros(mod.in_features, dtype=torch.float64)

    def hook(module, args):
        sums.add_(args[0].detach().double().pow(2).reshape(-1, module.in_features).sum(0))

    handle = mod.register_forward_pre_hook(hook)
    try:
        run_pass(model, batches, calib, StepCounter(), progress=False)
    finally:
        handle.remove()
    return sums


def _smallest(score, count):
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.flatten().argsort()[:count]] = True
    return mask.view_as(score)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_baselines(model, method):
    name = "transformer_blocks.0.attn.to_q"  # block 0: Wanda's one calibration group sees the dense model's inputs
    W = dict(model.denoiser.named_modules())[name].weight.detach().clone()
    # the masks each baseline must choose, computed here: the smallest |W| of the whole layer (magnitude), or
    # the smallest |W_ij| * ||X_j|| of each row (Wanda); the input norms make them differ on this layer
    by_magnitude = _smallest(W.abs(), round(0.5 * W.numel()))
    score = W.abs().double() * _input_square_sums(model, name, CALIB, "wanda").sqrt()
    by_wanda = torch.stack([_smallest(row, round(0.5 * W.shape[1])) for row in score])
    assert not torch.equal(by_magnitude, by_wanda)
    report = P.prune_(model, PruneConfig(method=method, sparsity=0.5), CALIB, progress=False)
    sparsity = [r.sparsity for r in report.pruned_layers]
    assert min(sparsity) >= 0.5 - 1e-9 and max(sparsity) <= 0.5 + 1e-9
    pruned = dict(model.denoiser.named_modules())[name].weight == 0
    if method == "sparsegpt":
        assert report.calib["groups"] == 1 and report.calib["timestep_weighting"] == "uniform"
    if method == "wanda":
        assert torch.equal(pruned, by_wanda)
        kept = ~pruned
        assert torch.equal(model.denoiser.get_submodule(name).weight[kept], W[kept])  # no weight update
    if method == "magnitude":
        # one group, as planned, that calibrated nothing
        assert [(g.calib_calls, g.hessian_bytes) for g in report.groups] == [(0, 0)] and report.calib["groups"] == 1
        assert all(r.error is None for r in report.layers)
        assert torch.equal(pruned, by_magnitude)


def test_blocks_range_leaves_other_blocks_dense(model):
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    report = P.prune_(model, PruneConfig(sparsity=0.5, blocks=(1, 2)), CALIB, progress=False)
    assert all(r.name.startswith("transformer_blocks.1.") for r in report.layers)
    after = model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("transformer_blocks.0."))


def _dense_hessian(model, unit, calib):
    """The Hessian of `unit` from one calibration pass over the unpruned model."""
    calib = resolve_calib(calib, None, "obs-diff")
    batches = encode_batches(model, calibration_prompts(calib, None), calib)
    counter = StepCounter()
    mod = dict(model.denoiser.named_modules())[unit[0]]
    acc = HessianAccumulator(mod.in_features)
    with HessianHooks(counter, timestep_weights(calib.timestep_weighting, calib.steps)) as hooks:
        hooks.watch(mod, acc)
        run_pass(model, batches, calib, counter, progress=False)
    return acc.H


@pytest.mark.parametrize("groups, differs", [(1, False), (2, True)])
def test_later_groups_see_the_already_pruned_model(tiny_sd3_dir, monkeypatch, groups, differs):
    model = load_pipeline(str(tiny_sd3_dir))
    calib = CalibConfig(num_prompts=4, steps=3, guidance=2.0, batch_size=2, groups=groups)
    last_unit = P.plan_units(model, PruneConfig(sparsity=0.5))[0][-1]
    dense_H = _dense_hessian(model, last_unit, calib)
    seen = {}
    real_solve = P._solve_unit

    def spy(unit, modules, H, cfg, *ranges):
        seen[unit] = H.clone()
        return real_solve(unit, modules, H, cfg, *ranges)

    monkeypatch.setattr(P, "_solve_unit", spy)
    P.prune_(load_pipeline(str(tiny_sd3_dir)), PruneConfig(sparsity=0.7), calib, progress=False)
    same = torch.allclose(seen[last_unit], dense_H, rtol=1e-5, atol=1e-7)
    assert same != differs


def test_timestep_weighting_changes_the_hessian(tiny_sd3_dir):
    model = load_pipeline(str(tiny_sd3_dir))
    unit = P.plan_units(model, PruneConfig(sparsity=0.5))[0][0]
    h_log = _dense_hessian(model, unit, CALIB)
    h_uni = _dense_hessian(model, unit, CalibConfig(**{**CALIB.to_dict(), "timestep_weighting": "uniform"}))
    assert not torch.allclose(h_log, h_uni, rtol=1e-4)


def test_hooks_are_removed_when_pruning_fails(model, monkeypatch):
    def boom(*args, **kwargs):
        raise PruneError("layer x: synthetic failure")

    monkeypatch.setattr(P, "_solve_unit", boom)
    with pytest.raises(PruneError, match="layer x: synthetic failure"):
        P.prune_(model, PruneConfig(sparsity=0.5), CALIB, progress=False)
    assert no_hooks_left(model.denoiser)

    def fail_in_pass(*args, **kwargs):
        raise RuntimeError("calibration died")

    monkeypatch.setattr(C, "run_pass", fail_in_pass)
    for mode in ("rerun", "cached"):
        with pytest.raises(RuntimeError, match="calibration died"):
            P.prune_(model, PruneConfig(sparsity=0.5), CalibConfig(**{**CALIB.to_dict(), "mode": mode}),
                     progress=False)
        assert no_hooks_left(model.denoiser)


def test_non_finite_result_names_the_layer(model, monkeypatch):
    monkeypatch.setattr(P, "prune_layer", lambda W, H, cfg: (torch.full_like(W, float("nan")), 0.01))
    with pytest.raises(PruneError, match=r"layer transformer_blocks\.0\.attn\.to_q: .*non-finite"):
        P.prune_(model, PruneConfig(sparsity=0.5), CALIB, progress=False)


def test_saved_run_reloads_to_identical_outputs(model, tmp_path):
    report = P.prune_(model, PruneConfig(sparsity_type="2:4"), CALIB, progress=False)
    run = save_run(model, report.to_dict(), tmp_path / "run")
    expected, got, reloaded = outputs_before_and_after_reload(model, run)
    assert torch.equal(expected, got)
    assert reloaded.run.sparsity_type == "2:4" and reloaded.name == "run"


def test_split_groups_is_contiguous_and_balanced():
    units = [(str(i),) for i in range(10)]
    chunks = split_groups(units, 4)
    assert [len(c) for c in chunks] == [3, 3, 2, 2] and sum(chunks, []) == units
    assert len(split_groups(units, 50)) == 10


def test_calibration_image_size_option(model):
    from obsdiff.calibration.calibrate import Calibrator

    name = P.plan_units(model, PruneConfig(sparsity=0.5))[0][0][0]  # attn.to_q of block 0: image tokens
    tokens = {}
    for size in (None, 32):
        calib = resolve_calib(CalibConfig(**{**CALIB.to_dict(), "height": size, "width": size}), None, "obs-diff")
        accs, _ = Calibrator(model, PruneConfig(sparsity=0.5), calib, progress=False).hessians([name], "t")
        tokens[size] = accs[name].tokens
    assert tokens[32] == 4 * tokens[None]  # 16 px -> 32 px: four times the image tokens
