"""Shrinking: slicing linears' rows and columns, the attention fix-ups, plans saved and replayed."""

import copy

import pytest
import torch
from torch import nn

from obsdiff.errors import ModelLoadError
from obsdiff.models import Slice, StructureGroup
from obsdiff.runs.loading import as_loaded
from obsdiff.runs.shrink import (
    plan_to_json,
    removed_indices,
    replay_plan_,
    shrink_,
    structure_columns,
    structure_indices,
)
from tests.conftest import tiny_sd3


def test_structure_index_helpers():
    g = StructureGroup("heads", "attn", count=3, size=2, readers=(), writers=())
    assert structure_columns(g, 4).tolist() == [[4, 5], [6, 7], [8, 9]]
    assert structure_indices(g, 4, [2, 0]) == [4, 5, 8, 9]  # sorted by structure
    assert removed_indices(g, 4, [1]) == [4, 5, 8, 9]
    assert removed_indices(g, 0, [0, 1, 2]) == []


class GegluFfn(nn.Module):
    """A GEGLU FFN whose down projection also reads 3 columns of a side input after the neurons (like Flux's
    proj_out reading cat(attention, mlp)): neuron i is rows i and i + inner of `up`, column i of `down`."""

    def __init__(self, d=5, inner=6, side=3):
        super().__init__()
        self.up = nn.Linear(d, 2 * inner)
        self.side = nn.Linear(d, side)
        self.down = nn.Linear(inner + side, d)

    def forward(self, x):
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(torch.cat([value * nn.functional.gelu(gate), self.side(x)], dim=-1))


FFN = StructureGroup("ffn", "ffn", count=6, size=1, readers=(Slice("down", 0),),
                     writers=(Slice("up", 0), Slice("up", 6)))
SIDE = StructureGroup("ffn", "side", count=3, size=1, readers=(Slice("down", 6),), writers=(Slice("side", 0),))


