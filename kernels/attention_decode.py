"""Block-decode path of the Triton attention backend: split-K (flash-decoding) with GQA packing.

For a short query block (``Lq`` up to 64, e.g. one diffusion block of 32) against a long cache,
the work per (batch, KV head) is memory-bound: every K/V element is read once and used for all
``G * Lq`` query rows of the ``G = Hq // Hkv`` query heads that share it. So the rows of one tile
are the packed pairs ``(query i, head g)`` (row ``r`` -> ``i = r // G``, ``g = r % G``) and the
key axis is cut into ``num_splits`` chunks, one program each, to fill the GPU. Each program
writes its normalised partial output and its log2-domain lse; a combine kernel merges the
chunks. With one split the decode kernel writes the final output directly.

Inside a chunk the key tiles are classified as in the prefill kernel (full tiles without a mask,
partial tiles with the per-row limit, empty tiles never loaded).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (LN2, LOG2E_F, autotune_enabled, big_shared_memory, bucket, is_interpreted,
                               sample_key_range, sm_count)
from .attention_prefill import attend_tiles, key_limit

__all__ = ["decode", "decode_configs", "decode_plan", "candidate_configs"]

# a split's key chunk is a multiple of this (>= every BLOCK_N of the configs) so that key tiles
# never straddle two splits
CHUNK_ALIGN = 32 if is_interpreted() else 128
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 128


def _cfg(block_n, warps, stages):
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def decode_configs():
    """Autotune candidates (sm_90, measured offline with ptxas: 128-row tiles need 8 warps)."""
    if is_interpreted():
        return [_cfg(32, 4, 1)]
    return [_cfg(64, 8, 3), _cfg(64, 8, 4), _cfg(128, 8, 3), _cfg(32, 8, 4),
            _cfg(64, 4, 3), _cfg(64, 4, 4), _cfg(128, 4, 3), _cfg(32, 4, 4)]


FP32_CONFIG = _cfg(16, 4, 1)  # exact float32 dots: small tiles (compile time)
AUTOTUNE_MIN_KEYS = 4096      # Lk bucket below which the default config is used


def default_config(head_dim: int, block_m: int, big_smem: bool = True):
    """The config used without autotuning; compiled for sm_90 by ``bench/sm90_resources.py``
    (launch-time specialisation of a contiguous cache): no register spills. Head dim 256 needs 8
    warps from 32 rows on (4 warps spilled 8 B at 32 rows and 120 B at 64)."""
    if head_dim > 128:
        return _cfg(32, 8 if block_m >= 32 else 4, 2)
    if block_m >= 128 and head_dim > 64:
        return _cfg(64, 8, 3) if big_smem else _cfg(32, 8, 3)  # 132 KB / ~82 KB
    return _cfg(64, 4, 3)  # <= 78 KB


def candidate_configs(head_dim: int, block_m: int, is_fp32: bool, lk_key: int, big_smem: bool = True):
    """The configs the autotuner may try for one launch; a single one is launched directly.

    One config (the default) below ``AUTOTUNE_MIN_KEYS``, with autotuning off, in float32 and in
    the interpreter: no benchmarking, so no stall when ``Lk`` crosses a bucket and no
    ``do_bench`` under CUDA-graph capture (Triton 3.6 benchmarks even a single pruned config).
    """
    if is_interpreted():
        return decode_configs()
    if is_fp32:
        return [FP32_CONFIG]
    if not autotune_enabled() or lk_key < AUTOTUNE_MIN_KEYS:
        return [default_config(head_dim, block_m, big_smem)]
    return [c for c in decode_configs() if head_dim <= 64 or block_m < 128 or c.num_warps >= 8]


def _prune(configs, named_args, **kwargs):
    return candidate_configs(kwargs["HEAD_DIM"], kwargs["BLOCK_M"], kwargs.get("IS_FP32", False),
                             named_args["LK_KEY"], big_shared_memory(named_args["Q"]))


def decode_block_m(rows: int, head_dim: int, fp32: bool = False) -> int:
    """Rows (query x head pairs) per tile: all of them up to 128 (64 above head dim 128, 32 in float32)."""
    cap = 32 if (fp32 and not is_interpreted()) else (128 if head_dim <= 128 else 64)
    return min(max(16, triton.next_power_of_2(rows)), cap)


def decode_plan(B: int, Hkv: int, rows: int, Lk: int, head_dim: int, device: torch.device,
                num_splits: int = 0, fp32: bool = False):
    """``(BLOCK_M, m_tiles, num_splits, chunk)`` for a decode launch, from the shapes only.

    ``num_splits = 0`` picks enough splits for about two CTAs per multiprocessor, each split
    covering at least ``MIN_KEYS_PER_SPLIT`` keys and at most ``Lk / (8 * rows)`` splits (so the
    float32 partials cost at most a quarter of the 16-bit K/V traffic); a positive value is taken
    as given (tests).
    """
    block_m = decode_block_m(rows, head_dim, fp32)
    m_tiles = triton.cdiv(rows, block_m)
    base = B * Hkv * m_tiles
    if num_splits <= 0:
        sms = 4 if (is_interpreted() or device.type != "cuda") else sm_count(device.index or 0)
        # the fp32 partials (S x rows x D, written and read back by the combine) stay <= 1/4 of the
        # K/V bytes at 16 bits: S <= Lk / (8 * rows per KV head), the rule of the CUDA path
        traffic_cap = max(1, Lk // (8 * max(rows, 1)))
        num_splits = min(triton.cdiv(2 * sms, base), triton.cdiv(max(Lk, 1), MIN_KEYS_PER_SPLIT), traffic_cap,
                         MAX_SPLITS)
    num_splits = max(1, min(num_splits, triton.cdiv(max(Lk, 1), CHUNK_ALIGN)))
    chunk = triton.cdiv(triton.cdiv(max(Lk, 1), num_splits), CHUNK_ALIGN) * CHUNK_ALIGN
    num_splits = triton.cdiv(max(Lk, 1), chunk)  # no trailing empty split
    return block_m, m_tiles, num_splits, chunk


@triton.autotune(configs=decode_configs(), key=["LK_KEY", "HEAD_DIM", "BLOCK_M", "DIRECT", "HAS_BIAS", "IS_FP32"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit(do_not_specialize=["Hkv", "G", "Lq", "Lk", "q_offset", "block_size", "chunk", "num_splits", "LK_KEY"])
def _decode_kernel(
    Q, K, V, Bias, Prefix, KvLens, Out, Lse, OPart, LPart,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn,
    sob, soh, som, sod, slb, slh, slm,
    Hkv, G, Lq, Lk, q_offset, block_size, qk_scale, chunk, num_splits,
    LK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_BLOCK: tl.constexpr, IS_FP32: tl.constexpr,
    DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    mt = tl.program_id(0)  # the m-tiles of one split are neighbours: they share K/V tiles in L2
    split = tl.program_id(1)
    pid_bk = tl.program_id(2)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)

    cap, prefix = sample_key_range(Prefix, KvLens, b, Lk, HAS_KVLENS)

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Lq
    qi = rows // G                      # query index (rows are query-major)
    h64 = (kvh * G + rows % G).to(tl.int64)  # query head
    offs_d = tl.arange(0, BLOCK_D)
    lim_m = key_limit(q_offset + qi, prefix, cap, block_size, HAS_BLOCK)
    lim_m = tl.where(row_ok, lim_m, 0)
    lo = tl.min(tl.where(row_ok, lim_m, cap), 0)
    hi = tl.max(lim_m, 0)

    start = split * chunk
    end = tl.maximum(tl.minimum(start + chunk, hi), start)
    lo_c = tl.minimum(tl.maximum(lo, start), end)
    full_end = start + ((lo_c - start) // BLOCK_N) * BLOCK_N  # operands >= 0

    q_ptrs = Q + b64 * sqb + h64[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :] * sqd
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
                                 start, full_end, lim_m, offs_d, qk_scale,
                                 HEAD_DIM, BLOCK_N, False, HAS_BIAS, EVEN_D, IS_FP32)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, k_base, v_base, b_base, skn, skd, svn, svd, sbn,
                                 full_end, end, lim_m, offs_d, qk_scale,
                                 HEAD_DIM, BLOCK_N, True, HAS_BIAS, EVEN_D, IS_FP32)

    seen = l_i > 0.0
    out = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    d_mask = offs_d[None, :] < HEAD_DIM
    if DIRECT:
        o_ptrs = Out + b64 * sob + h64[:, None] * soh + qi[:, None] * som + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask)
        tl.store(Lse + b64 * slb + h64 * slh + qi * slm, lse2 * LN2, mask=row_ok)
    else:
        # partials: OPart [B, Hq, Lq, S, D] and LPart [B, Hq, Lq, S], contiguous, fp32
        prow = ((b64 * (Hkv * G) + h64) * Lq + qi) * num_splits + split
        tl.store(OPart + prow[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_mask)
        tl.store(LPart + prow, lse2, mask=row_ok)


@triton.jit(do_not_specialize=["Hq", "Lq", "num_splits"])
def _combine_kernel(
    OPart, LPart, Out, Lse,
    sob, soh, som, sod, slb, slh, slm,
    Hq, Lq, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr,
):
    pid = tl.program_id(0)  # one (b, h, i) row
    i = pid % Lq
    bh = pid // Lq
    h = bh % Hq
    b = bh // Hq
    row = pid.to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse_s = tl.load(LPart + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_use)
    denom = tl.sum(w, 0)
    o = tl.load(OPart + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.sum(w[:, None] * o, 0)
    seen = denom > 0.0
    out = acc / tl.where(seen, denom, 1.0)
    lse = tl.where(seen, (m_use + tl.log2(tl.where(seen, denom, 1.0))) * LN2, float("-inf"))
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tl.store(Out + b64 * sob + h64 * soh + i * som + offs_d * sod, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + b64 * slb + h64 * slh + i * slm, lse)


def decode(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, out, lse, alloc,
           num_splits: int = 0):
    """Launch the split-K decode kernel (+ the combine kernel when split); writes ``out`` and ``lse``.

    ``alloc(shape, dtype, device)`` allocates the fp32 partial buffers.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    block_m, m_tiles, splits, chunk = decode_plan(B, Hkv, G * Lq, Lk, D, q.device, num_splits,
                                                  q.dtype == torch.float32)
    direct = splits == 1
    if direct:
        opart = lpart = lse  # dummies, never written
    else:
        opart = alloc((B, Hq, Lq, splits, D), torch.float32, q.device)
        lpart = alloc((B, Hq, Lq, splits), torch.float32, q.device)
    bias_t = bias if bias is not None else q
    sb = bias.stride() if bias is not None else (0, 0, 0)
    kvl = kv_lens if kv_lens is not None else prefix_len
    is_fp32 = q.dtype == torch.float32
    configs = candidate_configs(D, block_m, is_fp32, bucket(Lk), big_shared_memory(q))
    kernel, tuning = _decode_kernel, {}
    if len(configs) == 1:  # launch the JIT kernel directly: never a benchmark
        kernel = _decode_kernel.fn
        tuning = dict(configs[0].kwargs, num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
    kernel[(m_tiles, splits, B * Hkv)](
        q, k, v, bias_t, prefix_len, kvl, out, lse, opart, lpart,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(), *lse.stride(),
        Hkv, G, Lq, Lk, q_offset, max(block_size, 1), scale * LOG2E_F, chunk, splits,
        bucket(Lk),
        HEAD_DIM=D, BLOCK_D=block_d, HAS_BIAS=bias is not None, HAS_KVLENS=kv_lens is not None,
        HAS_BLOCK=block_size > 0, IS_FP32=is_fp32, DIRECT=direct, BLOCK_M=block_m, **tuning,
    )
    if not direct:
        _combine_kernel[(B * Hq * Lq,)](
            opart, lpart, out, lse, *out.stride(), *lse.stride(), Hq, Lq, splits,
            HEAD_DIM=D, BLOCK_D=block_d, S_PAD=max(2, triton.next_power_of_2(splits)),
            num_warps=4 if block_d * triton.next_power_of_2(splits) <= 8192 else 8,
        )
