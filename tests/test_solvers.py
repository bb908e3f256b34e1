"""Batched NNLS and (ridge) least squares against scipy / numpy in float64."""
import math

import numpy as np
import pytest
import torch

from cdlm_fast.backends import op
from cdlm_fast.ops.solvers import NNLSResult, lstsq, lstsq_gram, nnls, nnls_gram
from cdlm_fast.reference.lstsq import lstsq_gram_reference
from cdlm_fast.reference.nnls import kkt_residual, nnls_gram_reference, nnls_reference

NNLS_BACKENDS = ["torch", "triton", "cuda"]
LSTSQ_BACKENDS = ["torch", "triton", "cuda"]


def _skip(backend, device, name="nnls_gram"):
    why = op(name).reason(backend, torch.device(device))
    if why is not None:
        pytest.skip(why)


def _gram(A, b):
    A64, b64 = A.double(), b.double()
    return A64.mT @ A64, (A64.mT @ b64.unsqueeze(-1)).squeeze(-1)


def _objective(A, b, x):
    return float(((A.double() @ x.double().cpu().unsqueeze(-1)).squeeze(-1) - b.double()).pow(2).sum())


def _assert_matches_scipy(A, b, x):
    """Objective within 1e-6 relative of scipy.optimize.nnls (plus a 1e-12 ||b||^2 floor for
    the float64 cancellation of the Gram form when the fit is almost exact)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")  # a missing scipy skips, not ends collection
    assert torch.isfinite(x).all() and (x >= 0).all()
    A2 = A.double().reshape(-1, *A.shape[-2:])
    b2 = b.double().reshape(-1, b.shape[-1])
    x2 = x.double().cpu().reshape(-1, x.shape[-1])
    for p in range(A2.shape[0]):
        _, rnorm = scipy_optimize.nnls(A2[p].numpy(), b2[p].numpy(), maxiter=50 * A2.shape[-1])
        f, fs = _objective(A2[p], b2[p], x2[p]), rnorm ** 2
        assert f - fs <= 1e-6 * fs + 1e-12 * float(b2[p].pow(2).sum()), (p, f, fs)


def _random(batch, n, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, t, generator=g, dtype=torch.float64), \
        torch.randn(*batch, n, generator=g, dtype=torch.float64)


def _exp_kernel(P, n, t, D, seed, scale=None, dup=False):
    """A_ij = exp(scale q_i.c_j - s_i) with s_i the lse over a larger key set; target mass 1."""
    g = torch.Generator().manual_seed(seed)
    L = 3 * t
    Q = torch.randn(P, n, D, generator=g, dtype=torch.float64)
    K = torch.randn(P, L, D, generator=g, dtype=torch.float64)
    scale = D ** -0.5 if scale is None else scale
    s = torch.logsumexp(scale * Q @ K.mT, -1, keepdim=True)
    C = K[:, :t].clone()
    if dup:
        C[:, 1] = C[:, 0] + 1e-6 * torch.randn(P, D, generator=g, dtype=torch.float64)
    A = torch.exp(scale * Q @ C.mT - s)
    return A, torch.ones(P, n, dtype=torch.float64)


@pytest.mark.parametrize("backend", NNLS_BACKENDS)
@pytest.mark.parametrize("batch,n,t", [((3,), 40, 13), ((2, 2), 25, 7), ((1,), 9, 1), ((2,), 30, 33)], ids=str)
def test_nnls_random_matches_scipy(backend, batch, n, t, device):
    _skip(backend, device)
    A, b = _random(batch, n, t, seed=t)
    res = nnls(A.float().to(device), b.float().to(device), backend=backend)
    assert isinstance(res, NNLSResult)
    assert res.x.shape == (*batch, t) and res.x.dtype == torch.float32
    assert res.iterations.shape == batch and res.converged.shape == batch and res.kkt_residual.shape == batch
    assert res.converged.all()
    _assert_matches_scipy(A.float(), b.float(), res.x.double())
    # float64 input: float64 output at float64 accuracy
    r64 = nnls(A.to(device), b.to(device), backend=backend)
    assert r64.x.dtype == torch.float64 and r64.converged.all()
    _assert_matches_scipy(A, b, r64.x)
    G, h = _gram(A, b)
    assert float(kkt_residual(G, h, r64.x.cpu()).max()) < 1e-9
    assert torch.allclose(r64.kkt_residual.cpu(), kkt_residual(G, h, r64.x.cpu()), atol=1e-12)


@pytest.mark.parametrize("backend", NNLS_BACKENDS)
@pytest.mark.parametrize("dup", [False, True], ids=["distinct", "near_duplicate"])
def test_nnls_exp_kernel_problems(backend, dup, device):
    _skip(backend, device)
    A, b = _exp_kernel(4, 60, 11, 8, seed=3, dup=dup)
    G, h = _gram(A, b)
    res = nnls_gram(G.to(device), h.to(device), backend=backend)
    assert res.converged.all(), res.kkt_residual
    assert float(res.kkt_residual.max()) <= 1e-7
    _assert_matches_scipy(A, b, res.x)


@pytest.mark.parametrize("backend", NNLS_BACKENDS)
def test_nnls_ill_conditioned_never_nan(backend, device):
    """Scores spanning hundreds of orders of magnitude and exactly duplicated keys."""
    _skip(backend, device)
    A, b = _exp_kernel(3, 50, 9, 8, seed=4, scale=3.0)
    A[:, :, 2] = A[:, :, 3]
    G, h = _gram(A, b)
    res = nnls_gram(G.to(device), h.to(device), backend=backend)
    assert torch.isfinite(res.x).all() and (res.x >= 0).all()
    assert torch.isfinite(res.kkt_residual).all()
    ok = res.converged.cpu()
    assert ok.any()
    _assert_matches_scipy(A[ok], b[ok], res.x[ok])


@pytest.mark.parametrize("backend", NNLS_BACKENDS)
def test_nnls_admm_phase(backend, device):
    """Large-t path (ADMM support estimate, then exact active set), forced at a small t."""
    _skip(backend, device)
    A, b = _exp_kernel(3, 80, 21, 8, seed=5)
    G, h = _gram(A, b)
    impl = op("nnls_gram").impls[backend]
    x, it, kkt, conv = impl(G.to(device), h.to(device), None, None, 1e-7, admm_min_t=1, admm_iters=25)
    assert conv.all() and float(kkt.max()) <= 1e-7
    _assert_matches_scipy(A, b, x)


def test_nnls_default_large_t_path():
    """t >= ADMM_MIN_T takes the ADMM warm start by default (torch backend on CPU)."""
    A, b = _random((2,), 200, 100, seed=6)
    res = nnls(A, b, backend="torch")
    assert res.converged.all()
    _assert_matches_scipy(A, b, res.x)


def test_nnls_matches_lawson_hanson_reference():
    A, b = _random((5,), 30, 12, seed=7)
    x_ref, _, ok = nnls_reference(A, b)
    assert ok.all()
    res = nnls(A, b, backend="torch")
    assert torch.allclose(res.x, x_ref, atol=1e-9, rtol=1e-9)
    G, h = _gram(A, b)
    x2, _, ok2 = nnls_gram_reference(G, h)
    assert ok2.all() and torch.allclose(x2, x_ref, atol=1e-12)


@pytest.mark.parametrize("backend", NNLS_BACKENDS)
def test_nnls_warm_start(backend, device):
    _skip(backend, device)
    A, b = _random((4,), 40, 15, seed=8)
    G, h = _gram(A, b)
    G, h = G.to(device), h.to(device)
    cold = nnls_gram(G, h, backend=backend)
    warm = nnls_gram(G, h, x0=cold.x, backend=backend)
    assert (warm.iterations == 1).all() and warm.converged.all()
    assert torch.allclose(warm.x, cold.x, atol=1e-12)
    # a wrong warm start (complement of the support, negative entries) still reaches the optimum
    bad = torch.where(cold.x > 0, -1.0, 1.0).double()
    res = nnls_gram(G, h, x0=bad, backend=backend)
    assert res.converged.all()
    _assert_matches_scipy(A, b, res.x)


@pytest.mark.parametrize("backend", NNLS_BACKENDS)
def test_nnls_t2048_near_duplicate_keys_reaches_scipy(backend, device):
    """The issue's largest size: t = 2048 kept keys, every 7th a near-duplicate (1e-3) of
    another, so G is badly conditioned and ~600 weights are exactly 0 at the optimum. The
    result must be KKT-exact and match scipy's objective (float64 Lawson--Hanson)."""
    if backend != "torch" and device != "cuda":
        pytest.skip("t = 2048 runs the Triton / CUDA ADMM kernels on a GPU only (too slow interpreted)")
    _skip(backend, device)
    g = torch.Generator().manual_seed(7)
    n, t, D = 3072, 2048, 64
    Q = torch.randn(n, D, generator=g, dtype=torch.float64)
    K = torch.randn(2 * t, D, generator=g, dtype=torch.float64)
    s = torch.logsumexp(D ** -0.5 * Q @ K.mT, -1, keepdim=True)
    C = K[:t].clone()
    dup = C[1::7].shape[0]
    C[1::7] = C[0::7][:dup] + 1e-3 * torch.randn(dup, D, generator=g, dtype=torch.float64)
    A = torch.exp(D ** -0.5 * Q @ C.mT - s)
    b = torch.ones(n, dtype=torch.float64)
    G, h = _gram(A, b)
    res = nnls_gram(G.to(device), h.to(device), backend=backend)
    assert res.converged.all() and float(res.kkt_residual.max()) <= 1e-10
    assert float(kkt_residual(G, h, res.x.cpu()).max()) <= 1e-10
    assert int((res.x == 0).sum()) > 300
    _assert_matches_scipy(A[None], b[None], res.x[None])


