"""Batched solvers: exact non-negative least squares and (ridge) least squares.

All functions are batched over arbitrary leading dimensions ``...`` (identical in every
argument, no broadcasting), validate their input (``TypeError`` / ``ValueError`` naming the
argument) and reject NaN/inf.

What each backend runs:

* ``nnls_gram`` / ``nnls``: the exact batched active-set method of
  :mod:`cdlm_fast.ops.nnls_active_set` (float64 masked Cholesky through
  ``torch.linalg.cholesky_ex`` -- cuSOLVER on a GPU -- with an ADMM warm-start phase for
  large ``t``). Backend ``"torch"`` runs the ADMM iterations with torch ops, ``"triton"`` with
  one fused Triton kernel per iteration (:mod:`cdlm_fast.kernels.nnls`: mat-vec, projection
  and dual update in one pass), ``"cuda"`` with the same fused iteration as a CUDA kernel of
  the extension (``torch.ops.cdlm_fast.nnls_admm_step``, CUDA tensors only). ``nnls`` forms
  ``G = A^T A`` and ``h = A^T b`` in float64 and calls ``nnls_gram``.
* ``lstsq_gram`` / ``lstsq``: backend ``"torch"`` -- batched Cholesky of ``G + ridge I``
  in float64 (``cholesky_ex`` + ``cholesky_solve``, no host sync per problem), with an
  eigendecomposition pseudo-inverse fallback for the problems whose factorisation fails or
  is numerically singular (one host sync per call to find them). Backend ``"triton"``: a
  blocked float64 Cholesky and two-triangle solve of its own (:mod:`cdlm_fast.kernels.lstsq`,
  any ``t``); the problems it flags as singular take the fallback above. Backend ``"cuda"``: for
  ``t <= 64`` one CUDA thread block per problem factors ``G + ridge I`` in shared memory
  (float64) and solves all right-hand sides; the problems it flags as singular, and every
  problem with ``t > 64``, take the torch path above. ``lstsq`` forms the normal
  equations in float64 (the intended use has ``n >> t``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _validate as V
from ..backends import op
from .nnls_active_set import DEFAULT_TOL, nnls_gram_active_set

__all__ = ["NNLSResult", "nnls", "nnls_gram", "lstsq", "lstsq_gram"]

_NNLS = op("nnls_gram")
_LSTSQ = op("lstsq_gram")
# A pivot below this fraction of max(diag G) counts as numerical rank deficiency.
_RANK_TOL = 1e-12


class NNLSResult(NamedTuple):
    """Result of :func:`nnls` / :func:`nnls_gram`.

    Attributes:
        x: ``[..., t]`` solution, ``>= 0``; float64 if an input was float64, else float32.
        iterations: ``[...]`` int64, passive-set solves used per problem.
        kkt_residual: ``[...]`` float64, ``max_j |min(G_jj x_j, g_j)| / max_j |h_j|`` with the
            gradient ``g = G x - h`` (see :func:`cdlm_fast.ops.nnls_common.kkt_residual`); zero
            exactly at the solution.
        converged: ``[...]`` bool, True when the active set terminated with the KKT conditions
            met to ``tol`` (False: iteration cap hit or a numerically singular passive set).
    """

    x: torch.Tensor
    iterations: torch.Tensor
    kkt_residual: torch.Tensor
    converged: torch.Tensor


# --------------------------------------------------------------------------- validation

def _float(name, x, shape_doc):
    V.tensor(name, x, dtypes=V.FLOAT_DTYPES, shape_doc=shape_doc)
    return x


def _check_gram(G, h, hname, hdoc, *, matrix_rhs):
    _float("G", G, "[..., t, t]")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must have shape [..., t, t] (square in its last two dimensions), got {tuple(G.shape)}")
    _float(hname, h, hdoc)
    batch, t = tuple(G.shape[:-2]), G.shape[-1]
    if matrix_rhs:
        ok = h.dim() in (G.dim() - 1, G.dim()) and tuple(h.shape[:len(batch) + 1]) == batch + (t,)
    else:
        ok = tuple(h.shape) == batch + (t,)
    if not ok:
        raise ValueError(f"{hname} must have shape {hdoc} with ...={list(batch)}, t={t}; got {tuple(h.shape)}")
    V.same_device([("G", G), (hname, h)])
    V.finite_tensor("G", G)
    V.finite_tensor(hname, h)
    if G.numel():
        Gd = G.double()
        asym = (Gd - Gd.transpose(-1, -2)).abs().amax()
        if float(asym) > 1e-4 * float(Gd.abs().amax()) + 1e-30:
            raise ValueError("G must be symmetric (G = A^T A); got max |G - G^T| = "
                             f"{float(asym):.3g} against max |G| = {float(Gd.abs().amax()):.3g}")
    return batch, t


def _check_iter_tol(max_iter, tol):
    if max_iter is not None:
        V.non_negative_int("max_iter", max_iter, minimum=1)
    if tol is None:
        return DEFAULT_TOL
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a float or None, got {type(tol).__name__}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite positive float, got {tol}")
    return float(tol)


def _check_ridge(ridge):
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be a float, got {type(ridge).__name__}")
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge}")
    return float(ridge)


def _out_dtype(*xs):
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


# --------------------------------------------------------------------------- NNLS

def _nnls_torch(G, h, x0, max_iter, tol, **kwargs):
    """``nnls_gram`` backend: the active-set solver with torch ADMM iterations."""
    return nnls_gram_active_set(G, h, x0, max_iter, tol, **kwargs)


_NNLS.register("torch", _nnls_torch)
_NNLS.lazy("cdlm_fast.kernels.nnls", "cdlm_fast._cuda_ops")


def nnls_gram(G: torch.Tensor, h: torch.Tensor, *, x0: Optional[torch.Tensor] = None,
              max_iter: Optional[int] = None, tol: Optional[float] = None, backend: str = "auto") -> NNLSResult:
    """Batched exact NNLS in Gram form: ``argmin_{x >= 0} 0.5 x^T G x - h^T x``.

    With ``G = A^T A`` and ``h = A^T b`` this is ``argmin_{x >= 0} ||A x - b||^2``; the form
    Attention Matching uses (``n >> t``), since ``G`` can be built without materialising
    ``A`` (:func:`cdlm_fast.ops.gram.exp_gram`).

    Args:
        G: ``[..., t, t]`` symmetric positive semi-definite, float16/bfloat16/float32/float64
            (the solve runs in float64).
        h: ``[..., t]``.
        x0: optional ``[..., t]`` warm start (e.g. the previous solution); its support
            ``x0 > 0`` is the initial passive set, negative entries are treated as zero.
        max_iter: cap on passive-set solves per problem (default ``3 t + 20``).
        tol: KKT tolerance relative to ``max|h|`` (default ``1e-10``).
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see the module docstring).

    Returns:
        :class:`NNLSResult` ``(x [..., t], iterations [...], kkt_residual [...], converged [...])``.
        ``converged``: the active set finished with a KKT residual within ``10 * tol``, or, for
        ``G``/``h`` in float32 or coarser, the residual is within a tenth of their rounding unit
        (1.2e-8 for float32: what rounded data allows, e.g. with duplicate columns).

    Example::

        >>> A = torch.rand(8, 256, 32); b = torch.rand(8, 256)
        >>> G = A.mT @ A; h = (A.mT @ b[..., None])[..., 0]
        >>> res = nnls_gram(G, h)        # res.x: [8, 32] >= 0
    """
    batch, t = _check_gram(G, h, "h", "[..., t]", matrix_rhs=False)
    tol = _check_iter_tol(max_iter, tol)
    if x0 is not None:
        _float("x0", x0, "[..., t]")
        if tuple(x0.shape) != tuple(h.shape):
            raise ValueError(f"x0 must have the shape of h {tuple(h.shape)} ([..., t]), got {tuple(x0.shape)}")
        V.same_device([("G", G), ("x0", x0)])
        V.finite_tensor("x0", x0)
    name = _NNLS.select(backend, G.device, G=G, h=h)
    N = math.prod(batch)
    x, it, kkt, conv = _NNLS.impls[name](G.reshape(N, t, t), h.reshape(N, t),
                                         None if x0 is None else x0.reshape(N, t), max_iter, tol)
    # Inputs rounded to float32 (or coarser) are not a consistent system beyond their rounding
    # unit: h need not lie in the range of G in near-null directions (duplicate keys), and the
    # exact float64 solution of the rounded data keeps a KKT residual of that order (measured:
    # 2.6e-9 for a duplicate key with float32 G, h; 6e-16 with the same data built in float64).
    # Such a residual is converged to the data's precision.
    data_tol = 0.1 * max(torch.finfo(G.dtype).eps, torch.finfo(h.dtype).eps)
    if data_tol > 10 * tol:
        conv = conv | (kkt <= data_tol)
    dt = _out_dtype(G, h)
    return NNLSResult(x.to(dt).clamp_min(0).reshape(*batch, t), it.reshape(batch), kkt.reshape(batch),
                      conv.reshape(batch))


def nnls(A: torch.Tensor, b: torch.Tensor, *, x0: Optional[torch.Tensor] = None, max_iter: Optional[int] = None,
         tol: Optional[float] = None, backend: str = "auto") -> NNLSResult:
    """Batched exact non-negative least squares: ``argmin_{x >= 0} ||A x - b||^2``.

    Forms ``G = A^T A`` and ``h = A^T b`` in float64 and calls :func:`nnls_gram`.

    Args:
        A: ``[..., n, t]`` float. b: ``[..., n]``.
        x0, max_iter, tol, backend: as in :func:`nnls_gram` (``tol`` relative to ``max|A^T b|``).

    Returns:
        :class:`NNLSResult` with ``x [..., t]``.
    """
    G, h = _normal_equations(A, b, "b", "[..., n]", vector=True)
    res = nnls_gram(G, h, x0=x0, max_iter=max_iter, tol=tol, backend=backend)
    return res._replace(x=res.x.to(_out_dtype(A, b)))


def _normal_equations(A, B, bname, bdoc, *, vector):
    _float("A", A, "[..., n, t]")
    if A.dim() < 2:
        raise ValueError(f"A must have shape [..., n, t], got {tuple(A.shape)}")
    _float(bname, B, bdoc)
    batch, n = tuple(A.shape[:-2]), A.shape[-2]
    vec = B.dim() == A.dim() - 1
    if vector and not vec:
        raise ValueError(f"{bname} must have shape {bdoc} with ...={list(batch)}, n={n}; got {tuple(B.shape)}")
    if tuple(B.shape[:len(batch) + 1]) != batch + (n,) or B.dim() not in (A.dim() - 1, A.dim()):
        raise ValueError(f"{bname} must have shape {bdoc} with ...={list(batch)}, n={n}; got {tuple(B.shape)}")
    V.same_device([("A", A), (bname, B)])
    V.finite_tensor("A", A)
    V.finite_tensor(bname, B)
    A64 = A.double()
    B64 = (B.unsqueeze(-1) if vec else B).double()
    G = A64.transpose(-1, -2) @ A64
    R = A64.transpose(-1, -2) @ B64
    return G, (R.squeeze(-1) if vec else R)


# --------------------------------------------------------------------------- least squares

def _lstsq_gram_torch(G: torch.Tensor, R: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge I)^{-1} R`` for ``G [N, t, t]``, ``R [N, t, d]`` in float64 (see :func:`lstsq_gram`)."""
    N, t, _ = G.shape
    if N == 0 or t == 0:
        return R.new_zeros(R.shape, dtype=torch.float64)
    G64 = G.double()
    G64 = 0.5 * (G64 + G64.transpose(-1, -2))
    R64 = R.double()
    eye = torch.eye(t, dtype=torch.float64, device=G.device)
    Gr = G64 + ridge * eye
    L, info = torch.linalg.cholesky_ex(Gr)
    dL = L.diagonal(dim1=-2, dim2=-1)
    gmax = Gr.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    bad = (info != 0) | ((dL * dL).amin(-1) < _RANK_TOL * gmax)
    X = torch.cholesky_solve(R64, torch.where(bad.view(N, 1, 1), eye.expand(N, t, t), L))
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        w, Vec = torch.linalg.eigh(Gr[idx])
        cut = _RANK_TOL * w.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        winv = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
        X[idx] = Vec @ (winv.unsqueeze(-1) * (Vec.transpose(-1, -2) @ R64[idx]))
    return X


