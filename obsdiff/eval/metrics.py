"""Image-quality metrics as pure functions on numpy arrays."""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature rows of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians (the FID formula).

    `tr(sqrt(S1 S2))` is computed as `tr(sqrt(sqrt(S1) S2 sqrt(S1)))`: the same value, but the matrix is
    symmetric positive semi-definite, so its eigenvalues are real and the result is never complex.
    """
    root1 = _sqrtm_psd(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets (N, D) and (M, D)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def psnr(images: np.ndarray, reference: np.ndarray, max_value: float = 1.0, cap: float = 100.0) -> float:
    """Mean PSNR in dB over images (N, ...) in [0, max_value]; identical pairs count as `cap`."""
    a = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    b = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    mse = ((a - b) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = 10 * np.log10(max_value**2 / mse)
    return float(np.minimum(values, cap).mean())


def relative_mse(x: np.ndarray, reference: np.ndarray) -> float:
    """`||x - ref||^2 / ||ref||^2` over the whole batch: how far x drifted from the reference."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    return float(((x - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


def image_grid(images: np.ndarray, cols: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile images (N, H, W, C) in [0, 1] into one uint8 array, upscaled by `scale` (nearest)."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    hh, ww = h * scale + pad, w * scale + pad
    grid = np.full((rows * hh + pad, cols * ww + pad, c), 255, dtype=np.uint8)
    tiles = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, cols)
        grid[pad + r * hh: pad + r * hh + h * scale, pad + col * ww: pad + col * ww + w * scale] = tile
    return grid
