"""The OBS solver against a brute-force OBS, exactness of masks, and the baselines."""

import pytest
import torch

from obsdiff.solver.obs import (
    CholeskyError,
    damped_inverse_cholesky,
    layer_errors,
    magnitude_mask,
    nm_mask,
    obs_prune,
    parse_nm,
    reconstruction_error,
    smallest_mask,
    wanda_mask,
)


def layer(d_out=6, d_in=16, tokens=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    X = torch.randn(tokens, d_in, generator=g, dtype=dtype) @ torch.randn(d_in, d_in, generator=g, dtype=dtype)
    return W, 2 * X.T @ X / tokens


def brute_force_obs(W, H, sparsity=None, nm=None, percdamp=0.01):
    """OBS one column at a time with explicit inverses of the trailing Hessian (no Cholesky tricks).

    Column j is removed (or kept) given columns < j fixed: the inverse Hessian of the remaining columns
    F = {j, ..., d-1} is inv(H[F, F]); the OBS update of w_j is -w_j / Hinv_jj * Hinv[j, F].
    One block spanning all columns, so the unstructured mask is chosen up front like the blocked solver.
    """
    W = W.clone()
    H = H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    d_out, d_in = W.shape
    inv_diag = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(d_in)])
    mask = torch.zeros_like(W, dtype=torch.bool)
    if sparsity is not None:
        score = (W**2 / inv_diag[None, :]).flatten()
        mask.view(-1)[torch.argsort(score)[: round(sparsity * W.numel())]] = True
    for j in range(d_in):
        Hinv = torch.linalg.inv(H[j:, j:])
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            score = W[:, j:j + m] ** 2 / inv_diag[None, j:j + m]
            for r in range(d_out):
                mask[r, j + torch.argsort(score[r])[: m - n]] = True
        w = torch.where(mask[:, j], W[:, j], torch.zeros_like(W[:, j]))
        W[:, j:] -= (w / Hinv[0, 0])[:, None] * Hinv[0][None, :]
    W[mask] = 0
    return W, mask


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "4:8"])
def test_blocked_solver_matches_brute_force(kind):
    W, H = layer()
    nm = parse_nm(kind)
    sparsity = 0.5 if nm is None else None
    ref_W, ref_mask = brute_force_obs(W, H, sparsity, nm)
    res = obs_prune(W, H, sparsity, nm, block_size=16)
    assert torch.equal(res.mask, ref_mask)
    assert torch.allclose(res.weight, ref_W, atol=1e-9)
    assert reconstruction_error(W, res.weight, H) == pytest.approx(reconstruction_error(W, ref_W, H), rel=1e-9)


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_lazy_block_updates_do_not_change_the_result_for_nm(block_size):
    # N:M decisions are local, so the blocked solver must give the same answer for any block size.
    W, H = layer(d_in=32, seed=1)
    ref = obs_prune(W, H, nm=(2, 4), block_size=32)
    res = obs_prune(W, H, nm=(2, 4), block_size=block_size)
    assert torch.equal(res.mask, ref.mask) and torch.allclose(res.weight, ref.weight, atol=1e-9)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.123])
def test_unstructured_sparsity_is_exact(sparsity):
    W, H = layer(d_out=7, d_in=40, seed=2, dtype=torch.float32)
    res = obs_prune(W, H, sparsity=sparsity, block_size=16)
    assert int((res.weight == 0).sum()) == round(sparsity * W.numel()) == int(res.mask.sum())


def test_ties_do_not_over_prune():
    W = torch.ones(4, 8)
    H = torch.eye(8) * 2
    res = obs_prune(W, H, sparsity=0.5, block_size=8)
    assert int(res.mask.sum()) == 16
    assert int(magnitude_mask(W, 0.5).sum()) == 16


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_pattern_holds_in_every_group(pattern):
    n, m = parse_nm(pattern)
    W, H = layer(d_out=5, d_in=32, seed=3, dtype=torch.float32)
    res = obs_prune(W, H, nm=(n, m), block_size=16)
    nonzero = (res.weight != 0).reshape(5, -1, m).sum(-1)
    assert bool((nonzero <= n).all()) and bool((res.mask.reshape(5, -1, m).sum(-1) == m - n).all())


