"""FLOP counting on the meta device equals the measured forward; structured per-layer seconds are per layer."""

import pytest
import torch

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.pruning.flops import count_flops, forward_flops
from obsdiff.pruning.prune import prune_
from obsdiff.pruning.structured import model_stats
from obsdiff.runs.loading import as_loaded
from tests.conftest import tiny_flux, tiny_sd3, tiny_sdxl

BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux, "sdxl": tiny_sdxl}


def default_inputs(model):
    """The inputs `model_stats` counts on: batch 1 at the model's default shape."""
    msl = model.generation_defaults.get("max_sequence_length")
    return model.family.example_inputs(model.denoiser, batch=1,
                                       text_len=model.family.text_len(model.pipeline, msl),
                                       generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", BUILDERS)
def test_counted_flops_equal_measured_dense_and_shrunk(family):
    model = as_loaded(BUILDERS[family]())
    dense = forward_flops(model.denoiser, default_inputs(model))
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="structured", sparsity=0.5), progress=False)
    shrunk = forward_flops(model.denoiser, default_inputs(model))
    stats = report.model_stats
    assert shrunk < 0.9 * dense  # the shrink really removed work
    assert stats["before"]["flops_per_forward"] == pytest.approx(dense, rel=1e-6)
    assert stats["after"]["flops_per_forward"] == pytest.approx(shrunk, rel=1e-6)
    assert stats["flop_ratio"] == pytest.approx(shrunk / dense, rel=1e-6)
    assert stats["after"]["parameters"] == sum(p.numel() for p in model.denoiser.parameters())


def test_counting_leaves_the_model_untouched():
    model = as_loaded(tiny_sd3())
    inputs = default_inputs(model)
    with torch.no_grad():
        before = model.denoiser(**inputs, return_dict=False)[0]
        flops = model_stats(model)["flops_per_forward"]
        after = model.denoiser(**inputs, return_dict=False)[0]
    assert flops > 0 and torch.equal(before, after)
    assert not any(t.is_meta for t in [*model.denoiser.parameters(), *model.denoiser.buffers()])


class ValueDependent(torch.nn.Module):
    """A forward that needs real values (cannot be traced on the meta device)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, hidden_states, return_dict=False):
        return (self.lin(hidden_states) * 2 if hidden_states.sum().item() > -1e9 else hidden_states,)


def test_value_dependent_forward_falls_back_to_measuring():
    inputs = {"hidden_states": torch.randn(3, 8)}
    assert count_flops(ValueDependent(), inputs) == forward_flops(ValueDependent(), inputs) == 2 * 3 * 8 * 4


def test_structured_layer_seconds_are_per_layer():
    model = as_loaded(tiny_sd3())
    calib = CalibConfig(num_prompts=2, steps=2, guidance=2.0, batch_size=2, groups=2)
    report = prune_(model, PruneConfig(sparsity_type="structured", sparsity=0.5), calib, progress=False)
    layer_seconds = [r.seconds for r in report.layers]
    assert len(layer_seconds) > 2 and all(s > 0 for s in layer_seconds)
    # each record is its own layer's time: together no more than the groups' solve time (cumulative times
    # measured from each group's start would add up to far more)
    assert sum(layer_seconds) <= sum(g.prune_seconds for g in report.groups)
