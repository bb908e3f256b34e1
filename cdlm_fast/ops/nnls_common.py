"""Helpers of the batched NNLS solvers: the KKT residual, its scale and the fixed-size masked
passive-set solve (Cholesky with an eigendecomposition fallback), shared by the fast active-set
solver (:mod:`cdlm_fast.ops.nnls_active_set`) and the Lawson--Hanson references
(:mod:`cdlm_fast.reference.nnls`), which the tests check against scipy."""
from __future__ import annotations

import torch

__all__ = ["h_scale", "kkt_residual", "masked_passive_solve"]

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