def test_obs_beats_magnitude_and_no_compensation():
    W, H = layer(d_out=16, d_in=64, tokens=256, seed=4)
    for kw in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        obs = obs_prune(W, H, **kw, block_size=32)
        plain = obs_prune(W, H, **kw, block_size=32, compensate=False)
        assert torch.equal(plain.weight, W * ~plain.mask)  # no update anywhere
        mag = W * ~magnitude_mask(W, kw.get("sparsity"), kw.get("nm"))
        e_obs, e_plain, e_mag = (reconstruction_error(W, x, H) for x in (obs.weight, plain.weight, mag))
        assert e_obs < e_plain and e_obs <= e_mag


def test_dead_inputs_are_zeroed_and_count_toward_the_budget():
    W, H = layer(d_in=16, seed=5)
    H[3, :] = H[:, 3] = 0
    res = obs_prune(W, H, sparsity=0.5, block_size=16)
    assert bool((res.weight[:, 3] == 0).all()) and int(res.mask.sum()) == round(0.5 * W.numel())


def test_damping_escalates_and_then_fails():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.015]))  # indefinite: needs lambda > 0.015 / mean(diag)
    _, damp = damped_inverse_cholesky(H.double(), percdamp=0.01)
    assert damp == pytest.approx(0.1)
    with pytest.raises(CholeskyError, match="percdamp"):
        damped_inverse_cholesky(torch.diag(torch.tensor([1.0, -100.0])).double(), percdamp=0.01)


def test_wanda_prunes_per_row_and_weighs_inputs():
    W = torch.ones(3, 8)
    h = torch.arange(1.0, 9.0)
    mask = wanda_mask(W, h, sparsity=0.25)
    assert mask.sum(1).tolist() == [2, 2, 2] and bool(mask[:, :2].all())  # smallest-norm inputs go first
    assert torch.equal(nm_mask(torch.arange(8.0)[None], 2, 4), torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]]).bool())


def test_parse_nm_gives_none_for_the_sparsity_types_that_are_not_n_m():
    kinds = (None, "unstructured", "structured", "2:4", "1:8")
    assert [parse_nm(t) for t in kinds] == [None, None, None, (2, 4), (1, 8)]


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "x:y"])
def test_parse_nm_rejects_bad_patterns(bad):
    with pytest.raises(ValueError, match=rf"N:M pattern .*got {bad!r}"):
        parse_nm(bad)


# --- the fast solver against the straightforward one ---------------------------------------------------------


def reference_obs_prune(W, H, sparsity=None, nm=None, block_size=128, percdamp=0.01):
    """The blocked solver, plainly (docs/method.md#the-plain-column-loop): one rank-1 update of the whole rest of the
    block per column, explicit damping with an identity matrix, per-block clones."""
    H = H.clone()
    W = W.clone().to(H.dtype)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d_out, d_in = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b in range(0, d_in, block_size):
        e = min(b + block_size, d_in)
        W1, U1 = W[:, b:e].clone(), U[b:e, b:e]
        d = torch.diag(U1)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:
            count = round(sparsity * d_out * e) - round(sparsity * d_out * b)
            mask1 = smallest_mask(W1**2 / d[None, :] ** 2, count)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(e - b):
            if nm is not None and i % nm[1] == 0:
                mask1[:, i:i + nm[1]] = nm_mask(W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2, *nm)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q1[:, i], Err1[:, i] = q, err
        W[:, b:e], mask[:, b:e] = Q1, mask1
        W[:, e:] -= Err1 @ U[b:e, e:]
    W[mask] = 0.0
    return W, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "4:8", "1:4"])
