"""obsdiff.config and obsdiff.solver.methods: every validation check, the method registry and resolve_calib."""

import dataclasses

import pytest
import torch

from obsdiff.config import (
    CALIB_CHECKS,
    DEFAULT_CALIB,
    DIGITS_CALIB,
    PRUNE_CHECKS,
    CalibConfig,
    PruneConfig,
    QuantConfig,
    resolve_calib,
)
from obsdiff.errors import ConfigError
from obsdiff.solver.methods import METHODS, get_method

# one row per PruneConfig check: settings, the start of its one-line message
BAD_PRUNE = [
    ({"method": "optimal", "sparsity": 0.5}, "unknown method 'optimal'; choose one of obs-diff, sparsegpt"),
    ({"sparsity_type": "zigzag"}, "--sparsity-type 'zigzag': .*N:M pattern"),
    ({"sparsity_type": "4:4"}, "0 < N < M"),
    ({"method": "wanda", "sparsity_type": "structured", "sparsity": 0.3},
     "wanda has no structured variant; use obs-diff, sparsegpt, magnitude"),
    ({"sparsity": 0.5, "head_ratio": 0.3}, r"^--head-ratio applies to --sparsity-type structured only"),
    ({"sparsity": 0.5, "ffn_ratio": 0.3, "allocation": "sensitivity"},
     r"^--ffn-ratio / --allocation apply to --sparsity-type structured only"),
    ({"sparsity_type": "2:4", "structure_cost": "diag"}, "--structure-cost applies to --sparsity-type structured"),
    ({"sparsity": 0.5, "joint_scoring": "rrf"}, "--joint-scoring applies"),
    ({"sparsity": 0.5, "ffn_per_round": 8}, "--ffn-per-round applies"),
    ({"sparsity_type": "2:4", "sparsity": 0.3}, r"contradicts --sparsity-type 2:4 \(which removes 0.5\)"),
    ({"sparsity_type": "structured", "head_ratio": 0.2}, "structured pruning needs --sparsity, or both"),
    ({}, "--sparsity is required for unstructured pruning"),
    ({"sparsity": 1.5}, r"--sparsity 1.5 is outside \(0, 1\); e.g. 0.5 removes half the weights"),
    ({"sparsity": 0.0}, r"--sparsity 0.0 is outside \(0, 1\)"),
    ({"sparsity_type": "structured", "sparsity": 1.0}, "removes half the heads and FFN neurons"),
    ({"sparsity_type": "structured", "head_ratio": 1.0, "ffn_ratio": 0.2}, r"--head-ratio 1.0 must be in \[0, 1\)"),
    ({"sparsity_type": "structured", "head_ratio": 0.2, "ffn_ratio": -0.1}, r"--ffn-ratio -0.1 must be in \[0, 1\)"),
    ({"sparsity": 0.5, "percdamp": 1.0}, r"--percdamp 1.0 must be in \[0, 1\)"),
    ({"sparsity": 0.5, "block_size": 0}, "--block-size 0 must be positive"),
    ({"sparsity_type": "3:7", "block_size": 8}, "--block-size 8 must be a multiple of M=7"),
    ({"sparsity": 0.5, "on_indivisible": "warn"}, "on_indivisible 'warn' is not one of error, skip"),
    ({"sparsity": 0.5, "compute_dtype": "fp16"}, "--solver-precision 'fp16' is not one of fp32, fp64"),
    ({"sparsity_type": "structured", "sparsity": 0.3, "structure_cost": "trace"}, "--structure-cost 'trace'"),
    ({"sparsity_type": "structured", "sparsity": 0.3, "joint_scoring": "max"}, "--joint-scoring 'max'"),
    ({"sparsity_type": "structured", "sparsity": 0.3, "allocation": "greedy"}, "--allocation 'greedy'"),
    ({"sparsity_type": "structured", "sparsity": 0.3, "ffn_per_round": 0}, "--ffn-per-round 0 must be at least 1"),
    ({"method": "magnitude", "sparsity_type": "structured", "sparsity": 0.3, "allocation": "sensitivity"},
     "--allocation sensitivity needs OBS cost curves, which magnitude has not; use it with obs-diff or sparsegpt"),
    ({"method": "wanda", "sparsity": 0.5, "compensate": False},
     "--no-compensate: wanda never updates weights; it applies to obs-diff, sparsegpt"),
    ({"sparsity": 0.5, "compensate": False, "quant": QuantConfig("w8a8")}, "joint OBS compensates"),
    ({"method": "magnitude", "sparsity": 0.5, "quant": QuantConfig("fp8", method="rtn")},
     "--quant fp8 needs activation ranges from calibration, which magnitude skips"),
    ({"sparsity": 0.5, "blocks": (3, 1)}, "--blocks 3:1 is empty"),
    ({"sparsity": 0.5, "blocks": (-1, 2)}, "--blocks -1:2 is empty"),
]


