"""Key selection for Attention Matching: highest attention and OMP on the mass residual.

All functions work on a batch of ``P`` independent problems (``P = B * Hkv``: one per KV
head), each with ``N`` reference queries (the queries of all ``G`` query heads of a GQA group
stacked) and ``T`` keys:

* ``Q`` ``[P, N, D]`` float32 reference queries (post-RoPE);
* ``K`` ``[P, T, D]`` keys;
* ``lse`` ``[P, N]`` float32, log of each query's attention mass over the original keys
  (``A[p, i, j] = exp(scale * Q_i . K_j + key_bias_j - lse_i)`` is then the softmax weight
  of key ``j`` for query ``i``, and ``sum_j A[p, i, j] = 1``);
* ``key_bias`` optional ``[P, T]`` float32, ``-inf`` for keys that must never be chosen
  (padding).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.gram import exp_gram
from ..ops.solvers import nnls_gram

__all__ = ["softmax_weight_chunks", "highest_attention_scores", "max_softmax_weights", "attention_spread", "copy_weights", "softmax_blocks", "top_keys", "omp_select", "forced_keys",
           "refill_slots", "residual_gain", "sort_slots", "SoftmaxWeights"]


def _chunk_size(P: int, N: int, budget_elems: int) -> int:
    return max(1, budget_elems // max(1, P * N))


def softmax_weight_chunks(Q, K, lse, scale, key_bias=None, *, budget_elems: int = 1 << 26, power: int = 1):
    """Yield ``(start, A_chunk)`` with ``A_chunk`` ``[P, N, c]`` = softmax weights of a chunk of keys
    (to the ``power``: ``exp(power * logits)``, one fused GEMM + in-place ``exp``)."""
    P, N, _ = Q.shape
    T = K.shape[1]
    step = _chunk_size(P, N, budget_elems)
    for s in range(0, T, step):
        Kc = K[:, s:s + step].float()
        add = lse[:, :, None] * -power
        add = add + key_bias[:, None, s:s + step] * power if key_bias is not None else add.expand(-1, -1, Kc.shape[1])
        yield s, torch.baddbmm(add, Q, Kc.transpose(1, 2), alpha=scale * power).exp_()


def _chunks(Q, K, lse, scale, key_bias, budget_elems, power, weights):
    """:func:`softmax_weight_chunks`, or the held softmax weights ``weights`` ``[P, N, T]`` (to the
    ``power``) in one chunk."""
    if weights is None:
        return softmax_weight_chunks(Q, K, lse, scale, key_bias, budget_elems=budget_elems, power=power)
    return [(0, weights.square() if power == 2 else weights)]


def highest_attention_scores(Q, K, lse, scale, key_bias=None, *, reduce: str = "rms",
                             query_weight: Optional[torch.Tensor] = None,
                             weights: Optional[torch.Tensor] = None,
                             col_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-key importance ``[P, T]``: softmax weights aggregated over queries.

    ``reduce`` is ``"rms"`` (root mean square over queries, the published default), ``"mean"``
    or ``"max"``. ``query_weight`` ``[P, N]`` (0/1) excludes padded queries. ``weights``: the
    softmax weights ``[P, N, T]`` when the caller holds them (:class:`SoftmaxWeights`), else they
    are recomputed in chunks from ``Q``, ``K`` and ``lse``; ``col_sq`` ``[P, T]``: their column sums of
    squares over the queries of ``query_weight`` when the caller has them (``"rms"`` then reads
    nothing else).
    """
    if reduce not in ("rms", "mean", "max"):
        raise ValueError(f"reduce must be 'rms', 'mean' or 'max', got {reduce!r}")
    P, N, _ = Q.shape
    out = torch.empty(P, K.shape[1], dtype=torch.float32, device=Q.device)
    denom = (query_weight.sum(1, keepdim=True).clamp(min=1) if query_weight is not None
             else torch.full((P, 1), float(N), device=Q.device))
    qw = None if query_weight is None else query_weight.float()
    if reduce == "rms" and col_sq is not None:
        out = torch.sqrt(col_sq / denom)
    elif reduce != "max":  # sums over queries as a batched GEMV, on exp(2 logits) = A^2 for "rms"
        w = torch.ones(P, 1, N, device=Q.device) if qw is None else (qw * qw if reduce == "rms" else qw)[:, None]
        for s, A in _chunks(Q, K, lse, scale, key_bias, 1 << 22, 2 if reduce == "rms" else 1, weights):
            tot = torch.bmm(w, A)[:, 0] / denom
            out[:, s:s + A.shape[-1]] = torch.sqrt(tot) if reduce == "rms" else tot
    else:
        for s, A in _chunks(Q, K, lse, scale, key_bias, 1 << 22, 1, weights):
            out[:, s:s + A.shape[-1]] = (A if qw is None else A * qw[:, :, None]).amax(1)
    if key_bias is not None:
        out = out.masked_fill(torch.isneginf(key_bias), -1.0)
    return out


