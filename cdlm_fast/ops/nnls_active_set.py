"""Batched exact NNLS on the Gram form: ADMM support estimate + multi-index active set.

Solves, for a batch of ``N`` problems at once (``G [N, t, t]`` symmetric PSD, ``h [N, t]``)::

    minimise 0.5 x^T G x - h^T x  subject to  x >= 0.

Algorithm (the same for every backend; only the ADMM iteration kernel differs):

1. **Initial passive set** ``P``: the support of the warm start ``x0`` if one is given;
   otherwise, for ``t <= ADMM_MIN_T``, the positive entries of the unconstrained solution;
   for larger ``t``, the support after ``ADMM_ITERS`` ADMM iterations run on one cached
   factorisation ``M = (G + rho I)^{-1}`` (``rho`` = mean of ``diag(G)``), in float32.
2. **Active set** (float64, lock step over the batch, finished problems leave the batch):
   solve ``G[P, P] s = h[P]`` with a fixed-size masked Cholesky
   (:func:`cdlm_fast.ops.nnls_common.masked_passive_solve`). Then, per problem:

   * an index that just entered (``x_j = 0``) with ``s_j <= 0`` is dropped again, ``x`` is kept;
   * else, if some ``s_j <= 0``, step from the feasible ``x`` towards ``s`` until the first
     coordinate hits zero and drop it (Lawson--Hanson backtracking);
   * else accept ``x = s`` and compute ``g = G x - h``; if no ``j`` outside ``P`` has
     ``g_j < -tol * max|h|`` the problem is solved (KKT holds), otherwise *all* such
     ``j`` enter ``P``.

   The objective never increases, and strictly decreases at every accepted step that keeps
   a new index. If every new index is rejected, the next round adds only the single most
   violating index (the Lawson--Hanson rule, which provably enters); if even that one is
   rejected the problem is numerically singular and is reported with ``converged = False``.
3. **KKT check**: :func:`cdlm_fast.ops.nnls_common.kkt_residual` of the final ``x``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .nnls_common import h_scale, kkt_residual, masked_passive_solve

__all__ = ["nnls_gram_active_set", "admm_step_torch", "ADMM_MIN_T", "ADMM_ITERS", "DEFAULT_TOL"]

# KKT tolerance relative to max|h|. 1e-7 stopped a t = 2048 problem with near-duplicate keys
# one support change early, 3e-5 above scipy's objective; at 1e-10 it reaches it (KKT 3e-16).
DEFAULT_TOL = 1e-10
ADMM_MIN_T = 96
ADMM_ITERS = 60

AdmmStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    Tuple[torch.Tensor, torch.Tensor]]


def admm_step_torch(M: torch.Tensor, h: torch.Tensor, z: torch.Tensor, u: torch.Tensor,
                    rho: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ADMM iteration for NNLS: ``x = M (h + rho (z - u))``, ``z' = max(x + u, 0)``, ``u' = u + x - z'``.

    Shapes: ``M [N, t, t]``, ``h, z, u [N, t]``, ``rho [N]``; returns ``(z', u')``.
    """
    w = h + rho.unsqueeze(-1) * (z - u)
    x = (M @ w.unsqueeze(-1)).squeeze(-1)
    zn = (x + u).clamp_min(0)
    return zn, u + x - zn


def admm_support(G: torch.Tensor, h: torch.Tensor, iters: int, step: AdmmStep) -> torch.Tensor:
    """Approximate NNLS solution ``z [N, t]`` (float32) after ``iters`` ADMM iterations."""
    N, t = h.shape
    rho = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(t, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + rho.view(N, 1, 1) * eye)
    L = torch.where((info != 0).view(N, 1, 1), eye.expand(N, t, t), L)
    M = torch.cholesky_inverse(L).float().contiguous()
    h32, rho32 = h.float().contiguous(), rho.float().contiguous()
    z = torch.zeros_like(h32)
    u = torch.zeros_like(h32)
    for _ in range(iters):
        z, u = step(M, h32, z, u, rho32)
    return z


