"""Attention Matching compaction of one attention layer's KV cache.

``compact_layer`` replaces the ``T`` keys/values of every KV head by ``t`` selected keys
``C_k``, a per-key log-weight ``beta`` and refitted values ``C_v`` such that, for the
reference queries, the attention output and the attention mass of the compacted cache
match those of the original (Zweiger et al., "Attention Matching", arXiv 2602.16284).

Pipeline (every KV head of the layer is one problem of a batch, ``P = B * Hkv``):

1. original outputs ``Y`` and log-masses ``lse`` of the reference queries:
   :func:`cdlm_fast.attention` with ``return_lse=True``;
2. key selection: ``"highest_attention"`` (softmax weights aggregated over queries, by RMS
   or max, top-t), ``"omp"`` (greedy on the mass residual, one key and one NNLS refit per
   iteration) or ``"omp_fast"`` (four keys per iteration, refit every second one); optional
   attention sinks (the first keys) and a window of the most recent keys are always kept,
   inside the same budget;
3. ``beta = log w`` by NNLS on the mass-matching Gram system; keys whose weight is 0 are
   dropped and their slots refilled with the unused keys that correlate best with the mass
   residual of the live slots (the OMP criterion), for ``MAX_REFILL_ROUNDS`` rounds; heads still
   holding dead slots after that are solved once more with every weight floored at
   ``WEIGHT_FLOOR`` (the authors' lower clamp), so only keys with no attention mass at all
   (their ``exp`` underflows for every query) can leave a slot unusable;
4. ``C_v`` by (ridge) least squares on ``X = softmax(q C_k^T * scale + beta)``, the ridge
   chosen per head on a held-out split of the reference queries (``ridge="auto"``).

Everything is computed in float32 and cast to the cache dtype at the end (``bias`` stays
float32). With GQA the ``G`` query heads sharing a KV head all contribute their reference
queries to that head's problem.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

import torch

from .. import _validate as V
from ..ops.attention import attention
from .fit import MassGram, compacted_lse, fit_beta, fit_values
from .refine import refine
from .select import (SoftmaxWeights, _gather_keys, attention_spread, copy_weights, forced_keys, highest_attention_scores,
                     max_softmax_weights, omp_select, refill_slots, residual_gain, sort_slots, top_keys)
from .types import CompactedLayer

__all__ = ["METHODS", "resolve_counts", "compact_layer", "reference_outputs", "allocate_counts"]

METHODS = ("highest_attention", "omp", "omp_fast")
AGGREGATES = ("rms", "max", "mean")
# Refill rounds before the floored re-solve (one round by residual gain: measured on SmolLM2, more
# rounds lower the held-out error by under 1% and cost about half the compaction time again)
MAX_REFILL_ROUNDS = 1
# A slot whose NNLS weight is below this fraction of its head's largest weight carries no mass
# in float32 (its exp-matrix column is round-off) and counts as dead, like an exact zero.
DEAD_WEIGHT_RTOL = 1e-12
Budget = Union[int, float, Sequence[int], torch.Tensor]


def resolve_counts(budget: Budget, B: int, Hkv: int, T: int, device) -> torch.Tensor:
    """Turn a budget into ``[B, Hkv]`` int64 per-head key counts in ``[1, T]``.

    ``budget``: an int (keys per head), a float in ``(0, 1]`` (fraction of ``T`` kept, rounded
    up), or per-head counts (a sequence / tensor of shape ``[Hkv]`` or ``[B, Hkv]``).
    """
    if isinstance(budget, bool):
        raise TypeError("budget must be an int, a float in (0, 1] or per-head counts, got bool")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 key per head, got {budget}")
        counts = torch.full((B, Hkv), min(budget, T), dtype=torch.int64)
    elif isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is the fraction of keys kept and must be in (0, 1], got {budget}")
        counts = torch.full((B, Hkv), max(1, min(T, math.ceil(budget * T))), dtype=torch.int64)
    else:
        counts = torch.as_tensor(budget)
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise TypeError(f"per-head budget counts must be integers, got dtype {counts.dtype}")
        counts = counts.to(torch.int64).cpu()
        if counts.dim() == 1 and counts.shape[0] == Hkv:
            counts = counts[None].expand(B, Hkv)
        if tuple(counts.shape) != (B, Hkv):
            raise ValueError(f"per-head budget counts must have shape [Hkv={Hkv}] or [B={B}, Hkv={Hkv}], "
                             f"got {tuple(counts.shape)}")
        if int(counts.min()) < 1:
            raise ValueError("per-head budget counts must be >= 1")
        counts = counts.clamp(max=T)
    return counts.to(device)


# allocate_counts(copy_targets=...): a head whose repeat-prefill queries copy more keys than the global
# top-k gives it has its scores s (maximum softmax weights, in [0, 1]) raised to the power
# (1 - c / T) ** COPY_LIFT_GAMMA, c its copy count, before the top-k is redone: a strong induction head
# (c ~ 0.78 T) has every key read once, by the query that copies it, with a modest maximum weight,
# and the power lifts these toward 1. Measured on SmolLM2 (bench/results/quality_smollm2_2048/
# copy_lift/): at 50x the top-k gave the induction head of layer 18 (KV head 2, c ~ 1590 of 2048
# keys) 1091 keys and the recall probe was lost (1.4613 against KVzip's 0.9821); lifted, it keeps
# 1574 and recall is 0.9685 (with one sink). At 20x a few heads move by at most 48 keys; at 5x and 10x
# no head is short of its copy count and nothing changes. On other draws of the recall probe the 50x
# win does not hold (copy_lift/summary.md: 1.14-1.68 against KVzip's 0.82-1.12).
COPY_LIFT_GAMMA = 2.0


@torch.no_grad()
def allocate_counts(kv, queries, budget: float, *, scale: Optional[float] = None, aggregate: str = "max",
                    min_keys: int = 1, spread_floor: Optional[int] = None, copy_targets=None,
                    backend: str = "auto") -> list:
    """Non-uniform per-head budgets at the same total: a global top-k over layers and heads.

    Every key of every (layer, KV head) is scored by the softmax weight the reference queries give
    it (aggregated by ``aggregate``, the maximum by default, as KVzip does); the
    ``ceil(budget * T) * Hkv * L`` best keys over the whole model are counted per head. Heads
    whose keys some query needs (retrieval / induction heads) get large budgets, diffuse heads
    small ones. Pass the result as ``budget`` of :func:`compact_layer` layer by layer.

    Args:
        kv: list over layers of ``(keys [B, Hkv, T, D], values [B, Hkv, T, Dv])``.
        queries: layer index -> ``[B, Hq, n, D]`` reference queries (same keys as ``kv``'s indices).
        budget: fraction of keys kept on average, in ``(0, 1]``.
        min_keys: floor of every head's count (its best keys are taken first, inside the total).
        spread_floor: if given, a head's floor is instead the median over its reference queries of
            the number of keys a query effectively attends (participation ratio ``1 / sum_j a_j^2``,
            :func:`cdlm_fast.compaction.select.attention_spread`), rounded and clamped to
            ``[min_keys, spread_floor]``: a diffuse head (early layers) keeps up to
            ``spread_floor`` keys, a head whose queries each read one key (sinks, copying) only
            ``min_keys``, and the global top-k gets the rest.
        copy_targets: optional layer index -> ``[n]`` (or ``[B, n]``) int64, for every reference
            query the key it would copy next, ``-1`` for none (repeat-prefill queries: see
            :func:`cdlm_fast.compaction.queries.repeat_copy_targets`). A head's copy count ``c`` is
            then the mean weight its queries put on their targets times ``T`` (the largest over
            the query heads of a GQA group): about how many keys the head copies when the context
            is repeated -- ~0.78 T for a strong induction head, ~0 for most heads. A head that
            the top-k gives fewer than ``c`` keys has its scores raised to the power
            ``(1 - c / T) ** COPY_LIFT_GAMMA`` and the top-k is redone: a copying head needs
            nearly every key (each is read by the one query that copies it, with a moderate
            weight), which the maximum weight alone, next to sharper heads, does not give it at
            high compression.

    Returns:
        list over layers of ``[B, Hkv]`` int64 counts (each in ``[min_keys, T]``).
    """
    if isinstance(budget, bool) or not isinstance(budget, float) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a float fraction in (0, 1], got {budget!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if spread_floor is not None and (isinstance(spread_floor, bool) or not isinstance(spread_floor, int)
                                     or spread_floor < 1):
        raise ValueError(f"spread_floor must be None or an int >= 1, got {spread_floor!r}")
    scores, floored, copies = [], [], []
    lo = max(int(min_keys), 1)
    for i, (k, v) in enumerate(kv):
        B, Hkv, T, D = k.shape
        sc = D ** -0.5 if scale is None else float(scale)
        Qp = _to_problems(queries[i].float(), Hkv)
        Kp = k.reshape(B * Hkv, T, D)
        G = queries[i].shape[1] // Hkv
        tgt = None if copy_targets is None else _problem_targets(copy_targets[i], B, Hkv, G, queries[i].shape[2], T,
                                                                   k.device)
        spread = copy = None
        if aggregate == "max" and k.device.type == "cpu" and backend in ("auto", "torch"):
            # no log-masses needed
            out = max_softmax_weights(Qp, Kp, sc, with_spread=spread_floor is not None, copy_targets=tgt)
            if tgt is not None:
                s_, spread, copy = out
            elif spread_floor is not None:
                s_, spread = out
            else:
                s_ = out
        else:
            _, lse = reference_outputs(k, v, queries[i], scale=sc, backend=backend)
            lsep = _to_problems(lse, Hkv)
            qw = torch.isfinite(lsep)
            lsep = torch.where(qw, lsep, torch.full_like(lsep, 1e30))
            s_ = highest_attention_scores(Qp, Kp, lsep, sc, reduce=aggregate, query_weight=qw.float())
            if spread_floor is not None:
                spread = attention_spread(Qp, Kp, lsep, sc, query_weight=qw.float())
            if tgt is not None:
                copy = copy_weights(Qp, Kp, lsep, sc, tgt)
        floors = torch.full((B * Hkv,), min(lo, T), dtype=torch.int64, device=k.device)
        if spread is not None:
            med = spread.nanmedian(1).values.nan_to_num(float(lo))
            floors = med.round().clamp(lo, max(lo, spread_floor)).long().clamp(max=T)
        scores.append(s_)
        # every head keeps its best floors[h] keys (counted first); the lift below keeps each head's order
        floored.append(s_.argsort(1, descending=True).argsort(1) < floors[:, None])
        if copy is not None:  # [P, G * n] -> mean weight on the target per query head, the group's largest, x T
            has = (tgt >= 0).reshape(B * Hkv, G, -1)
            mean = copy.reshape(B * Hkv, G, -1).sum(-1) / has.sum(-1).clamp(min=1)
            copies.append(mean.amax(1) * T)
    B, L = kv[0][0].shape[0], len(kv)
    T = kv[0][0].shape[2]
    Hkv = kv[0][0].shape[1]
    total = min(math.ceil(budget * T) * Hkv * L, Hkv * T * L)
    counts = _top_counts(scores, floored, B, L, Hkv, T, total)
    if copies:  # lift the scores of the heads short of their copy count, then the top-k again
        lifted = []
        for l, (s_, c) in enumerate(zip(scores, copies)):
            short = counts[:, l].reshape(-1) < c.round().long()
            p = torch.where(short, (1 - c / T).clamp(min=0) ** COPY_LIFT_GAMMA, torch.ones_like(c))
            lifted.append(torch.where(s_ > 0, s_.clamp(min=0) ** p[:, None], s_))
        counts = _top_counts(lifted, floored, B, L, Hkv, T, total)
    return [counts[:, l].to(torch.int64) for l in range(L)]


def _top_counts(scores, floored, B, L, Hkv, T, total) -> torch.Tensor:
    """``[B, L, Hkv]`` how many of the ``total`` best keys over all layers and heads each head holds,
    the keys of ``floored`` (per layer ``[B * Hkv, T]`` bool) counted first."""
    flat = torch.cat([s_.masked_fill(f, float("inf")).reshape(B, Hkv * T) for s_, f in zip(scores, floored)], 1)
    top = flat.topk(total, dim=1).indices
    hit = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return hit.reshape(B, L, Hkv, T).sum(-1)


def _problem_targets(targets, B: int, Hkv: int, G: int, n: int, T: int, device) -> torch.Tensor:
    """``[n]`` / ``[B, n]`` copy targets -> ``[B * Hkv, G * n]`` (the query heads of a group stacked)."""
    t = torch.as_tensor(targets)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() not in (1, 2) or t.shape[-1] != n \
            or (t.dim() == 2 and t.shape[0] != B):
        raise ValueError(f"copy_targets must be int64 tensors of shape [n={n}] or [B={B}, n={n}] (one key index per "
                         f"reference query, -1 for none), got {t.dtype} {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= T):
        raise ValueError(f"copy_targets must lie in [-1, T={T}), got values in [{int(t.min())}, {int(t.max())}]")
    t = t.long().to(device).expand(B, n)
    return t[:, None, None, :].expand(B, Hkv, G, n).reshape(B * Hkv, G * n)


class _Clock:
    """Adds the seconds since the previous call to ``timings[stage]`` (no-op without a dict)."""

    def __init__(self, timings: Optional[dict], device):
        self.timings, self.device = timings, torch.device(device)
        self.last = time.perf_counter() if timings is not None else 0.0

    def __call__(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def _to_problems(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """``[B, Hq, n, ...]`` -> ``[B * Hkv, G * n, ...]`` (query heads of a group stacked)."""
    B, Hq, n = x.shape[:3]
    G = Hq // Hkv
    return x.reshape(B, Hkv, G * n, *x.shape[3:]).reshape(B * Hkv, G * n, *x.shape[3:])


def reference_outputs(keys, values, queries, *, scale, key_bias=None, backend="auto"):
    """Original attention of the reference queries: ``(Y [B,Hq,n,D] f32, lse [B,Hq,n] f32)``."""
    y, lse = attention(queries.float(), keys.float(), values.float(), bias=key_bias, scale=scale,
                       return_lse=True, backend=backend)
    return y.float(), lse.float()


def compact_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    budget: Budget,
    method: str = "highest_attention",
    *,
    scale: Optional[float] = None,
    key_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    ridge: Union[float, str] = "auto",
    aggregate: str = "rms",
    sinks: int = 0,
    window: Union[int, float] = 0,
    logical_length: Optional[int] = None,
    omp_keys_per_iter: Optional[int] = None,
    omp_refit_every: Optional[int] = None,
    backend: str = "auto",
    timings: Optional[dict] = None,
    refine_steps: int = 0,
    refine_lr: float = 1e-2,
    stats: Optional[dict] = None,
) -> CompactedLayer:
    """Compact one layer's KV cache by Attention Matching.

    Args:
        keys: ``[B, Hkv, T, D]`` cached keys (post-RoPE), any float dtype.
        values: ``[B, Hkv, T, Dv]`` cached values, same dtype.
        queries: ``[B, Hq, n, D]`` reference queries (post-RoPE), ``Hq`` a multiple of ``Hkv``.
        budget: keys kept per KV head: an int ``t``, a float fraction of ``T`` in ``(0, 1]``, or
            per-head counts ``[Hkv]`` / ``[B, Hkv]``. Heads with fewer keys than the largest
            count are padded to it with ``bias = -inf`` slots: those slots cost memory and
            bandwidth but no accuracy (a varlen consumer may skip them via ``counts``). Every
            other slot holds a key with a finite ``beta`` unless the head has fewer keys with a
            positive NNLS weight than its budget.
        method: ``"highest_attention"``, ``"omp"`` or ``"omp_fast"``.
        scale: score scale, default ``D ** -0.5``.
        key_mask: optional ``[B, T]`` bool, False for padding keys (never selected).
        query_mask: optional ``[B, n]`` bool, False for padding queries (ignored by the fits).
        ridge: relative ridge of the value fit (``lambda = ridge * mean diag(X^T X)``), or
            ``"auto"``: chosen per KV head on a held-out fifth of the reference queries (see
            :func:`cdlm_fast.compaction.fit.fit_values`).
        aggregate: how ``"highest_attention"`` aggregates a key's softmax weights over the
            queries (``"rms"``, ``"max"``, ``"mean"``).
        sinks: the first ``sinks`` keys of every head are kept uncompacted (attention sinks).
        window: the last ``window`` keys are kept uncompacted (an int, or a float in
            ``[0, 1)``: that fraction of each head's budget). Sinks and window count within
            the budget and keep their original values with ``beta = 0``; the other keys are
            compacted so that, together with them, the original attention is reproduced.
        logical_length: ``T`` recorded in the result (default ``keys.shape[2]``).
        omp_keys_per_iter, omp_refit_every: override the OMP schedule (default 1/1 for
            ``"omp"``, 4/2 for ``"omp_fast"``).
        backend: backend of the attention calls.
        timings: optional dict; seconds per stage (``"reference"``, ``"select"``, ``"beta"``,
            ``"values"``, ``"refine"``) are added to it (synchronising the device between stages).
        stats: optional dict; counters are added to it: ``"beta_not_converged"`` (NNLS solves
            that hit the fallback), ``"refill_rounds"``, ``"slots_refilled"``, ``"slots_floored"``
            (slots still dead after the refill rounds, kept usable by a floored weight fit),
            ``"dead_slots"`` (slots left without a usable key: only when the budget exceeds the keys
            with any attention mass), ``"ridge_chosen"``.
        refine_steps, refine_lr: when ``refine_steps > 0``, polish the result with at most that
            many Adam steps of learning rate ``refine_lr`` (:func:`cdlm_fast.compaction.refine.refine`,
            early-stopped on held-out reference queries).

    Returns:
        :class:`CompactedLayer` with ``keys``/``values`` ``[B, Hkv, t, D]`` in the cache dtype,
        ``bias`` ``[B, Hkv, t]`` float32 (``t`` = the largest per-head count), ``counts`` the
        usable slots per head (first in each head, sorted by position) and ``indices`` the
        original positions of the kept keys (``-1`` for unusable slots).
    """
    V.tensor("keys", keys, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hkv, T, D]")
    V.tensor("values", values, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hkv, T, Dv]")
    V.tensor("queries", queries, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hq, n, D]")
    B, Hkv, T, D = keys.shape
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"values must have shape [B={B}, Hkv={Hkv}, T={T}, Dv], got {tuple(values.shape)}")
    if queries.shape[0] != B or queries.shape[3] != D or queries.shape[1] % Hkv != 0:
        raise ValueError(f"queries must have shape [B={B}, Hq (a multiple of Hkv={Hkv}), n, D={D}], "
                         f"got {tuple(queries.shape)}")
    if queries.shape[2] == 0 or T == 0:
        raise ValueError("compact_layer needs at least one reference query and one key")
    V.same_device([("keys", keys), ("values", values), ("queries", queries), ("key_mask", key_mask),
                   ("query_mask", query_mask)])
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, T)):
        raise ValueError(f"key_mask must be a bool tensor of shape [B={B}, T={T}], got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    n = queries.shape[2]
    if query_mask is not None and (query_mask.dtype != torch.bool or tuple(query_mask.shape) != (B, n)):
        raise ValueError(f"query_mask must be a bool tensor of shape [B={B}, n={n}], got "
                         f"{query_mask.dtype} {tuple(query_mask.shape)}")
    if not (ridge == "auto" or (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and ridge >= 0)):
        raise ValueError(f"ridge must be a float >= 0 or 'auto', got {ridge!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window < 0 or \
            (isinstance(window, float) and window >= 1):
        raise ValueError(f"window must be an int >= 0 or a float fraction of the budget in [0, 1), got {window!r}")
    scale = D ** -0.5 if scale is None else float(scale)
    dev = keys.device
    Hq = queries.shape[1]
    G = Hq // Hkv

    counts = resolve_counts(budget, B, Hkv, T, dev)
    t = int(counts.max())
    kb = None
    if key_mask is not None:
        kb = torch.zeros(B, Hkv, T, dtype=torch.float32, device=dev)
        kb = kb.masked_fill(~key_mask[:, None, :], float("-inf"))
        counts = torch.minimum(counts, key_mask.sum(1, keepdim=True).clamp(min=1))

    if _split_by_head(counts, dev):
        return _compact_heads_apart(keys, values, queries, counts, method, scale=scale, key_mask=key_mask,
                                    query_mask=query_mask, ridge=ridge, aggregate=aggregate, sinks=sinks,
                                    window=window, logical_length=logical_length,
                                    omp_keys_per_iter=omp_keys_per_iter, omp_refit_every=omp_refit_every,
                                    backend=backend, timings=timings, refine_steps=refine_steps,
                                    refine_lr=refine_lr, stats=stats)

    clock = _Clock(timings, dev)
    P = B * Hkv
    Kp = keys.reshape(P, T, D)
    Vp = values.reshape(P, T, values.shape[-1])
    cp = counts.reshape(-1)
    kbp = None if kb is None else kb.reshape(P, T)
    # sinks and recent window: kept uncompacted (original keys and values, beta = 0); the other
    # keys are compacted to the rest of the budget so that, together with the window, they
    # reproduce the original attention (exact decomposition of the softmax over disjoint key sets)
    win = (cp.float() * window).floor().long() if isinstance(window, float) else int(window)
    forced = forced_keys(cp, T, sinks, win, kbp)
    n_forced = forced.sum(1)
    if bool(n_forced.any()):
        kbp = (torch.zeros(P, T, device=dev) if kbp is None else kbp).masked_fill(forced, float("-inf"))
        kb = kbp.reshape(B, Hkv, T)
    c_rest = cp - n_forced
    t_rest = int(c_rest.max())

    Qp = _to_problems(queries.float(), Hkv)
    # on the CPU, the softmax weights of all queries over all keys are kept when they fit: one GEMM
    # and one exp serve the reference outputs, the selection scores and the refills' gains
    qm = None if query_mask is None else query_mask[:, None, None, :].expand(B, Hkv, G, n).reshape(P, G * n)
    sw = SoftmaxWeights.maybe(Qp, Kp, Vp, scale, kbp, qm) if backend in ("auto", "torch") else None
    if sw is not None:
        Yp, lsep = sw.Y, sw.lse
    else:
        Y, lse = reference_outputs(keys, values, queries, scale=scale, key_bias=kb, backend=backend)
        Yp = _to_problems(Y, Hkv)
        lsep = _to_problems(lse, Hkv)
    qw = torch.isfinite(lsep)
    if query_mask is not None:
        qw = qw & qm
    qwf = qw.float()
    lsep = torch.where(qw, lsep, torch.full_like(lsep, 1e30))
    clock("reference")

    if t_rest == 0:
        idx = torch.zeros(P, 0, dtype=torch.int64, device=dev)
        valid = torch.zeros(P, 0, dtype=torch.bool, device=dev)
    elif method == "highest_attention":
        scores = highest_attention_scores(Qp, Kp, lsep, scale, kbp, reduce=aggregate, query_weight=qwf,
                                          weights=None if sw is None else sw.A,
                                          col_sq=None if sw is None else sw.col_sq)
        idx, valid = top_keys(scores, c_rest, t_rest)
    else:
        kpi = omp_keys_per_iter or (1 if method == "omp" else 4)
        rfe = omp_refit_every or (1 if method == "omp" else 2)
        idx, valid = omp_select(Qp, Kp, lsep, scale, c_rest, t_rest, kbp, keys_per_iter=kpi, refit_every=rfe,
                                query_weight=qwf)
    clock("select")
    used = torch.zeros(P, T, dtype=torch.bool, device=dev) if kbp is None else torch.isneginf(kbp)
    used |= _chosen_mask(idx, valid, T)
    w0 = None
    # on the CPU the mass fit's Gram system is kept and updated column-wise across refill rounds
    # (exp_gram's fused kernels on a GPU recompute it: cheaper than holding A there)
    gram, prev = None, None
    keep_gram = Kp.device.type == "cpu" and MassGram.fits(P, Qp.shape[1], idx.shape[1])
    for rnd in range(MAX_REFILL_ROUNDS + 1):
        C = _gather_keys(Kp, idx)
        if gram is not None:  # a refill round: only the heads whose slots changed are solved again
            changed = (idx != prev) | (valid != prev_valid)
            gram.replace(changed, C)
            redo = changed.any(1).nonzero()[:, 0]
            b_sub, res = gram.solve(valid, x0=w0, problems=redo)
            beta = beta.index_copy(0, redo, b_sub)
        elif keep_gram:
            gram = MassGram(Qp, C, lsep, scale, query_weight=qwf)
            beta, res = gram.solve(valid, x0=w0)
        else:
            beta, res = fit_beta(Qp, C, lsep, scale, valid, query_weight=qwf, x0=w0)
        _add(stats, "beta_not_converged", int((~res.converged.bool()).sum()))
        prev, prev_valid = idx, valid
        dead = _dead_slots(beta, valid)
        if not bool(dead.any()) or rnd == MAX_REFILL_ROUNDS or bool(used.all()):
            break
        _add(stats, "refill_rounds", 1)
        _add(stats, "slots_refilled", int(dead.sum()))
        # candidates by their correlation with the live slots' mass residual (the OMP criterion): they
        # enter the NNLS with a positive weight, where the next keys by selection score mostly
        # duplicate kept ones and die again (measured on SmolLM2: lower held-out error in one round
        # than eight rounds by score, at 5x to 50x)
        live = valid & ~dead
        if gram is not None:  # each query's fitted mass from the kept design matrix
            fitted = torch.bmm(gram.A, torch.exp(beta).masked_fill(~live, 0.0)[:, :, None])[:, :, 0]
        else:  # or through the attention op (no [P, N, t] matrix on a GPU)
            fitted = torch.exp(compacted_lse(Qp, C, beta.masked_fill(~live, float("-inf")), scale, backend)
                               - lsep)
        gain = residual_gain(Qp, Kp, lsep, scale, fitted, kbp, query_weight=qwf,
                             weights=None if sw is None else sw.A, col_sq=None if sw is None else sw.col_sq)
        idx, valid = refill_slots(idx, valid, dead, used, gain)
        w0 = torch.exp(beta).masked_fill(dead | ~valid, 0.0)  # warm start: new keys start at 0
    dead = _dead_slots(beta, valid)
    if bool(dead.any()):  # refills exhausted: the heads left with dead slots are solved again with every
        # slot's weight floored (w >= WEIGHT_FLOOR, the authors' clamp), so a key with any mass stays usable
        redo = dead.any(1).nonzero()[:, 0]
        if gram is not None:
            b_sub, res = gram.solve(valid, x0=torch.exp(beta), problems=redo, floor=valid)
        else:
            b_sub, res = fit_beta(Qp[redo], C[redo], lsep[redo], scale, valid[redo],
                                  query_weight=None if qwf is None else qwf[redo], x0=torch.exp(beta[redo]),
                                  floor=valid[redo])
        beta = beta.index_copy(0, redo, b_sub)
        _add(stats, "slots_floored", int(dead.sum()) - int(_dead_slots(beta, valid).sum()))
        _add(stats, "beta_not_converged", int((~res.converged.bool()).sum()))
    valid = valid & ~_dead_slots(beta, valid)
    beta = torch.where(valid, beta, torch.full_like(beta, float("-inf")))
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    C = _gather_keys(Kp, idx)
    sw = None  # the [P, N, T] weights are not needed past the refills
    clock("beta")
    Cv = fit_values(Qp, C, beta, Yp, scale, ridge=ridge, query_weight=qwf, backend=backend, stats=stats)
    clock("values")
    if bool(n_forced.any()):
        f_idx, f_valid = top_keys(forced.float(), n_forced, int(n_forced.max()))
        idx = torch.cat([idx, f_idx], 1)
        valid = torch.cat([valid, f_valid], 1)
        beta = torch.cat([beta, torch.zeros_like(f_idx, dtype=beta.dtype).masked_fill(~f_valid, float("-inf"))], 1)
        Cv = torch.cat([Cv, _gather_keys(Vp, f_idx).float() * f_valid[:, :, None]], 1)
    if idx.shape[1] < t:
        pad = t - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(P, pad)], 1)
        valid = torch.cat([valid, valid.new_zeros(P, pad)], 1)
        beta = torch.cat([beta, beta.new_full((P, pad), float("-inf"))], 1)
        Cv = torch.cat([Cv, Cv.new_zeros(P, pad, Cv.shape[-1])], 1)
    _add(stats, "dead_slots", int((cp - valid.sum(1)).sum()))
    order = sort_slots(idx, valid)[:, :t]
    idx, valid, beta = idx.gather(1, order), valid.gather(1, order), beta.gather(1, order)
    Cv = Cv.gather(1, order[:, :, None].expand(-1, -1, Cv.shape[-1]))
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    C = _gather_keys(Kp, idx)
    layer = CompactedLayer(
        keys=C.reshape(B, Hkv, t, D).to(keys.dtype),
        values=Cv.reshape(B, Hkv, t, -1).to(values.dtype),
        bias=beta.reshape(B, Hkv, t).float().contiguous(),
        logical_length=T if logical_length is None else int(logical_length),
        counts=valid.reshape(B, Hkv, t).sum(-1),
        indices=torch.where(valid, idx, torch.full_like(idx, -1)).reshape(B, Hkv, t),
    )
    if refine_steps:
        layer = refine(layer, keys, values, queries, steps=refine_steps, lr=refine_lr, scale=scale,
                       key_mask=key_mask, query_mask=query_mask, backend=backend)
        clock("refine")
    return layer


# On the CPU, heads whose budgets differ by more than this factor of padded work are compacted one at
# a time (see _split_by_head).
SPLIT_PADDED_WORK = 1.5


def _split_by_head(counts: torch.Tensor, device) -> bool:
    """Whether to compact the heads of a layer one at a time: on the CPU, when padding every head to the
    largest budget ``t`` (the batched path) would cost more than ``SPLIT_PADDED_WORK`` times the work of
    each head at its own budget. The fits cost about ``N t^2`` per head (the Gram matrices), so with
    non-uniform budgets (``allocation="mixed"``: one head of a SmolLM2 layer at 1715 slots, the others
    at about 100) the batched path spends most of its time on padding; on a GPU the batch runs in
    parallel and stays."""
    if device.type != "cpu" or counts.numel() < 2:
        return False
    c = counts.flatten().tolist()
    return len(c) * max(c) ** 2 > SPLIT_PADDED_WORK * sum(x * x for x in c)


def _compact_heads_apart(keys, values, queries, counts, method, *, key_mask, query_mask, logical_length,
                         refine_steps, **kw) -> CompactedLayer:
    """:func:`compact_layer` head by head (each at its own budget ``counts[b, h]``), padded to the
    largest budget as the batched path pads (``bias = -inf``, zero keys and values, index ``-1``)."""
    B, Hkv, T, D = keys.shape
    G = queries.shape[1] // Hkv
    t = int(counts.max())
    parts = []
    for b in range(B):
        for h in range(Hkv):
            part = compact_layer(
                keys[b:b + 1, h:h + 1], values[b:b + 1, h:h + 1], queries[b:b + 1, h * G:(h + 1) * G],
                counts[b:b + 1, h:h + 1], method,
                key_mask=None if key_mask is None else key_mask[b:b + 1],
                query_mask=None if query_mask is None else query_mask[b:b + 1],
                logical_length=logical_length, refine_steps=refine_steps, **kw)
            parts.append(_pad_slots(part, t))
    cat = {f: torch.cat([getattr(p, f) for p in parts], 1).reshape(B, Hkv, *getattr(parts[0], f).shape[2:])
           for f in ("keys", "values", "bias", "counts", "indices")}
    return CompactedLayer(cat["keys"], cat["values"], cat["bias"], parts[0].logical_length, cat["counts"],
                          cat["indices"])


def _pad_slots(layer: CompactedLayer, t: int) -> CompactedLayer:
    """``layer`` with ``t`` slots per head: the extra ones unusable (``bias = -inf``, index ``-1``)."""
    pad = t - layer.keys.shape[2]
    if pad == 0:
        return layer

    def more(x, fill):
        return torch.cat([x, x.new_full((*x.shape[:2], pad, *x.shape[3:]), fill)], 2)

    return CompactedLayer(more(layer.keys, 0), more(layer.values, 0), more(layer.bias, float("-inf")),
                          layer.logical_length, layer.counts, more(layer.indices, -1))


def _dead_slots(beta: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[P, t]`` bool: valid slots whose weight ``exp(beta)`` is zero or below ``DEAD_WEIGHT_RTOL``
    times the largest weight of their head."""
    if beta.shape[1] == 0:  # every slot of the layer is a sink or in the recent window
        return valid.clone()
    top = beta.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    return valid & (torch.isneginf(beta) | (beta < top + math.log(DEAD_WEIGHT_RTOL)))


def _chosen_mask(idx: torch.Tensor, valid: torch.Tensor, T: int) -> torch.Tensor:
    """``[P, T]`` bool: keys held by a valid slot."""
    m = torch.zeros(idx.shape[0], T + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(1, torch.where(valid, idx, torch.full_like(idx, T)), True)
    return m[:, :T]


def _add(stats: Optional[dict], key: str, value: int) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + value
