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


# --- structured OBS (METHOD.md section 4) ------------------------------------------------------------------


@dataclass
class ReaderState:
    """One "reader" linear during greedy structure removal: its weight and its (damped) Hessian.

    Removed input columns have zero weights and identity rows/columns in `H`, which decouples them from
    the remaining problem, so `inverse(H)` restricted to the remaining columns is `inverse(H_RR)`.
    """

    W: torch.Tensor  # (d_out, d_in), compute dtype
    H: torch.Tensor  # (d_in, d_in)
    damp: float = 0.0

    @classmethod
    def create(cls, W: torch.Tensor, H: torch.Tensor, percdamp: float, removed: torch.Tensor | None = None
               ) -> ReaderState:
        H, W, _ = prepare_hessian(H, W.to(H.dtype))
        if removed is not None and removed.any():
            W[:, removed] = 0.0
            H[removed, :] = 0.0
            H[:, removed] = 0.0
            H[removed, removed] = 1.0
        mean_diag = torch.diag(H).mean()
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        for factor in DAMPING_ESCALATION:
            damp = percdamp * factor
            if torch.linalg.cholesky_ex(H + damp * mean_diag * eye)[1] == 0:
                return cls(W, H + damp * mean_diag * eye, damp)
        raise CholeskyError(f"Hessian not positive definite even with percdamp {damp:g}")

    def inverse(self) -> torch.Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(self.H))

    def remove_(self, cols: torch.Tensor, Hi: torch.Tensor, compensate: bool = True) -> None:
        """Exact block OBS update for removing columns `cols`: `W_R -= W_G (Hi_GG)^-1 Hi_GR`, then `W_G = 0`."""
        if compensate:
            Hi_GG = Hi[cols][:, cols]
            Hi_G = Hi[cols]  # (|G|, d_in); its G columns give W_G itself back, zeroed just below
            self.W -= self.W[:, cols] @ torch.linalg.solve(Hi_GG, Hi_G)
        self.W[:, cols] = 0.0
        self.H[cols, :] = 0.0
        self.H[:, cols] = 0.0
        self.H[cols, cols] = 1.0


def structure_costs(W: torch.Tensor, Hi: torch.Tensor, cols: torch.Tensor, approx: str = "exact") -> torch.Tensor:
    """OBS cost of removing each structure: `sum_rows w_G^T (Hi_GG)^-1 w_G` (exact), shape (count,).

    `cols` is (count, size): the input columns of each structure. `approx="diag"` is the reference
    implementation's approximation, `sum w^2 / diag(chol(Hi_GG))^2`, which ignores the coupling of the
    columns inside a structure.
    """
    if cols.shape[1] == 1:  # single columns (FFN neurons): both formulas are w^2 / Hi_jj, no batched solve
        j = cols[:, 0]
        return (W[:, j] ** 2).sum(0) / torch.diagonal(Hi)[j]
    Wg = W[:, cols].permute(1, 2, 0)  # (count, size, d_out)
    Hgg = Hi[cols[:, :, None], cols[:, None, :]]  # (count, size, size)
    if approx == "exact":
        return (Wg * torch.linalg.solve(Hgg, Wg)).sum(dim=(1, 2))
    if approx == "diag":
        d = torch.diagonal(torch.linalg.cholesky(Hgg), dim1=1, dim2=2)  # (count, size)
        return (Wg**2 / d[:, :, None] ** 2).sum(dim=(1, 2))
    raise ValueError(f"unknown structure cost {approx!r}; use exact or diag")


def fuse_costs(costs: list[torch.Tensor], how: str = "sum", rrf_k: int = 60) -> torch.Tensor:
    """Combine per-reader costs of shared structures (MMDiT joint heads): lower is cheaper.

    `sum` adds the costs (the exact joint objective: both streams' output errors); `rrf` is the reference
    implementation's reciprocal-rank fusion, `-sum_r 1 / (k + rank_r)`.
    """
    if how == "sum" or len(costs) == 1:
        return torch.stack(costs).sum(0)
    if how == "rrf":
        fused = torch.zeros_like(costs[0])
        for c in costs:
            ranks = torch.empty_like(c)
            ranks[torch.argsort(c)] = torch.arange(len(c), dtype=c.dtype, device=c.device)
            fused -= 1.0 / (rrf_k + ranks + 1)
        return fused.masked_fill(torch.isinf(costs[0]), float("inf"))
    raise ValueError(f"unknown cost fusion {how!r}; use sum or rrf")


def remove_structures_(readers: list[ReaderState], cols: list[torch.Tensor], n_remove: int, per_round: int = 1,
                       approx: str = "exact", fuse: str = "sum", compensate: bool = True,
                       exclude: torch.Tensor | None = None) -> list[int]:
    """Greedy structured OBS with recomputation; mutates the readers. Returns removed structure indices.

    Each round recomputes every reader's inverse Hessian, scores the remaining structures (one cost per
    reader, fused), removes the `per_round` cheapest with the exact joint update, and drops their columns
    from the problem. `cols[r]` is (count, size): structure columns in reader r. `exclude` marks structures
    removed earlier (never chosen again).
    """
    count = cols[0].shape[0]
    removed: list[int] = []
    gone = torch.zeros(count, dtype=torch.bool, device=cols[0].device) if exclude is None else exclude.clone()
    while len(removed) < n_remove:
        inverses = [r.inverse() for r in readers]
        costs = [structure_costs(r.W, Hi, c, approx).masked_fill(gone, float("inf"))
                 for r, Hi, c in zip(readers, inverses, cols, strict=True)]
        score = fuse_costs(costs, fuse)
        k = min(per_round, n_remove - len(removed))
        chosen = torch.topk(score, k, largest=False).indices
        for r, Hi, c in zip(readers, inverses, cols, strict=True):
            r.remove_(c[chosen].flatten(), Hi, compensate)
        gone[chosen] = True
        removed.extend(int(i) for i in chosen)
    return sorted(removed)


def magnitude_structures(readers: list[torch.Tensor], cols: list[torch.Tensor], n_remove: int) -> list[int]:
    """L1-norm baseline: remove the structures whose reader columns have the smallest total |w|."""
    score = sum(W.abs()[:, c].sum(dim=(0, 2)) for W, c in zip(readers, cols, strict=True))
    return sorted(int(i) for i in torch.topk(score, n_remove, largest=False).indices)