def _resolve_singular(X: torch.Tensor, bad: torch.Tensor, G: torch.Tensor, R: torch.Tensor,
                      ridge: float) -> torch.Tensor:
    """Re-solve with :func:`_lstsq_gram_torch` the problems a fused Cholesky backend flagged in
    ``bad [N]`` as numerically singular (one host sync); returns ``X``."""
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        X[idx] = _lstsq_gram_torch(G[idx], R[idx], ridge)
    return X


_LSTSQ.register("torch", _lstsq_gram_torch)
_LSTSQ.lazy("cdlm_fast.kernels.lstsq", "cdlm_fast._cuda_ops")


def lstsq_gram(G: torch.Tensor, R: torch.Tensor, *, ridge: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Batched (ridge) least squares from the normal equations: ``X = (G + ridge I)^{-1} R``.

    With ``G = A^T A``, ``R = A^T B`` this minimises ``||A X - B||^2 + ridge ||X||^2``.

    Lambda: ``ridge`` is used as given (absolute, in the units of ``G``); no jitter is added on
    the fast path. Problems whose Cholesky of ``G + ridge I`` fails or has a pivot below
    ``1e-12 max(diag)`` (numerically rank deficient) are solved instead by an eigendecomposition
    pseudo-inverse that discards eigenvalues below ``1e-12 * lambda_max``: the minimum-norm
    solution, finite for any finite input.

    Args:
        G: ``[..., t, t]`` symmetric PSD float (solved in float64).
        R: ``[..., t, d]`` or ``[..., t]``.
        ridge: float ``>= 0``.
        backend: ``"auto"``, ``"cuda"`` (CUDA tensors), ``"triton"`` or ``"torch"`` (cuSOLVER
            batched Cholesky on a GPU); see the module docstring.

    Returns:
        ``X`` ``[..., t, d]`` (or ``[..., t]``), float64 if an input is float64 else float32.
    """
    batch, t = _check_gram(G, R, "R", "[..., t, d] or [..., t]", matrix_rhs=True)
    ridge = _check_ridge(ridge)
    name = _LSTSQ.select(backend, G.device, G=G, R=R)
    vec = R.dim() == G.dim() - 1
    R3 = R.unsqueeze(-1) if vec else R
    d = R3.shape[-1]
    N = math.prod(batch)
    X = _LSTSQ.impls[name](G.reshape(N, t, t), R3.reshape(N, t, d), ridge)
    X = X.to(_out_dtype(G, R)).reshape(*batch, t, d)
    return X.squeeze(-1) if vec else X


def lstsq(A: torch.Tensor, B: torch.Tensor, *, ridge: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Batched (ridge) least squares: ``argmin_X ||A X - B||^2 + ridge ||X||^2``.

    Forms ``A^T A`` and ``A^T B`` in float64 and calls :func:`lstsq_gram`; a rank-deficient
    ``A`` with ``ridge = 0`` gives the (finite) minimum-norm solution.

    Args:
        A: ``[..., n, t]`` float. B: ``[..., n, d]`` or ``[..., n]``.
        ridge: float ``>= 0``. backend: as in :func:`lstsq_gram`.

    Returns:
        ``X`` ``[..., t, d]`` (or ``[..., t]`` for a vector ``B``).
    """
    ridge = _check_ridge(ridge)
    G, R = _normal_equations(A, B, "B", "[..., n, d] or [..., n]", vector=False)
    return lstsq_gram(G, R, ridge=ridge, backend=backend).to(_out_dtype(A, B))