def test_nnls_iteration_cap_reports_not_converged():
    A, b = _random((6,), 40, 15, seed=9)
    full = nnls(A, b, backend="torch")
    assert full.converged.all() and (full.iterations > 1).any()
    cut = nnls(A, b, max_iter=1, backend="torch")
    need_more = full.iterations > 1
    assert not cut.converged[need_more].any()
    assert (cut.iterations <= 1).all()
    assert (cut.kkt_residual[need_more] > 1e-7).all()
    assert cut.converged[~need_more].all()


def test_nnls_gram_converged_to_the_precision_of_float32_data():
    """Attention-mass columns with a duplicate (Attention Matching's beta fit), the system built in
    float64: solved in float64 it reaches float64 accuracy; rounded to float32 with the duplicate's
    two right-hand sides one float32 ulp apart (the inconsistency float32 products leave; built
    explicitly, since whether a float32 GEMM leaves it depends on the CPU's kernels), the exact
    solve keeps a KKT residual of about 1e-8 (above 10 * tol, under a tenth of float32's rounding
    unit): converged for float32 data."""
    g = torch.Generator().manual_seed(6)
    u = torch.ones(8) / 8 ** 0.5
    Q = torch.randn(1, 50, 8, generator=g) * 0.3 + 2 * u
    K = torch.randn(1, 40, 8, generator=g) * 0.5
    C = torch.cat([K[:, :5], -400.0 * u.view(1, 1, 8)], 1)
    C[0, 1] = C[0, 0]
    lse = torch.logsumexp(Q @ K[0].T, dim=-1)
    A = torch.exp(Q.double() @ C[0].double().T - lse.double()[..., None])  # [1, 50, 6]
    G, h = A.mT @ A / 50, A.sum(1) / 50
    r64 = nnls_gram(G, h, backend="torch")
    h32 = h.float()
    h32[0, 1] = torch.nextafter(h32[0, 0], torch.tensor(float("inf")))  # the duplicate's rhs, one ulp up
    r32 = nnls_gram(G.float(), h32, backend="torch")
    assert bool(r64.converged) and float(r64.kkt_residual) <= 1e-12
    assert 1e-9 < float(r32.kkt_residual) <= 0.1 * torch.finfo(torch.float32).eps  # the rule is exercised
    assert bool(r32.converged)
    assert torch.allclose(r32.x.double().sum(), r64.x.sum(), rtol=1e-4)  # the duplicate's weights split freely


