"""Structured OBS: the block solver, physical shrinking per family, and structured runs end to end."""

import copy
import json

import pytest
import torch

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import ConfigError, ModelLoadError
from obsdiff.models import family_for_pipeline
from obsdiff.pruning.prune import prune_
from obsdiff.runs.io import save_run
from obsdiff.runs.loading import load_pipeline
from obsdiff.runs.shrink import removed_indices, shrink_
from obsdiff.solver import group_obs
from tests.conftest import outputs_before_and_after_reload, tiny_flux, tiny_sd3, tiny_sdxl
from tests.obsdiff.test_shrink import zeroed_copy

CALIB = CalibConfig(num_prompts=4, steps=3, guidance=2.0, batch_size=2, groups=2)


def problem(d_out=5, d_in=12, tokens=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                                  dtype=torch.float64)
    return W, 2 * X.T @ X / tokens


def test_block_cost_is_the_error_of_the_optimal_update():
    W, H = problem()
    state = group_obs.ReaderState.create(W, H, percdamp=0.01)
    Hd = state.H.clone()  # damped
    cols = torch.arange(12).view(4, 3)  # four "heads" of three columns
    costs = group_obs.structure_costs(state.W, state.inverse(), cols)
    for i in range(4):
        s = group_obs.ReaderState(W.clone(), Hd.clone())
        s.remove_(cols[i], s.inverse())
        dW = s.W - W
        assert float(((dW @ Hd) * dW).sum()) == pytest.approx(float(costs[i]), rel=1e-9)
        # the update is the least-squares optimum of the remaining columns: W_R + W_G H_GR H_RR^-1
        R = torch.tensor([c for c in range(12) if c not in cols[i]])
        G = cols[i]
        best = W[:, R] + W[:, G] @ Hd[G][:, R] @ torch.linalg.inv(Hd[R][:, R])
        assert torch.allclose(s.W[:, R], best, atol=1e-10) and bool((s.W[:, G] == 0).all())


def test_diag_approximation_is_exact_for_single_columns_and_differs_for_blocks():
    W, H = problem(seed=1)
    Hi = group_obs.ReaderState.create(W, H, 0.01).inverse()
    single = torch.arange(12).view(12, 1)
    assert torch.allclose(group_obs.structure_costs(W, Hi, single), group_obs.structure_costs(W, Hi, single, "diag"))
    heads = torch.arange(12).view(3, 4)
    assert not torch.allclose(group_obs.structure_costs(W, Hi, heads), group_obs.structure_costs(W, Hi, heads, "diag"))


def test_greedy_removal_counts_and_beats_l1():
    W, H = problem(d_out=6, d_in=32, seed=2)
    cols = torch.arange(32).view(32, 1)
    s = group_obs.ReaderState.create(W, H, 0.01)
    Hd = s.H.clone()
    removed = group_obs.remove_structures_([s], [cols], n_remove=12, per_round=4)
    assert len(removed) == 12 == len(set(removed))
    assert bool((s.W[:, removed] == 0).all()) and int((s.W == 0).all(0).sum()) == 12
    l1 = group_obs.magnitude_structures([W], [cols], 12)
    masked = W.clone()
    masked[:, l1] = 0

    def err(Wn):
        return float((((Wn - W) @ Hd) * (Wn - W)).sum())

    assert err(s.W) < err(masked)


def test_rrf_fusion_ranks():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 1.0, 2.0])
    fused = group_obs.fuse_costs([a, b], "rrf")
    # ranks: a -> 0,1,2; b -> 2,0,1; structure 1 is best on average
    assert int(torch.argmin(fused)) == 1
    assert torch.equal(group_obs.fuse_costs([a, b], "sum"), a + b)


