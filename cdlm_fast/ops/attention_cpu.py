"""The ``"torch"`` backend of :func:`cdlm_fast.attention`: fast on the CPU, exact semantics.

It serves every CPU call (``backend="auto"`` on the CPU resolves here) and CUDA tensors that
neither the Triton nor the CUDA kernels accept (float64, unusual head dims). It is *not* the
dense oracle of the tests (:mod:`cdlm_fast.reference.attention`), which stays as it is.

How it works: the visible keys of query ``i`` are always a prefix ``[0, limit_i)`` of the key
axis (before the ``-inf`` entries of the bias), and ``limit`` is non-decreasing in ``i``. So a
tile of queries ``[i0, i1)`` splits the keys into

* a **common part** ``[0, lo)``, ``lo = min limit`` over the tile: visible to every row, only
  the bias applies. The kernel reads the bias as a ``[B, Hkv, 1, lo]`` mask broadcast over the
  rows (stride 0, nothing materialised), or no mask at all without a bias;
* a **band** ``[lo, hi)``, ``hi = max limit``: the only place where a ``[rows, hi - lo]`` float
  mask is built; keys at or past ``hi`` are never read (so causal prefill does about half the
  work of a full-mask call).

The two parts are combined exactly through their log-sum-exps (``lse = logaddexp(lse_c,
lse_b)``, ``out = e^(lse_c - lse) out_c + e^(lse_b - lse) out_b``). GQA: the ``G`` query heads
of a KV head are folded into the rows of one problem (``[B, Hkv, G * rows, D]``), so K/V are
never repeated. Rows with no visible key (geometry, ``kv_lens`` or an all ``-inf`` bias) get
zeros and ``lse = -inf``; they are found from a prefix count of the finite bias entries (in
the one-call path below, only when the kernel reports some ``lse == 0``, its value for such rows).

Each part runs on the CPU in PyTorch's flash-attention kernel that returns the log-sum-exp,
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (float32 / bfloat16 / float16
with a float32 mask, float64 with a float64 mask; bfloat16 and float16 accumulate in float32).
On other devices (or if that op is missing) each part is a dense float32 / float64 softmax of
the tile's ``[rows, hi]`` scores: memory ``O(rows * Lk)``, never ``O(Lq * Lk)``.

Rule (chosen by measurement on a 2-core x86 CPU, ``python bench/cpu_report.py``):

* all rows of the call share one limit (a decode block on the block grid, a bidirectional call,
  a single query; decided by host arithmetic on the first and last query): **one** kernel call,
  no mask tensor at all (bias broadcast over the rows). With host-int lengths and no ``kv_lens``
  :func:`cdlm_fast.attention` reaches it through :func:`shared_call` after one combined argument
  check, building no length tensor (the decode hot path). Each KV head's folded rows are cut into
  :func:`row_chunks` chunks, passed as heads over the same K/V (stride 0), when that spreads the
  kernel's work items more evenly over the threads (float32 / float64; SmolLM2's 3 KV heads x 96
  rows on 2 threads: 2 chunks, 3-13% less time than one; without the lse, the check for heads that
  see no key is skipped). Where the C++ CPU extension is built, that call runs in one C++ function
  (``cdlm_fast._cpu.decode``, csrc/cpu/decode.cpp) instead of a dozen Python-level ops;
* causal rows (``limit_i = q_offset + i + 1``, e.g. a transformers prefill): the cached keys before
  ``q_offset`` as a common part, the last ``Lq`` keys in **one** call with the kernel's own causal
  mask (it skips the masked tiles; K/V of that band repeated to the query heads, since folded rows
  would not line up with the diagonal); measured on par with SDPA ``is_causal`` + ``enable_gqa``;
* otherwise tiles: runs of queries with equal limits (a prompt is one run, one call), shorter runs
  packed up to ``QUERY_TILE`` queries, each tile a common part plus a band, as above.

Against SDPA with a materialised float mask the gain is the mask that is never built or read, and
(prefill) the masked tiles never computed; in decode the kernel work is the same, so the two are
on par there. FlexAttention is not used: on the CPU it needs ``torch.compile`` (a C++ toolchain
and a compile per shape), and the calls above already skip the masked tiles. A dense chunked
softmax over the folded rows (one GEMM per KV head) measured 1.3-2.6x slower than the flash kernel
for decode blocks.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["attention_torch", "key_limits", "visible_mask", "shared_call", "row_chunks", "QUERY_TILE"]

# Queries per tile of the banded path (block-causal generated parts): bounds the band's mask
# to QUERY_TILE * G rows.
QUERY_TILE = 256

# The CPU flash kernel that also returns the lse; its ``torch.`` binding skips the Python layer of
# ``torch.ops`` (a few microseconds per decode call).
_FLASH_CPU: Optional[Callable] = (getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)
                                  or getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None))


def _load_decode_cpp() -> Tuple[Optional[Callable], Optional[str]]:
    """``(cdlm_fast._cpu.decode, None)`` (csrc/cpu/decode.cpp: the row-chunked one-call path of
    :func:`_shared` in C++), or ``(None, reason)`` where the C++ CPU extension is not built or does
    not load (then the same call runs in Python)."""
    try:
        from .. import _cpu
    except Exception as e:  # noqa: BLE001 - not built, or built against another torch
        return None, (f"not built or not loadable ({e.__class__.__name__}: {e}); the decode call runs in Python; "
                      "reinstall with a C++ compiler (CDLM_FAST_BUILD_CPU=1 makes a failed build an error)")
    return _cpu.decode, None


# After a large kernel every Python-level tensor op costs about 10 us on a 2-core CPU (cold caches),
# so the decode call's views, kernel and dead-head check run in one C++ function where it is built.
_DECODE_CPP, CPU_EXTENSION_ERROR = _load_decode_cpp()


def key_limits(prefix_len: torch.Tensor, block_size: Optional[int], q_offset: int, lq: int, lk: int,
               kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Number of visible keys of every query, ``[B, Lq]`` int64 (see :mod:`cdlm_fast.ops.attention`).

    Args:
        prefix_len: ``[B]`` integer tensor. block_size: ``None``/``0`` (no mask) or >= 1.
        q_offset: key index of query 0. lq, lk: numbers of queries and keys.
        kv_lens: optional ``[B]`` integer tensor capping the visible keys.
    """
    prefix = prefix_len.to(torch.int64).view(-1, 1)
    if not block_size:
        limit = torch.full((prefix.shape[0], lq), lk, dtype=torch.int64, device=prefix.device)
    else:
        pos = torch.arange(lq, dtype=torch.int64, device=prefix.device).view(1, -1) + q_offset
        rel = pos - prefix
        gen = prefix + block_size * (torch.div(rel, block_size, rounding_mode="floor") + 1)
        limit = torch.where(rel < 0, prefix, gen)
    cap = lk if kv_lens is None else kv_lens.to(torch.int64).view(-1, 1).clamp(max=lk)
    return torch.clamp(torch.minimum(limit, torch.as_tensor(cap, device=limit.device)), min=0)


