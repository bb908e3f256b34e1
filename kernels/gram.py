"""Triton kernels for :func:`cdlm_fast.ops.gram.exp_gram`.

``A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i])`` is never written
to memory: each program owns one ``BT x BT`` tile ``(I, J)`` of ``G = A^T A`` (upper
triangle only; the tile is mirrored on store), streams the queries in chunks of ``BN`` rows,
recomputing the two ``BN x BT`` slices of ``A`` with ``tl.dot`` and accumulating ``A_I^T A_J`` in
float32. The key tiles ``C[I]`` and ``C[J]`` are loop-invariant: for 16-bit inputs they are loaded
once per program; for float32 the scores are summed over head-dim slices (see ``_blocks``). A second kernel
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
FP32_MAX_HEAD_DIM = 128  # float32 beyond this spills > 2 KB of registers on sm_90 (see _blocks)


@triton.jit
def _exp_tile(s, b2, shift, rows_ok, cols_ok, qk_scale, HAS_BETA: tl.constexpr):
    """``exp2`` of one ``BN x BT`` tile of raw scores ``s`` (``b2``: the key tile's bias in the log2
    domain); rows past ``n`` and columns past ``t`` are zero."""
    s = s * qk_scale - shift[:, None]
    if HAS_BETA:
        s = s + b2[None, :]
    a = tl.exp2(s)
    return tl.where(rows_ok[:, None] & cols_ok[None, :], a, 0.0)


@triton.jit
def _load_keys(C, p, cols, d, t, D, scp, sct, scd):
    """Key rows ``C[p, cols, d]`` (zero past ``t`` / ``D``)."""
    cmask = (cols[:, None] < t) & (d[None, :] < D)
    return tl.load(C + p * scp + cols[:, None] * sct + d[None, :] * scd, mask=cmask, other=0.0)


@triton.jit
def _load_bias(BETA, p, cols, t, sbp, sbt, HAS_BETA: tl.constexpr):
    """The bias of a key tile in the log2 domain (``-inf`` past ``t``), loaded once per program."""
    if HAS_BETA:
        b2 = tl.load(BETA + p * sbp + cols * sbt, mask=cols < t, other=float("-inf")) * 1.4426950408889634
    else:
        b2 = (cols * 0).to(tl.float32)
    return b2


@triton.jit
def _scores_chunked(Q, C, p, r, rok, cols, t, D, sqp, sqn, sqd, scp, sct, scd,
                    BN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """``Q[p, r] . C[p, cols]`` over the head dim in ``BK``-wide slices: the float32 ``tf32x3`` dot
    keeps hi/lo copies of both operands, which over a whole 128-wide head dim exceed the register
    file (255 registers and spills on sm_90); slices keep it small."""
    s = tl.zeros((BN, BT), dtype=tl.float32)
    for k0 in tl.static_range(0, BD, BK):
        dk = k0 + tl.arange(0, BK)
        q = tl.load(Q + p * sqp + r[:, None] * sqn + dk[None, :] * sqd, mask=rok[:, None] & (dk[None, :] < D),
                    other=0.0)
        c = _load_keys(C, p, cols, dk, t, D, scp, sct, scd)
        s = tl.dot(q, tl.trans(c), s, input_precision=PREC)
    return s


@triton.jit
def _exp_gram_kernel(
    Q, C, BETA, SHIFT, G,
    n, t, D, qk_scale,
    sqp, sqn, sqd, scp, sct, scd, sbp, sbt, ssp, ssn, sgp, sgi, sgj,
    HAS_BETA: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
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
    b_i = _load_bias(BETA, p, ci, t, sbp, sbt, HAS_BETA)
    b_j = _load_bias(BETA, p, cj, t, sbp, sbt, HAS_BETA)
    if BK == BD:  # the key tiles do not change over the query loop: loaded once, only Q streams
        c_i = _load_keys(C, p, ci, d, t, D, scp, sct, scd)
        c_j = _load_keys(C, p, cj, d, t, D, scp, sct, scd)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for n0 in range(0, n, BN):
        r = n0 + tl.arange(0, BN)
        rok = r < n
        if BK == BD:
            q = tl.load(Q + p * sqp + r[:, None] * sqn + d[None, :] * sqd, mask=rok[:, None] & dmask[None, :],
                        other=0.0)
            s_i = tl.dot(q, tl.trans(c_i), input_precision=QK_PREC)
            s_j = tl.dot(q, tl.trans(c_j), input_precision=QK_PREC)
        else:
            s_i = _scores_chunked(Q, C, p, r, rok, ci, t, D, sqp, sqn, sqd, scp, sct, scd, BN, BT, BK, BD, QK_PREC)
            s_j = _scores_chunked(Q, C, p, r, rok, cj, t, D, sqp, sqn, sqd, scp, sct, scd, BN, BT, BK, BD, QK_PREC)
        sh = tl.load(SHIFT + p * ssp + r * ssn, mask=rok, other=0.0) * 1.4426950408889634
        a_i = _exp_tile(s_i, b_i, sh, rok, ci < t, qk_scale, HAS_BETA)
        a_j = _exp_tile(s_j, b_j, sh, rok, cj < t, qk_scale, HAS_BETA)
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
    BK: tl.constexpr, BE: tl.constexpr, QK_PREC: tl.constexpr, G_PREC: tl.constexpr,
):
    ti = tl.program_id(0)
    te = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    ci = ti * BT + tl.arange(0, BT)
    ce = te * BE + tl.arange(0, BE)
    d = tl.arange(0, BD)
    dmask = d < D
    b_i = _load_bias(BETA, p, ci, t, sbp, sbt, HAS_BETA)
    if BK == BD:
        c_i = _load_keys(C, p, ci, d, t, D, scp, sct, scd)
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    for n0 in range(0, n, BN):
        r = n0 + tl.arange(0, BN)
        rok = r < n
        if BK == BD:
            q = tl.load(Q + p * sqp + r[:, None] * sqn + d[None, :] * sqd, mask=rok[:, None] & dmask[None, :],
                        other=0.0)
            s_i = tl.dot(q, tl.trans(c_i), input_precision=QK_PREC)
        else:
            s_i = _scores_chunked(Q, C, p, r, rok, ci, t, D, sqp, sqn, sqd, scp, sct, scd, BN, BT, BK, BD, QK_PREC)
        sh = tl.load(SHIFT + p * ssp + r * ssn, mask=rok, other=0.0) * 1.4426950408889634
        a_i = _exp_tile(s_i, b_i, sh, rok, ci < t, qk_scale, HAS_BETA)
        if HAS_Y:
            y = tl.load(Y + p * syp + r[:, None] * syn + ce[None, :] * sye, mask=rok[:, None] & (ce[None, :] < e),
                        other=0.0)
        else:
            y = tl.where(rok[:, None] & (ce[None, :] < e), 1.0, 0.0)
        acc = tl.dot(tl.trans(a_i), y, acc, input_precision=G_PREC)
    tl.store(R + p * srp + ci[:, None] * srt + ce[None, :] * sre, acc, mask=(ci[:, None] < t) & (ce[None, :] < e))


def _blocks(t: int, n: int, D: int, e: int, fp32: bool, interpreted: bool = None):
    """``(BT, BN, BD, BK, BE, num_warps, num_stages)`` of a launch.

    16-bit inputs keep the two key tiles for the whole query loop (``BK = BD``: loaded once, only
    the queries stream). Float32 inputs compute the scores in ``BK = 16``-wide head-dim slices on
    small tiles: ``tf32x3`` keeps hi/lo copies of both operands, and over a whole 128-wide head
    dim with the former 64 x 64 tiles, 4 warps and 3 stages it needed 262 KB of shared memory
    (H100/H200 allow 227 KiB) and spilled 2 KB of registers. Measured for sm_90 by
    ``bench/sm90_resources.py`` (``tests/test_sm90_resources.py`` asserts the limits): float32
    hd128 on 16 x 16 tiles now 41 KB and a spill of 68 bytes with Triton 3.6 (12 with 3.8; hd64
    on 32 x 32 tiles spilled 64 bytes with 3.6); not
    zero: every float32 tile shape tried spills a little with ``tf32x3`` scores, as the compiler
    keeps the loop-invariant key slices in registers, and 32 x 32 tiles spilled 888 bytes with
    Triton 3.6 (96 with 3.8). Float32 above head dim 128 spilled > 2 KB with any tiles and is
    refused in ``_supports`` (``auto`` falls back); 16-bit inputs do not spill.
    """
    bd = max(16, triton.next_power_of_2(D))
    if triton_interpreted() if interpreted is None else interpreted:
        return 16, 16, bd, (bd if not fp32 or bd <= 16 else 16), 16, 4, 1
    be = min(64, max(16, triton.next_power_of_2(e)))
    if fp32:
        return 16, 16, bd, min(bd, 16), min(be, 32), 4, 2
    if bd > 128:
        return 32, 32, bd, bd, min(be, 32), 4, 2
    return 64 if t > 32 else 32, 32, bd, bd, be, 4, 2


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
    bt, bn, bd, bk, be, warps, stages = _blocks(t, n, D, e, Q.dtype == torch.float32)
    interp = triton_interpreted()
    qk_prec = ("ieee" if interp else "tf32x3") if Q.dtype == torch.float32 else None
    g_prec = "ieee" if interp else "tf32x3"
    qk_scale = float(scale) * _LOG2E
    nt = triton.cdiv(t, bt)
    common = dict(HAS_BETA=beta is not None, BT=bt, BN=bn, BD=bd, BK=bk, QK_PREC=qk_prec, G_PREC=g_prec,
                  num_warps=warps, num_stages=stages)
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
    if Q is not None and Q.dtype == torch.float32 and Q.shape[-1] > FP32_MAX_HEAD_DIM:
        return (f"float32 inputs at head dim D={Q.shape[-1]} > {FP32_MAX_HEAD_DIM} spill registers in the Triton "
                "exp_gram kernel (tf32x3 scores, measured for sm_90); use float16/bfloat16, or another backend")
    return None


op("exp_gram").register("triton", exp_gram_triton, supports=_supports)
