"""Exact batched NNLS references (Lawson--Hanson), the oracles of the solver tests besides scipy.

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

from ..ops.nnls_common import _TINY, h_scale, kkt_residual, masked_passive_solve

__all__ = ["nnls_reference", "nnls_gram_reference", "masked_passive_solve", "kkt_residual", "h_scale"]

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