def visible_mask(prefix_len: torch.Tensor, block_size: Optional[int], q_offset: int, lq: int, lk: int,
                 kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean ``[B, Lq, Lk]``: ``True`` where key ``j`` is visible to query ``i`` (bias aside)."""
    limits = key_limits(prefix_len, block_size, q_offset, lq, lk, kv_lens)
    return torch.arange(lk, device=limits.device).view(1, 1, -1) < limits.unsqueeze(-1)


def _part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
          cdt: torch.dtype, causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of rows ``q`` ``[B, H, R, D]`` over ``k``/``v`` ``[B, H, L, D]`` with an additive ``mask``
    broadcastable to ``[B, H, R, L]`` (or ``None``), and with ``causal`` row ``r`` seeing keys ``<= r``;
    ``(out [B, H, R, D], lse [B, H, R])``. Rows whose mask is all ``-inf`` get a zero output and an
    arbitrary lse (the caller sets it)."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.matmul(p, v.to(cdt)), lse


def _visible_count(cnt: Optional[torch.Tensor], a, b_lim: torch.Tensor) -> torch.Tensor:
    """Number of visible (finite-bias) keys in ``[a, b_lim)``: ``b_lim`` ``[B, 1 | Hkv, R]`` int64."""
    if cnt is None:
        return b_lim - a
    idx = b_lim.expand(cnt.shape[0], cnt.shape[1], b_lim.shape[-1])
    lo = cnt[:, :, a:a + 1] if isinstance(a, int) else cnt.gather(2, a)
    return cnt.gather(2, idx) - lo


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                    prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int,
                    scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-causal attention with a per-key bias; ``(out [B, Hq, Lq, D], lse [B, Hq, Lq])``.

    Arguments as validated by :func:`cdlm_fast.attention`: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``,
    bias ``[B, Hkv, Lk]`` float32 (float64 allowed for float64 inputs) or ``None``, ``prefix_len``
    ``[B]`` int, ``kv_lens`` ``[B]`` int or ``None``, ``block_size`` ``0`` for "no mask". ``out`` is in
    q's dtype, ``lse`` float32 (float64 for float64 inputs).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if B * Hq * Lq * D == 0 or Lk == 0:
        return _no_keys(q, cdt)
    G = Hq // Hkv
    bias_c = bias if bias is None or bias.dtype == cdt else bias.to(cdt)
    shared = _shared_limit(prefix_len, kv_lens, block_size, q_offset, Lq, Lk)
    if shared is not None:  # every row sees keys [0, shared): one call, no limits tensor
        return _shared(q, k, v, bias_c, shared, scale, cdt)
    cnt = None
    if bias_c is not None and not bool(torch.isfinite(bias_c).all()):
        cnt = torch.nn.functional.pad(torch.isfinite(bias_c).to(torch.int32).cumsum(-1), (1, 0)).to(torch.int64)
    q5 = q.reshape(B, Hkv, G, Lq, D)
    limits = key_limits(prefix_len, block_size, q_offset, Lq, Lk, kv_lens)  # [B, Lq], non-decreasing in i
    lo_t, hi_t = limits.amin(0), limits.amax(0)
    if Lq > 1 and bool((limits == torch.arange(q_offset + 1, q_offset + Lq + 1, device=limits.device)).all()):
        o, l = _causal(q, k, v, bias_c, cnt, limits, q_offset, scale, cdt)
        return o.reshape(B, Hq, Lq, D).to(q.dtype), l.reshape(B, Hq, Lq)
    lo_all = int(lo_t[0])  # limits are non-decreasing in i: the fewest keys any query sees
    r0 = int((hi_t <= lo_all).sum())  # the leading queries that see exactly keys [0, lo_all)
    if lo_all > 0 and 2 * r0 >= Lq:  # a prompt and a few blocks: see _prompt_then_rest
        return _prompt_then_rest(q, k, v, bias_c, cnt, limits, lo_all, r0, scale, cdt)
    o, l = _tiled(q5, k, v, bias_c, cnt, limits, lo_t, hi_t, scale, cdt)
    return o.reshape(B, Hq, Lq, D).to(q.dtype), l.reshape(B, Hq, Lq)


def _tiled(q5, k, v, bias_c, cnt, limits, lo_t, hi_t, scale, cdt):
    """Every query of ``q5`` ``[B, Hkv, G, Lq, D]`` through the tiles of :func:`_tiles`:
    ``(out [B, Hkv, G, Lq, D], lse [B, Hkv, G, Lq])``."""
    B, Hkv, G, Lq, D = q5.shape
    tiles = _tiles(lo_t, hi_t, QUERY_TILE)
    if len(tiles) == 1:
        i0, i1, lo, hi = tiles[0]
        return _tile(q5, k, v, bias_c, cnt, limits, i0, i1, lo, hi, scale, cdt)
    out = torch.empty(B, Hkv, G, Lq, D, dtype=q5.dtype, device=q5.device)
    lse = torch.empty(B, Hkv, G, Lq, dtype=cdt, device=q5.device)
    for i0, i1, lo, hi in tiles:
        out[:, :, :, i0:i1], lse[:, :, :, i0:i1] = _tile(q5, k, v, bias_c, cnt, limits, i0, i1, lo, hi, scale, cdt)
    return out, lse


def _prompt_then_rest(q, k, v, bias_c, cnt, limits, lo_all, r0, scale, cdt):
    """Queries ``[0, r0)`` see keys ``[0, lo_all)``, the later ones more (a prompt, then blocks): every
    query over ``[0, lo_all)`` in **one** call on the folded rows (:func:`_shared`: ``q`` and the output
    are views, nothing copied), then the queries ``[r0, Lq)`` over keys ``[lo_all, hi)`` by tiles, merged
    into their rows by lse. Against tiling from key 0 this saves the copies of the prompt's queries and
    outputs (4% of a Llama-8B-shaped 2K prefill on a 2-core CPU)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    o, l = _shared(q, k, v, bias_c, lo_all, scale, cdt)
    o5, l5 = o.reshape(B, Hkv, G, Lq, D), l.reshape(B, Hkv, G, Lq)
    lim = limits[:, r0:] - lo_all
    ob, lb = _tiled(q.reshape(B, Hkv, G, Lq, D)[:, :, :, r0:], k[:, :, lo_all:], v[:, :, lo_all:],
                    None if bias_c is None else bias_c[:, :, lo_all:],
                    None if cnt is None else cnt[:, :, lo_all:] - cnt[:, :, lo_all:lo_all + 1],
                    lim, lim.amin(0), lim.amax(0), scale, cdt)
    om, lm = _combine([(o5[:, :, :, r0:], l5[:, :, :, r0:], None), (ob, lb, None)], B, Hkv, G, Lq - r0, D, cdt)
    o5[:, :, :, r0:] = om.to(o5.dtype)
    l5[:, :, :, r0:] = lm
    return o5.reshape(B, Hq, Lq, D), l5.reshape(B, Hq, Lq)


def _no_keys(q: torch.Tensor, cdt: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The result when no query sees a key: zeros ``[B, Hq, Lq, D]`` and ``lse = -inf``."""
    return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
            torch.full(q.shape[:3], float("-inf"), dtype=cdt, device=q.device))


def _limit(prefix: int, cap: int, block_size: int, pos: int, lk: int) -> int:
    """Visible keys of the query at key index ``pos`` (host ints; see :func:`key_limits`)."""
    if not block_size:
        return max(0, min(lk, cap))
    if pos >= prefix:
        prefix = prefix + block_size * ((pos - prefix) // block_size + 1)
    return max(0, min(prefix, cap))


def _shared_limit(prefix_len, kv_lens, block_size, q_offset, lq, lk) -> Optional[int]:
    """The key limit when all queries of all samples share it (decode blocks on the block grid,
    bidirectional calls), else ``None``; host arithmetic on the first and last query only (limits
    are non-decreasing in the query index), so the common decode call builds no tensors."""
    prefixes = prefix_len.tolist()
    caps = [lk] * len(prefixes) if kv_lens is None else [min(lk, c) for c in kv_lens.tolist()]
    ends = {_limit(p, c, block_size, q_offset + i, lk) for p, c in zip(prefixes, caps) for i in (0, lq - 1)}
    return ends.pop() if len(ends) == 1 else None


def shared_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], prefix_len: int,
                block_size: int, q_offset: int, scale: float,
                need_lse: bool = True) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`attention_torch` for a host-int ``prefix_len`` and no ``kv_lens`` when every query sees
    the same keys (a decode block on the block grid, a bidirectional call): ``(out, lse)``; ``None``
    when the queries' key limits differ (the caller then takes the general path). Arguments checked.
    With ``need_lse=False`` the lse of heads that see no key is left as the kernel gives it (``0``
    instead of ``-inf``; ``out`` is right either way), which saves a reduction after the kernel."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    lim = _limit(prefix_len, lk, block_size, q_offset, lk)
    if lq > 1 and _limit(prefix_len, lk, block_size, q_offset + lq - 1, lk) != lim:
        return None
    cdt = torch.float64 if q.dtype is torch.float64 else torch.float32
    if lim == 0 or q.numel() == 0:
        return _no_keys(q, cdt)
    return _shared(q, k, v, bias if bias is None or bias.dtype is cdt else bias.to(cdt), lim, scale, cdt, need_lse)


def _shared(q, k, v, bias_c, lim, scale, cdt, need_lse=True):
    """Every query sees keys ``[0, lim)`` (a decode block on the block grid, a bidirectional call):
    one kernel call, the ``G`` query heads of a KV head folded into its rows (K/V read once per KV
    head), the ``B * Hkv`` KV heads passed as a batch of one-head problems where the strides allow
    (then the kernel's lse is already in ``[B, Hq, Lq]`` order; with :func:`row_chunks` > 1 the rows
    are that many interleaved heads over the same K/V, so out and lse stay views) and the bias read as a view
    broadcast over the rows: no tensor is built besides the outputs. Heads whose bias is ``-inf``
    on every key get ``lse = -inf`` (the kernel gives them zeros and ``lse = 0``, so the bias is
    scanned only when some ``lse == 0``).

    The decode hot path, kept to as few tensor ops and attribute reads as possible around the
    kernel: right after a 1-3 ms kernel call each costs several times its warm cost on 2-core
    x86 CPUs (measured: an op 15-120 us against 4 us warm)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if lim == 0:
        return _no_keys(q, cdt)
    R = Hq // Hkv * Lq
    ks, vs = k.stride(), v.stride()
    if B == 1 or (ks[0] == Hkv * ks[1] and vs[0] == Hkv * vs[1]):
        # KV heads as the batch of one-head problems: K/V, bias and the outputs are views, and the
        # kernel's out and lse ([batch, rows, heads] in memory) are [B, Hq, Lq] in order, so no copy.
        # With c > 1 row chunks (thread balance, see row_chunks) each problem's rows are c "heads"
        # over the same K/V and bias (stride 0), interleaved (chunk j holds rows j, j + c, ...) so
        # that the outputs still come back in row order. One as_strided view per input (its first
        # ``lim`` keys): each op counts here.
        bh = B * Hkv
        cpu = _FLASH_CPU is not None and q.is_cpu
        c = row_chunks(bh, R, torch.get_num_threads()) if cpu and q.dtype in _CHUNKED_DTYPES else 1
        if cpu and _DECODE_CPP is not None:  # the same, in C++ (see _load_decode_cpp)
            return _DECODE_CPP(q, k, v, bias_c, lim, scale, c, need_lse)
        qf = q.reshape(bh, R // c, c, D).transpose(1, 2)
        k = k.as_strided((bh, c, lim, D), (ks[1], 0, ks[2], ks[3]))
        v = v.as_strided((bh, c, lim, v.shape[-1]), (vs[1], 0, vs[2], vs[3]))
        mask = None
        if bias_c is not None:
            bs = bias_c.stride()
            mask = (bias_c.as_strided((bh, c, 1, lim), (bs[1], 0, 0, bs[2])) if B == 1 or bs[0] == Hkv * bs[1]
                    else bias_c[:, :, :lim].reshape(bh, 1, 1, lim).expand(bh, c, 1, lim))
    else:  # K/V whose batch and head strides do not merge: the KV heads stay heads
        c = 1
        if lim < Lk:
            k, v = k[:, :, :lim], v[:, :, :lim]
            bias_c = None if bias_c is None else bias_c[:, :, :lim]
        qf = q.reshape(B, Hkv, R, D)
        mask = None if bias_c is None else bias_c.unsqueeze(2)  # [B, Hkv, 1, lim]
    if _FLASH_CPU is not None and q.is_cpu:
        out, lse = _FLASH_CPU(qf, k, v, 0.0, False, attn_mask=mask, scale=scale)
    else:
        out, lse = _part(qf, k, v, mask, scale, cdt)
    if c > 1:  # interleaved row chunks: [bh, c, R / c] -> [bh, R / c, c], rows in order (views)
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    lse = lse.reshape(B, Hq, Lq)
    if lse.dtype is not cdt:
        lse = lse.to(cdt)
    if need_lse and bias_c is not None and not lse.all():  # some lse == 0: check for heads with no key
        dead = (bias_c[:, :, :lim].amax(-1) == float("-inf")).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq]: no key
        lse = lse.masked_fill(dead[:, :, None], float("-inf"))
    out = out.reshape(B, Hq, Lq, D)
    return (out if out.dtype is q.dtype else out.to(q.dtype)), lse


# Row chunks (row_chunks): a work item's fixed cost in rows of its GEMMs (each item streams its
# problem's keys once; measured: SmolLM2's 3 KV heads x 96 rows vs a 1K cache on 2 threads run
# fastest as 2 chunks of 48 rows, 0.37 against 0.42 ms in one chunk and 0.39 ms in 6 chunks).
ITEM_OVERHEAD_ROWS = 4
# Row chunks only where the kernel's items are plain GEMMs: in bfloat16 / float16 it may pack K/V per
# item (AMX), so more items cost more (measured on a Xeon with AMX, SmolLM2 bf16 vs a 2K cache:
# 0.53 ms in 2 chunks against 0.49 ms in one).
_CHUNKED_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=512)
def row_chunks(problems: int, rows: int, threads: int) -> int:
    """Into how many equal chunks ``c`` (a divisor of ``rows``, at most 16) to cut each of ``problems``
    one-head problems of ``rows`` query rows so that PyTorch's CPU flash kernel spreads the work
    evenly over ``threads``. The kernel cuts each head's rows into blocks of 32 (fewer than 192
    rows), 64 (fewer than 768) or 256 and gives each thread one contiguous run of
    ``ceil(items / threads)`` (problem, head, block) items; an item costs its rows plus
    ``ITEM_OVERHEAD_ROWS``. E.g. 3 problems of 96 rows on 2 threads: 9 blocks of 32 split 5:4
    (160 rows against 128); as 2 chunks of 48, 12 items split 144:144. Ties keep fewer chunks."""
    best, best_cost = 1, None
    for c in range(1, min(rows, 16) + 1):
        if rows % c:
            continue
        r = rows // c
        qs = 256 if r >= 768 else 64 if r >= 192 else 32
        sizes = [min(qs, r - s) + ITEM_OVERHEAD_ROWS for s in range(0, r, qs)] * (problems * c)
        per = -(-len(sizes) // max(1, threads))
        cost = max(sum(sizes[i:i + per]) for i in range(0, len(sizes), per))
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return best


def _causal(q, k, v, bias_c, cnt, limits, q_offset, scale, cdt):
    """Causal rows (query ``i`` sees keys ``< q_offset + i + 1``): the keys before ``q_offset`` in one
    call (G folded into the rows, bias broadcast), the last ``Lq`` keys in one call with the kernel's
    own causal masking (which skips the masked tiles; K/V of that band repeated to the query heads,
    since folded rows would not line up with the diagonal), merged by lse."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    parts = []
    if q_offset > 0:
        mask = None if bias_c is None else bias_c[:, :, None, :q_offset]
        o, l = _part(q.reshape(B, Hkv, G * Lq, D), k[:, :, :q_offset], v[:, :, :q_offset], mask, scale, cdt)
        parts.append((o, l, None if cnt is None else (cnt[:, :, q_offset:q_offset + 1] > 0)))
    kb, vb = (x[:, :, q_offset:q_offset + Lq] for x in (k, v))
    if G > 1:
        kb, vb = kb.repeat_interleave(G, dim=1), vb.repeat_interleave(G, dim=1)
    mask = None
    if bias_c is not None:
        bb = bias_c[:, :, q_offset:q_offset + Lq]
        mask = (bb.repeat_interleave(G, dim=1) if G > 1 else bb)[:, :, None, :]  # [B, Hq, 1, Lq], rows broadcast
    o, l = _part(q, kb, vb, mask, scale, cdt, causal=True)
    parts.append((o, l, None if cnt is None else _visible_count(cnt, q_offset, limits[:, None, :]) > 0))
    return _combine(parts, B, Hkv, G, Lq, D, cdt)


def _tiles(lo_t: torch.Tensor, hi_t: torch.Tensor, max_rows: int) -> List[Tuple[int, int, int, int]]:
    """Query tiles ``(i0, i1, lo, hi)``: runs of queries with equal key limits, a run longer than
    ``max_rows`` (a prompt) on its own, shorter runs packed up to ``max_rows`` queries."""
    lq = lo_t.shape[0]
    change = ((lo_t[1:] != lo_t[:-1]) | (hi_t[1:] != hi_t[:-1])).nonzero().flatten() + 1
    bounds = [0] + change.tolist() + [lq]
    lo_h, hi_h = lo_t.tolist(), hi_t.tolist()
    tiles, r = [], 0
    nruns = len(bounds) - 1
    while r < nruns:
        i0 = bounds[r]
        r += 1
        while r < nruns and bounds[r + 1] - i0 <= max_rows:
            r += 1
        i1 = bounds[r]
        tiles.append((i0, i1, lo_h[i0], hi_h[i1 - 1]))
    return tiles


def _tile(q5, k, v, bias_c, cnt, limits, i0, i1, lo, hi, scale, cdt):
    """Queries ``[i0, i1)`` (keys ``[0, lo)`` common, ``[lo, hi)`` banded): ``(out [B,Hkv,G,n,D], lse [B,Hkv,G,n])``."""
    B, Hkv, G, _, D = q5.shape
    n = i1 - i0
    if hi == 0:
        return (torch.zeros(B, Hkv, G, n, D, dtype=q5.dtype, device=q5.device),
                torch.full((B, Hkv, G, n), float("-inf"), dtype=cdt, device=q5.device))
    qt = q5[:, :, :, i0:i1].reshape(B, Hkv, G * n, D)
    parts = []
    if lo > 0:
        mask = None if bias_c is None else bias_c[:, :, None, :lo]
        o, l = _part(qt, k[:, :, :lo], v[:, :, :lo], mask, scale, cdt)
        vis = None if cnt is None else (cnt[:, :, lo:lo + 1] > 0)  # [B, Hkv, 1]
        parts.append((o, l, vis))
    if hi > lo:
        lim_t = limits[:, None, i0:i1]  # [B, 1, n]
        j = torch.arange(lo, hi, device=q5.device)
        band = j.view(1, 1, 1, -1) < lim_t.unsqueeze(-1)  # [B, 1, n, hi - lo]
        neg_inf = torch.full((), float("-inf"), dtype=cdt, device=q5.device)
        keep = torch.zeros((), dtype=cdt, device=q5.device) if bias_c is None else bias_c[:, :, None, lo:hi]
        mask = torch.where(band, keep, neg_inf)  # [B, 1 | Hkv, n, hi - lo]
        h = mask.shape[1]  # without a bias, the KV heads share one mask (stride 0)
        if G > 1:
            mask = mask[:, :, None].expand(B, h, G, n, hi - lo).reshape(B, h, G * n, hi - lo)
        mask = mask.expand(B, Hkv, G * n, hi - lo)
        o, l = _part(qt, k[:, :, lo:hi], v[:, :, lo:hi], mask, scale, cdt)
        vis = _visible_count(cnt, lo, lim_t.clamp(min=lo)) > 0  # [B, 1 | Hkv, n]
        parts.append((o, l, vis))
    return _combine(parts, B, Hkv, G, n, D, cdt)


def _combine(parts, B, Hkv, G, n, D, cdt):
    """Merge per-part ``(out, lse, visible)`` of one tile into ``(out [B,Hkv,G,n,D], lse [B,Hkv,G,n])``.

    ``visible`` (``None``: every row) marks the rows that see a key in that part; the others get
    ``lse = -inf`` (the kernel's output there is already 0: every mask entry is ``-inf``)."""
    outs, lses = [], []
    for o, l, vis in parts:
        l = l.reshape(B, Hkv, G, n).to(cdt)
        if vis is not None and not bool(vis.all()):
            l = l.masked_fill(~vis[:, :, None, :].expand(B, Hkv, G, n), float("-inf"))
        outs.append(o.reshape(B, Hkv, G, n, D))
        lses.append(l)
    if len(parts) == 1:
        return outs[0], lses[0]
    l = torch.logaddexp(lses[0], lses[1])
    safe = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
    w0, w1 = torch.exp(lses[0] - safe)[..., None], torch.exp(lses[1] - safe)[..., None]
    return w0 * outs[0].to(cdt) + w1 * outs[1].to(cdt), l
