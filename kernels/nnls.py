"""Triton kernel for the ADMM warm-start phase of the batched NNLS solver.

One launch is one ADMM iteration for every problem of the batch, fused in a single pass
over the cached inverse ``M = (G + rho I)^{-1}`` (the dominant memory traffic)::

    x  = M (h + rho (z - u))
    z' = max(x + u, 0)
    u' = u + x - z'

Program ``(p, row block)`` forms ``w = h + rho (z - u)`` on the fly, reduces ``M[rows, :] w``
in float32 and writes ``z'``/``u'`` for its rows to separate output buffers (the inputs are
read by every program, so updates cannot be in place). Registered as the ``"triton"``
backend of op ``nnls_gram``; the exact active-set phase that follows is shared with the
torch backend (:mod:`cdlm_fast.ops.nnls_active_set`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cdlm_fast.backends import op, triton_interpreted

__all__ = ["admm_step_triton", "nnls_gram_triton"]


@triton.jit
def _admm_step_kernel(M, H, Z, U, RHO, ZO, UO, t, smp, smi, smj,
                      BR: tl.constexpr, BK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    rok = rows < t
    rho = tl.load(RHO + p)
    acc = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, t, BK):
        k = k0 + tl.arange(0, BK)
        kok = k < t
        w = tl.load(H + p * t + k, mask=kok, other=0.0) + rho * (
            tl.load(Z + p * t + k, mask=kok, other=0.0) - tl.load(U + p * t + k, mask=kok, other=0.0))
        m = tl.load(M + p * smp + rows[:, None] * smi + k[None, :] * smj, mask=rok[:, None] & kok[None, :], other=0.0)
        acc += tl.sum(m * w[None, :], axis=1)
    u = tl.load(U + p * t + rows, mask=rok, other=0.0)
    zn = tl.maximum(acc + u, 0.0)
    tl.store(ZO + p * t + rows, zn, mask=rok)
    tl.store(UO + p * t + rows, u + acc - zn, mask=rok)


def admm_step_triton(M: torch.Tensor, h: torch.Tensor, z: torch.Tensor, u: torch.Tensor, rho: torch.Tensor):
    """Fused ADMM iteration; same contract as :func:`cdlm_fast.ops.nnls_active_set.admm_step_torch`.

    ``M [N, t, t]`` float32, ``h, z, u [N, t]`` float32 contiguous, ``rho [N]`` float32.
    """
    N, t = h.shape
    zo = torch.empty_like(z)
    uo = torch.empty_like(u)
    if N == 0 or t == 0:
        return zo, uo
    br, bk = (16, 16) if triton_interpreted() else (32, 128)
    _admm_step_kernel[(N, triton.cdiv(t, br))](M, h.contiguous(), z.contiguous(), u.contiguous(), rho.contiguous(),
                                               zo, uo, t, *M.stride(), BR=br, BK=bk)
    return zo, uo


def nnls_gram_triton(G, h, x0, max_iter, tol, **kwargs):
    """``nnls_gram`` backend: the active-set solver with the fused Triton ADMM phase."""
    from cdlm_fast.ops.nnls_active_set import nnls_gram_active_set
    return nnls_gram_active_set(G, h, x0, max_iter, tol, admm_step=admm_step_triton, **kwargs)


op("nnls_gram").register("triton", nnls_gram_triton)
