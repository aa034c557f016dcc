"""Hooks: Hessian accumulation timed and removed on exit; pipeline calls and block runs cut short only
where nothing after the cut is read."""

import pytest
import torch

from obsdiff.calibrate import calibration_prompts, encode_batches, run_pass
from obsdiff.config import CalibConfig, resolve_calib
from obsdiff.hessian import HessianAccumulator, timestep_weights
from obsdiff.hooks import CallCut, HessianHooks, LastStepCut, StepCounter, StopPass
from obsdiff.loading import as_loaded
from tests.conftest import tiny_sd3

CALIB = dict(num_prompts=4, steps=3, guidance=2.0, batch_size=2)


@pytest.fixture(scope="module")
def sd3():
    model = as_loaded(tiny_sd3(num_layers=3))
    calib = resolve_calib(CalibConfig(**CALIB), None, "obs-diff")
    return model, calib, encode_batches(model, calibration_prompts(calib, None), calib)


def hooked_pass(model, calib, batches, names, cut: bool):
    """Hessians of `names` from one pass, and how often each block ran in each step."""
    counter = StepCounter()
    modules = dict(model.denoiser.named_modules())
    accs = {n: HessianAccumulator(modules[n].in_features) for n in names}
    runs: dict[tuple[int, int], int] = {}
    blocks = model.family.blocks(model.denoiser)
    handles = [b.module.register_forward_hook(
        lambda m, a, o, i=i: runs.__setitem__((i, counter.step), runs.get((i, counter.step), 0) + 1))
        for i, b in enumerate(blocks)]
    weights = timestep_weights(calib.timestep_weighting, calib.steps)
    try:
        with HessianHooks(counter, weights, cut=LastStepCut(counter) if cut else None) as hooks:
            for n, acc in accs.items():
                hooks.watch(modules[n], acc)
            run_pass(model, batches, calib, counter, progress=False)
    finally:
        for h in handles:
            h.remove()
    return accs, runs, hooks


def test_last_step_cut_keeps_every_hessian_and_skips_the_rest(sd3):
    model, calib, batches = sd3
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"]
    full, runs_full, _ = hooked_pass(model, calib, batches, names, cut=False)
    cut, runs_cut, hooks = hooked_pass(model, calib, batches, names, cut=True)
    for n in names:
        assert torch.equal(cut[n].H, full[n].H) and cut[n].calls == full[n].calls == len(batches) * calib.steps
    last = calib.steps - 1
    assert runs_full[(2, last)] == len(batches) and (2, last) not in runs_cut  # later blocks of the last step
    assert (0, last) not in runs_cut  # block 0 itself stops at its FFN output layer's input
    assert runs_cut[(2, last - 1)] == len(batches)  # earlier steps run whole (the trajectory needs them)
    assert hooks.seconds > 0 and not any(m._forward_pre_hooks for m in model.denoiser.modules())


def test_last_step_cut_needs_a_known_step_count():
    counter = StepCounter()
    cut = LastStepCut(counter)
    counter.reset()
    cut.fired()  # step 0 of a call whose length is unknown: never cut
    counter.step, counter.total = 1, 2
    with pytest.raises(StopPass):
        cut.fired()  # last step, fired as often as in step 0
    counter.reset()
    counter.step, counter.total = 0, 1
    cut.fired()  # a one-step call is never cut


def test_call_cut_learns_the_fires_of_the_first_run():
    cut = CallCut()
    cut.start()
    for _ in range(3):
        cut.fired()
    cut.finish()
    assert cut.expected == 3
    cut.start()
    cut.fired()
    cut.fired()
    with pytest.raises(StopPass):
        cut.fired()


def test_hooks_are_removed_when_the_pass_fails(sd3):
    model, calib, batches = sd3
    lin = dict(model.denoiser.named_modules())["transformer_blocks.1.attn.to_q"]

    class Boom(HessianAccumulator):
        def add(self, x, alpha=1.0):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), HessianHooks(StepCounter(), [1.0] * 3) as hooks:
        hooks.watch(lin, Boom(lin.in_features))
        run_pass(model, batches, calib, hooks.counter, progress=False)
    assert not lin._forward_pre_hooks
