"""Least-squares fits of Attention Matching: the key weights (beta) and the values (C_v).

Both fits go through the Gram matrices of the problem (``exp_gram``), never a dense
``[N, T]`` float64 design matrix, and batch every KV head of a layer into one solver call.
Shapes as in :mod:`cdlm_fast.compaction.select` (``P`` problems, ``N`` queries, ``t`` slots).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.gram import exp_gram
from ..ops.solvers import lstsq_gram, nnls_gram
from .select import _mask_problem, _masked_shift

__all__ = ["fit_beta", "compacted_lse", "fit_values"]


def fit_beta(Q: torch.Tensor, C: torch.Tensor, lse: torch.Tensor, scale: float, valid: torch.Tensor,
             query_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, object]:
    """Fit ``beta = log w`` so that the compacted keys reproduce each query's attention mass.

    Solves, per problem, ``min_{w >= 0} sum_i (sum_j exp(scale q_i.c_j - lse_i) w_j - 1)^2``
    (relative mass error of every reference query; ``lse_i`` is its log-mass over the original
    keys) with ``nnls_gram`` on ``G = A^T A``, ``h = A^T 1``.

    Args:
        Q: ``[P, N, D]`` float32 queries. C: ``[P, t, D]`` selected keys.
        lse: ``[P, N]`` float32 log-mass over the original keys.
        valid: ``[P, t]`` bool, False for padding slots.
        query_weight: optional ``[P, N]`` 0/1 weights (0 excludes a padded query).

    Returns:
        ``beta`` ``[P, t]`` float32 (``-inf`` where ``w = 0`` or the slot is padding: such a key
        gets no attention) and the solver's ``NNLSResult``.
    """
    N = Q.shape[1]
    shift = lse if query_weight is None else _masked_shift(lse, query_weight)
    G, R = exp_gram(Q, C.float(), None, shift, scale, None)
    G, h = _mask_problem(G, R[..., 0], valid)
    res = nnls_gram(G / N, h / N)
    w = res.x.float().clamp(min=0) * valid
    beta = torch.log(w)  # log(0) = -inf: the key is dropped
    return beta, res


def compacted_lse(Q: torch.Tensor, C: torch.Tensor, beta: torch.Tensor, scale: float,
                  backend: str = "auto") -> torch.Tensor:
    """``[P, N]`` float32 log-mass of every query over the compacted keys (with ``beta``)."""
    from ..ops.attention import attention

    q = Q[:, None]
    k = C.float()[:, None]
    _, lse = attention(q, k, k, bias=beta[:, None].contiguous(), scale=scale, return_lse=True, backend=backend)
    return lse[:, 0].float()


def fit_values(Q: torch.Tensor, C: torch.Tensor, beta: torch.Tensor, Y: torch.Tensor, scale: float,
               *, ridge: float = 1e-4, query_weight: Optional[torch.Tensor] = None,
               backend: str = "auto") -> torch.Tensor:
    """Fit the compacted values ``C_v`` so that attention outputs are preserved.

    ``X = softmax(scale * Q C^T + beta)`` (``[N, t]`` per problem) and ``Y`` the original
    attention outputs; solves ``(X^T X + lambda I) C_v = X^T Y`` with ``lstsq_gram``, where
    ``lambda = ridge * mean(diag(X^T X))`` (a relative ridge; 0 gives plain least squares).
    Slots with ``beta = -inf`` get zero values.

    Args:
        Q: ``[P, N, D]`` float32. C: ``[P, t, D]``. beta: ``[P, t]`` float32.
        Y: ``[P, N, Dv]`` float32 original attention outputs.

    Returns:
        ``C_v`` ``[P, t, Dv]`` float32.
    """
    lse_c = compacted_lse(Q, C, beta, scale, backend=backend)
    finite = torch.isfinite(lse_c)
    if query_weight is not None:
        finite = finite & (query_weight > 0)
    shift = torch.where(finite, lse_c, torch.full_like(lse_c, 1e30))
    G, R = exp_gram(Q, C.float(), beta, shift, scale, Y.float())
    valid = torch.isfinite(beta)
    G, _ = _mask_problem(G, R[..., 0], valid)
    R = R * valid[:, :, None]
    vf = valid.float()
    d = (torch.diagonal(G, dim1=1, dim2=2) * vf).sum(1) / vf.sum(1).clamp(min=1)
    d = torch.where(d > 0, d, torch.ones_like(d))[:, None, None]
    # Normalising every problem by its mean diagonal makes one scalar ridge relative for all.
    Gn = G / d
    Gn = Gn + torch.diag_embed(1.0 - vf) * (1.0 - 1.0 / d)  # padding rows stay unit rows
    X = lstsq_gram(Gn, R / d, ridge=float(ridge))
    return X.float() * valid[:, :, None]
