"""Quantization: the quantizers, joint OBS, activation ranges, SmoothQuant, and quantized prunes end to end
(runs stored as codes + scales that load back to the same module)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from obsdiff.calibration.ranges import ActivationRanges
from obsdiff.cli import cli
from obsdiff.config import CalibConfig, PruneConfig, QuantConfig
from obsdiff.errors import ConfigError
from obsdiff.pruning.prune import prune_
from obsdiff.runs.io import read_run, save_run
from obsdiff.runs.loading import load_pipeline
from obsdiff.solver import obs
from obsdiff.solver import quant as Q
from obsdiff.solver.qlinear import dequantize_, quantize_linear_, quantized_layers
from tests.conftest import tiny_sd3


def correlated_hessian(d: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """H = 2 X^T X / n of inputs with strongly correlated channels (as real activations are): where rounding one
    weight can be compensated by its neighbours, OBS has something to gain over round-to-nearest."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    X = torch.randn(tokens, d // 8, generator=g) @ torch.randn(d // 8, d, generator=g) + 0.1 * torch.randn(
        tokens, d, generator=g) @ mix
    return 2 * X.T @ X / tokens


# ---------------------------------------------------------------------------------------------- quantizers


def test_fake_quant_rounds_half_to_even_and_saturates_like_quantize_linear():
    int8 = Q.FORMATS["int8"]
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0])
    assert Q.fake_quant(x, torch.tensor(1.0), int8).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0]
    fp8 = Q.FORMATS["fp8"]
    assert Q.fake_quant(torch.tensor([1000.0, 17.0]), torch.tensor(1.0), fp8).tolist() == [448.0, 16.0]


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("fp8", None)])
def test_codes_are_on_the_grid_and_zero_stays_zero(fmt, group):
    fmt = Q.FORMATS[fmt]
    W = torch.randn(16, 64)
    W[:, ::4] = 0.0
    s = Q.weight_scales(W, fmt, group)
    assert s.shape == (16, 1 if group is None else 64 // group)
    Wq = Q.rtn(W, s, fmt)
    c = Q.codes(Wq, Q.expand_groups(s, 64), fmt)
    assert c.dtype == fmt.storage and torch.equal(c.float() * Q.expand_groups(s, 64), Wq)
    assert (Wq[:, ::4] == 0).all() and c.float().abs().max() <= max(-fmt.qmin, fmt.qmax)


def test_clipping_search_lowers_the_rounding_error_of_heavy_tailed_weights():
    torch.manual_seed(0)
    W = torch.distributions.StudentT(2.0).sample((64, 256)).float()  # outliers stretch the absmax step
    fmt = Q.FORMATS["int4"]

    def group_errors(search):  # the search's own norm, per row and group of 128
        return (Q.rtn(W, Q.weight_scales(W, fmt, 128, search), fmt) - W).abs().pow(Q.CLIP_NORM).reshape(64, 2, 128
                                                                                                      ).sum(-1)

    plain, searched = group_errors(False), group_errors(True)
    assert (searched <= plain).all()  # the grid includes the absmax scale: never worse
    assert searched.sum() < 0.9 * plain.sum()


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide"):
        Q.weight_scales(torch.randn(4, 100), Q.FORMATS["int4"], 128)


# ---------------------------------------------------------------------------------------------- joint OBS


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", "fp8"])
def test_joint_obs_keeps_the_pattern_and_beats_pruning_then_rounding(scheme):
    spec = Q.SCHEMES["w4a16" if scheme == "w4a16" else scheme]
    fmt, group = spec.weights, (32 if spec.group_size else None)
    H = correlated_hessian(128)
    W = torch.randn(48, 128)
    res = obs.obs_prune(W, H, nm=(2, 4), quant=Q.ScaleRule(fmt, group))
    joint = res.weight
    assert obs.holds_nm(joint, (2, 4))
    assert torch.equal(Q.rtn(joint, res.scale, fmt), joint)  # every kept weight on the fixed grid
    pruned = obs.obs_prune(W, H, nm=(2, 4)).weight
    assert torch.equal(res.scale, Q.weight_scales(pruned, fmt, group, search=True))  # of the weights pruning leaves
    then_rtn = Q.rtn(pruned, res.scale, fmt)
    assert obs.reconstruction_error(W, joint, H) < obs.reconstruction_error(W, then_rtn, H)
    # scales of the dense weights clip the weights compensation grew: worse than either
    dense_scales = obs.obs_prune(W, H, nm=(2, 4), quant=Q.ScaleRule(fmt, group)(W)).weight
    assert obs.reconstruction_error(W, joint, H) < obs.reconstruction_error(W, dense_scales, H)


def test_quantization_alone_halves_the_int4_error_of_round_to_nearest():
    H = correlated_hessian(256)
    W = torch.randn(64, 256)
    fmt = Q.FORMATS["int4"]
    s = Q.weight_scales(W, fmt, 64)
    gptq = obs.obs_prune(W, H, 0.0, quant=Q.WeightQuantizer(s, fmt, 64)).weight
    assert (gptq != 0).float().mean() > 0.8  # sparsity 0: nothing pruned, only rounding zeros
    assert obs.reconstruction_error(W, gptq, H) < 0.5 * obs.reconstruction_error(W, Q.rtn(W, s, fmt), H)


def test_smoothing_transforms_the_hessian_exactly():
    """Errors of (W diag(s), S^-1 H S^-1) are those of (W, H): OBS sees the smoothed inputs without a second pass."""
    H = correlated_hessian(32)
    W, dW = torch.randn(8, 32).double(), 1e-2 * torch.randn(8, 32).double()
    s = torch.rand(32).double() + 0.5
    Hs = H.double() / s[:, None] / s[None, :]
    assert obs.reconstruction_error(W * s, (W + dW) * s, Hs) == pytest.approx(
        obs.reconstruction_error(W, W + dW, H.double()), rel=1e-9)


def test_smooth_factors_follow_smoothquant_and_leave_dead_channels_alone():
    s = Q.smooth_factors(torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------- activations


def test_activation_ranges_per_step_and_their_combinations():
    ranges = ActivationRanges()
    for step, peak in [(0, 8.0), (0, 2.0), (1, 4.0), (2, 2.0)]:
        x = torch.zeros(2, 3, 4)
        x[1, 2, 3] = -peak
        x[0, 0, 0] = 1.0
        ranges.add(x, step)
    assert ranges.channel_amax().tolist() == [1.0, 0.0, 0.0, 8.0]
    assert ranges.input_range("max") == 8.0
    assert ranges.input_range("mean") == pytest.approx(14 / 3)
    assert ranges.input_range("percentile", 50.0) == 4.0
    assert ranges.input_range("max", smooth=torch.tensor([1.0, 1.0, 1.0, 16.0])) == 1.0


def test_quant_linear_computes_its_qdq_graph_and_dequantizes_back():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    fmt = Q.FORMATS["int8"]
    s = Q.weight_scales(lin.weight.detach(), fmt)
    with torch.no_grad():
        lin.weight.copy_(Q.rtn(lin.weight, s, fmt))
    x = torch.randn(5, 32)
    pre = torch.rand(32) + 0.5
    q = quantize_linear_(lin, Q.SCHEMES["w8a8"], s, input_scale=0.02, output_scale=0.05, pre_quant_scale=pre)
    expected = Q.fake_quant(torch.nn.functional.linear(Q.fake_quant(x * pre, torch.tensor(0.02), fmt), lin.weight,
                                                       lin.bias), torch.tensor(0.05), fmt)
    assert torch.equal(q(x), expected)
    plain = dequantize_(q)
    assert type(plain) is torch.nn.Linear and not hasattr(plain, "weight_scale")
    assert torch.allclose(plain(x), torch.nn.functional.linear(x * pre, q.weight.detach() / pre, q.bias), atol=1e-5)


# ---------------------------------------------------------------------------------------------- prunes


CALIB = CalibConfig(num_prompts=4, steps=3, batch_size=2, guidance=2.0, groups=2)


@pytest.mark.parametrize("prune", [
    PruneConfig(sparsity_type="2:4", quant=QuantConfig("w8a8")),
    PruneConfig(sparsity_type="none", quant=QuantConfig("w4a16", group_size=8)),
    PruneConfig(sparsity=0.5, quant=QuantConfig("fp8", method="rtn", smoothquant=0.5)),
    PruneConfig(sparsity_type="structured", sparsity=0.5, quant=QuantConfig("w8a16")),
    PruneConfig(method="wanda", sparsity_type="2:4", quant=QuantConfig("w8a8", method="rtn", act_steps="mean")),
], ids=["2:4+w8a8", "none+w4a16", "unstructured+fp8+smooth", "structured+w8a16", "wanda+w8a8-rtn"])
def test_quantized_prune_saves_codes_and_loads_the_same_module(prune, tiny_sd3_dir, tmp_path):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, prune, CALIB, progress=False)
    layers = quantized_layers(model.denoiser)
    assert sorted(layers) == sorted(report.quantized) and len(layers) >= len(report.pruned_layers) > 0
    spec = prune.quant.spec
    for name, lin in layers.items():
        grid = Q.fake_quant(lin.weight, Q.expand_groups(lin.weight_scale, lin.in_features), spec.weights)
        assert torch.equal(grid, lin.weight), name
        assert (lin.input_scale is not None) == (spec.activations is not None)
        # output quantizers: by default only where TensorRT needs them, on 2:4 INT8 layers
        assert (lin.output_scale is not None) == (prune.sparsity_type == "2:4" and spec.activations is not None)
        if prune.nm:
            assert obs.holds_nm(lin.weight_codes(), prune.nm)
        if prune.quant.smoothquant is not None:
            assert lin.pre_quant_scale is not None and not torch.equal(lin.pre_quant_scale, torch.ones(lin.in_features))
    out = save_run(model, report.to_dict(), tmp_path / "run", dtype="fp16")
    record = read_run(out)
    assert record.quant_scheme == prune.quant.scheme and set(record.quantized_layers) == set(layers)
    loaded = quantized_layers(load_pipeline(str(out), dtype="fp16").denoiser)
    for name, lin in layers.items():
        got = loaded[name]
        assert got.weight.dtype == torch.float16 and got.weight_scale.dtype == torch.float32
        assert torch.equal(got.weight_codes(), lin.weight_codes()), name
        for buf in ("weight_scale", "input_scale", "output_scale", "pre_quant_scale"):
            a, b = getattr(lin, buf), getattr(got, buf)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, buf)


