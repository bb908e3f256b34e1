"""Exact batched NNLS references (Lawson--Hanson) and the helpers the fast solvers share.

The problem, in Gram form (``G = A^T A``, ``h = A^T b``)::

    minimise  0.5 x^T G x - h^T x   subject to  x >= 0

which is ``||A x - b||^2`` up to the constant ``||b||^2`` and a factor 2. Its KKT conditions
with the gradient ``g = G x - h`` are ``x >= 0``, ``g >= 0`` and ``x_j g_j = 0``.

:func:`nnls_gram_reference` is the textbook Lawson--Hanson active-set method run in lock
step over a batch in float64: one index enters the passive set per outer iteration, and the
least-squares problem restricted to the passive set is solved by a fixed-size masked
Cholesky (rows/columns outside the passive set replaced by the identity) so every problem
of the batch shares one ``cholesky_ex`` call. It is exact and simple, not fast.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["nnls_reference", "nnls_gram_reference", "masked_passive_solve", "kkt_residual", "h_scale"]

_TINY = 1e-300


def h_scale(h: torch.Tensor) -> torch.Tensor:
    """The scale KKT residuals are relative to: ``max_j |h_j|`` (``[...]``, at least a tiny floor)."""
    return h.abs().amax(-1).clamp_min(_TINY) if h.shape[-1] else h.new_full(h.shape[:-1], 1.0)


def kkt_residual(G: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Relative KKT residual of ``x`` for ``min 0.5 x^T G x - h^T x, x >= 0``: ``[...]``.

    ``max_j |min(G_jj x_j, g_j)| / max_j |h_j|`` with ``g = G x - h``. It is zero exactly at the
    solution: it measures a negative gradient on a zero coordinate (an index that should
    enter), a non-zero gradient on a positive coordinate (an inexact solve) and a positive
    gradient on a positive coordinate (complementarity), all in the units of ``h``
    (``G_jj x_j`` is the gradient change from zeroing ``x_j``). Computed in float64.
    """
    G64, h64, x64 = G.double(), h.double(), x.double()
    if x64.shape[-1] == 0:
        return h64.new_zeros(h64.shape[:-1])
    g = (G64 @ x64.unsqueeze(-1)).squeeze(-1) - h64
    d = G64.diagonal(dim1=-2, dim2=-1)
    r = torch.minimum(d * x64.clamp_min(0), g).abs()
    r = torch.where(x64 < 0, x64.abs() * d.clamp_min(1.0), r)  # infeasible entries count too
    return r.amax(-1) / h_scale(h64)


