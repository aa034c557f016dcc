"""Hooks: Hessian accumulation timed and removed on exit; pipeline calls and block runs cut short only
where nothing after the cut is read."""

import pytest
import torch

from obsdiff.calibration.calibrate import encode_batches, run_pass
from obsdiff.calibration.hooks import CallCut, HessianHooks, LastStepCut, StepCounter, StopPass
from obsdiff.calibration.prompts import calibration_prompts
from obsdiff.config import CalibConfig, resolve_calib
from obsdiff.runs.loading import as_loaded
from obsdiff.solver.hessian import HessianAccumulator, timestep_weights
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


def fires_until_stop(cut, limit: int = 10) -> int | None:
    """How many `fired()` calls `cut` takes before it raises StopPass (the stopping call included); None if
    it never does within `limit`."""
    for n in range(1, limit + 1):
        try:
            cut.fired()
        except StopPass:
            return n
    return None


def test_last_step_cut_needs_a_known_step_count():
    counter = StepCounter()
    cut = LastStepCut(counter)
    counter.reset()
    assert fires_until_stop(cut, 5) is None  # step 0 of a call whose length is unknown: never cut
    counter.step, counter.total = 1, 2
    assert fires_until_stop(cut) == 5  # last step: stops once it has fired as often as step 0 did
    counter.reset()
    counter.step, counter.total = 0, 1
    assert fires_until_stop(cut) is None  # a one-step call is never cut


def test_last_step_cut_compares_with_the_first_and_the_second_to_last_step():
    counter = StepCounter()
    cut = LastStepCut(counter)
    counter.reset()
    counter.total = 4
    for step, fires in enumerate((3, 3, 3)):
        counter.step = step
        assert fires_until_stop(cut, fires) is None  # steps before the last are never cut
    counter.step = 3
    assert fires_until_stop(cut) == 3
    # a scheduler whose steps call the denoiser a varying number of times is never cut
    counter.reset()
    counter.total = 3
    for step, fires in enumerate((2, 3)):
        counter.step = step
        assert fires_until_stop(cut, fires) is None
    counter.step = 2
    assert fires_until_stop(cut) is None
    # a new pipeline call (reset) starts counting afresh
    counter.reset()
    counter.total = 2
    counter.step = 0
    assert fires_until_stop(cut, 1) is None
    counter.step = 1
    assert fires_until_stop(cut) == 1


def test_step_counter_follows_the_pipeline_callback():
    counter = StepCounter()
    assert (counter.step, counter.run, counter.total) == (0, 0, None)
    counter.reset()
    pipe = type("Pipe", (), {"num_timesteps": 7})()
    assert counter.on_step_end(pipe, 2, 0.5, {"latents": torch.zeros(1)}) == {}  # overrides nothing
    assert (counter.step, counter.run, counter.total) == (3, 1, 7)
    counter.reset()
    assert (counter.step, counter.run, counter.total) == (0, 2, None)


def test_call_cut_learns_the_fires_of_the_first_run():
    cut = CallCut()
    cut.start()
    assert fires_until_stop(cut, 3) is None  # the first run only counts
    cut.finish()
    assert cut.expected == 3
    for _ in range(2):  # every later run stops at the third fire, and finish() keeps what it learnt
        cut.start()
        assert fires_until_stop(cut) == 3
        cut.finish()
    assert cut.expected == 3


def test_hooks_feed_the_step_weight_and_are_removed_on_exception():
    lin = torch.nn.Linear(4, 3)
    counter = StepCounter()
    acc = HessianAccumulator(4)
    x0, x1 = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="user code failed"), HessianHooks(counter, [1.0, 0.25]) as hooks:
        hooks.watch(lin, acc)
        hooks.watch(lin, HessianAccumulator(4))
        assert len(lin._forward_pre_hooks) == 2
        with torch.no_grad():
            lin(x0)
            counter.step = 5  # past the last weight: the last one applies
            lin(x1)
        raise ValueError("user code failed")
    assert not lin._forward_pre_hooks and not hooks._handles
    assert acc.calls == 2 and acc.tokens == 10 and acc.weight_sum == pytest.approx(1.0 * 5 + 0.25 * 5)
    ref = HessianAccumulator(4)
    ref.add(x0, 1.0)
    ref.add(x1, 0.25)
    torch.testing.assert_close(acc.H, ref.H, rtol=0, atol=0)


def test_input_capture_records_keyword_calls_and_refuses_positional_ones():
    from obsdiff.calibration.hooks import InputCapture

    class Block(torch.nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return hidden_states * scale

    block, counter = Block(), StepCounter()
    first = []
    with InputCapture(block, counter, device=torch.device("cpu"), on_first=first.append) as cap:
        block(hidden_states=torch.ones(2), scale=2.0)
        counter.step = 1
        block(hidden_states=torch.zeros(2), scale=3.0)
        with pytest.raises(TypeError, match="Block was called with positional inputs"):
            block(torch.ones(2))
    assert not block._forward_pre_hooks
    assert cap.count == 2 and len(first) == 1 and first[0]["scale"] == 2.0
    assert [(kw["scale"], step) for kw, step in cap.calls] == [(2.0, 0), (3.0, 1)]
    assert torch.equal(cap.calls[1][0]["hidden_states"], torch.zeros(2))


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