class SoftmaxWeights:
    """The softmax-weight matrix ``A`` ``[P, N, T]`` float32 of every reference query over every key,
    held in memory (a CPU path): one GEMM and one softmax give the original outputs and the
    log-masses, and ``A`` is passed as ``weights`` (with its column sums of squares as ``col_sq``)
    to :func:`highest_attention_scores` and :func:`residual_gain`, which otherwise recompute
    ``Q K^T`` and its ``exp`` in chunks. Built by :meth:`maybe` when ``A`` fits ``MAX_BYTES``.

    ``A`` is built ``ROWS`` queries at a time, so that the logits, their row maximum, ``exp``, the
    normalisation and the products with ``V`` all run on a block that stays in the CPU caches.

    Attributes: ``A`` ``[P, N, T]``; ``lse`` ``[P, N]`` (``-inf`` for a query that sees no key, whose
    row of ``A`` is 0); ``Y`` ``[P, N, Dv]`` the original attention outputs; ``col_sq`` ``[P, T]``
    ``sum_i query_weight_i A_ij^2``; all float32.
    """

    MAX_BYTES = 1 << 29  # 512 MiB of A
    ROWS = 256  # queries per block: 256 x 2048 keys of float32 = 2 MiB (fastest of 32-512 on a 2-core EPYC)

    @classmethod
    def maybe(cls, Q, K, V, scale, key_bias=None, query_weight=None) -> Optional["SoftmaxWeights"]:
        """An instance for ``Q`` ``[P, N, D]``, ``K`` ``[P, T, D]``, ``V`` ``[P, T, Dv]``, ``key_bias``
        ``[P, T]`` (``-inf`` masks a key), ``query_weight`` ``[P, N]`` (0/1, for ``col_sq``) on the
        CPU when ``A`` fits ``MAX_BYTES``; else ``None``."""
        P, N, _ = Q.shape
        if Q.device.type != "cpu" or P * N * K.shape[1] * 4 > cls.MAX_BYTES:
            return None
        return cls(Q, K, V, scale, key_bias, query_weight)

    def __init__(self, Q, K, V, scale, key_bias=None, query_weight=None):
        P, N, _ = Q.shape
        T = K.shape[1]
        Qf, Kt, Vf = Q.float(), K.float().transpose(1, 2), V.float()
        kb = None if key_bias is None else key_bias.float()[:, None, :]
        qw = None if query_weight is None else query_weight.float()
        self.A = torch.empty(P, N, T, dtype=torch.float32, device=Q.device)
        self.lse = torch.empty(P, N, dtype=torch.float32, device=Q.device)
        self.Y = torch.empty(P, N, Vf.shape[-1], dtype=torch.float32, device=Q.device)
        self.col_sq = torch.zeros(P, T, dtype=torch.float32, device=Q.device)
        for p, i0, i1, a, m in softmax_blocks(Qf, Kt, kb, scale, self.ROWS, self.A):
            # the largest weight of a row is exp(0) / mass: lse = m + log(mass) = m - log(max weight)
            self.lse[p, i0:i1] = m - torch.log(a.amax(-1))
            if not bool(torch.isfinite(m).all()):  # a query that sees no key: a zero row, lse -inf
                a.masked_fill_(torch.isneginf(m)[:, None], 0.0)
                self.lse[p, i0:i1].masked_fill_(torch.isneginf(m), float("-inf"))
            torch.mm(a, Vf[p], out=self.Y[p, i0:i1])
            w = a.square()
            self.col_sq[p] += w.sum(0) if qw is None else qw[p, i0:i1] @ w