def test_nnls_trivial_and_empty():
    A = torch.rand(2, 10, 4, dtype=torch.float64)
    res = nnls(A, -torch.rand(2, 10, dtype=torch.float64))  # A >= 0, b < 0 -> x = 0
    assert (res.x == 0).all() and res.converged.all()
    res = nnls_gram(torch.zeros(0, 3, 3), torch.zeros(0, 3))
    assert res.x.shape == (0, 3)


# ---------------------------------------------------------------------------------- lstsq

def _np_lstsq(A, B):
    return torch.from_numpy(np.linalg.lstsq(A.double().numpy(), B.double().numpy(), rcond=None)[0])


@pytest.mark.parametrize("backend", LSTSQ_BACKENDS)
@pytest.mark.parametrize("shape", [(30, 7, 3), (25, 13, 1), (9, 9, 2)], ids=str)
def test_lstsq_full_rank(backend, shape, device):
    _skip(backend, device, "lstsq_gram")
    n, t, d = shape
    g = torch.Generator().manual_seed(n)
    A, B = torch.randn(2, 3, n, t, generator=g), torch.randn(2, 3, n, d, generator=g)
    X = lstsq(A.to(device), B.to(device), backend=backend)
    assert X.shape == (2, 3, t, d) and X.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            ref = _np_lstsq(A[i, j], B[i, j])
            assert float((X[i, j].cpu().double() - ref).norm() / ref.norm()) < 1e-5
    xv = lstsq(A.double().to(device), B[..., 0].double().to(device), backend=backend)
    assert xv.shape == (2, 3, t) and xv.dtype == torch.float64
    ref = _np_lstsq(A[0, 0], B[0, 0, :, 0])
    assert float((xv[0, 0].cpu() - ref).norm() / ref.norm()) < 1e-10