def test_joint_obs_prune_is_closer_to_dense_than_pruning_then_rounding():
    def layer_error(quant_method):
        model = tiny_sd3(num_layers=2)
        report = prune_(model, PruneConfig(sparsity_type="2:4", quant=QuantConfig("w4a16", method=quant_method,
                                                                                     group_size=8)),
                        CALIB, progress=False)
        return sum(r.error for r in report.pruned_layers)

    assert layer_error("obs") < layer_error("rtn")


@pytest.mark.parametrize("quant,error", [
    (dict(scheme="int3"), "unknown --quant"),
    (dict(scheme="w8a8", group_size=64), "applies to w4a16 only"),
    (dict(scheme="w4a16", smoothquant=0.5), "leaves activations unquantized"),
    (dict(scheme="w8a8", smoothquant=1.5), "must be in [0, 1]"),
    (dict(scheme="w8a8", act_steps="median"), "--act-steps"),
])
def test_bad_quant_settings_are_one_line_errors(quant, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        QuantConfig(**quant)


@pytest.mark.parametrize("prune,error", [
    (dict(sparsity_type="none"), "add --quant"),
    (dict(method="magnitude", sparsity_type="2:4", quant=QuantConfig("w8a8", method="rtn")), "activation ranges"),
    (dict(method="wanda", sparsity_type="2:4", quant=QuantConfig("w8a8")), "--quant-method rtn"),
])
def test_bad_combinations_are_refused(prune, error):
    with pytest.raises(ConfigError, match=error):
        PruneConfig(**prune)


def test_cli_refuses_a_group_size_that_does_not_divide_a_width_before_loading(tmp_path, monkeypatch):
    import obsdiff.runs.loading as loading

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    r = CliRunner().invoke(cli, ["prune", "--model", "builtin:digits", "--sparsity-type", "none", "--quant", "w4a16",
                                 "--quant-group-size", "96", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "--quant-group-size 96 does not divide its input width 128" in r.output
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(cli, ["prune", "--model", "builtin:digits", "--sparsity", "0.5", "--smoothquant", "0.5",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--smoothquant apply with --quant only" in r.output


@pytest.mark.parametrize("family,prune", [
    ("flux", PruneConfig(sparsity_type="2:4", quant=QuantConfig("w8a8", smoothquant=0.5))),
    ("sdxl", PruneConfig(sparsity_type="structured", sparsity=0.5, quant=QuantConfig("fp8"))),
])
def test_flux_and_sdxl_prunes_quantize_every_selected_linear(family, prune):
    from tests.conftest import tiny_flux, tiny_sdxl

    model = tiny_flux() if family == "flux" else tiny_sdxl()
    report = prune_(model, prune, CalibConfig(num_prompts=2, steps=2, batch_size=2, guidance=2.0, groups=2),
                    progress=False)
    denoiser = model.transformer if family == "flux" else model.unet
    layers = quantized_layers(denoiser)
    assert sorted(layers) == sorted(report.quantized) and len(layers) == {"flux": 34, "sdxl": 40}[family]
    assert all(lin.input_scale is not None and float(lin.input_scale) > 0 for lin in layers.values())


def test_structured_w4a16_refuses_a_group_size_the_shrunk_widths_break_before_calibrating(monkeypatch):
    import obsdiff.calibration.calibrate as C

    monkeypatch.setattr(C.Calibrator, "hessians", lambda *a, **k: pytest.fail("calibrated before refusing"))
    prune = PruneConfig(sparsity_type="structured", sparsity=0.5, quant=QuantConfig("w4a16", group_size=16))
    with pytest.raises(ConfigError, match=r"to_out.0: --quant-group-size 16 does not divide its input width after "
                                          r"structured pruning \(8\)"):
        prune_(tiny_sd3(num_layers=2), prune, CALIB, progress=False)