def softmax_blocks(Qf, Kt, kb, scale, rows, out=None):
    """Yield ``(p, i0, i1, a, m)`` over problems ``p`` and blocks of ``rows`` queries ``[i0, i1)``: ``a``
    ``[i1 - i0, T]`` the softmax weights of those queries (``softmax(scale Q K^T + kb)``, NaN rows where a
    query sees no key), written into ``out[p, i0:i1]`` when ``out`` ``[P, N, T]`` is given (else a reused
    block), and ``m`` their row maxima of the logits. ``Qf`` ``[P, N, D]`` and ``Kt`` ``[P, D, T]`` float32,
    ``kb`` ``[P, 1, T]`` or ``None``."""
    P, N, _ = Qf.shape
    T = Kt.shape[2]
    scratch = None if out is not None else torch.empty(min(rows, N), T, dtype=torch.float32, device=Qf.device)
    for p in range(P):
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            a = out[p, i0:i1] if out is not None else scratch[:i1 - i0]
            if kb is None:
                torch.mm(Qf[p, i0:i1], Kt[p], out=a).mul_(scale)
            else:
                torch.addmm(kb[p], Qf[p, i0:i1], Kt[p], alpha=scale, out=a)
            m = a.amax(-1)
            softmax_rows_(a)  # row-wise in cache; its exp is faster than torch.exp's
            yield p, i0, i1, a, m


def max_softmax_weights(Q, K, scale, key_bias=None, query_weight=None, rows: int = 256, *,
                        with_spread: bool = False, copy_targets: Optional[torch.Tensor] = None):
    """``[P, T]``: every key's largest softmax weight over the queries of ``query_weight`` > 0 (all by
    default), ``-1`` for keys with ``key_bias = -inf`` -- :func:`highest_attention_scores` with
    ``reduce="max"``, computed by blocks of ``rows`` queries without the log-masses (one GEMM and one
    row softmax per block; the CPU path of :func:`cdlm_fast.compaction.allocate_counts`).

    With ``with_spread``, returns ``(max_weights, spread)``: ``spread`` ``[P, N]`` float32 every
    query's participation ratio ``1 / sum_j a_ij^2`` (the number of keys it effectively attends: 1
    for a query on one key, ``T`` for a uniform one; NaN for queries left out by ``query_weight`` or
    that see no key), from the same blocks (see :func:`attention_spread`).

    With ``copy_targets`` ``[P, N]`` int64 (a key index per query, ``-1`` for none), returns
    ``(max_weights, spread or None, copy)``: ``copy`` ``[P, N]`` float32 the softmax weight of every
    query on its target key (0 without a target), from the same blocks (see :func:`copy_weights`)."""
    P, N, _ = Q.shape
    copy = None
    if copy_targets is not None:
        copy = torch.zeros(P, N, dtype=torch.float32, device=Q.device)
        has = copy_targets >= 0
        tgt = copy_targets.clamp(min=0)
    kb = None if key_bias is None else key_bias.float()[:, None, :]
    out = torch.zeros(P, K.shape[1], dtype=torch.float32, device=Q.device)
    spread = torch.full((P, N), float("nan"), dtype=torch.float32, device=Q.device) if with_spread else None
    for p, i0, i1, a, m in softmax_blocks(Q.float(), K.float().transpose(1, 2), kb, scale, rows):
        keep = torch.isfinite(m)
        if query_weight is not None:
            keep = keep & (query_weight[p, i0:i1] > 0)
        if copy is not None:
            w = a.gather(1, tgt[p, i0:i1, None])[:, 0]
            copy[p, i0:i1] = torch.where(keep & has[p, i0:i1], w, torch.zeros_like(w))
        if with_spread:  # a row that sees no key is NaN here and left out by keep
            sq = torch.linalg.vector_norm(a, dim=-1).square()
            spread[p, i0:i1] = torch.where(keep & (sq > 0), 1.0 / sq, torch.full_like(sq, float("nan")))
        if not bool(keep.all()):
            a = a[keep]
        if a.shape[0]:
            torch.maximum(out[p], a.amax(0), out=out[p])
    if key_bias is not None:
        out = out.masked_fill(torch.isneginf(key_bias), -1.0)
    if copy is not None:
        return out, spread, copy
    return (out, spread) if with_spread else out