@pytest.mark.parametrize("kwargs, message", BAD_PRUNE)
def test_every_prune_check_refuses_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        PruneConfig(**kwargs)
    assert "\n" not in str(info.value)


def first_failing_checks(cls, checks, rows) -> set[str]:
    """The checks that are the first to refuse some row (settings set without running __post_init__)."""
    found = set()
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for kwargs, _ in rows:
        cfg = object.__new__(cls)
        for name, value in {**defaults, **kwargs}.items():
            object.__setattr__(cfg, name, value)
        for check in checks:
            try:
                check(cfg)
            except ConfigError:
                found.add(check.__name__)
                break
    return found


def test_every_check_has_a_row():
    assert first_failing_checks(PruneConfig, PRUNE_CHECKS, BAD_PRUNE) == {c.__name__ for c in PRUNE_CHECKS}
    assert first_failing_checks(CalibConfig, CALIB_CHECKS, BAD_CALIB) == {c.__name__ for c in CALIB_CHECKS}


@pytest.mark.parametrize("kwargs, message", [
    ({"percdamp": -0.1}, r"--percdamp -0.1 must be in \[0, 1\)"),
    ({"block_size": 0}, "--block-size 0 must be positive"),
    ({"on_indivisible": "warn"}, "on_indivisible 'warn'"),
])
def test_checks_for_every_sparsity_type_apply_to_structured_too(kwargs, message):
    """These were skipped for structured pruning before the checks became one sequence."""
    with pytest.raises(ConfigError, match=message):
        PruneConfig(sparsity_type="structured", sparsity=0.3, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"sparsity": 0.5},
    {"sparsity_type": "2:4"},
    {"sparsity_type": "2:4", "sparsity": 0.5},
    {"sparsity_type": "structured", "head_ratio": 0.25, "ffn_ratio": 0.0},
    {"method": "magnitude", "sparsity_type": "structured", "sparsity": 0.3},
    {"method": "sparsegpt", "sparsity_type": "structured", "sparsity": 0.3, "allocation": "sensitivity"},
    {"sparsity": 0.5, "compensate": False},
])
def test_valid_configs_pass_and_round_trip(kwargs):
    cfg = PruneConfig(**kwargs)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg


def test_properties():
    assert PruneConfig(sparsity_type="4:8").nm == (4, 8)
    assert PruneConfig(sparsity=0.5).nm is None
    cfg = PruneConfig(sparsity_type="structured", sparsity=0.3, head_ratio=0.5)
    assert (cfg.ratio("heads"), cfg.ratio("ffn")) == (0.5, 0.3)
    assert not PruneConfig(method="magnitude", sparsity=0.5).needs_calibration
    assert PruneConfig(method="wanda", sparsity=0.5).needs_calibration
    assert PruneConfig(sparsity=0.5, blocks=[0, 2]).blocks == [0, 2]
    assert PruneConfig.from_dict({"sparsity": 0.5, "blocks": [0, 2], "unknown": 1}).blocks == (0, 2)


# ------------------------------------------------------------------------------------------------- registry


