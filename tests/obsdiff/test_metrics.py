import numpy as np
import pytest

from obsdiff.eval import metrics as M


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # For commuting covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = 8.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4))
    assert M.feature_frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(2000, 4)) + 1.0
    assert M.feature_frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)
    with pytest.raises(ValueError, match=r"need at least 2 feature rows .*\(1, 4\)"):
        M.gaussian_stats(a[:1])


def test_psnr_and_relative_mse():
    x = np.zeros((2, 4, 4, 1))
    y = x + 0.1
    assert M.psnr(x, y) == pytest.approx(20.0)
    assert M.psnr(x, x) == 100.0
    assert M.relative_mse(y, y) == 0.0
    assert M.relative_mse(2 * y, y) == pytest.approx(1.0)


def test_image_grid_layout():
    imgs = np.ones((5, 3, 2, 1))
    grid = M.image_grid(imgs, cols=2, scale=2, pad=1)
    assert grid.shape == (3 * (3 * 2 + 1) + 1, 2 * (2 * 2 + 1) + 1, 1)
    assert grid.dtype == np.uint8 and grid.max() == 255
