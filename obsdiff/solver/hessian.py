"""Timestep-aware Hessians (docs/method.md#hessian-accumulation).

`H = (2 / S) * sum_c alpha_{k(c)} X_c^T X_c`, `S = sum_c alpha_{k(c)} B_c`, accumulated per distinct input
tensor as a running weighted mean in float32, so it never overflows however many calls it sees.
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("log_decrease", "log_increase", "linear_decrease", "linear_increase", "uniform")


def timestep_weights(strategy: str, num_steps: int, a_min: float = 0.8, a_max: float = 1.2) -> list[float]:
    """alpha_k for denoising steps k = 0 (noisiest) .. T-1.

    log_decrease (the paper's default): `a_min + (a_max - a_min) * ln(T - k) / ln(T)`, so early steps,
    which fix the layout of the image, weigh most. T = 1 gives weight 1 for every strategy.
    """
    if strategy not in WEIGHTINGS:
        raise ValueError(f"unknown timestep weighting {strategy!r}; choose one of {', '.join(WEIGHTINGS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    T = num_steps
    if T == 1 or strategy == "uniform":
        return [1.0] * T
    span = a_max - a_min
    if strategy == "log_decrease":
        return [a_min + span * math.log(T - k) / math.log(T) for k in range(T)]
    if strategy == "log_increase":
        return [a_min + span * math.log(1 + k) / math.log(T) for k in range(T)]
    if strategy == "linear_decrease":
        return [a_max - span * k / (T - 1) for k in range(T)]
    return [a_min + span * k / (T - 1) for k in range(T)]


# Inputs at least this wide accumulate X^T X tile row by tile row over the lower triangle only (about 40 %
# fewer multiply-adds at 512 wide); narrower ones are cheaper as one full product.
TILE = 128


def syrk_lower_(H: torch.Tensor, X: torch.Tensor, beta: float, alpha: float, tile: int = TILE) -> bool:
    """`H <- beta H + alpha X^T X` for H (d, d) and X (tokens, d); True if only the lower triangle and the
    diagonal tiles were updated (d >= 2 tile), and the rest must be filled by `symmetrize_` before use."""
    d = H.shape[0]
    if d < 2 * tile:
        H.addmm_(X.T, X, beta=beta, alpha=alpha)
        return False
    for i0 in range(0, d, tile):
        i1 = min(i0 + tile, d)
        H[i0:i1, :i1].addmm_(X[:, i0:i1].T, X[:, :i1], beta=beta, alpha=alpha)
    return True


def symmetrize_(H: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Copy the strict lower triangle of H (d, d) onto the upper one, in place, one tile row at a time."""
    d = H.shape[0]
    for i0 in range(0, d, tile):
        i1 = min(i0 + tile, d)
        H[i0:i1, i1:].copy_(H[i1:, i0:i1].T)
        diag = H[i0:i1, i0:i1]
        diag.copy_(torch.tril(diag) + torch.tril(diag, -1).T)
    return H


class HessianAccumulator:
    """Running weighted mean of `2 X^T X` over forward calls, one per distinct input tensor.

    `add(x, alpha)` takes the call's input (..., d_in) on any device (it is moved to the accumulator's);
    every leading dimension but the last is a token. The batch rows `B_c` of the normaliser are
    `x.shape[0]`. With `max_tokens`, a seeded random subset of at most that many tokens per call is used
    (bounds the cost on large models).
    """

    def __init__(self, d_in: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, seed: int = 0):
        self._H = torch.zeros(d_in, d_in, device=device, dtype=dtype)
        self.d_in, self._device, self._itemsize = d_in, self._H.device, self._H.element_size()
        self._upper_stale = False  # wide inputs: syrk_lower_ leaves the upper triangle stale
        self.weight_sum = 0.0  # S
        self.calls = 0
        self.tokens = 0
        self.max_tokens = max_tokens
        self.ranges = None  # activation ranges the same hook collects (`obsdiff.calibration.ranges`), if asked
        self._gen = torch.Generator(device="cpu").manual_seed(seed) if max_tokens else None

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (d_in, d_in), symmetric."""
        if self._H is None:
            raise RuntimeError("this accumulator's Hessian was released (another rank owns it)")
        if self._upper_stale:
            symmetrize_(self._H)
            self._upper_stale = False
        return self._H

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix while it accumulates (kept after `release`, for the report)."""
        return self.d_in * self.d_in * self._itemsize

    def merge(self, H: torch.Tensor, weight_sum: float, calls: int, tokens: int) -> None:
        """Replace the state by one combined over several processes (`obsdiff.pruning.distributed`)."""
        self._H, self._upper_stale = H, False
        self.weight_sum, self.calls, self.tokens = weight_sum, calls, tokens

    def release(self, weight_sum: float, calls: int, tokens: int) -> None:
        """Free the matrix (another process owns the combined one), keeping the combined counts."""
        self._H = None
        self.weight_sum, self.calls, self.tokens = weight_sum, calls, tokens

    def add(self, x: torch.Tensor, alpha: float = 1.0) -> None:
        with torch.no_grad():
            batch_rows = x.shape[0] if x.dim() > 1 else 1
            X = x.reshape(-1, x.shape[-1])
            if self.max_tokens is not None and X.shape[0] > self.max_tokens:
                keep = torch.randperm(X.shape[0], generator=self._gen)[: self.max_tokens]
                X = X[keep.to(X.device, non_blocking=True)]
            X = X.to(self._H.device, self._H.dtype)  # no copy when already there (fp32 model, same device)
            s_new = self.weight_sum + alpha * batch_rows
            # H <- H * S_old / S_new + (2 alpha / S_new) X^T X, fused multiply-adds over the lower triangle.
            if syrk_lower_(self._H, X, self.weight_sum / s_new, 2.0 * alpha / s_new):
                self._upper_stale = True
            self.weight_sum = s_new
            self.calls += 1
            self.tokens += X.shape[0]