@pytest.mark.parametrize("backend", LSTSQ_BACKENDS)
def test_lstsq_rank_deficient_is_minimum_norm(backend, device):
    _skip(backend, device, "lstsq_gram")
    g = torch.Generator().manual_seed(11)
    A = torch.randn(3, 20, 6, generator=g, dtype=torch.float64)
    A[..., 4] = A[..., 1]                     # exact duplicate column
    A[1, :, 5] = 0.0                          # a zero column
    A[2, :, 3] = 2 * A[2, :, 0] - A[2, :, 2]  # linear dependence
    B = torch.randn(3, 20, 2, generator=g, dtype=torch.float64)
    X = lstsq(A.to(device), B.to(device), backend=backend)
    assert torch.isfinite(X).all()
    for p in range(3):
        ref = _np_lstsq(A[p], B[p])
        assert float((X[p].cpu() - ref).norm() / ref.norm()) < 1e-6
    Xg = lstsq_gram((A.mT @ A).to(device), (A.mT @ B).to(device), backend=backend)
    assert float((Xg.cpu() - lstsq_gram_reference(A.mT @ A, A.mT @ B)).norm() / Xg.norm()) < 1e-6


@pytest.mark.parametrize("backend", LSTSQ_BACKENDS)
@pytest.mark.parametrize("ridge", [1e-3, 0.5, 10.0])
def test_lstsq_ridge_closed_form(backend, ridge, device):
    _skip(backend, device, "lstsq_gram")
    g = torch.Generator().manual_seed(12)
    A, B = torch.randn(4, 15, 9, generator=g, dtype=torch.float64), torch.randn(4, 15, 3, generator=g,
                                                                                 dtype=torch.float64)
    A[..., 2] = A[..., 1]
    X = lstsq(A.to(device), B.to(device), ridge=ridge, backend=backend)
    ref = torch.linalg.solve(A.mT @ A + ridge * torch.eye(9, dtype=torch.float64), A.mT @ B)
    assert float((X.cpu() - ref).norm() / ref.norm()) < 1e-10