def zeroed_copy(model, groups, kept):
    """`model` with the reader columns of every removed structure set to zero."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for g in groups:
            for s in g.readers:
                mods[s.linear].weight[:, removed_indices(g, s.offset, kept[g.name])] = 0
    return out


def test_shrink_slices_rows_columns_and_biases_and_equals_zeroing():
    torch.manual_seed(0)
    dense = GegluFfn()
    kept = {"ffn": [1, 2, 4], "side": [0, 2]}
    shrunk = copy.deepcopy(dense)
    shrink_(shrunk, [FFN, SIDE], kept)
    rows_up = [1, 2, 4, 7, 8, 10]  # value rows and their gate rows, inner = 6 apart
    assert torch.equal(shrunk.up.weight, dense.up.weight[rows_up])
    assert torch.equal(shrunk.up.bias, dense.up.bias[rows_up])
    assert torch.equal(shrunk.side.weight, dense.side.weight[[0, 2]])
    assert torch.equal(shrunk.side.bias, dense.side.bias[[0, 2]])
    assert torch.equal(shrunk.down.weight, dense.down.weight[:, [1, 2, 4, 6, 8]])
    assert torch.equal(shrunk.down.bias, dense.down.bias)  # readers keep all their rows
    assert (shrunk.up.in_features, shrunk.up.out_features, shrunk.down.in_features) == (5, 6, 5)
    x = torch.randn(4, 5)
    with torch.no_grad():
        ref, out, full = zeroed_copy(dense, [FFN, SIDE], kept)(x), shrunk(x), dense(x)
    assert not torch.allclose(ref, full, atol=1e-4)  # something was removed
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_groups_left_out_stay_whole_and_linears_keep_dtype_and_mode():
    dense = GegluFfn().to(torch.bfloat16).eval()
    shrunk = copy.deepcopy(dense)
    side_before = shrunk.side
    shrink_(shrunk, [FFN, SIDE], {"ffn": [0, 5]})
    assert shrunk.side is side_before  # no structure of this group was named: not even replaced
    assert shrunk.up.weight.dtype == shrunk.down.weight.dtype == torch.bfloat16
    assert not shrunk.up.training and not shrunk.down.training
    assert shrunk.down.in_features == 2 + 3 and shrunk.up.out_features == 4


def test_removing_every_structure_is_refused():
    with pytest.raises(ValueError, match="ffn: at least one structure must remain"):
        shrink_(GegluFfn(), [FFN], {"ffn": []})


@pytest.fixture(scope="module")
def sd3():
    return as_loaded(tiny_sd3(num_layers=2, num_heads=4, head_dim=4))


def sd3_groups(denoiser, family):
    return [g for b in family.blocks(denoiser) for g in family.structure_groups(b)]


def sd3_output(denoiser, family):
    inputs = family.example_inputs(denoiser, batch=2, text_len=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return denoiser(**inputs, return_dict=False)[0]


def test_sd3_heads_and_neurons_removed_equal_the_zeroed_model_and_fix_the_attention(sd3):
    dense, fam = sd3.denoiser, sd3.family
    groups = sd3_groups(dense, fam)
    # remove heads 1 and 3 of every attention (not a prefix: order matters) and every other FFN neuron
    kept = {g.name: [0, 2] if g.kind == "heads" else list(range(0, g.count, 2)) for g in groups}
    shrunk = copy.deepcopy(dense)
    shrink_(shrunk, groups, kept)
    ref, out = sd3_output(zeroed_copy(dense, groups, kept), fam), sd3_output(shrunk, fam)
    assert not torch.allclose(ref, sd3_output(dense, fam), atol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    mods, dense_mods = dict(shrunk.named_modules()), dict(dense.named_modules())
    for g in groups:
        if g.kind == "heads":
            attn = mods[g.attention]
            assert attn.heads == 2 and attn.inner_dim == 2 * g.size
            assert all(mods[s.linear].out_features == 2 * g.size for s in g.writers)
            assert all(mods[s.linear].in_features == 2 * g.size for s in g.readers)
        else:
            assert all(mods[s.linear].in_features == dense_mods[s.linear].in_features // 2 for s in g.readers)
    n_dense, n_shrunk = (sum(p.numel() for p in m.parameters()) for m in (dense, shrunk))
    assert n_shrunk < n_dense

    # without the attention fix-up the processors split heads wrongly: the fix-up is what makes it exact
    for g in groups:
        if g.kind == "heads":
            mods[g.attention].heads = g.count
    assert not torch.allclose(sd3_output(shrunk, fam), ref, atol=1e-4)


def test_a_saved_plan_replays_to_the_same_model_and_a_foreign_one_is_refused(sd3):
    dense, fam = sd3.denoiser, sd3.family
    groups = sd3_groups(dense, fam)
    kept = {groups[0].name: [3, 1], groups[1].name: [5, 0, 9]}
    shrunk = copy.deepcopy(dense)
    shrink_(shrunk, groups, kept)
    plan = plan_to_json(groups, kept)
    assert [op["name"] for op in plan] == [groups[0].name, groups[1].name]
    assert plan[0] == {"name": groups[0].name, "kind": "heads", "count": 4, "size": 4, "kept": [1, 3]}
    replayed = copy.deepcopy(dense)
    replay_plan_(replayed, groups, plan)
    a, b = shrunk.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    bad = [dict(plan[0], count=8)]
    with pytest.raises(ModelLoadError, match=rf"{groups[0].name} is heads x8 of size 4 in the plan, the base has "
                                             r"heads x4 of size 4"):
        replay_plan_(copy.deepcopy(dense), groups, bad)
    with pytest.raises(ModelLoadError, match="nosuch.attn is heads x4 of size 4 in the plan, the base has nothing"):
        replay_plan_(copy.deepcopy(dense), groups, [dict(plan[0], name="nosuch.attn")])