def copy_weights(Q, K, lse, scale, copy_targets, key_bias=None) -> torch.Tensor:
    """``[P, N]`` float32: every query's softmax weight on its target key, ``exp(scale q_i . k_t(i) +
    key_bias_t(i) - lse_i)``, 0 where ``copy_targets`` is ``-1`` or ``lse`` is not finite.

    For repeat-prefill queries the target of the query that repeats token ``i`` is key ``i + 1``, the
    token it has to write next: an induction (copying) head puts most of its weight there. ``Q``
    ``[P, N, D]``, ``K`` ``[P, T, D]``, ``lse`` ``[P, N]``, ``copy_targets`` ``[P, N]`` int64,
    ``key_bias`` ``[P, T]``."""
    has = (copy_targets >= 0) & torch.isfinite(lse)
    tgt = copy_targets.clamp(min=0)
    Kt = K.float().gather(1, tgt[:, :, None].expand(-1, -1, K.shape[2]))
    logit = (Q.float() * Kt).sum(-1) * scale
    if key_bias is not None:
        logit = logit + key_bias.float().gather(1, tgt)
    w = torch.exp(logit - torch.where(has, lse, torch.zeros_like(lse)))
    return torch.where(has & torch.isfinite(w), w, torch.zeros_like(w))


def attention_spread(Q, K, lse, scale, key_bias=None, query_weight=None) -> torch.Tensor:
    """``[P, N]`` float32: every query's participation ratio ``1 / sum_j a_ij^2`` over the keys (the
    number of keys it effectively attends), from its log-mass ``lse`` ``[P, N]`` (chunks of
    ``exp(2 (scale q.k - lse))``, no ``[P, N, T]`` matrix); NaN for queries with ``query_weight`` 0
    or a non-finite ``lse``. ``Q`` ``[P, N, D]``, ``K`` ``[P, T, D]``, ``key_bias`` ``[P, T]``."""
    ok = torch.isfinite(lse)
    if query_weight is not None:
        ok = ok & (query_weight > 0)
    safe = torch.where(ok, lse, torch.full_like(lse, 1e30))
    sq = torch.zeros(Q.shape[:2], dtype=torch.float32, device=Q.device)
    for _, A in softmax_weight_chunks(Q.float(), K, safe, scale, key_bias, budget_elems=1 << 22, power=2):
        sq += A.sum(-1)
    return torch.where(ok & (sq > 0), 1.0 / sq, torch.full_like(sq, float("nan")))


def softmax_rows_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``x`` in place (``x`` returned); rows of ``-inf`` become NaN."""
    try:
        return torch.softmax(x, -1, out=x)
    except (RuntimeError, TypeError):  # a build that refuses the output aliasing its input, or out=
        return x.copy_(torch.softmax(x, -1))


def top_keys(scores: torch.Tensor, counts: torch.Tensor, t: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``counts[p]`` best keys per problem, padded to ``t``.

    Returns ``idx`` ``[P, t]`` int64 (sorted by key position; padding slots repeat index 0)
    and ``valid`` ``[P, t]`` bool.
    """
    P, T = scores.shape
    k = min(t, T)
    top = scores.topk(k, dim=1).indices
    rank = torch.arange(k, device=scores.device)[None, :]
    valid = rank < counts[:, None]
    return _sort_and_pad(top, valid, t)


def _sort_and_pad(idx, valid, t):
    P, k = idx.shape
    big = torch.iinfo(torch.int64).max
    key = torch.where(valid, idx, torch.full_like(idx, big))
    order = key.argsort(dim=1)
    idx = idx.gather(1, order)
    valid = valid.gather(1, order)
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    if k < t:
        idx = torch.cat([idx, idx.new_zeros(P, t - k)], 1)
        valid = torch.cat([valid, valid.new_zeros(P, t - k)], 1)
    return idx, valid


def _gather_keys(K, idx):
    return K.gather(1, idx[:, :, None].expand(-1, -1, K.shape[-1]))


