"""Optimal Brain Surgeon for one linear layer, and the baselines. Pure math: tensors in, tensors out.

Notation follows docs/method.md#notation and SparseGPT: `W` is (d_out, d_in), `H = 2 X^T X` (d_in, d_in),
`U` the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`), so `U[j, j]^2` is the inverse-Hessian
diagonal of column j once columns < j are fixed, and `U[j, j:] / U[j, j]` is its OBS update direction.
Masks are boolean with True = pruned (set to zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from obsdiff.solver.quant import WeightQuantizer

DAMPING_ESCALATION = (1.0, 10.0, 100.0, 1000.0)
SUB_BLOCK = 32  # columns per rank-1 sweep inside a column block (obs_prune)


class CholeskyError(RuntimeError):
    """The damped Hessian stayed indefinite after every damping escalation."""


@dataclass
class ObsResult:
    weight: torch.Tensor  # pruned (and compensated) weight, float32 or float64, same shape as W
    mask: torch.Tensor  # True where pruned
    damp: float  # percdamp actually used (after escalation)
    scale: torch.Tensor | None = None  # joint mode: the weight scales the kept weights are quantized with


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights. None, 'unstructured', 'structured' and 'none' (the
    sparsity types that are not N:M) -> None. ValueError for anything else that is not N:M with 0 < N < M."""
    if pattern in (None, "unstructured", "structured", "none"):
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern must look like 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def holds_nm(weight, nm: tuple[int, int]) -> bool:
    """Whether every group of M consecutive values along the last axis of `weight` (a torch tensor or numpy
    array; for a linear's (out, in) weight, the input axis) has at most N non-zeros; False when that axis is not a
    multiple of M."""
    n, m = nm
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(-1) <= n).all())


