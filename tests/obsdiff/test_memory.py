"""The memory planner: shapes from a meta-device forward, Hessian and cache bytes equal to what a prune holds,
group counts chosen for a budget, one-line refusals, and --dry-run."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from obsdiff.cli import cli
from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import ConfigError
from obsdiff.planning.memory import GiB, check_fits
from obsdiff.planning.planner import choose_groups, plan_memory, skeleton
from obsdiff.planning.profile import CountLiveBytes, FusedAttention, profile_forward
from obsdiff.planning.sizes import component_bytes
from obsdiff.pruning.prune import prune_
from obsdiff.runs.loading import as_loaded
from tests.conftest import tiny_flux, tiny_sd3

CALIB = dict(num_prompts=4, steps=2, batch_size=2, guidance=2.0)


@pytest.mark.parametrize("make", [tiny_sd3, tiny_flux])
def test_meta_forward_sees_the_real_input_shapes(make):
    model = as_loaded(make())
    d = model.denoiser
    inputs = model.family.example_inputs(d, batch=2, height=8, width=8, text_len=8,
                                         generator=torch.Generator().manual_seed(0))
    real = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: real.setdefault(n, tuple(a[0].shape)) and None)
               for n, m in d.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        d(**inputs, return_dict=False)
    for h in handles:
        h.remove()
    from obsdiff.planning.profile import meta_twin

    twin = meta_twin(d)
    profile = profile_forward(twin, {k: v.to("meta") for k, v in inputs.items()})
    assert profile.linear_inputs == real
    # the same forward on the real tensors, its live bytes counted op by op, peaks at the same bytes exactly
    assert profile.activation_peak == real_forward_peak(d, inputs)
    assert all(p.device.type == "cpu" for p in d.parameters())  # the model itself is untouched


def real_forward_peak(denoiser, inputs) -> int:
    """Most bytes of intermediate tensors alive at once in one real forward (attention as the fused kernels
    run it), counted op by op."""
    count = CountLiveBytes()
    live = count.live
    with torch.no_grad(), FusedAttention(), count:
        denoiser(**inputs, return_dict=False)
    return live.peak


@pytest.mark.parametrize("mode,prune", [("rerun", PruneConfig(sparsity=0.5)), ("cached", PruneConfig(sparsity=0.5)),
                                        ("rerun", PruneConfig(method="wanda", sparsity=0.5)),
                                        ("rerun", PruneConfig(sparsity_type="structured", sparsity=0.5))])
def test_planned_hessian_and_cache_bytes_are_what_the_prune_holds(mode, prune):
    calib = CalibConfig(**CALIB, groups=2 if mode == "rerun" else None, mode=mode)
    model = as_loaded(tiny_sd3(num_layers=3))
    d_in = {n: m.in_features for n, m in model.denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = sum(component_bytes(model.pipeline).values())  # before a structured prune shrinks the model
    plan = plan_memory(model, prune, calib, baseline_bytes=0)
    report = prune_(model, prune, calib, progress=False)
    assert [g.hessian_bytes for g in plan.groups] == [g.hessian_bytes for g in report.groups]
    for g in plan.groups:  # one fp32 d_in x d_in matrix per hooked input
        assert g.hessian_bytes == sum(d_in[n] ** 2 * 4 for n in g.layers)
    if not prune.structured:  # the planned groups are the ones the prune ran, unit by unit
        assert [g.layers for g in plan.groups] == [[u[0] for u in r.units] for r in report.groups]
    if mode == "cached":
        assert plan.cache_bytes == report.calibration["cache_bytes"]
    # on a CPU every phase adds up on the host: a group's peak is the weights, its Hessians, the cached inputs
    # and the larger of its calibration transient (one forward and one hooked input) and its solve workspace
    groups = [weights + g.hessian_bytes + plan.cache_bytes
              + max(plan.activation_bytes + g.hook_bytes, g.solve_bytes + g.held_bytes) for g in plan.groups]
    assert plan.peak == {"cpu": max(weights, *groups)}


def test_skeleton_reads_sizes_from_disk_without_loading(tiny_sd3_dir):
    from obsdiff.runs.loading import load_pipeline

    sketch, weights = skeleton(str(tiny_sd3_dir), "fp32")
    assert all(p.is_meta for p in sketch.denoiser.parameters())
    pipeline = load_pipeline(str(tiny_sd3_dir)).pipeline
    loaded = component_bytes(pipeline)
    assert weights.keys() == loaded.keys()
    for k in weights:  # the files hold every tensor but the buffers a module does not persist (CLIP's position ids)
        module = pipeline.components[k]
        kept = module.state_dict()
        transient = sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n not in kept)
        assert weights[k] == loaded[k] - transient, k
    assert weights["transformer"] == sum(t.numel() for t in sketch.denoiser.state_dict().values()) * 4


def test_max_memory_chooses_more_groups_and_refuses_what_cannot_fit():
    model = as_loaded(tiny_sd3(num_layers=4, num_heads=4, head_dim=32))
    prune = PruneConfig(sparsity=0.5)
    calib = CalibConfig(**CALIB, groups=1)
    one = plan_memory(model, prune, calib, baseline_bytes=0)
    per_block = plan_memory(model, prune, CalibConfig(**CALIB, groups=4), baseline_bytes=0)
    assert per_block.peak["cpu"] < one.peak["cpu"]
    budget = (one.peak["cpu"] + per_block.peak["cpu"]) / 2 / GiB
    chosen, plan = choose_groups(model, prune, calib, budget, baseline_bytes=0)
    assert 1 < chosen.groups <= 4 and plan.peak["cpu"] <= budget * GiB
    with pytest.raises(ConfigError, match=r"--max-memory .* is too small: with one group per block"):
        choose_groups(model, prune, calib, per_block.peak["cpu"] / GiB * 0.5, baseline_bytes=0)
    with pytest.raises(ConfigError, match="needs about .* GiB on cpu but --max-memory is"):
        check_fits(one, torch.device("cpu"), limit=int(per_block.peak["cpu"] * 0.5))


def test_hessians_on_the_host_leave_the_accelerator_plan():
    model = as_loaded(tiny_sd3(num_layers=2))
    prune, calib = PruneConfig(sparsity=0.5), CalibConfig(**CALIB)
    on_gpu = plan_memory(model, prune, calib, device="cuda", baseline_bytes=0)
    on_host = plan_memory(model, prune, calib, device="cuda", hessian_device="cpu", baseline_bytes=0)
    hess = max(g.hessian_bytes for g in on_gpu.groups)
    assert on_gpu.peak["cuda"] - on_host.peak["cuda"] == pytest.approx(hess, rel=0.01)
    host = [g.peak["cpu"] - h.peak["cpu"] for g, h in zip(on_host.groups, on_gpu.groups, strict=True)]
    assert host == [g.hessian_bytes for g in on_gpu.groups]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["prune", "--model", str(tiny_sd3_dir), "--sparsity", "0.5", "--groups", "2",
                                 "--dry-run", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Hessians MiB" in r.output and "predicted peak: cpu" in r.output
    row = r"\| 1 +\| transformer_blocks\.0\.ff_context\.net\.2 \.\. transformer_blocks\.1\.ff\.net\.2 +\| 6 "
    assert re.search(row, r.output)
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_prune_refuses_before_loading_when_max_memory_is_too_small(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["prune", "--model", str(tiny_sd3_dir), "--sparsity", "0.5", "--max-memory", "0.001",
                                 "--out", str(out)])
    assert r.exit_code == 2 and "--max-memory 0.001 GiB is too small" in r.output
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_component_bytes_come_from_the_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    from obsdiff.errors import ModelLoadError
    from obsdiff.planning.sizes import safetensors_bytes

    save_file({"w": torch.zeros(3, 4), "ids": torch.zeros(5, dtype=torch.int64),
               "q": torch.zeros(8).to(torch.float8_e4m3fn)}, str(tmp_path / "a.safetensors"))
    assert safetensors_bytes(tmp_path) == 12 * 4 + 5 * 8 + 8 * 1
    assert safetensors_bytes(tmp_path, torch.float16) == 12 * 2 + 5 * 8 + 8 * 1  # float8 and integers as stored
    (tmp_path / "b.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json")
    with pytest.raises(ModelLoadError, match=r"b\.safetensors is not a readable safetensors file"):
        safetensors_bytes(tmp_path)