FAMILIES = {
    "sd3": lambda: tiny_sd3(num_layers=2),
    "sd35": lambda: tiny_sd3(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "flux": tiny_flux,
    "sdxl": tiny_sdxl,
}


def _inputs(name, fam, denoiser):
    gen = torch.Generator().manual_seed(0)
    if name == "flux":
        return fam.example_inputs(denoiser, batch=2, height=8, width=8, text_len=8, generator=gen)
    return fam.example_inputs(denoiser, batch=2, text_len=8, generator=gen)


class ShrinkSpy:
    """Records the denoiser as the prune leaves it just before shrinking (removed structures zeroed, not yet
    sliced away) and what shrinking keeps."""

    def __init__(self, monkeypatch):
        import obsdiff.pruning.structured as S

        real = S.shrink_
        self.before, self.groups, self.kept = None, None, None

        def spy(denoiser, groups, kept):
            self.before, self.groups, self.kept = copy.deepcopy(denoiser), list(groups), dict(kept)
            return real(denoiser, groups, kept)

        monkeypatch.setattr(S, "shrink_", spy)

    def assert_zeroed_and_equal(self, shrunk, inputs):
        """Every removed structure is zero in the unshrunk model (writer rows, biases, reader columns), and the
        shrunk model's output equals the unshrunk one's."""
        mods = dict(self.before.named_modules())
        for g in self.groups:
            for s in g.readers:
                cols = removed_indices(g, s.offset, self.kept[g.name])
                assert cols and not mods[s.linear].weight[:, cols].any(), s.linear
            for s in g.writers:
                rows = removed_indices(g, s.offset, self.kept[g.name])
                lin = mods[s.linear]
                assert not lin.weight[rows].any(), s.linear
                if lin.bias is not None:
                    assert not lin.bias[rows].any(), s.linear
        with torch.no_grad():
            ref = self.before(**inputs, return_dict=False)[0]
            out = shrunk(**inputs, return_dict=False)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def removed_counts(report) -> dict[str, int]:
    return {s["name"]: len(s["removed"]) for s in report.structures}


def uniform_counts(groups, ratio: float) -> dict[str, int]:
    """What uniform allocation removes: round(ratio * count) per group, one structure always kept."""
    return {g.name: min(round(ratio * g.count), g.count - 1) for g in groups}


@pytest.mark.parametrize("name", FAMILIES)
def test_physical_removal_equals_zeroing(name):
    pipe = FAMILIES[name]()
    fam = family_for_pipeline(pipe)
    dense = fam.denoiser(pipe)
    groups = [g for b in fam.blocks(dense) for g in fam.structure_groups(b)]
    assert {g.kind for g in groups} == {"heads", "ffn"}
    # drop the first head of every attention and every third FFN neuron
    kept = {g.name: list(range(1, g.count)) if g.kind == "heads" else [i for i in range(g.count) if i % 3]
            for g in groups}
    zeroed = zeroed_copy(dense, groups, kept)
    mods = dict(dense.named_modules())
    shrunk = copy.deepcopy(dense)
    shrink_(shrunk, groups, kept)
    inputs = _inputs(name, fam, dense)
    with torch.no_grad():
        ref = zeroed(**inputs, return_dict=False)[0]
        out = shrunk(**inputs, return_dict=False)[0]
        full = dense(**inputs, return_dict=False)[0]
    assert not torch.allclose(ref, full, atol=1e-4)  # something was really removed
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
    n_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in shrunk.parameters()) < n_dense
    smods = dict(shrunk.named_modules())
    for g in groups:
        if g.kind == "heads":
            assert smods[g.attention].heads == g.count - 1
            assert all(smods[s.linear].out_features < mods[s.linear].out_features for s in g.writers)


def test_structured_prune_end_to_end_and_reload(tiny_sd3_dir, tmp_path):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(sparsity_type="structured", sparsity=0.9), CALIB, progress=False)
    blocks = model.denoiser.transformer_blocks
    assert all(b.attn.heads == 1 for b in blocks)  # 2 heads, 90 %: at least one always remains
    assert blocks[0].ff.net[0].proj.out_features == 64 - 58  # round(0.9 * 64) = 58 neurons removed
    stats = report.model_stats
    assert stats["parameter_ratio"] < 0.8 and stats["flop_ratio"] < 0.8  # embedders and adaLN stay
    assert report.shrink_plan and {s["kind"] for s in report.structures} == {"heads", "ffn"}
    assert all(r.error <= r.error_no_compensation + 1e-9 for r in report.layers)
    run = save_run(model, report.to_dict(), tmp_path / "run")
    expected, got, reloaded = outputs_before_and_after_reload(model, run)
    assert torch.equal(got, expected)
    assert reloaded.denoiser.transformer_blocks[0].attn.to_q.out_features == 8

    # a plan that does not match the saved weights is refused by the strict load
    record = json.loads((run / "obsdiff.json").read_text())
    record["shrink_plan"][0]["kept"] = [0, 1]
    (run / "obsdiff.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_pipeline(str(run))


def test_plan_on_the_wrong_base_model_is_refused(tiny_sd3_dir, tmp_path):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(sparsity_type="structured", sparsity=0.3), CALIB, progress=False)
    run = save_run(model, report.to_dict(), tmp_path / "run")
    other = tmp_path / "other"
    tiny_sd3(num_layers=2, num_heads=4, head_dim=4).save_pretrained(other)
    record = json.loads((run / "obsdiff.json").read_text())
    record["base_model"] = str(other)
    record.pop("base")  # the relative path would find the right base first
    (run / "obsdiff.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="plan does not fit this base model"):
        load_pipeline(str(run))


def test_ratio_rounding_to_zero_warns(tiny_sd3_dir):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(sparsity_type="structured", head_ratio=0.2, ffn_ratio=0.2), CALIB,
                    progress=False)
    assert any("rounds to zero" in w and ".attn" in w for w in report.warnings)
    assert model.denoiser.transformer_blocks[0].attn.heads == 2
    assert model.denoiser.transformer_blocks[0].ff.net[0].proj.out_features == 64 - 13