def nnls_gram_active_set(
    G: torch.Tensor,
    h: torch.Tensor,
    x0: Optional[torch.Tensor] = None,
    max_iter: Optional[int] = None,
    tol: float = DEFAULT_TOL,
    admm_step: AdmmStep = admm_step_torch,
    admm_min_t: int = ADMM_MIN_T,
    admm_iters: int = ADMM_ITERS,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact batched NNLS (see the module docstring).

    Args:
        G: ``[N, t, t]`` symmetric PSD (any float dtype; the solve runs in float64).
        h: ``[N, t]``.
        x0: optional ``[N, t]`` warm start; its support ``x0 > 0`` is the initial passive set.
        max_iter: cap on passive-set solves per problem (default ``3 t + 20``).
        tol: KKT tolerance relative to ``max|h|``.
        admm_step: the ADMM iteration (torch, or a fused Triton or CUDA kernel).
        admm_min_t, admm_iters: ADMM warm-start phase for ``t >= admm_min_t`` without ``x0``.
    Returns:
        ``(x [N, t] float64, iterations [N] int64, kkt_residual [N] float64, converged [N] bool)``.
    """
    N, t = h.shape
    dev = h.device
    G64 = G.double()
    G64 = 0.5 * (G64 + G64.transpose(-1, -2))
    h64 = h.double()
    max_iter = 3 * t + 20 if max_iter is None else int(max_iter)
    x = h64.new_zeros(N, t)
    iters = torch.zeros(N, dtype=torch.long, device=dev)
    if N == 0 or t == 0:
        return x, iters, h64.new_zeros(N), torch.ones(N, dtype=torch.bool, device=dev)
    thr = tol * h_scale(h64)
    if x0 is not None:
        P = x0 > 0
    elif t >= admm_min_t and admm_iters > 0:
        P = admm_support(G64, h64, admm_iters, admm_step) > 0
    else:
        P = masked_passive_solve(G64, h64, torch.ones_like(h64, dtype=torch.bool)) > 0
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    stalled = torch.zeros(N, dtype=torch.bool, device=dev)
    single = torch.zeros(N, dtype=torch.bool, device=dev)
    cols = torch.arange(t, device=dev)
    while True:
        act = (~done & (iters < max_iter)).nonzero().squeeze(-1)
        if act.numel() == 0:
            break
        Ga, ha, xa, Pa = G64[act], h64[act], x[act], P[act]
        iters[act] += 1
        s = masked_passive_solve(Ga, ha, Pa)
        nonpos = Pa & (s <= 0)
        fresh = Pa & (xa == 0)
        fresh_neg = fresh & nonpos
        c_drop = fresh_neg.any(-1)
        c_back = ~c_drop & nonpos.any(-1)
        c_acc = ~c_drop & ~c_back
        # (a) drop rejected new indices; all new ones rejected -> next round adds one index
        kept_fresh = (fresh & ~fresh_neg).any(-1)
        back_to_old = c_drop & ~kept_fresh
        stall = back_to_old & single[act]
        single[act] = single[act] | back_to_old
        Pa = Pa & ~(fresh_neg & c_drop.unsqueeze(-1))
        # (b) Lawson--Hanson backtracking from the feasible x
        ratio = torch.where(nonpos, xa / (xa - s).clamp_min(1e-300), torch.full_like(xa, float("inf")))
        alpha, jmin = ratio.min(-1)
        alpha = alpha.clamp(0, 1)
        xb = xa + alpha.unsqueeze(-1) * (s - xa)
        hit = Pa & ((xb <= 0) | (cols == jmin.unsqueeze(-1)))
        xb = torch.where(hit, torch.zeros_like(xb), xb)
        xa = torch.where(c_back.unsqueeze(-1), xb, xa)
        Pa = Pa & ~(hit & c_back.unsqueeze(-1))
        # (c) accept, check KKT, add violators
        xa = torch.where(c_acc.unsqueeze(-1), s, xa)
        single[act] = single[act] & ~(c_acc & kept_fresh)
        g = (Ga @ xa.unsqueeze(-1)).squeeze(-1) - ha
        viol = ~Pa & (g < -thr[act].unsqueeze(-1)) & c_acc.unsqueeze(-1)
        any_viol = viol.any(-1)
        solved = c_acc & ~any_viol
        jbest = torch.where(viol, g, torch.full_like(g, float("inf"))).argmin(-1)
        one = viol & (cols == jbest.unsqueeze(-1))
        add = torch.where(single[act].unsqueeze(-1), one, viol)
        Pa = Pa | add
        x[act] = xa
        P[act] = Pa
        done[act] = done[act] | solved | stall
        stalled[act] = stalled[act] | stall
    x = x.clamp_min(0)
    kkt = kkt_residual(G64, h64, x)
    converged = done & ~stalled & (kkt <= max(tol, 1e-12) * 10)
    return x, iters, kkt, converged
