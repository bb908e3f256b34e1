"""Dense float64 references for :func:`cdlm_fast.ops.solvers.lstsq` and ``lstsq_gram``.

Minimum-norm solutions through the pseudo-inverse (SVD), ridge through the closed form.
"""
from __future__ import annotations

import torch

__all__ = ["lstsq_reference", "lstsq_gram_reference"]


def lstsq_reference(A: torch.Tensor, B: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``argmin_X ||A X - B||^2 + ridge ||X||^2`` in float64, minimum norm when ``ridge == 0``.

    Args:
        A: ``[..., n, t]``. B: ``[..., n, d]`` or ``[..., n]``.
    Returns:
        ``X`` ``[..., t, d]`` (or ``[..., t]``) float64.
    """
    vec = B.dim() == A.dim() - 1
    A64 = A.double()
    B64 = (B.unsqueeze(-1) if vec else B).double()
    if ridge == 0:
        X = torch.linalg.pinv(A64) @ B64
    else:
        t = A64.shape[-1]
        G = A64.transpose(-1, -2) @ A64 + ridge * torch.eye(t, dtype=torch.float64, device=A.device)
        X = torch.linalg.solve(G, A64.transpose(-1, -2) @ B64)
    return X.squeeze(-1) if vec else X


def lstsq_gram_reference(G: torch.Tensor, R: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``X = (G + ridge I)^+ R`` in float64 (pseudo-inverse, so minimum norm when singular).

    Args:
        G: ``[..., t, t]`` symmetric PSD. R: ``[..., t, d]`` or ``[..., t]``.
    """
    vec = R.dim() == G.dim() - 1
    t = G.shape[-1]
    G64 = G.double() + ridge * torch.eye(t, dtype=torch.float64, device=G.device)
    R64 = (R.unsqueeze(-1) if vec else R).double()
    X = torch.linalg.pinv(G64, hermitian=True) @ R64
    return X.squeeze(-1) if vec else X