def prepare_hessian(H: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead inputs (H_jj == 0: the input is always zero) get H_jj = 1 and their weights zeroed."""
    H = H.clone()
    W = W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return H, W, dead


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, dead: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, float]:
    """`U` with `(H + lambda I)^-1 = U^T U`, `lambda = percdamp * mean(diag H)`; H is (d, d).

    Escalates the damping 10x, 100x, 1000x when a factorisation fails; returns U and the percdamp used.
    `dead` (bool, (d,)): inputs whose diagonal counts as 1 (docs/method.md#dead-inputs; their rows and columns are 0).
    Dead inputs and damping only touch the diagonal, so H's diagonal is changed in place and restored
    before returning: no d x d copy of H is made (H must not be read concurrently).
    """
    diag = H.diagonal()
    H_diag = diag.clone()
    base = H_diag if dead is None else H_diag.masked_fill(dead, 1.0)
    mean_diag = base.mean()
    try:
        for factor in DAMPING_ESCALATION:
            damp = percdamp * factor
            diag.copy_(base + damp * mean_diag)
            L, info = torch.linalg.cholesky_ex(H)
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                del L  # free d x d before the next factorisation
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                del Hinv
                # a finite diagonal is enough: any non-finite entry of U makes the weights non-finite,
                # which the caller checks, and a full d x d scan is not free at d = 15k
                if info == 0 and torch.isfinite(U.diagonal()).all():
                    return U, damp
    finally:
        diag.copy_(H_diag)
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


def _nm_mask_t(score_t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """`nm_mask` for a transposed score (cols, rows): groups of M consecutive rows of every column."""
    cols, rows = score_t.shape
    groups = score_t.reshape(cols // m, m, rows)
    idx = torch.topk(groups, m - n, dim=1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).reshape(cols, rows)


def obs_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
              block_size: int = 128, percdamp: float = 0.01, compensate: bool = True,
              quant: WeightQuantizer | Callable[[torch.Tensor], WeightQuantizer] | None = None) -> ObsResult:
    """Blocked OBS (SparseGPT solver) for unstructured sparsity or an N:M pattern along the input dim.

    Unstructured: exactly `round(sparsity * W.numel())` weights are pruned; each column block gets its share
    by cumulative rounding, chosen by `w^2 / U_jj^2` (the OBS saliency, eq. 3 of SparseGPT).
    `compensate=False` prunes with the same saliency but skips every weight update (ablation).
    Computes in the dtype and on the device of `H` (float32 or float64); returns the weight in that dtype.
    `H` is not modified (its diagonal is changed during the factorisation and restored); `W` is copied once.

    Cost: the factorisations (d_in^3) and the lazy updates (d_out d_in^2) dominate. Inside a column block
    the per-column rank-1 updates only span a sub-block of <= 32 columns; the rest of the block gets one
    product per sub-block (the same lazy-update identity one level down), so the Python loop does one
    product and one rank-1 update per column (and an N:M group's mask at its first column). Results are
    deterministic; they differ from docs/method.md#the-plain-column-loop by float rounding (masks agree except
    at near-ties).

    `quant` (joint mode, SparseGPT section 3.4 / GPTQ): each column is masked, then its kept weights are quantized
    with scales fixed before the sweep, and the error of both is propagated to the columns not yet processed, in
    the same sweep with the same Hessian. `sparsity=0` quantizes alone (GPTQ with fixed scales). A
    `WeightQuantizer` fixes the scales itself; a function of the weight returning one (`quant.ScaleRule`) gets the
    weights as pruning alone leaves them: OBS compensation grows the kept weights (rows of a 2:4 layer by ~8 %),
    and scales taken from the dense weights would clip them. That costs one more sweep on the same factorisation.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity (unstructured) or nm (N:M)")
    d_out, d_in = W.shape
    if nm is not None:
        n, m = nm
        if d_in % m or block_size % m:
            raise ValueError(f"N:M with M={m} needs d_in ({d_in}) and block size ({block_size}) divisible by M")
    dead = torch.diagonal(H) == 0  # inputs that are always zero (docs/method.md#dead-inputs)
    W = W.to(H.dtype, copy=True)
    W[:, dead] = 0.0
    U, damp = damped_inverse_cholesky(H, percdamp, dead)
    if callable(quant):
        pruned = W.clone()
        if sparsity != 0:  # something is pruned: scales for the weights pruning leaves
            _sweep(pruned, U, sparsity, nm, block_size, compensate, None)
        quant = quant(pruned)
        del pruned
    mask = _sweep(W, U, sparsity, nm, block_size, compensate, quant)
    return ObsResult(W, mask, damp, quant.scale if quant is not None else None)


def _sweep(W: torch.Tensor, U: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None, block_size: int,
           compensate: bool, quant: WeightQuantizer | None) -> torch.Tensor:
    """The column sweep of `obs_prune` on W in place (U: the inverse Hessian's upper Cholesky factor); the mask."""
    d_out, d_in = W.shape
    if nm is not None:
        n, m = nm
    mask = torch.zeros_like(W, dtype=torch.bool)
    if quant is not None:
        quant = quant.to(W.dtype, W.device)
    sub = max(m, SUB_BLOCK // m * m) if nm is not None else SUB_BLOCK  # sub-block: whole N:M groups
    for b in range(0, d_in, block_size):
        e = min(b + block_size, d_in)
        # transposed (columns as contiguous rows of length d_out): the per-column kernels below are memory
        # bound and faster on contiguous rows than on strided columns
        W1 = W[:, b:e].T.contiguous()
        U1 = U[b:e, b:e]
        d = torch.diagonal(U1)
        d2 = (d**2)[:, None]
        if nm is None:
            count = round(sparsity * d_out * e) - round(sparsity * d_out * b)
            mask1 = smallest_mask(W1**2 / d2, count)
        elif not compensate:  # nothing changes W1 before a group's decision: decide the whole block at once
            mask1 = _nm_mask_t(W1**2 / d2, n, m)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if quant is not None and compensate:
            W1, Err1 = _joint_block(W1, mask1, U1, quant, b, nm, sub)
            if e < d_in:
                W[:, e:].addmm_(Err1.T, U[b:e, e:], alpha=-1)
            del Err1
        elif compensate:
            sel = mask1 / d[:, None]  # err = w * sel: (w - q) / U_jj with q = 0 where pruned, w where kept
            # views made once per block: the column loop is bound by per-call overhead below d_in ~ 4096
            rows, sels, urows = W1.unbind(0), sel.unbind(0), U1.unbind(0)
            for s in range(0, e - b, sub):
                t = min(s + sub, e - b)
                for i in range(s, t):
                    if nm is not None and i % m == 0:
                        # decided on the already-compensated weights of this group (SparseGPT's N:M rule)
                        group = mask1[i:i + m]
                        score = W1[i:i + m].square().div_(d2[i:i + m])
                        group.scatter_(0, score.topk(m - n, dim=0, largest=False).indices, True)
                        torch.div(group, d[i:i + m, None], out=sel[i:i + m])
                    if i + 1 < t:
                        W1[i + 1:t].addr_(urows[i][i + 1:t], rows[i] * sels[i], alpha=-1)
                # row i of W1 never changes after its turn, so the sub-block's errors are recomputed at once
                if t < e - b:
                    W1[t:].addmm_(U1[s:t, t:].T, W1[s:t] * sel[s:t], alpha=-1)
            if e < d_in:
                Err1 = W1 * sel
                W[:, e:].addmm_(Err1.T, U[b:e, e:], alpha=-1)  # lazy batch update of all later columns
                del Err1
        elif quant is not None:  # no compensation: every kept weight rounded alone
            W1 = torch.stack([quant.column_(W1[i], b + i, torch.empty_like(W1[i])) for i in range(e - b)])
        W[:, b:e] = W1.masked_fill_(mask1, 0.0).T
        mask[:, b:e] = mask1.T
    return mask


def _joint_block(W1: torch.Tensor, mask1: torch.Tensor, U1: torch.Tensor, quant: WeightQuantizer, b: int,
                 nm: tuple[int, int] | None, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column block of joint OBS, transposed (W1: (cols, d_out), mask1 likewise, filled here for N:M).

    Column i's target is 0 where masked and `q(w)` elsewhere; its error `(w - target) / U_ii` updates the later
    columns of the block (rank-1 inside a sub-block, one product per sub-block for the rest, as `obs_prune`).
    Returns the block's final weights (the targets) and errors, for the lazy update of the columns after it.
    """
    d = torch.diagonal(U1)
    Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
    rows, urows, qrows, cols = W1.unbind(0), U1.unbind(0), Q1.unbind(0), W1.shape[0]
    for s in range(0, cols, sub):
        t = min(s + sub, cols)
        for i in range(s, t):
            if nm is not None and i % nm[1] == 0:  # the group's mask, on its compensated weights
                n, m = nm
                score = W1[i:i + m].square().div_((d[i:i + m] ** 2)[:, None])
                mask1[i:i + m].scatter_(0, score.topk(m - n, dim=0, largest=False).indices, True)
            quant.column_(rows[i], b + i, qrows[i]).masked_fill_(mask1[i], 0.0)
            torch.sub(rows[i], qrows[i], out=Err1[i]).div_(d[i])
            if i + 1 < t:
                W1[i + 1:t].addr_(urows[i][i + 1:t], Err1[i], alpha=-1)
        if t < cols:
            W1[t:].addmm_(U1[s:t, t:].T, Err1[s:t], alpha=-1)
    return Q1, Err1


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


def layer_errors(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor, col_blocks: int = 16
                 ) -> tuple[float, float]:
    """The two relative output errors of a pruned layer: mask alone, and with OBS compensation.

    `tr(P H P^T) / tr(W H W^T)` with `P` = W where `W_new == 0` (the pruned weights), and
    `tr(dW H dW^T) / tr(W H W^T)` with `dW = W - W_new`: the numbers `reconstruction_error` gives for
    `W.masked_fill(W_new == 0, 0)` and for `W_new`, at a fraction of its cost. With `H = L L^T` (Cholesky,
    dead inputs' zero diagonal set to 1), `tr(A H A^T) = ||A L||_F^2`: a sum of squares (no cancellation),
    and `A L` for the three stacked A costs half a dense product because L is triangular (`col_blocks`
    column blocks of L, each multiplied by the rows of A it can reach). If H is too singular for a float
    Cholesky, three dense products with H instead. Computes in H's dtype and device; sums in float64.
    Relative difference to the float64 `reconstruction_error`: ~1e-6 on real-width float32 layers
    (tested < 1e-4). W, W_new: (d_out, d_in); H: (d_in, d_in), not modified.
    """
    dead = torch.diagonal(H) == 0  # zero rows and columns: such inputs add nothing to any error
    W = W.to(H.dtype)
    A = torch.cat([W, W.masked_fill(W_new != 0, 0.0), W - W_new.to(H.dtype)])  # a new tensor: W is not touched
    A[:, dead] = 0.0
    diag = H.diagonal()
    H_diag = diag.clone()
    diag.masked_fill_(dead, 1.0)
    try:
        L, info = torch.linalg.cholesky_ex(H)
    finally:
        diag.copy_(H_diag)
    quad = torch.zeros(A.shape[0], dtype=torch.float64, device=H.device)
    if info == 0:
        n = H.shape[0]
        step = -(-n // col_blocks)
        for j in range(0, n, step):  # (A L)[:, j:k] = A[:, j:] @ L[j:, j:k]: L is zero above the diagonal
            quad += (A[:, j:] @ L[j:, j:j + step]).square_().sum(1, dtype=torch.float64)
    else:
        for j in range(0, A.shape[0], W.shape[0]):
            quad[j:j + W.shape[0]] = (A[j:j + W.shape[0]] @ H).mul_(A[j:j + W.shape[0]]).sum(1, dtype=torch.float64)
    den, num0, num = (float(q.sum()) for q in quad.split(W.shape[0]))
    if not den > 0:
        return 0.0, 0.0
    return num0 / den, num / den
