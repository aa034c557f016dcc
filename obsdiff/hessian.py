"""Timestep-aware Hessians (METHOD.md section 2).

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


class HessianAccumulator:
    """Running weighted mean of `2 X^T X` over forward calls, one per distinct input tensor.

    `add(x, alpha)` takes the call's input (..., d_in); every leading dimension but the last is a token.
    The batch rows `B_c` of the normaliser are `x.shape[0]`. With `max_tokens`, a seeded random subset
    of at most that many tokens per call is used (bounds the cost on large models).
    """

    def __init__(self, d_in: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, seed: int = 0):
        self.H = torch.zeros(d_in, d_in, device=device, dtype=dtype)
        self.weight_sum = 0.0  # S
        self.calls = 0
        self.tokens = 0
        self.max_tokens = max_tokens
        self._gen = torch.Generator(device="cpu").manual_seed(seed) if max_tokens else None

    @property
    def nbytes(self) -> int:
        return self.H.numel() * self.H.element_size()

    @torch.no_grad()
    def add(self, x: torch.Tensor, alpha: float = 1.0) -> None:
        batch_rows = x.shape[0] if x.dim() > 1 else 1
        X = x.reshape(-1, x.shape[-1])
        if self.max_tokens is not None and X.shape[0] > self.max_tokens:
            keep = torch.randperm(X.shape[0], generator=self._gen)[: self.max_tokens].to(X.device)
            X = X[keep]
        X = X.to(self.H.dtype)
        s_new = self.weight_sum + alpha * batch_rows
        # H <- H * S_old / S_new + (2 alpha / S_new) X^T X, one fused matrix-multiply-add.
        self.H.addmm_(X.T, X, beta=self.weight_sum / s_new, alpha=2.0 * alpha / s_new)
        self.weight_sum = s_new
        self.calls += 1
        self.tokens += X.shape[0]