def omp_select(Q, K, lse, scale, counts: torch.Tensor, t: int, key_bias=None, *, keys_per_iter: int = 1,
               refit_every: int = 1, query_weight: Optional[torch.Tensor] = None,
               max_materialize: int = 1 << 28, forced: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy key selection on the attention-mass residual (orthogonal matching pursuit).

    With ``A`` the softmax-weight matrix (``[N, T]`` per problem) and the target mass 1 for
    every query, each iteration adds the ``keys_per_iter`` unselected keys with the largest
    correlation ``A^T r`` with the residual ``r = 1 - A_S w``; every ``refit_every``-th
    iteration the weights ``w >= 0`` of the selected set are refitted by NNLS on the Gram
    matrix (``exp_gram`` + ``nnls_gram``, warm-started). ``keys_per_iter=1, refit_every=1``
    is AM-OMP; ``4, 2`` is AM-OMP-fast.

    ``A`` is kept in memory when ``P * N * T <= max_materialize`` and recomputed in chunks
    otherwise. Problems with ``counts[p] < t`` keep the first ``counts[p]`` keys they picked.
    ``forced`` (optional ``[P, T]`` bool, at most ``counts[p]`` per problem) are picked in the
    first iteration, before any greedy choice.

    Returns ``idx`` ``[P, t]`` and ``valid`` ``[P, t]`` as :func:`top_keys`.
    """
    P, N, _ = Q.shape
    T = K.shape[1]
    dev = Q.device
    qw = torch.ones(P, N, device=dev) if query_weight is None else query_weight.float()
    A_full = None
    if P * N * T <= max_materialize:
        A_full = torch.cat([a for _, a in softmax_weight_chunks(Q, K, lse, scale, key_bias)], dim=2)

    def correlate(r):
        if A_full is not None:
            return torch.bmm(r[:, None, :], A_full)[:, 0]
        out = torch.empty(P, T, device=dev)
        for s, a in softmax_weight_chunks(Q, K, lse, scale, key_bias):
            out[:, s:s + a.shape[-1]] = torch.bmm(r[:, None, :], a)[:, 0]
        return out

    blocked = torch.zeros(P, T, dtype=torch.bool, device=dev)
    if key_bias is not None:
        blocked |= torch.isneginf(key_bias)
    n_real = (~blocked).sum(1)
    t_eff = min(t, T)
    chosen = torch.zeros(P, 0, dtype=torch.int64, device=dev)
    w = torch.zeros(P, 0, device=dev)
    r = qw.clone()
    it = 0
    while chosen.shape[1] < t_eff:
        corr = correlate(r).masked_fill(blocked, float("-inf"))
        k = min(keys_per_iter, t_eff - chosen.shape[1])
        if it == 0 and forced is not None and bool(forced.any()):
            corr = corr.masked_fill(forced & ~blocked, float("inf"))
            k = min(t_eff, max(k, int(forced.sum(1).max())))
        new = corr.topk(k, dim=1).indices
        blocked.scatter_(1, new, True)
        chosen = torch.cat([chosen, new], 1)
        w = torch.cat([w, torch.zeros(P, k, device=dev)], 1)
        it += 1
        if it % refit_every == 0 or chosen.shape[1] >= t_eff:
            C = _gather_keys(K, chosen).float()
            valid = torch.arange(chosen.shape[1], device=dev)[None, :] < n_real[:, None]
            G, R = exp_gram(Q, C, None, _masked_shift(lse, qw), scale, None)
            G, h = _mask_problem(G, R[..., 0], valid)
            res = nnls_gram(G / N, h / N, x0=w)
            w = res.x.float() * valid
            # padding/blocked slots (w = 0) may overflow exp: select, never multiply by 0 (inf * 0 = NaN)
            A_s = torch.exp(scale * torch.bmm(Q, C.transpose(1, 2)) - lse[:, :, None])
            fit = torch.where(valid[:, None, :], A_s, torch.zeros_like(A_s)) @ w[:, :, None]
            r = (qw - fit[:, :, 0]) * qw
    rank = torch.arange(chosen.shape[1], device=dev)[None, :]
    valid = (rank < counts[:, None]) & (rank < n_real[:, None])
    return _sort_and_pad(chosen, valid, t)


def forced_keys(counts: torch.Tensor, T: int, sinks: int = 0, window=0,
                key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[P, T]`` bool: the first ``sinks`` and the last ``window`` real keys of every problem.

    ``window`` is an int or ``[P]`` int64 per-problem window lengths.

    ``counts`` ``[P]`` caps them per problem (sinks first, then the window); keys with
    ``key_bias = -inf`` (padding) are not real and never forced.
    """
    P = counts.shape[0]
    dev = counts.device
    real = torch.ones(P, T, dtype=torch.bool, device=dev) if key_bias is None else ~torch.isneginf(key_bias)
    pos = real.long().cumsum(1) - 1
    n_real = real.sum(1, keepdim=True)
    s = counts.clamp(max=int(sinks))[:, None]
    win = torch.as_tensor(window, device=dev).reshape(-1, 1)
    w = torch.minimum((counts[:, None] - s).clamp(min=0), win)
    return real & ((pos < s) | (pos >= n_real - w))


def residual_gain(Q, K, lse, scale, fitted: torch.Tensor, key_bias=None, *,
                  query_weight: Optional[torch.Tensor] = None,
                  weights: Optional[torch.Tensor] = None,
                  col_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-key gain ``[P, T]`` of adding a key to a mass fit: the correlation ``a_j^T r / ||a_j||`` of
    its softmax-weight column ``a_j`` with the residual ``r = 1 - fitted`` (``fitted`` ``[P, N]``: each
    query's mass over the current slots, relative to its original mass). A key with positive gain
    lowers the NNLS objective when it enters, so it gets a positive weight (the OMP criterion).
    ``weights``: the held softmax weights ``[P, N, T]`` (see :func:`highest_attention_scores`); the
    column norms are then over the queries of ``query_weight`` 1 (0/1), which the chunks get from an
    ``lse`` of 1e30 on the excluded queries in ``compact_layer``; ``col_sq``: their squares summed over
    those queries, as :func:`highest_attention_scores` takes them."""
    P, N, _ = Q.shape
    qw = torch.ones(P, N, device=Q.device) if query_weight is None else query_weight.float()
    r = ((qw - fitted.float()) * qw)[:, None, :]
    out = torch.empty(P, K.shape[1], dtype=torch.float32, device=Q.device)
    for s, A in _chunks(Q, K, lse, scale, key_bias, 1 << 22, 1, weights):
        corr = torch.bmm(r, A)[:, 0]
        if col_sq is not None and weights is not None:
            norm = col_sq.sqrt()
        elif weights is None:
            norm = A.square_().sum(1).sqrt_()
        else:
            norm = torch.bmm(qw[:, None, :], A.square())[:, 0].sqrt_()
        out[:, s:s + A.shape[-1]] = corr / norm.clamp(min=1e-30)
    if key_bias is not None:
        out = out.masked_fill(torch.isneginf(key_bias), float("-inf"))
    return out


def refill_slots(idx: torch.Tensor, valid: torch.Tensor, dead: torch.Tensor, used: torch.Tensor,
                 scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Put the best unused keys (by ``scores``) into the ``dead`` slots.

    ``idx``/``valid``/``dead`` ``[P, t]``; ``used`` ``[P, T]`` bool (keys already tried or
    never allowed, updated in place); ``scores`` ``[P, T]``. A dead slot left without a candidate
    becomes invalid. Returns the new ``(idx, valid)``.
    """
    idx, valid = idx.clone(), valid.clone()
    order = scores.argsort(dim=1, descending=True)
    for p in dead.any(1).nonzero()[:, 0].tolist():
        slots = dead[p].nonzero()[:, 0]
        cand = order[p][~used[p][order[p]]][:slots.numel()]
        idx[p, slots[:cand.numel()]] = cand
        used[p, cand] = True
        valid[p, slots[cand.numel():]] = False
    return idx, valid


def sort_slots(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Permutation ``[P, t]`` putting valid slots first, by key position, invalid slots last."""
    big = torch.iinfo(torch.int64).max
    return torch.where(valid, idx, torch.full_like(idx, big)).argsort(dim=1)


def _masked_shift(lse, qw):
    """Shift for ``exp_gram`` so that excluded queries (weight 0) contribute nothing."""
    return torch.where(qw > 0, lse, torch.full_like(lse, 1e30))


def _mask_problem(G, h, valid):
    """Make padded slots decoupled unit rows (solution 0 there).

    Padded slots may hold any key (e.g. a padding key whose entries overflowed to inf), so
    their rows/columns are replaced, not multiplied by 0 (``inf * 0 = NaN``).
    """
    vf = valid.to(G.dtype)
    both = valid[:, :, None] & valid[:, None, :]
    G = torch.where(both, G, torch.zeros_like(G)) + torch.diag_embed(1.0 - vf)
    h = torch.where(valid, h, torch.zeros_like(h))
    return G, h