@pytest.mark.parametrize("backend", LSTSQ_BACKENDS)
def test_lstsq_gram_float32_and_singular_gram(backend, device):
    _skip(backend, device, "lstsq_gram")
    G = torch.zeros(2, 4, 4)
    R = torch.ones(2, 4, 1)
    X = lstsq_gram(G.to(device), R.to(device), backend=backend)  # zero matrix: minimum norm answer is 0
    assert torch.isfinite(X).all() and float(X.abs().max()) == 0.0
    g = torch.Generator().manual_seed(13)
    A = torch.rand(3, 50, 8, generator=g)
    Y = torch.randn(3, 50, 5, generator=g)
    X = lstsq_gram((A.mT @ A).to(device), (A.mT @ Y).to(device), ridge=1e-4, backend=backend)
    ref = lstsq_gram_reference(A.mT.double() @ A.double(), A.mT.double() @ Y.double(), ridge=1e-4)
    assert X.dtype == torch.float32 and float((X.cpu().double() - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("t,d", [(33, 3), (47, 17)], ids=str)
def test_lstsq_blocked_cholesky_across_blocks(backend, t, d, device):
    """t spans several Cholesky blocks (16 wide in the interpreter) with a ragged last block;
    d spans two right-hand-side tiles. One problem has a duplicate column straddling a block
    boundary (the singular fallback), one an exp-kernel Gram matrix with entries over many
    orders of magnitude; the factor itself is checked as well."""
    _skip(backend, device, "lstsq_gram")
    from cdlm_fast.kernels.lstsq import cholesky_triton
    g = torch.Generator().manual_seed(t + d)
    A = torch.randn(3, 2 * t, t, generator=g, dtype=torch.float64)
    A[1, :, 17] = A[1, :, 14]
    A[2] = torch.exp(3.0 * A[2]) / 50.0
    B = torch.randn(3, 2 * t, d, generator=g, dtype=torch.float64)
    G, R = A.mT @ A, A.mT @ B
    W, _, bad = cholesky_triton(G.to(device), 0.0, 1e-12)
    assert bad.tolist() == [False, True, False]
    L = torch.tril(W.cpu())
    for p in (0, 2):
        assert float((L[p] @ L[p].mT - G[p]).norm() / G[p].norm()) < 1e-14
    X = lstsq_gram(G.to(device), R.to(device), backend=backend)
    for p in range(3):
        ref = _np_lstsq(A[p], B[p])
        assert float((X[p].cpu() - ref).norm() / ref.norm()) < (1e-7 if p == 2 else 1e-10), p
    Xr = lstsq_gram(G.to(device), R.to(device), ridge=1e-2, backend=backend)
    ref = torch.linalg.solve(G + 1e-2 * torch.eye(t, dtype=torch.float64), R)
    assert float((Xr.cpu() - ref).norm() / ref.norm()) < 1e-12


# ------------------------------------------------------------------- GPU: backends side by side

def _poison_allocator(nbytes=64 << 20):
    """Fill a block of the caching allocator with NaN and free it, so that buffers a kernel
    allocates with torch.empty start as NaN and unwritten elements show."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("t", [96, 150])
def test_nnls_gpu_large_t_default_path_matches_torch_and_scipy(backend, t, device):
    """The default ADMM warm start (t >= 96) with each GPU kernel, against the torch backend
    and scipy, on exp-kernel (Attention Matching) and random problems."""
    if device != "cuda":
        pytest.skip("needs a CUDA device (the ADMM kernels run on the GPU)")
    _skip(backend, device)
    A1, b1 = _exp_kernel(2, 3 * t, t, 16, seed=t)
    A2, b2 = _random((2,), 2 * t, t, seed=t + 1)
    A, b = torch.cat([A1, A2]), torch.cat([b1, b2])
    G, h = _gram(A, b)
    _poison_allocator()
    res = nnls_gram(G.cuda(), h.cuda(), backend=backend)
    ref = nnls_gram(G.cuda(), h.cuda(), backend="torch")
    assert torch.isfinite(res.x).all() and res.converged.all(), res.kkt_residual
    assert float(res.kkt_residual.max()) <= 1e-7
    _assert_matches_scipy(A, b, res.x)
    for p in range(A.shape[0]):  # same optimum as the torch backend (x itself may be ill-conditioned)
        f, fr = _objective(A[p], b[p], res.x[p]), _objective(A[p], b[p], ref.x[p])
        assert f - fr <= 1e-9 * fr + 1e-12 * float(b[p].pow(2).sum()), (p, f, fr)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("t,d", [(1, 1), (17, 3), (64, 130), (65, 2), (100, 5), (513, 129)], ids=str)
def test_lstsq_gpu_matches_torch(backend, t, d, device):
    """The fused backends at real sizes against the torch backend (cuSOLVER), in a batch that
    mixes regular and singular problems (a duplicate column far from its twin: in another
    Cholesky block). triton: 32-wide blocks on a GPU (the interpreter runs 16-wide ones),
    ragged last block and RHS tile. cuda: t <= 64 runs the shared-memory Cholesky kernel
    (d > 128 loops over columns), larger t and the singular problems take the torch path."""
    if device != "cuda":
        pytest.skip("needs a CUDA device")
    _skip(backend, device, "lstsq_gram")
    g = torch.Generator().manual_seed(t * 1000 + d)
    A = torch.randn(4, 2 * t + 3, t, generator=g, dtype=torch.float64)
    B = torch.randn(4, 2 * t + 3, d, generator=g, dtype=torch.float64)
    if t > 2:
        A[1, :, t - 1] = A[1, :, t // 3]  # singular Gram: the pseudo-inverse fallback
    G, R = A.mT @ A, A.mT @ B
    _poison_allocator()
    X = lstsq_gram(G.cuda(), R.cuda(), backend=backend)
    ref = lstsq_gram(G.cuda(), R.cuda(), backend="torch")
    assert X.shape == (4, t, d) and torch.isfinite(X).all()
    assert float((X - ref).norm() / ref.norm()) < 1e-9
    Xr = lstsq_gram(G.cuda(), R.cuda(), ridge=0.3, backend=backend)
    ref = torch.linalg.solve(G + 0.3 * torch.eye(t, dtype=torch.float64), R)
    assert float((Xr.cpu() - ref).norm() / ref.norm()) < 1e-10


# ---------------------------------------------------------------------------------- validation

def test_solver_validation():
    A, b = torch.randn(2, 10, 4), torch.randn(2, 10)
    G, h = _gram(A, b)
    nan_G = G.clone()
    nan_G[0, 0, 0] = math.nan
    cases = [
        (lambda: nnls(A, b[:, :5]), ValueError, r"b must have shape \[\.\.\., n\]"),
        (lambda: nnls(A, b.unsqueeze(-1)), ValueError, "b must have shape"),
        (lambda: nnls(A.long(), b), TypeError, "A must have dtype"),
        (lambda: nnls(A[0, 0], b), ValueError, r"A must have shape \[\.\.\., n, t\]"),
        (lambda: nnls("A", b), TypeError, "A must be a torch.Tensor"),
        (lambda: nnls(A, b.clone().fill_(math.inf)), ValueError, "b must be finite"),
        (lambda: nnls_gram(G[..., :3], h), ValueError, r"G must have shape \[\.\.\., t, t\]"),
        (lambda: nnls_gram(G, h[:, :3]), ValueError, r"h must have shape \[\.\.\., t\]"),
        (lambda: nnls_gram(nan_G, h), ValueError, "G must be finite"),
        (lambda: nnls_gram(G + torch.triu(torch.ones(4, 4), 1), h), ValueError, "G must be symmetric"),
        (lambda: nnls_gram(G, h, x0=h[:, :2]), ValueError, "x0 must have the shape of h"),
        (lambda: nnls_gram(G, h, x0=h.clone().fill_(math.nan)), ValueError, "x0 must be finite"),
        (lambda: nnls_gram(G, h, max_iter=0), ValueError, "max_iter must be >= 1"),
        (lambda: nnls_gram(G, h, max_iter=1.5), TypeError, "max_iter must be an int"),
        (lambda: nnls_gram(G, h, tol=-1.0), ValueError, "tol must be a finite positive"),
        (lambda: nnls_gram(G, h, tol="x"), TypeError, "tol must be a float"),
        (lambda: nnls_gram(G, h, backend="magic"), ValueError, "backend must be one of"),
        (lambda: lstsq(A, b[:, :3]), ValueError, r"B must have shape"),
        (lambda: lstsq(A, b, ridge=-1.0), ValueError, "ridge must be a finite float >= 0"),
        (lambda: lstsq(A, b, ridge=None), TypeError, "ridge must be a float"),
        (lambda: lstsq_gram(G, h[:, :3]), ValueError, r"R must have shape"),
        (lambda: lstsq_gram(G, h.int()), TypeError, "R must have dtype"),
        (lambda: lstsq_gram(G, h, backend="cuda"), ValueError, "lstsq_gram: backend 'cuda' cannot run"),
        (lambda: nnls_gram(G, h, backend="cuda"), ValueError, "nnls_gram: backend 'cuda' cannot run"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
