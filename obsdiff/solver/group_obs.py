"""Structured OBS (docs/method.md#structured-selection): removing whole groups of input columns (attention heads,
FFN neurons) with the exact block-OBS cost and update, greedily, and the L1 baseline. Pure math, as `obs`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obsdiff.solver.obs import DAMPING_ESCALATION, CholeskyError, prepare_hessian


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
