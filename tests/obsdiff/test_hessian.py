import pytest
import torch

from obsdiff.solver.hessian import WEIGHTINGS, HessianAccumulator, timestep_weights


def test_log_decrease_matches_method_table():
    expected = [1.2, 1.1817, 1.1612, 1.138, 1.1113, 1.0796, 1.0408, 0.9908, 0.9204, 0.8]
    assert timestep_weights("log_decrease", 10) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("strategy", WEIGHTINGS)
def test_weight_shapes_and_ranges(strategy):
    w = timestep_weights(strategy, 25)
    assert len(w) == 25 and min(w) >= 0.8 - 1e-12 and max(w) <= 1.2 + 1e-12
    assert timestep_weights(strategy, 1) == [1.0]


def test_increasing_and_linear_strategies():
    assert timestep_weights("log_increase", 10)[0] == pytest.approx(0.8)
    assert timestep_weights("log_increase", 10)[-1] == pytest.approx(1.2)
    assert timestep_weights("linear_decrease", 5) == pytest.approx([1.2, 1.1, 1.0, 0.9, 0.8])
    assert timestep_weights("linear_increase", 5) == pytest.approx([0.8, 0.9, 1.0, 1.1, 1.2])
    assert timestep_weights("uniform", 4) == [1.0] * 4
    with pytest.raises(ValueError, match="unknown timestep weighting"):
        timestep_weights("cosine", 4)


def test_running_mean_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(b, 5, 6, generator=g), a) for b, a in ((2, 1.2), (3, 0.9), (1, 0.8), (4, 1.1))]
    acc = HessianAccumulator(6, dtype=torch.float64)
    for x, a in calls:
        acc.add(x.double(), a)
    S = sum(a * x.shape[0] for x, a in calls)
    H = sum(a * x.reshape(-1, 6).double().T @ x.reshape(-1, 6).double() for x, a in calls) * 2 / S
    assert torch.allclose(acc.H, H, atol=1e-12)
    assert acc.weight_sum == pytest.approx(S) and acc.calls == 4 and acc.tokens == 50


def test_float32_accumulation_from_half_inputs_and_no_overflow():
    acc = HessianAccumulator(4)
    big = torch.full((2, 3, 4), 200.0, dtype=torch.float16)  # 200^2 * tokens would overflow fp16 sums
    for _ in range(100):
        acc.add(big, 1.0)
    assert acc.H.dtype == torch.float32 and torch.isfinite(acc.H).all()
    assert acc.H[0, 0].item() == pytest.approx(2 * 3 * 200.0**2)


def test_token_subsampling_is_seeded_and_bounded():
    x = torch.randn(2, 100, 8)
    a, b = HessianAccumulator(8, max_tokens=16, seed=7), HessianAccumulator(8, max_tokens=16, seed=7)
    a.add(x)
    b.add(x)
    assert a.tokens == 16 and torch.equal(a.H, b.H)


@pytest.mark.parametrize("d", [255, 256, 300, 512])
def test_wide_inputs_accumulate_the_lower_triangle_and_read_symmetric(d):
    """From 2 tiles wide, only the lower triangle is multiplied; `H` is the full symmetric running mean."""
    from obsdiff.solver.hessian import TILE

    g = torch.Generator().manual_seed(1)
    calls = [(torch.randn(2, 30, d, generator=g, dtype=torch.float64), a) for a in (1.2, 0.9, 1.0)]
    acc = HessianAccumulator(d, dtype=torch.float64)
    for x, a in calls:
        acc.add(x, a)
    assert acc._upper_stale == (d >= 2 * TILE)
    S = sum(a * x.shape[0] for x, a in calls)
    H = sum(a * x.reshape(-1, d).T @ x.reshape(-1, d) for x, a in calls) * 2 / S
    torch.testing.assert_close(acc.H, H, rtol=1e-12, atol=1e-12)
    if d >= 2 * TILE:
        assert torch.equal(acc.H, acc.H.T)
    acc.add(calls[0][0], 1.0)  # adding after a read keeps the result right
    S2 = S + 2
    H2 = (H * S + 2 * calls[0][0].reshape(-1, d).T @ calls[0][0].reshape(-1, d)) / S2
    torch.testing.assert_close(acc.H, H2, rtol=1e-12, atol=1e-12)


def test_inputs_are_moved_to_the_accumulator_device_and_dtype():
    acc = HessianAccumulator(8, device="cpu", dtype=torch.float64)
    x = torch.randn(3, 4, 8, dtype=torch.float32)
    acc.add(x, 1.0)
    assert acc.device == torch.device("cpu") and acc.H.dtype == torch.float64
    X = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.H, 2 * X.T @ X / 3)
