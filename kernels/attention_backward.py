"""Triton backward of :func:`cdlm_fast.attention` (registered as backend ``"triton"`` of the op
``attention_bwd``, see :mod:`cdlm_fast.ops.attention_grad` for the math).

FlashAttention-2 style, two passes that recompute ``P = exp(s - lse)`` from ``q``, ``k``, ``bias``
and the saved ``lse`` (nothing of size ``Lq x Lk`` is stored), with ``D = rowsum(dout * out) - dlse``
precomputed:

* ``dq`` pass: one program per (query tile, batch, query head), over the key tiles that tile can
  see, split like the forward into *full* tiles (no mask) and *partial* tiles (masked per row);
* ``dk / dv / dbias`` pass: one program per (key tile, batch, KV head). It loops over the ``G``
  query heads of the group and over the query tiles that can see the key tile, so the GQA sums of
  ``dk``, ``dv`` and ``dbias`` are done in registers, without atomics. The first query that can see
  key ``j`` has a closed form (the limits are non-decreasing in the query index):
  ``0`` for a prompt key, ``prefix + block(j) * block_size - q_offset`` for a generated one.

Scores are in the log2 domain (``exp2``). Rows that see no key (``lse = -inf``) and keys with
``bias = -inf`` get ``P = 0`` and so exactly zero gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from cdlm_fast.backends import op

from .attention_common import LOG2E, LOG2E_F, is_interpreted, sample_key_range
from .attention_prefill import key_limit

__all__ = ["attention_backward_triton", "supports", "block_config"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q, k, v, bias=None, **_) -> Optional[str]:
    """``None`` if the Triton backward handles these inputs, else the reason."""
    if q.dtype not in _DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')} is not supported by the triton backward"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bfloat16 does not run in the Triton interpreter (CPU)"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is not supported by the triton backward (1..{MAX_HEAD_DIM})"
    if bias is not None and bias.dtype != torch.float32:
        return "bias must be float32 for the triton backward"
    return None


def block_config(head_dim: int, dtype: torch.dtype):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of both passes (no autotuning yet).

    Chosen by compiling ahead of time for sm_90 (``python bench/check_backward_sm90.py``, ptxas
    ``-v``): no register spills for float16/bfloat16 up to head dim 256 and float32 up to 64.
    """
    if is_interpreted():
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return (32, 32, 4, 1) if head_dim <= 64 else (16, 32, 4, 1)
    if head_dim <= 64:
        return 64, 64, 8, 2
    return (32, 64, 8, 2) if head_dim <= 128 else (32, 32, 8, 1)


