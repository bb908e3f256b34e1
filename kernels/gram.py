"""Triton kernels for :func:`cdlm_fast.ops.gram.exp_gram`.

``A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i])`` is never written
to memory: each program owns one ``BT x BT`` tile ``(I, J)`` of ``G = A^T A`` (upper
triangle only; the tile is mirrored on store), keeps the key tiles ``C[I]`` and ``C[J]`` in
registers, and streams the queries in chunks of ``BN`` rows, recomputing the two ``BN x BT``
slices of ``A`` with ``tl.dot`` and accumulating ``A_I^T A_J`` in float32. A second kernel
computes ``R = A^T Y`` the same way over ``(I, e-block)`` tiles.

Precision: scores of float16/bfloat16 inputs use the native tensor-core dot with float32
accumulation; float32 operands (float32 ``Q``/``C`` and the float32 ``A`` tiles of the Gram
product) use ``tf32x3`` on the GPU (three TF32 products, about float32 accuracy), never plain
TF32, which would perturb the solvers' Gram matrices by ~1e-3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cdlm_fast.backends import op, triton_interpreted

__all__ = ["exp_gram_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _exp_tile(q, c_ptrs, cmask, beta_ptr, shift, rows_ok, cols, t, qk_scale,
              HAS_BETA: tl.constexpr, PREC: tl.constexpr):
    c = tl.load(c_ptrs, mask=cmask, other=0.0)
    s = tl.dot(q, tl.trans(c), input_precision=PREC)
    s = s * qk_scale - shift[:, None]
    if HAS_BETA:
        b = tl.load(beta_ptr + cols, mask=cols < t, other=float("-inf"))
        s = s + b[None, :] * 1.4426950408889634
    a = tl.exp2(s)
    return tl.where(rows_ok[:, None] & (cols[None, :] < t), a, 0.0)


@triton.jit
def _exp_gram_kernel(
    Q, C, BETA, SHIFT, G,
    n, t, D, qk_scale,
    sqp, sqn, sqd, scp, sct, scd, sbp, sbt, ssp, ssn, sgp, sgi, sgj,
    HAS_BETA: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    QK_PREC: tl.constexpr, G_PREC: tl.constexpr,
):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:
        return
    p = tl.program_id(2).to(tl.int64)
    ci = ti * BT + tl.arange(0, BT)
    cj = tj * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    dmask = d < D
    ci_ptrs = C + p * scp + ci[:, None] * sct + d[None, :] * scd
    cj_ptrs = C + p * scp + cj[:, None] * sct + d[None, :] * scd
    ci_mask = (ci[:, None] < t) & dmask[None, :]
    cj_mask = (cj[:, None] < t) & dmask[None, :]
    beta_p = BETA + p * sbp
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for n0 in range(0, n, BN):
        r = n0 + tl.arange(0, BN)
        rok = r < n
        q = tl.load(Q + p * sqp + r[:, None] * sqn + d[None, :] * sqd, mask=rok[:, None] & dmask[None, :], other=0.0)
        sh = tl.load(SHIFT + p * ssp + r * ssn, mask=rok, other=0.0) * 1.4426950408889634
        a_i = _exp_tile(q, ci_ptrs, ci_mask, beta_p, sh, rok, ci, t, qk_scale, HAS_BETA, QK_PREC)
        a_j = _exp_tile(q, cj_ptrs, cj_mask, beta_p, sh, rok, cj, t, qk_scale, HAS_BETA, QK_PREC)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=G_PREC)
    omask = (ci[:, None] < t) & (cj[None, :] < t)
    tl.store(G + p * sgp + ci[:, None] * sgi + cj[None, :] * sgj, acc, mask=omask)
    if ti != tj:
        tl.store(G + p * sgp + ci[:, None] * sgj + cj[None, :] * sgi, acc, mask=omask)


@triton.jit
def _exp_rhs_kernel(
    Q, C, BETA, SHIFT, Y, R,
    n, t, D, e, qk_scale,
    sqp, sqn, sqd, scp, sct, scd, sbp, sbt, ssp, ssn, syp, syn, sye, srp, srt, sre,
    HAS_BETA: tl.constexpr, HAS_Y: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BE: tl.constexpr, QK_PREC: tl.constexpr, G_PREC: tl.constexpr,
):
    ti = tl.program_id(0)
    te = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    ci = ti * BT + tl.arange(0, BT)
    ce = te * BE + tl.arange(0, BE)
    d = tl.arange(0, BD)
    dmask = d < D
    ci_ptrs = C + p * scp + ci[:, None] * sct + d[None, :] * scd
    ci_mask = (ci[:, None] < t) & dmask[None, :]
    beta_p = BETA + p * sbp
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    for n0 in range(0, n, BN):
        r = n0 + tl.arange(0, BN)
        rok = r < n
        q = tl.load(Q + p * sqp + r[:, None] * sqn + d[None, :] * sqd, mask=rok[:, None] & dmask[None, :], other=0.0)
        sh = tl.load(SHIFT + p * ssp + r * ssn, mask=rok, other=0.0) * 1.4426950408889634
        a_i = _exp_tile(q, ci_ptrs, ci_mask, beta_p, sh, rok, ci, t, qk_scale, HAS_BETA, QK_PREC)
        if HAS_Y:
            y = tl.load(Y + p * syp + r[:, None] * syn + ce[None, :] * sye, mask=rok[:, None] & (ce[None, :] < e),
                        other=0.0)
        else:
            y = tl.where(rok[:, None] & (ce[None, :] < e), 1.0, 0.0)
        acc = tl.dot(tl.trans(a_i), y, acc, input_precision=G_PREC)
    tl.store(R + p * srp + ci[:, None] * srt + ce[None, :] * sre, acc, mask=(ci[:, None] < t) & (ce[None, :] < e))


def _blocks(t: int, n: int, D: int, e: int):
    bd = max(16, triton.next_power_of_2(D))
    if triton_interpreted():
        return 16, 16, bd, 16
    bt = 64 if t > 32 else 32
    bn = 64 if bd <= 128 else 32
    be = min(64, max(16, triton.next_power_of_2(e)))
    return bt, bn, bd, be


def exp_gram_triton(Q: torch.Tensor, C: torch.Tensor, beta, shift: torch.Tensor, scale: float, Y=None, out=None):
    """Triton backend of ``exp_gram``: ``(G [P, t, t], R [P, t, e])`` float32 (see the module docstring).

    ``out``: optional preallocated ``(G, R)`` float32 buffers, every element of which is written.
    """
    P, n, D = Q.shape
    t = C.shape[1]
    e = 1 if Y is None else Y.shape[-1]
    if out is None:
        G = torch.empty(P, t, t, dtype=torch.float32, device=Q.device)
        R = torch.empty(P, t, e, dtype=torch.float32, device=Q.device)
    else:
        G, R = out
    if P == 0 or t == 0 or e == 0:
        return G, R
    if n == 0:
        return G.zero_(), R.zero_()
    shift = shift.float()
    beta_t = beta.float() if beta is not None else shift  # dummy pointer when absent
    bt, bn, bd, be = _blocks(t, n, D, e)
    interp = triton_interpreted()
    qk_prec = ("ieee" if interp else "tf32x3") if Q.dtype == torch.float32 else None
    g_prec = "ieee" if interp else "tf32x3"
    qk_scale = float(scale) * _LOG2E
    nt = triton.cdiv(t, bt)
    common = dict(HAS_BETA=beta is not None, BT=bt, BN=bn, BD=bd, QK_PREC=qk_prec, G_PREC=g_prec)
    _exp_gram_kernel[(nt, nt, P)](
        Q, C, beta_t, shift, G, n, t, D, qk_scale,
        *Q.stride(), *C.stride(), beta_t.stride(0), beta_t.stride(1), shift.stride(0), shift.stride(1),
        *G.stride(), **common)
    y = Y.float() if Y is not None else R
    _exp_rhs_kernel[(nt, triton.cdiv(e, be), P)](
        Q, C, beta_t, shift, y, R, n, t, D, e, qk_scale,
        *Q.stride(), *C.stride(), beta_t.stride(0), beta_t.stride(1), shift.stride(0), shift.stride(1),
        *(y.stride() if Y is not None else (0, 0, 0)), *R.stride(), HAS_Y=Y is not None, BE=be, **common)
    return G, R


def _supports(Q=None, C=None, beta=None, shift=None, Y=None, **_):
    if Q is not None and Q.dtype == torch.float64:
        return "the Triton exp_gram kernel takes float16/bfloat16/float32 inputs, not float64"
    if Q is not None and Q.dtype == torch.bfloat16 and triton_interpreted():
        return "bfloat16 dots are not supported by the Triton interpreter"
    if Q is not None and Q.shape[-1] > 256:
        return f"head dim D={Q.shape[-1]} > 256 is not supported by the Triton exp_gram kernel"
    return None


op("exp_gram").register("triton", exp_gram_triton, supports=_supports)
