"""Prefill path of the Triton attention backend: block-causal flash attention with a per-key bias.

One program computes one ``BLOCK_M`` tile of queries of one (batch, query head). The key
range it visits follows the block-causal limits (see :mod:`cdlm_fast.ops.attention`):
every query ``i`` sees exactly the keys ``[0, limit(i))`` (before ``-inf`` bias entries), and
``limit`` is non-decreasing in ``i``. For a query tile with smallest limit ``lo`` and largest
``hi`` the key tiles split into

* *full* tiles ``[0, lo)`` (rounded down to ``BLOCK_N``): visible to every row, no mask;
* *partial* tiles ``[.., hi)``: masked per row with ``j < limit(i)``;
* *empty* tiles ``[hi, Lk)``: never loaded.

So the cost follows the visible area, not ``Lq * Lk``. ``beta`` (the bias) is loaded once per key
tile as a vector and broadcast over the rows. GQA reads K/V head ``h // G`` in place. Scores are
kept in the log2 domain (``exp2``); ``lse`` is returned as a natural log.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (LN2, LOG2E, LOG2E_F, autotune_enabled, big_shared_memory, bucket, is_interpreted,
                               sample_key_range)

__all__ = ["prefill", "prefill_configs", "candidate_configs"]


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def prefill_configs():
    """Autotune candidates (H100-class; those that do not fit a GPU are skipped by the autotuner).

    Measured offline for sm_90 (ptxas): with head dim 128, 128-row tiles need 8 warps (4 spill).
    """
    if is_interpreted():
        return [_cfg(32, 32, 4, 1)]
    return [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 3), _cfg(128, 32, 8, 4),
            _cfg(128, 64, 4, 3), _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 4),
            _cfg(64, 128, 4, 3), _cfg(64, 64, 4, 4)]


# float32 uses exact (non-TF32) dots, which are slow to compile with large tiles: one small config
FP32_CONFIG = _cfg(32, 16, 4, 1)
AUTOTUNE_MIN_AREA = 1 << 20  # Lq_bucket * Lk_bucket below which the default config is used


def default_config(head_dim: int, big_smem: bool = True):
    """The config used without autotuning (no register spills on sm_90; fits the GPU's shared memory)."""
    if head_dim <= 64:
        return _cfg(128, 64, 8, 3)  # 66 KB
    if head_dim <= 128:
        return _cfg(128, 64, 8, 3) if big_smem else _cfg(64, 32, 4, 3)  # 132 KB / ~66 KB
    return _cfg(64, 32, 8, 2) if big_smem else _cfg(32, 32, 4, 2)  # 64 rows on 4 warps spilled 32 B


def candidate_configs(head_dim: int, is_fp32: bool, lq_key: int, lk_key: int, big_smem: bool = True):
    """The configs the autotuner may try for one launch; a single one is launched directly
    (no benchmark: see :func:`cdlm_fast.kernels.attention_decode.candidate_configs`)."""
    if is_interpreted():
        return prefill_configs()
    if is_fp32:
        return [FP32_CONFIG]
    if not autotune_enabled() or lq_key * lk_key < AUTOTUNE_MIN_AREA:
        return [default_config(head_dim, big_smem)]
    return [c for c in prefill_configs() if head_dim <= 64 or c.kwargs["BLOCK_M"] < 128 or c.num_warps >= 8]


def _prune(configs, named_args, **kwargs):
    return candidate_configs(kwargs["HEAD_DIM"], kwargs.get("IS_FP32", False), named_args["LQ_KEY"],
                             named_args["LK_KEY"], big_shared_memory(named_args["Q"]))


@triton.jit
def key_limit(pos, prefix, cap, block_size, HAS_BLOCK: tl.constexpr):
    """Number of keys visible to the query at key index ``pos`` (``prefix <= cap`` already)."""
    if HAS_BLOCK:
        rel = pos - prefix
        gen = prefix + block_size * (tl.maximum(rel, 0) // block_size + 1)
        lim = tl.where(rel < 0, prefix, gen)
        lim = tl.minimum(lim, cap)
    else:
        lim = pos * 0 + cap
    return lim


@triton.jit
def attend_tiles(acc, l_i, m_i, q, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
                 start, end, lim_m, offs_d, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, IS_FP32: tl.constexpr):
    """Online-softmax over the key tiles ``[start, end)`` (``start`` a multiple of ``BLOCK_N``).

    ``MASKED`` tiles apply ``j < lim_m[row]`` (and bound the loads by ``end``); unmasked tiles are
    entirely visible to every row. Scores are in the log2 domain.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kt_ptrs = k_base + offs_d[:, None] * skd + offs_n[None, :] * skn  # [BLOCK_D, BLOCK_N]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :] * svd   # [BLOCK_N, BLOCK_D]
        if MASKED:
            n_ok = offs_n < end
            if EVEN_D:
                kt = tl.load(kt_ptrs, mask=n_ok[None, :], other=0.0)
                vt = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                vt = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(kt_ptrs)
                vt = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
                vt = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if IS_FP32:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = qk * qk_scale
        if HAS_BIAS:
            # beta: one vector load per key tile, broadcast over all rows of the tile
            if MASKED:
                beta = tl.load(b_base + offs_n * sbn, mask=n_ok, other=0.0)
            else:
                beta = tl.load(b_base + offs_n * sbn)
            qk = qk + (beta * LOG2E)[None, :]
        if MASKED:
            qk = tl.where(offs_n[None, :] < lim_m[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows that have seen no key yet keep m = -inf: shift by 0 so that -inf - -inf never occurs
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IS_FP32:
            acc = tl.dot(p, vt, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=prefill_configs(), key=["LQ_KEY", "LK_KEY", "HEAD_DIM", "HAS_BIAS", "HAS_BLOCK", "IS_FP32"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit(do_not_specialize=["Hq", "G", "Lq", "Lk", "q_offset", "block_size", "LQ_KEY", "LK_KEY"])
def _prefill_kernel(
    Q, K, V, Bias, Prefix, KvLens, Out, Lse,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn,
    sob, soh, som, sod, slb, slh, slm,
    Hq, G, Lq, Lk, q_offset, block_size, qk_scale,
    LQ_KEY, LK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_BLOCK: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # heaviest query tiles (largest key ranges) first: better load balance under causal masks
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
    lim_m = key_limit(q_offset + offs_m, prefix, cap, block_size, HAS_BLOCK)
    lim_m = tl.where(row_ok, lim_m, 0)
    lo = tl.min(tl.where(row_ok, lim_m, cap), 0)  # smallest limit in the tile
    hi = tl.max(lim_m, 0)                         # largest limit in the tile
    full_end = (lo // BLOCK_N) * BLOCK_N          # lo >= 0

    q_ptrs = Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    k_base = K + b64 * skb + kvh64 * skh
    v_base = V + b64 * svb + kvh64 * svh
    b_base = Bias + b64 * sbb + kvh64 * sbh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
                                 0, full_end, lim_m, offs_d, qk_scale,
                                 HEAD_DIM, BLOCK_N, False, HAS_BIAS, EVEN_D, IS_FP32)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
                                 full_end, hi, lim_m, offs_d, qk_scale,
                                 HEAD_DIM, BLOCK_N, True, HAS_BIAS, EVEN_D, IS_FP32)

    seen = l_i > 0.0
    out = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_ptrs = Out + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + b64 * slb + h64 * slh + offs_m * slm, lse, mask=row_ok)


def prefill(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, out, lse):
    """Launch the prefill kernel; writes ``out`` ``[B, Hq, Lq, D]`` and ``lse`` ``[B, Hq, Lq]``."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    bias_t = bias if bias is not None else q  # dummy pointer, never read
    sb = bias.stride() if bias is not None else (0, 0, 0)
    kvl = kv_lens if kv_lens is not None else prefix_len  # dummy pointer, never read

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)

    is_fp32 = q.dtype == torch.float32
    configs = candidate_configs(D, is_fp32, bucket(Lq), bucket(Lk), big_shared_memory(q))
    kernel, tuning = _prefill_kernel, {}
    if len(configs) == 1:  # launch the JIT kernel directly: never a benchmark
        kernel = _prefill_kernel.fn
        tuning = dict(configs[0].kwargs, num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
    kernel[grid](
        q, k, v, bias_t, prefix_len, kvl, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(), *lse.stride(),
        Hq, Hq // Hkv, Lq, Lk, q_offset, max(block_size, 1), scale * LOG2E_F,
        bucket(Lq), bucket(Lk),
        HEAD_DIM=D, BLOCK_D=block_d, HAS_BIAS=bias is not None, HAS_KVLENS=kv_lens is not None,
        HAS_BLOCK=block_size > 0, IS_FP32=is_fp32, **tuning,
    )