def _empty(shape, dtype, device):
    """Gradient allocation (a hook: the tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    if IS_FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
              start, end, lim_m, offs_d, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < end
        kmask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)
        qk = _dot(q, tl.trans(k), IS_FP32) * qk_scale
        if HAS_BIAS:
            beta = tl.load(b_base + offs_n * sbn, mask=n_ok, other=0.0)
            qk = qk + (beta * LOG2E)[None, :]
        if MASKED:
            qk = tl.where(offs_n[None, :] < lim_m[:, None], qk, float("-inf"))
        p = tl.exp2(qk - lse2[:, None])
        dp = _dot(do, tl.trans(v), IS_FP32)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, IS_FP32) + dq
    return dq


@triton.jit(do_not_specialize=["Hq", "G", "Lq", "Lk", "q_offset", "block_size"])
def _bwd_dq_kernel(
    Q, K, V, Bias, Prefix, KvLens, DO, Lse, Delta, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn,
    sdob, sdoh, sdom, sdod, slb, slh, slm, sdqb, sdqh, sdqm, sdqd,
    Hq, G, Lq, Lk, q_offset, block_size, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_BLOCK: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // G
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = kvh.to(tl.int64)

    cap, prefix = sample_key_range(Prefix, KvLens, b, Lk, HAS_KVLENS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(Lse + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
    seen = lse > float("-inf")
    lse2 = tl.where(seen, lse * LOG2E, 0.0)
    delta = tl.load(Delta + (b64 * Hq + h64) * Lq + offs_m, mask=row_ok, other=0.0)
    lim_m = key_limit(q_offset + offs_m, prefix, cap, block_size, HAS_BLOCK)
    lim_m = tl.where(row_ok & seen, lim_m, 0)
    lo = tl.min(tl.where(row_ok, lim_m, cap), 0)
    hi = tl.max(lim_m, 0)
    full_end = (lo // BLOCK_N) * BLOCK_N

    qmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=qmask,
                 other=0.0)
    k_base = K + b64 * skb + kvh64 * skh
    v_base = V + b64 * svb + kvh64 * svh
    b_base = Bias + b64 * sbb + kvh64 * sbh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
                   0, full_end, lim_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, False, HAS_BIAS, IS_FP32)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
                   full_end, hi, lim_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, True, HAS_BIAS, IS_FP32)
    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=["Hkv", "G", "Lq", "Lk", "q_offset", "block_size"])
def _bwd_dkv_kernel(
    Q, K, V, Bias, Prefix, KvLens, DO, Lse, Delta, DK, DV, DB,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn,
    sdob, sdoh, sdom, sdod, slb, slh, slm,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    Hkv, G, Lq, Lk, q_offset, block_size, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_BLOCK: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)

    cap, prefix = sample_key_range(Prefix, KvLens, b, Lk, HAS_KVLENS)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < HEAD_DIM
    kmask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * skb + kvh64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b64 * svb + kvh64 * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)
    if HAS_BIAS:
        beta2 = tl.load(Bias + b64 * sbb + kvh64 * sbh + offs_n * sbn, mask=n_ok, other=0.0) * LOG2E

    # first query that can see key n0 (limits are non-decreasing in the query index)
    first_p = n0 * 0
    if HAS_BLOCK:
        rel = n0 - prefix
        first_p = tl.where(rel < 0, 0, prefix + (tl.maximum(rel, 0) // block_size) * block_size)
    first_i = tl.maximum(first_p - q_offset, 0)
    start_m = tl.where(n0 < cap, (first_i // BLOCK_M) * BLOCK_M, Lq)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M)
    for g in range(0, G):
        h64 = kvh64 * G + g
        for start in range(start_m, Lq, BLOCK_M):
            offs_m = start + offs_m0
            row_ok = offs_m < Lq
            qmask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask,
                        other=0.0)
            do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                         mask=qmask, other=0.0)
            lse = tl.load(Lse + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=float("-inf"))
            seen = lse > float("-inf")
            lse2 = tl.where(seen, lse * LOG2E, 0.0)
            delta = tl.load(Delta + (b64 * (Hkv * G) + h64) * Lq + offs_m, mask=row_ok, other=0.0)
            lim_m = key_limit(q_offset + offs_m, prefix, cap, block_size, HAS_BLOCK)
            lim_m = tl.where(row_ok & seen, lim_m, 0)
            qk = _dot(q, tl.trans(k), IS_FP32) * qk_scale
            if HAS_BIAS:
                qk = qk + beta2[None, :]
            qk = tl.where(offs_n[None, :] < lim_m[:, None], qk, float("-inf"))
            p = tl.exp2(qk - lse2[:, None])                       # [BLOCK_M, BLOCK_N]
            dv = _dot(tl.trans(p.to(do.dtype)), do, IS_FP32) + dv
            dp = _dot(do, tl.trans(v), IS_FP32)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, IS_FP32) + dk
            db += tl.sum(ds, 0)
    dk = dk * scale
    tl.store(DK + b64 * sdkb + kvh64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b64 * sdvb + kvh64 * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kmask)
    if HAS_BIAS:
        tl.store(DB + (b64 * Hkv + kvh64) * Lk + offs_n, db, mask=n_ok)


def attention_backward_triton(dout, dlse, q, k, v, bias, out, lse, prefix_len, kv_lens, q_offset, block_size,
                              scale):
    """``(dq, dk, dv, dbias)`` of the attention forward (shapes and arguments as in
    :func:`cdlm_fast.ops.attention_grad.attention_backward_torch`; ``dlse`` may be ``None``).
    ``dq``/``dk``/``dv`` in the input dtype, ``dbias`` ``[B, Hkv, Lk]`` float32 (``None`` without bias)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dq = _empty((B, Hq, Lq, D), q.dtype, q.device)
    dk = _empty((B, Hkv, Lk, D), k.dtype, k.device)
    dv = _empty((B, Hkv, Lk, D), v.dtype, v.device)
    db = _empty((B, Hkv, Lk), torch.float32, q.device) if bias is not None else None
    if q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv, db):
            if t is not None:
                t.zero_()
        return dq, dk, dv, db
    lse = lse.float()
    seen = torch.isfinite(lse)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(seen, dlse.float(), torch.zeros_like(delta))
    delta = delta.contiguous()
    block_size = min(block_size, q_offset + Lq + Lk + 1) if block_size > 0 else 0
    prefix_len = prefix_len.to(device=q.device, dtype=torch.int32).contiguous()
    kvl = kv_lens.to(device=q.device, dtype=torch.int32).contiguous() if kv_lens is not None else prefix_len
    bias_t = bias if bias is not None else q
    sb = bias.stride() if bias is not None else (0, 0, 0)
    block_m, block_n, warps, stages = block_config(D, q.dtype)
    block_d = max(16, triton.next_power_of_2(D))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, HAS_BIAS=bias is not None, HAS_KVLENS=kv_lens is not None,
                HAS_BLOCK=block_size > 0, IS_FP32=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps, num_stages=stages)
    common = (*q.stride(), *k.stride(), *v.stride(), *sb, *dout.stride(), *lse.stride())
    _bwd_dq_kernel[(triton.cdiv(Lq, block_m), B * Hq)](
        q, k, v, bias_t, prefix_len, kvl, dout, lse, delta, dq, *common, *dq.stride(),
        Hq, G, Lq, Lk, q_offset, max(block_size, 1), scale * LOG2E_F, scale, **meta)
    _bwd_dkv_kernel[(triton.cdiv(Lk, block_n), B * Hkv)](
        q, k, v, bias_t, prefix_len, kvl, dout, lse, delta, dk, dv, db if db is not None else dk,
        *common, *dk.stride(), *dv.stride(),
        Hkv, G, Lq, Lk, q_offset, max(block_size, 1), scale * LOG2E_F, scale, **meta)
    return dq, dk, dv, db


op("attention_bwd").register("triton", attention_backward_triton, supports=supports)
