"""Optimal Brain Surgeon for one linear layer, and the baselines. Pure math: tensors in, tensors out.

Notation follows METHOD.md and the SparseGPT paper: `W` is (d_out, d_in), `H = 2 X^T X` (d_in, d_in),
`U` the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`), so `U[j, j]^2` is the inverse-Hessian
diagonal of column j once columns < j are fixed, and `U[j, j:] / U[j, j]` is its OBS update direction.
Masks are boolean with True = pruned (set to zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DAMPING_ESCALATION = (1.0, 10.0, 100.0, 1000.0)


class CholeskyError(RuntimeError):
    """The damped Hessian stayed indefinite after every damping escalation."""


@dataclass
class ObsResult:
    weight: torch.Tensor  # pruned (and compensated) weight, float32 or float64, same shape as W
    mask: torch.Tensor  # True where pruned
    damp: float  # percdamp actually used (after escalation)


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights. None/'unstructured' -> None."""
    if pattern in (None, "unstructured"):
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern must look like 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def prepare_hessian(H: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead inputs (H_jj == 0: the input is always zero) get H_jj = 1 and their weights zeroed."""
    H = H.clone()
    W = W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return H, W, dead


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """`U` with `(H + lambda I)^-1 = U^T U`, `lambda = percdamp * mean(diag H)`.

    Escalates the damping 10x, 100x, 1000x when a factorisation fails; returns U and the percdamp used.
    """
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for factor in DAMPING_ESCALATION:
        damp = percdamp * factor
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
    raise CholeskyError(f"Hessian not positive definite even with percdamp {damp:g}")


def smallest_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask exactly `count` entries with the smallest score (ties broken by position, never over-pruned)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        mask[torch.topk(score.flatten(), count, largest=False, sorted=False).indices] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of M consecutive columns of each row, mask the M - N smallest scores."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def obs_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
              block_size: int = 128, percdamp: float = 0.01, compensate: bool = True) -> ObsResult:
    """Blocked OBS (SparseGPT solver) for unstructured sparsity or an N:M pattern along the input dim.

    Unstructured: exactly `round(sparsity * W.numel())` weights are pruned; each column block gets its share
    by cumulative rounding, chosen by `w^2 / U_jj^2` (the OBS saliency, eq. 3 of SparseGPT).
    `compensate=False` prunes with the same saliency but skips every weight update (ablation).
    Computes in the dtype of `H` (float32 or float64); returns the weight in that dtype.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity (unstructured) or nm (N:M)")
    H, W, _ = prepare_hessian(H, W.to(H.dtype))
    d_out, d_in = W.shape
    if nm is not None:
        n, m = nm
        if d_in % m or block_size % m:
            raise ValueError(f"N:M with M={m} needs d_in ({d_in}) and block size ({block_size}) divisible by M")
    U, damp = damped_inverse_cholesky(H, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b in range(0, d_in, block_size):
        e = min(b + block_size, d_in)
        W1 = W[:, b:e].clone()
        U1 = U[b:e, b:e]
        d = torch.diag(U1)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            count = round(sparsity * d_out * e) - round(sparsity * d_out * b)
            mask1 = smallest_mask(W1**2 / d[None, :] ** 2, count)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(e - b):
            if nm is not None and i % m == 0:
                # decided on the already-compensated weights of this group (SparseGPT's N:M rule)
                mask1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2, n, m)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            if compensate:
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, b:e] = Q1
        mask[:, b:e] = mask1
        if compensate:
            W[:, e:] -= Err1 @ U[b:e, e:]  # lazy batch update of all later columns
    W[mask] = 0.0
    return ObsResult(W, mask, damp)


def magnitude_mask(W: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """|W| per layer (unstructured, exact count) or per M-group (N:M)."""
    score = W.abs().float()
    return nm_mask(score, *nm) if nm else smallest_mask(score, round(sparsity * W.numel()))


def wanda_mask(W: torch.Tensor, H_diag: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda: `|W_ij| * ||X_j||`, compared within each output row (unstructured) or M-group (N:M).

    `||X_j||^2` is `H_jj` up to a constant factor, which does not change the ranking.
    """
    score = W.abs().float() * H_diag.float().clamp_min(0).sqrt()[None, :]
    if nm:
        return nm_mask(score, *nm)
    per_row = round(sparsity * W.shape[1])
    idx = torch.topk(score, per_row, dim=1, largest=False).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer output error `tr(dW H dW^T) / tr(W H W^T)` (= ||dW X^T||^2 / ||W X^T||^2)."""
    H = H.to(torch.float64)
    dW = (W.to(torch.float64) - W_new.to(torch.float64))
    num = ((dW @ H) * dW).sum()
    den = ((W.to(torch.float64) @ H) * W.to(torch.float64)).sum()
    return float(num / den) if den > 0 else 0.0