@pytest.mark.parametrize("block_size", [128, 48])
def test_fast_solver_matches_the_straightforward_one(kind, block_size, dtype):
    # d_in 320: several column blocks, sub-blocks inside each, and a ragged last block
    W, H = layer(d_out=24, d_in=320, tokens=512, seed=6, dtype=dtype)
    H[7, :] = H[:, 7] = 0  # one dead input
    nm = parse_nm(kind)
    sparsity = 0.5 if nm is None else None
    H_before = H.clone()
    ref_W, ref_mask = reference_obs_prune(W, H, sparsity, nm, block_size)
    res = obs_prune(W, H, sparsity, nm, block_size=block_size)
    assert torch.equal(H, H_before)  # the diagonal is restored bitwise
    assert torch.equal(res.mask, ref_mask)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(res.weight, ref_W, rtol=0, atol=tol * float(ref_W.abs().max()))
    assert int((res.weight == 0).sum()) >= int(res.mask.sum())
    if nm is None:
        assert int(res.mask.sum()) == round(0.5 * W.numel())
    else:
        n, m = nm
        assert bool((res.mask.reshape(24, -1, m).sum(-1) == m - n).all())
        assert bool(((res.weight != 0).reshape(24, -1, m).sum(-1) <= n).all())


def test_fast_solver_is_deterministic_and_leaves_inputs_alone():
    W, H = layer(d_out=32, d_in=256, tokens=512, seed=7, dtype=torch.float32)
    W0, H0 = W.clone(), H.clone()
    a = obs_prune(W, H, sparsity=0.6)
    b = obs_prune(W, H, sparsity=0.6)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_nm_without_compensation_decides_every_group_on_the_original_weights():
    W, H = layer(d_out=8, d_in=64, seed=8, dtype=torch.float32)
    res = obs_prune(W, H, nm=(2, 4), block_size=32, compensate=False)
    U, _ = damped_inverse_cholesky(H)
    assert torch.equal(res.mask, nm_mask(W**2 / torch.diag(U)[None, :] ** 2, 2, 4))
    assert torch.equal(res.weight, W * ~res.mask)


def test_damping_restores_the_diagonal_after_failure():
    H = torch.diag(torch.tensor([1.0, -100.0])).double()
    with pytest.raises(CholeskyError, match="not positive definite even with percdamp"):
        damped_inverse_cholesky(H, percdamp=0.01)
    assert H.diagonal().tolist() == [1.0, -100.0]


def test_layer_errors_match_float64_reconstruction_error():
    # realistic: correlated inputs with a decaying spectrum, OBS-compensated 50 % and 2:4 layers
    g = torch.Generator().manual_seed(9)
    d_in = 512
    mix = torch.randn(d_in, d_in, generator=g) * torch.logspace(0, -2, d_in)[:, None]
    X = torch.randn(2048, d_in, generator=g) @ mix + 0.1 * torch.randn(d_in, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(192, d_in, generator=g) * 0.02
    for kw in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        W_new = obs_prune(W, H, **kw).weight
        err0, err = layer_errors(W, W_new, H)
        ref0 = reconstruction_error(W, W.masked_fill(W_new == 0, 0.0), H)
        ref = reconstruction_error(W, W_new, H)
        assert 0 < ref < ref0
        assert err0 == pytest.approx(ref0, rel=1e-4) and err == pytest.approx(ref, rel=1e-4)
    assert layer_errors(W, W, H)[1] == 0.0
    assert layer_errors(torch.zeros_like(W), W, H) == (0.0, 0.0)


def test_layer_errors_on_a_singular_hessian_and_dead_inputs():
    # fewer tokens than inputs: H is singular, the Cholesky route gives way to dense products
    W, H = layer(d_out=12, d_in=64, tokens=16, seed=10, dtype=torch.float32)
    H[5, :] = H[:, 5] = 0
    W0, H0 = W.clone(), H.clone()
    W_new = obs_prune(W, H, sparsity=0.5, block_size=32).weight
    err0, err = layer_errors(W, W_new, H)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert err0 == pytest.approx(reconstruction_error(W, W.masked_fill(W_new == 0, 0.0), H), rel=1e-4)
    assert err == pytest.approx(reconstruction_error(W, W_new, H), rel=1e-3, abs=1e-7)
