"""Solver benchmarks: our batched NNLS / ridge least squares against what users would use.

Run: ``pytest bench/bench_solvers.py --benchmark-group-by=group`` (GPU: realistic Attention
Matching shapes; CPU or ``CDLM_FAST_BENCH_QUICK=1``: small shapes, a minute or two).

Compared in one run, on the same exp-kernel (attention-mass) problems
``A_ij = exp(scale q_i.c_j - lse_i)``, target ``b = 1``:

* NNLS: ``nnls_gram`` (torch and triton backends) vs a Python loop of ``scipy.optimize.nnls``
  vs the clamp-then-projected-gradient heuristic of the reference Attention Matching code
  (``lstsq`` + clamp to ``[1e-12, e^7]`` + 2 projected-gradient steps). ``extra_info`` reports
  the mean and max relative excess objective over the exact optimum, so speed is compared at
  known final residual.
* least squares: ``lstsq_gram`` vs batched ``torch.linalg.lstsq`` on ``A`` and batched
  ``torch.linalg.solve`` on ``G + ridge I``.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from _common import QUICK, run
from cdlm_fast.backends import op
from cdlm_fast.ops.gram import exp_gram
from cdlm_fast.ops.solvers import lstsq_gram, nnls_gram

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# (problems, n queries, t kept keys, head dim)
SHAPES = [(8, 256, 32, 64), (16, 512, 64, 64)] if QUICK else [(256, 4096, 512, 128), (64, 4096, 1024, 128)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "P{}_n{}_t{}_D{}".format(*s))
def problem(request):
    P, n, t, D = request.param
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(P, n, D, generator=g)
    K = torch.randn(P, 4 * t, D, generator=g)
    scale = D ** -0.5
    lse = torch.logsumexp(scale * Q @ K.mT, -1, keepdim=True)
    A = torch.exp(scale * Q @ K[:, :t].mT - lse).to(DEV)
    b = torch.ones(P, n, device=DEV)
    G = A.mT @ A
    h = (A.mT @ b.unsqueeze(-1)).squeeze(-1)
    Y = torch.randn(P, n, D, generator=g).to(DEV)
    R = A.mT @ Y
    # exact optimum for the residual reports (our own solver, float64)
    exact = nnls_gram(G.double(), h.double(), backend="torch").x
    f_star = _objective(G, h, exact)
    return dict(A=A, b=b, G=G, h=h, Y=Y, R=R, f_star=f_star, shape=(P, n, t, D),
                Q=Q.to(DEV), C=K[:, :t].contiguous().to(DEV), lse=lse.squeeze(-1).to(DEV), scale=scale)


def _time(benchmark, pb, fn, *, op_name, group, impl, ours):
    P, n, t, D = pb["shape"]
    return run(benchmark, fn, op=op_name, case=f"{group} P={P} n={n} t={t}", impl=impl, ours=ours,
               x=t, x_name="t")


def _objective(G, h, x):
    """0.5 x^T G x - h^T x per problem (float64); minus the constant 0.5||b||^2 of the LS form."""
    G, h, x = G.double(), h.double(), x.double()
    return 0.5 * (x.unsqueeze(-2) @ G @ x.unsqueeze(-1)).view(-1) - (h * x).sum(-1)


def _report(benchmark, pb, x):
    b2 = 0.5 * pb["b"].double().pow(2).sum(-1)
    f, fs = _objective(pb["G"], pb["h"], x) + b2, pb["f_star"] + b2
    excess = ((f - fs) / fs.abs().clamp_min(1e-30)).cpu()
    benchmark.extra_info["rel_excess_objective_mean"] = float(excess.mean())
    benchmark.extra_info["rel_excess_objective_max"] = float(excess.max())


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_nnls_gram_ours(benchmark, problem, backend):
    why = op("nnls_gram").reason(backend, torch.device(DEV))
    if why is not None:
        pytest.skip(why)
    if backend == "triton" and not CUDA:
        pytest.skip("Triton timings are meaningless in the interpreter")
    res = _time(benchmark, problem, lambda: nnls_gram(problem["G"], problem["h"], backend=backend),
                op_name="nnls_gram", group="nnls", impl=f"cdlm_fast/{backend}", ours=True)
    benchmark.extra_info["converged_fraction"] = float(res.converged.float().mean())
    benchmark.extra_info["iterations_max"] = int(res.iterations.max())
    _report(benchmark, problem, res.x)


def test_nnls_scipy_loop(benchmark, problem):
    A = problem["A"].double().cpu().numpy()
    b = problem["b"].double().cpu().numpy()
    if A.shape[0] * A.shape[-1] > 64 * 512:
        A, b = A[:4], b[:4]  # a loop over every problem would take minutes: time 4, report per batch
        benchmark.extra_info["timed_problems"] = 4

    def loop():
        return np.stack([scipy.optimize.nnls(A[p], b[p], maxiter=50 * A.shape[-1])[0] for p in range(A.shape[0])])

    x = torch.from_numpy(_time(benchmark, problem, loop, op_name="nnls_gram", group="nnls", impl="scipy",
                               ours=False))
    pb = {k: (v[: x.shape[0]] if torch.is_tensor(v) else v) for k, v in problem.items()}
    _report(benchmark, pb, x.to(problem["G"].device))


def test_nnls_clamp_projected_gradient(benchmark, problem):
    """Reference Attention Matching heuristic: lstsq, clamp to bounds, 2 projected-gradient steps."""
    A, b = problem["A"], problem["b"]
    lo, hi = 1e-12, float(np.exp(7.0))

    def heuristic():
        x = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1).clamp(lo, hi)
        lip = torch.linalg.matrix_norm(A, ord=2).pow(2).clamp_min(1e-30)
        for _ in range(2):
            grad = (A.mT @ ((A @ x.unsqueeze(-1)).squeeze(-1) - b).unsqueeze(-1)).squeeze(-1)
            x = (x - grad / lip.unsqueeze(-1)).clamp(lo, hi)
        return x

    x = _time(benchmark, problem, heuristic, op_name="nnls_gram", group="nnls", impl="lstsq+clamp+pg", ours=False)
    _report(benchmark, problem, x)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_lstsq_gram_ours(benchmark, problem, ridge, backend):
    why = op("lstsq_gram").reason(backend, torch.device(DEV))
    if why is not None:
        pytest.skip(why)
    X = _time(benchmark, problem, lambda: lstsq_gram(problem["G"], problem["R"], ridge=ridge, backend=backend),
              op_name="lstsq_gram", group=f"lstsq ridge={ridge}", impl=f"cdlm_fast/{backend}", ours=True)
    benchmark.extra_info["residual"] = _ls_residual(problem, X)


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_lstsq_torch_solve(benchmark, problem, ridge):
    G, R = problem["G"], problem["R"]
    eye = torch.eye(G.shape[-1], device=G.device)
    X = _time(benchmark, problem, lambda: torch.linalg.solve(G + ridge * eye, R), op_name="lstsq_gram",
              group=f"lstsq ridge={ridge}", impl="torch.linalg.solve", ours=False)
    benchmark.extra_info["residual"] = _ls_residual(problem, X)


def test_lstsq_torch_lstsq(benchmark, problem):
    A, Y = problem["A"], problem["Y"]
    X = _time(benchmark, problem, lambda: torch.linalg.lstsq(A, Y).solution, op_name="lstsq_gram",
              group="lstsq ridge=0.0", impl="torch.linalg.lstsq", ours=False)
    benchmark.extra_info["residual"] = _ls_residual(problem, X)


def _ls_residual(pb, X):
    """Relative least-squares residual ||A X - Y|| / ||Y|| (NaN shows a failed solve)."""
    A, Y = pb["A"].double(), pb["Y"].double()
    return float((A @ X.double() - Y).norm() / Y.norm())


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_exp_gram(benchmark, problem, backend):
    """Gram construction of the mass fit: fused kernels vs dense torch (A materialised in chunks)."""
    Q, C, lse = problem["Q"], problem["C"], problem["lse"]
    why = op("exp_gram").reason(backend, Q.device, Q=Q, C=C)
    if why is not None:
        pytest.skip(why)
    if backend == "triton" and not CUDA:
        pytest.skip("Triton timings are meaningless in the interpreter")
    P, n, t, D = problem["shape"]
    G, _ = _time(benchmark, problem, lambda: exp_gram(Q, C, None, lse, problem["scale"], backend=backend),
                 op_name="exp_gram", group="exp_gram", impl="torch (dense)" if backend == "torch" else
                 f"cdlm_fast/{backend}", ours=backend != "torch")
    benchmark.extra_info["flops"] = 2.0 * P * n * t * t
    benchmark.extra_info["rel_err_vs_dense_fp32"] = float((G - problem["G"]).norm() / problem["G"].norm())