def masked_passive_solve(G: torch.Tensor, h: torch.Tensor, P: torch.Tensor, refine: int = 1) -> torch.Tensor:
    """Solve ``G[P, P] s_P = h_P``, ``s = 0`` off ``P``, for a batch at a fixed size.

    Args:
        G: ``[N, t, t]`` float64 symmetric PSD. h: ``[N, t]`` float64. P: ``[N, t]`` bool.
    Returns:
        ``s`` ``[N, t]`` float64. Rows and columns outside ``P`` are replaced by the identity so
        all problems share one batched ``cholesky_ex``; problems whose factorisation fails
        (singular ``G[P, P]``, e.g. duplicate columns) fall back to the minimum-norm solution
        through a symmetric eigendecomposition. ``refine`` steps of iterative refinement
        follow the Cholesky solve. Never NaN for finite input.
    """
    N, t = h.shape
    if N == 0 or t == 0:
        return h.new_zeros(h.shape)
    PP = P.unsqueeze(-1) & P.unsqueeze(-2)
    eye = torch.eye(t, dtype=G.dtype, device=G.device).expand(N, t, t)
    Gm = torch.where(PP, G, eye)
    hm = torch.where(P, h, torch.zeros_like(h)).unsqueeze(-1)
    L, info = torch.linalg.cholesky_ex(Gm)
    # A pivot far below the matrix scale means the factorisation is numerically singular.
    dL = L.diagonal(dim1=-2, dim2=-1)
    gmax = torch.where(P, G.diagonal(dim1=-2, dim2=-1), torch.zeros_like(h)).amax(-1, keepdim=True).clamp_min(_TINY)
    tiny_pivot = ((dL * dL < 1e-13 * gmax) & P).any(-1)
    bad = (info != 0) | tiny_pivot
    L = torch.where(bad.view(N, 1, 1), eye, L)
    s = torch.cholesky_solve(hm, L)
    for _ in range(refine):  # iterative refinement: cheap, and it matters for ill-conditioned G[P, P]
        s = s + torch.cholesky_solve(hm - Gm @ s, L)
    s = s.squeeze(-1)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        s[idx] = _pinv_solve(Gm[idx], hm[idx].squeeze(-1), P[idx])
    s = torch.where(P, s, torch.zeros_like(s))
    return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def _pinv_solve(Gm: torch.Tensor, hm: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Minimum-norm ``Gm^+ hm`` by eigendecomposition (relative cutoff ``t * 1e3 * eps``)."""
    t = hm.shape[-1]
    w, V = torch.linalg.eigh(Gm)
    cut = max(t, 1) * 1e3 * torch.finfo(Gm.dtype).eps * w.abs().amax(-1, keepdim=True)
    winv = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    return (V @ (winv.unsqueeze(-1) * (V.transpose(-1, -2) @ hm.unsqueeze(-1)))).squeeze(-1)


def nnls_gram_reference(G: torch.Tensor, h: torch.Tensor, max_iter: Optional[int] = None,
                        tol: float = 1e-10) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Lawson--Hanson on the Gram form, in float64.

    Args:
        G: ``[..., t, t]`` symmetric PSD. h: ``[..., t]``.
        max_iter: cap on passive-set solves per problem (default ``3 t + 10``).
        tol: an index enters when ``-g_j > tol * max|h|``.
    Returns:
        ``(x [..., t] float64, iterations [...] int64, converged [...] bool)``. ``converged`` is
        False if the iteration cap was hit or an entering index was rejected at once
        (numerically singular passive set).
    """
    batch, t = h.shape[:-1], h.shape[-1]
    G64 = G.double().reshape(-1, t, t)
    h64 = h.double().reshape(-1, t)
    N = h64.shape[0]
    max_iter = 3 * t + 10 if max_iter is None else max_iter
    x = h64.new_zeros(N, t)
    P = torch.zeros(N, t, dtype=torch.bool, device=h.device)
    inner = torch.zeros(N, dtype=torch.bool, device=h.device)
    done = torch.zeros(N, dtype=torch.bool, device=h.device)
    ok = torch.ones(N, dtype=torch.bool, device=h.device)
    entered = torch.full((N,), -1, dtype=torch.long, device=h.device)
    iters = torch.zeros(N, dtype=torch.long, device=h.device)
    thr = tol * h_scale(h64)
    ar = torch.arange(N, device=h.device)
    while not bool(done.all()):
        # outer step: add the most violating index
        outer = ~inner & ~done
        if bool(outer.any()):
            w = h64 - (G64 @ x.unsqueeze(-1)).squeeze(-1)
            w = torch.where(P, torch.full_like(w, -float("inf")), w)
            wmax, j = w.max(-1)
            stop = outer & ~(wmax > thr)
            done |= stop
            add = outer & ~stop
            P[ar[add], j[add]] = True
            entered = torch.where(add, j, entered)
            inner |= add
        act = inner & ~done
        if not bool(act.any()):
            break
        over = act & (iters >= max_iter)
        done |= over
        ok &= ~over
        act &= ~over
        if not bool(act.any()):
            break
        iters += act.long()
        s = masked_passive_solve(G64, h64, P & act.unsqueeze(-1))
        neg = P & (s <= 0) & act.unsqueeze(-1)
        accept = act & ~neg.any(-1)
        x = torch.where(accept.unsqueeze(-1), s, x)
        inner &= ~accept
        bt = act & ~accept
        if bool(bt.any()):
            ratio = torch.where(neg, x / (x - s).clamp_min(_TINY), torch.full_like(x, float("inf")))
            alpha, jmin = ratio.min(-1)
            alpha = alpha.clamp(0, 1)
            stalled = bt & (jmin == entered) & (alpha == 0)
            xn = x + alpha.unsqueeze(-1) * (s - x)
            drop = P & ((xn <= 0) | (torch.arange(t, device=h.device) == jmin.unsqueeze(-1)))
            xn = torch.where(drop, torch.zeros_like(xn), xn)
            x = torch.where(bt.unsqueeze(-1), xn, x)
            P = P & ~(drop & bt.unsqueeze(-1))
            entered = torch.where(bt, torch.full_like(entered, -1), entered)
            done |= stalled
            ok &= ~stalled
    return x.reshape(*batch, t), iters.reshape(batch), ok.reshape(batch)


def nnls_reference(A: torch.Tensor, b: torch.Tensor, max_iter: Optional[int] = None,
                   tol: float = 1e-10) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``argmin_{x >= 0} ||A x - b||`` for ``A [..., n, t]``, ``b [..., n]`` via :func:`nnls_gram_reference`."""
    A64, b64 = A.double(), b.double()
    G = A64.transpose(-1, -2) @ A64
    h = (A64.transpose(-1, -2) @ b64.unsqueeze(-1)).squeeze(-1)
    return nnls_gram_reference(G, h, max_iter=max_iter, tol=tol)
