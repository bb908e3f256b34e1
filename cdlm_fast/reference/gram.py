"""Dense reference for :func:`cdlm_fast.ops.gram.exp_gram`.

It materialises ``A [P, n, t]`` and is the oracle the fused kernels are compared with. It
runs on any device; float64 inputs are computed in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["exp_gram_reference", "exp_matrix_reference"]


def exp_matrix_reference(Q: torch.Tensor, C: torch.Tensor, beta: Optional[torch.Tensor], shift: torch.Tensor,
                         scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i])``: ``[P, n, t]`` in ``dtype``.

    Args:
        Q: ``[P, n, D]`` queries. C: ``[P, t, D]`` keys. beta: ``[P, t]`` or ``None`` (zeros;
            ``-inf`` gives a zero column). shift: ``[P, n]`` per-row log-shift. scale: score scale.
    """
    s = scale * torch.matmul(Q.to(dtype), C.to(dtype).transpose(-1, -2))
    if beta is not None:
        s = s + beta.to(dtype).unsqueeze(-2)
    s = s - shift.to(dtype).unsqueeze(-1)
    return torch.exp(s)


def exp_gram_reference(Q: torch.Tensor, C: torch.Tensor, beta: Optional[torch.Tensor], shift: torch.Tensor,
                       scale: float, Y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense ``G = A^T A`` ``[P, t, t]`` and ``R = A^T Y`` ``[P, t, e]`` (``Y = None``: ones, ``e = 1``).

    Computed in float64 when any input is float64, else in float32 (the dtype of the result).
    See :func:`exp_matrix_reference` for ``A``.
    """
    f64 = any(x is not None and x.dtype == torch.float64 for x in (Q, C, beta, shift, Y))
    dtype = torch.float64 if f64 else torch.float32
    A = exp_matrix_reference(Q, C, beta, shift, scale, dtype)
    G = torch.matmul(A.transpose(-1, -2), A)
    if Y is None:
        R = A.sum(-2).unsqueeze(-1)
    else:
        R = torch.matmul(A.transpose(-1, -2), Y.to(dtype))
    return G, R