def test_magnitude_l1_structured_and_family_without_groups(tiny_sd3_dir, monkeypatch):
    model = load_pipeline(str(tiny_sd3_dir))
    groups = [g for b in model.family.blocks(model.denoiser) for g in model.family.structure_groups(b)]
    spy = ShrinkSpy(monkeypatch)
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="structured", sparsity=0.5), CALIB,
                    progress=False)
    assert removed_counts(report) == uniform_counts(groups, 0.5) == {g.name: g.count // 2 for g in groups}
    blocks = model.denoiser.transformer_blocks
    assert all(b.attn.heads == 1 and b.ff.net[0].proj.out_features == 32 for b in blocks)  # 2 heads, 64 neurons
    spy.assert_zeroed_and_equal(model.denoiser, _inputs("sd3", model.family, model.denoiser))
    monkeypatch.undo()
    from obsdiff.models.sd3 import SD3Family

    monkeypatch.setattr(SD3Family, "structure_groups", lambda self, block: [])
    with pytest.raises(ConfigError, match="defines no heads or FFN groups"):
        prune_(load_pipeline(str(tiny_sd3_dir)), PruneConfig(sparsity_type="structured", sparsity=0.5), CALIB,
               progress=False)


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_structured_prune_other_families(name, monkeypatch):
    pipe = FAMILIES[name]()
    fam = family_for_pipeline(pipe)
    groups = [g for b in fam.blocks(fam.denoiser(pipe)) for g in fam.structure_groups(b)]
    spy = ShrinkSpy(monkeypatch)
    report = prune_(pipe, PruneConfig(sparsity_type="structured", sparsity=0.5),
                    CalibConfig(num_prompts=2, steps=2, batch_size=2, groups=2, guidance=3.0), progress=False)
    assert removed_counts(report) == uniform_counts(groups, 0.5)
    assert sum(removed_counts(report).values()) > len(groups)  # not just one structure per group
    assert [op["name"] for op in report.shrink_plan] == [g.name for g in groups]
    denoiser = fam.denoiser(pipe)
    mods = dict(denoiser.named_modules())
    for g in groups:
        if g.kind == "heads":
            assert mods[g.attention].heads == g.count - uniform_counts([g], 0.5)[g.name]
    spy.assert_zeroed_and_equal(denoiser, _inputs(name, fam, denoiser))
    n_dense = report.model_stats["before"]["parameters"]
    assert report.model_stats["after"]["parameters"] == sum(p.numel() for p in denoiser.parameters()) < n_dense


def test_allocate_spends_the_budget_where_it_is_cheapest():
    from obsdiff.pruning.allocation import allocate

    curves = {"a": [0.0, 0.1, 0.5, 2.0], "b": [0.0, 0.01, 0.02, 0.03], "c": [0.0, 1.0]}
    taken = allocate(curves, {"a": 1, "b": 1, "c": 1}, budget=4)
    assert taken == {"a": 1, "b": 3, "c": 0}
    taken = allocate(curves, {"a": 1, "b": 2, "c": 1}, budget=4)  # b's structures cost twice the parameters
    assert sum(taken[k] * w for k, w in {"a": 1, "b": 2, "c": 1}.items()) <= 4


def test_cost_curve_is_increasing_from_zero():
    from obsdiff.pruning.allocation import cost_curve

    W, H = problem(d_out=4, d_in=16, seed=3)
    state = group_obs.ReaderState.create(W, H, 0.01)
    curve = cost_curve([state], [torch.arange(16).view(16, 1)], 8, 3, PruneConfig(sparsity_type="structured",
                                                                                sparsity=0.3))
    assert curve[0] == 0 and len(curve) == 9
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:], strict=False))
    assert torch.equal(state.W, group_obs.ReaderState.create(W, H, 0.01).W)  # computed on copies


def test_sensitivity_allocation_keeps_the_parameter_budget(tiny_sd3_dir):
    uniform = load_pipeline(str(tiny_sd3_dir))
    r_uni = prune_(uniform, PruneConfig(sparsity_type="structured", sparsity=0.4), CALIB, progress=False)
    sens = load_pipeline(str(tiny_sd3_dir))
    r_sens = prune_(sens, PruneConfig(sparsity_type="structured", sparsity=0.4, allocation="sensitivity"), CALIB,
                    progress=False)
    assert r_sens.allocation and set(r_sens.allocation["removed"]) == {s["name"] for s in r_uni.structures}
    p_uni = r_uni.model_stats["after"]["parameters"]
    p_sens = r_sens.model_stats["after"]["parameters"]
    assert p_sens >= p_uni and p_sens - p_uni < 0.02 * p_uni  # same budget, up to one structure