def test_registry_declares_each_methods_needs():
    assert list(METHODS) == ["obs-diff", "sparsegpt", "wanda", "magnitude"]
    needs = {name: (m.hessian, m.compensation, m.step_weighting, m.one_group_modes, m.structured)
             for name, m in METHODS.items()}
    assert needs == {
        "obs-diff": ("full", True, None, (), "obs"),
        "sparsegpt": ("full", True, "uniform", ("rerun",), "obs"),
        "wanda": ("diag", False, "uniform", ("rerun", "cached"), None),
        "magnitude": (None, False, None, (), "l1"),
    }
    assert [m.calibration for m in METHODS.values()] == [True, True, True, False]
    with pytest.raises(ConfigError, match="unknown method 'x'; choose one of obs-diff, sparsegpt, wanda, magnitude"):
        get_method("x")


def test_each_method_solves_one_layer_as_declared():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(64, 16, generator=g) * torch.linspace(0.1, 3.0, 16)  # uneven input norms
    H = X.T @ X / 64
    for name, method in METHODS.items():
        cfg = PruneConfig(method=name, sparsity_type="2:4")
        W_new, damp = method.solve(W.clone(), H, None, cfg)
        kept = W_new != 0
        assert kept.view(8, 4, 4).sum(-1).eq(2).all(), name  # 2 of every 4 inputs kept
        changed_kept = (W_new != W) & kept
        assert bool(changed_kept.any()) == method.compensation, name  # only OBS updates the kept weights
        assert (damp is not None) == (method.hessian == "full"), name
    # Wanda's mask follows |W| x input norm, magnitude's |W| alone: with uneven norms they differ
    wanda = METHODS["wanda"].solve(W, H, None, PruneConfig(method="wanda", sparsity_type="2:4"))[0] != 0
    magnitude = METHODS["magnitude"].solve(W, None, None, PruneConfig(method="magnitude", sparsity_type="2:4"))[0] != 0
    assert not torch.equal(wanda, magnitude)


# ------------------------------------------------------------------------------------------------- calibration


BAD_CALIB = [
    ({"mode": "replay"}, "unknown --calibration-mode 'replay'"),
    ({"cache_device": "cpu"}, "--cache-device only applies to --calibration-mode cached"),
    ({"mode": "cached", "cache_spill": "maybe"}, "unknown --cache-spill 'maybe'"),
    ({"cache_spill": "always"}, "--cache-spill only applies to --calibration-mode cached"),
    ({"hessian_device": "gpu0"}, "--hessian-device 'gpu0' is not a device name"),
    ({"mode": "cached", "cache_device": "meta"}, "--cache-device 'meta' holds no data"),
    ({"timestep_weighting": "cosine"}, "unknown --timestep-weighting 'cosine'"),
    ({"steps": 0}, "--steps 0 must be at least 1"),
    ({"max_tokens": -1}, "--max-tokens -1 must be at least 1"),
    ({"alpha_min": 1.3}, r"0 < a_min <= a_max, got 1.3, 1.2"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALIB)
def test_calib_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CalibConfig(**kwargs)


@pytest.mark.parametrize("method, mode, weighting, groups", [
    ("obs-diff", "rerun", "log_decrease", DEFAULT_CALIB["groups"]),
    ("obs-diff", "cached", "log_decrease", None),  # one group per block
    ("sparsegpt", "rerun", "uniform", 1),
    ("sparsegpt", "cached", "uniform", None),
    ("wanda", "rerun", "uniform", 1),
    ("wanda", "cached", "uniform", 1),
    ("magnitude", "rerun", "log_decrease", DEFAULT_CALIB["groups"]),
])
def test_resolve_calib_applies_each_methods_calibration(method, mode, weighting, groups):
    calib = resolve_calib(CalibConfig(mode=mode), None, method)
    assert (calib.timestep_weighting, calib.groups) == (weighting, groups)
    assert (calib.num_prompts, calib.steps) == (DEFAULT_CALIB["num_prompts"], DEFAULT_CALIB["steps"])


def test_resolve_calib_keeps_explicit_settings_and_digits_defaults():
    calib = resolve_calib(CalibConfig(num_prompts=3, groups=2), "digits", "obs-diff")
    assert (calib.num_prompts, calib.groups, calib.steps) == (3, 2, DIGITS_CALIB["steps"])
    assert resolve_calib(CalibConfig(mode="cached", groups=3), None, "sparsegpt").groups == 3
