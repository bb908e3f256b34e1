"""One-call compaction of a transformers model's KV cache: :func:`compact_model_cache`."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from .core import METHODS, allocate_counts, compact_layer
from .hf_cache import CompactedCacheLayer, CompactedDynamicCache, attention_layer_types
from .queries import (QUERY_MODES, capture_layer_queries, instruction_ids, prefill_with_heldout_queries,
                      prefill_with_queries, repeat_copy_targets, subsample, subsample_index)
from .quality import attention_match_metrics
from .types import CompactedCache, CompactedLayer

__all__ = ["CompactionReport", "compact_model_cache", "compact_kv"]


@dataclass
class CompactionReport:
    """What :func:`compact_model_cache` did.

    Attributes:
        times: stage -> seconds (``"prefill"``, ``"queries"``, ``"compaction"``, ``"evaluation"``).
        layers: per layer ``{"layer", "t", "rel_error", "cosine", "mass_error"}`` on held-out
            queries (attention-output relative L2 error, mean cosine similarity, mean
            ``|exp(lse_compacted - lse) - 1|``).
        logical_length: ``T``. compacted_length: largest ``t`` over layers.
        method, queries: the settings used.
        stage_times: seconds inside the compaction per stage (``"reference"`` attention,
            ``"select"``, ``"beta"``, ``"values"``), summed over layers.
        stats: counters summed over layers (see ``stats`` of
            :func:`cdlm_fast.compaction.compact_layer`): ``"beta_not_converged"`` NNLS solves
            that used the fallback, ``"refill_rounds"``, ``"slots_refilled"``, ``"dead_slots"``
            left unusable, ``"ridge_chosen"`` (relative ridge -> number of heads),
            ``"usable_slots"`` and ``"stored_slots"`` (slots held in memory, padding included:
            the memory cost of non-uniform budgets), ``"compacted_heads"`` (``B * Hkv`` summed over
            the compacted layers: ``usable_slots / compacted_heads`` keys are kept per head on
            average).
        fit_queries, heldout_queries: reference queries per query head and layer used by the
            fit, and used only for the metrics (``holdout``; in the repeat modes queries of the
            context's own prefill, see :func:`compact_model_cache`); the two sets are disjoint.
        ratio: the compression ratio ``T / t`` asked for.
    """

    times: Dict[str, float] = field(default_factory=dict)
    layers: List[Dict[str, float]] = field(default_factory=list)
    logical_length: int = 0
    compacted_length: int = 0
    method: str = ""
    queries: str = ""
    stage_times: Dict[str, float] = field(default_factory=dict)
    stats: Dict[str, object] = field(default_factory=dict)
    fit_queries: int = 0
    heldout_queries: int = 0
    ratio: float = 0.0

    def summary(self) -> str:
        """One-paragraph text summary."""
        def mean(key):
            vals = [d[key] for d in self.layers if key in d]
            return sum(vals) / len(vals) if vals else float("nan")
        times = ", ".join(f"{k} {v:.2f}s" for k, v in self.times.items())
        heads = self.stats.get("compacted_heads", 0)
        if heads:  # non-uniform budgets: the largest layer's t says little about the compression
            kept = self.stats.get("usable_slots", 0) / heads
            size = (f"{kept:.1f} keys per head on average ({self.logical_length / max(kept, 1e-9):.1f}x; "
                    f"largest layer t={self.compacted_length})")
        else:
            size = f"t={self.compacted_length} ({self.logical_length / max(1, self.compacted_length):.1f}x)"
        return (f"{self.method}/{self.queries}: T={self.logical_length} -> {size}; held-out attention rel. error "
                f"{mean('rel_error'):.4f}, cosine {mean('cosine'):.4f}, mass error {mean('mass_error'):.4f}; {times}")


def _tqdm(iterable, enabled: bool, total: int, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False)


# The pipeline's default (compact_kv, compact_model_cache): the first key (the attention sink) and a
# recent window of a quarter of each head's budget kept uncompacted, the rest compacted; compact_layer
# itself keeps sinks=0, window=0. Measured on SmolLM2 (2K context, five kinds of text, 5-50x): the
# window wins Python source at 50x against every kvpress press (1.8144 against 1.8200; 1.8745
# without, bench/results/quality_smollm2_2048/window_default.md); one sink instead of four frees 3
# keys per head (270 of 3690 at 50x), which the induction heads need to recall planted facts at 50x
# (0.9685 against 1.0471 with four sinks and KVzip's 0.9821, with the copy targets of
# compact_model_cache; bench/results/quality_smollm2_2048/copy_lift/). SmolLM2's heads rest on the
# first token only.
PIPELINE_SINKS = 1
PIPELINE_WINDOW = 0.25


def compact_kv(kv, queries: Dict[int, torch.Tensor], budget, method: str = "highest_attention", *,
               scale: Optional[float] = None, ridge="auto", allocation: str = "mixed", sinks: int = PIPELINE_SINKS,
               window=PIPELINE_WINDOW, copy_targets=None, progress: bool = False, **kwargs) -> CompactedCache:
    """Compact precomputed per-layer ``(keys, values)`` with fixed reference queries.

    Args:
        kv: list over layers of ``(keys [B, Hkv, T, D], values [B, Hkv, T, Dv])``.
        queries: layer -> ``[B, Hq, n, D]`` reference queries.
        budget, method, ridge, kwargs: as :func:`cdlm_fast.compaction.compact_layer`.
        allocation: ``"mixed"`` (default: every head keeps at least :func:`mixed_floor` of the
            uniform count ``u``, i.e. ``max(MIXED_FLOOR_MIN_KEYS = 20, MIXED_FLOOR = 0.1 * u)`` keys
            (at most ``u``); the rest of the same total goes by a global top-k over heads and layers,
            :func:`allocate_counts`), ``"global"`` (all of it by the global top-k), ``"spread"`` (every
            head keeps at least the number of keys its queries effectively attend, at most
            ``SPREAD_FLOOR_MAX`` = 10, the rest by the global top-k: best for recalling facts from the
            context, with ``window=0``; see ``SPREAD_FLOOR_MAX``) or ``"uniform"`` (the same count for
            every head). ``budget`` is then the average; per-head count tensors
            are used as given.
        sinks, window: kept uncompacted inside each head's budget (see
            :func:`cdlm_fast.compaction.compact_layer`); the pipeline's default is ``PIPELINE_SINKS``
            = 1 first key and a recent window of ``PIPELINE_WINDOW`` = a quarter of each head's
            budget (``sinks=0, window=0`` is Attention Matching over every key).
        copy_targets: ``None``, an int64 ``[n]`` / ``[B, n]`` tensor (for every layer) or a dict
            layer -> such a tensor: the key every reference query copies next, ``-1`` for none.
            For repeat-prefill queries pass
            :func:`cdlm_fast.compaction.queries.repeat_copy_targets` (as :func:`compact_model_cache`
            does): a head that copies the context then keeps the keys it copies (see
            :func:`cdlm_fast.compaction.core.allocate_counts`). Not used by ``allocation="uniform"``.
    """
    T = kv[0][0].shape[2]
    if torch.is_tensor(copy_targets):
        copy_targets = {i: copy_targets for i in queries}
    elif isinstance(copy_targets, dict):
        missing = sorted(set(queries) - set(copy_targets))
        if missing:
            raise ValueError(f"copy_targets has no entry for layers {missing} (one per layer of queries)")
    elif copy_targets is not None:
        raise TypeError(f"copy_targets must be None, an int64 tensor or a dict layer -> tensor, got "
                        f"{type(copy_targets).__name__}")
    budgets = _budgets(kv, queries, budget, allocation, scale, copy_targets=copy_targets)
    layers = [compact_layer(k, v, queries[i], budgets[i], method, scale=scale, ridge=ridge, logical_length=T,
                            sinks=sinks, window=window, **kwargs)
              for i, (k, v) in _tqdm(enumerate(kv), progress, len(kv), "compacting layers")]
    return CompactedCache(layers, T)


ALLOCATIONS = ("uniform", "global", "mixed", "spread")
# allocation="mixed": every head keeps at least this share of the uniform budget, and never fewer than
# MIXED_FLOOR_MIN_KEYS keys (nor more than the uniform count); the rest of the total is spread by the
# global top-k (see mixed_floor, _budgets). Measured on SmolLM2 (bench/results/quality_smollm2_2048/
# default_floor_min20/): a floor of half the uniform count kept too few keys in the retrieval heads to
# win the recall probe at 20x (0.7387 against KVzip's 0.7102; 0.6452 with this floor); 20 keys keep a
# head's sinks and recent window usable (at 50x, 41 keys a head, it is the old floor of 20).
MIXED_FLOOR = 0.1
MIXED_FLOOR_MIN_KEYS = 20


# allocation="spread": a head's floor is the number of keys its reference queries effectively attend
# (the median participation ratio, see allocate_counts), at most SPREAD_FLOOR_MAX keys; the rest by the
# global top-k. Measured on SmolLM2 (bench/results/quality_smollm2_2048/spread_floor/, with window=0):
# it recalls planted facts better than every press and than "mixed" at 5-50x (0.86 against KVzip's
# 0.98 at 50x) and keeps prose ahead of the presses, but it loses Python source and the reference
# manual at 20x/50x: an option for retrieval from a compacted document, not the default.
SPREAD_FLOOR_MAX = 10


def mixed_floor(uniform: int) -> int:
    """The fewest keys a head keeps under ``allocation="mixed"`` when the uniform count is ``uniform``:
    ``max(MIXED_FLOOR_MIN_KEYS, int(MIXED_FLOOR * uniform))``, at most ``uniform``, at least 1."""
    return max(1, min(uniform, max(MIXED_FLOOR_MIN_KEYS, int(MIXED_FLOOR * uniform))))


def _budgets(kv, queries, budget, allocation: str, scale, layers=None, copy_targets=None) -> list:
    """Per-layer budgets: ``budget`` everywhere, or global per-head counts over ``layers`` (default all)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "uniform" or torch.is_tensor(budget):  # explicit per-head counts are kept as given
        return [budget] * len(kv)
    T = kv[0][0].shape[2]
    if isinstance(budget, int) and not isinstance(budget, bool) and 1 <= budget <= T:
        budget = budget / T  # keys per head -> the same fraction on average
    if not isinstance(budget, float):
        raise ValueError(f"allocation={allocation!r} needs a float fraction or an int number of keys per head as "
                         f"budget (the average kept), got {budget!r}")
    layers = list(range(len(kv))) if layers is None else list(layers)
    floor, spread = 1, None
    if allocation == "mixed":
        floor = mixed_floor(math.ceil(budget * T))
    elif allocation == "spread":
        spread = max(1, min(SPREAD_FLOOR_MAX, math.ceil(budget * T)))
    targets = None if copy_targets is None else {j: copy_targets[i] for j, i in enumerate(layers)}
    counts = allocate_counts([kv[i] for i in layers], {j: queries[i] for j, i in enumerate(layers)}, budget,
                             scale=scale, min_keys=floor, spread_floor=spread, copy_targets=targets)
    out = [budget] * len(kv)
    for j, i in enumerate(layers):
        out[i] = counts[j]
    return out


def _scale(model) -> Optional[float]:
    for m in model.modules():
        if hasattr(m, "scaling") and hasattr(m, "layer_idx"):
            return float(m.scaling)
    return None


def _sliding_layer(k: torch.Tensor, v: torch.Tensor, window: int, T: int) -> CompactedLayer:
    """A sliding-window layer's cache, uncompacted: its last ``window`` keys/values ``[B, Hkv, w, D]``."""
    w = min(window, T)
    B, Hkv = k.shape[:2]
    idx = torch.arange(T - w, T, device=k.device)
    return CompactedLayer(k[:, :, T - w:].contiguous(), v[:, :, T - w:].contiguous(),
                          torch.zeros(B, Hkv, w, device=k.device), T,
                          torch.full((B, Hkv), w, dtype=torch.int64, device=k.device), idx.expand(B, Hkv, w).contiguous())


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
        raise ValueError(f"ratio must be a number >= 1 (T / t) or a list of such numbers, got {ratio!r}")


@torch.no_grad()
def compact_model_cache(model, input_ids: torch.Tensor, *, ratio: Union[float, Sequence[float]] = 10.0,
                        method: str = "highest_attention", queries: str = "repeat", max_queries: Optional[int] = 4096,
                        holdout: int = 256, tokenizer=None, instruction: Optional[str] = None, ridge="auto",
                        allocation: str = "mixed", sinks: int = PIPELINE_SINKS, window=PIPELINE_WINDOW, seed: int = 0,
                        progress: bool = True, return_compacted: bool = False, **kwargs):
    """Prefill ``input_ids``, compact every layer's KV cache by Attention Matching, report quality.

    Which queries fit and which evaluate: with ``queries="repeat"`` / ``"on_policy"`` every
    reference query of the repeated context fits (a random ``max_queries`` of them at most), and
    the report's metrics come from ``holdout`` queries of the context's own prefill at random
    positions (``seed``), captured in the same forward: no fit query is taken away, so
    ``holdout`` does not change the compacted cache. (Taking them from the fit queries did:
    recall of facts planted in a 2K SmolLM2 context fell from NLL 0.74 to 0.98-1.00 at 20x with
    256 of about 2070 fit queries held out.) With ``queries="context"`` the context's queries are
    split at random into ``holdout`` held-out and at most ``max_queries`` fit queries, so there
    ``holdout`` removes fit queries. ``holdout=0`` reports no metrics.

    Args:
        model: transformers causal LM (Llama, Qwen2, Qwen3, Gemma-3, ...). Full-attention layers
            are compacted; sliding-window layers (``config.layer_types``) keep their last
            ``sliding_window`` keys uncompacted, all they can attend to.
        input_ids: ``[B, T]`` context ids (no padding).
        ratio: compression ratio ``T / t`` (``>= 1``; 10.0 keeps 10% of the keys per head), or a
            list of ratios: one prefill (and one set of reference queries) serves all of them.
        method: ``"highest_attention"``, ``"omp"`` or ``"omp_fast"``.
        queries: ``"repeat"`` (repeat-prefill), ``"on_policy"`` or ``"context"``.
        max_queries: cap on fit queries per layer (random subsample) before GQA stacking.
        holdout: held-out queries per layer for the report's metrics (see above; at most a
            quarter of ``T``).
        tokenizer: used to tokenize the repeat instruction (without it the context is simply
            repeated). instruction: override the instruction text.
        ridge: relative ridge of the value fit, or ``"auto"`` (per head, by held-out error).
        allocation: ``"mixed"`` (default: every head keeps at least 10% of ``T / ratio`` keys and
            at least 20 (:func:`mixed_floor`), and the rest of the same total is spread over the
            full-attention layers' heads by a global top-k of the keys' maximum attention from the
            fit queries; in the repeat modes, a head that copies the repeated context (an induction
            head) and gets fewer keys than it copies is lifted toward that many (the queries' copy
            targets, :func:`cdlm_fast.compaction.queries.repeat_copy_targets`); see
            :func:`cdlm_fast.compaction.core.allocate_counts`), ``"global"`` (all of the total
            by that top-k), ``"spread"`` (floors from how many keys each head's queries
            effectively attend, at most 10; for recall of facts from the context, with
            ``window=0``) or ``"uniform"`` (every head keeps ``T / ratio`` keys). Heads are
            padded to the largest count of their layer (``report.stats`` gives usable and stored
            slots).
        sinks, window: kept uncompacted inside each head's budget: by default the first key and
            the most recent quarter of the budget (see :func:`compact_kv`).
        seed: RNG seed of the split / subsampling.
        progress: show a tqdm bar over layers.
        return_compacted: also return the :class:`CompactedCache`.
        kwargs: passed to :func:`cdlm_fast.compaction.compact_layer` (e.g. ``aggregate``).

    Returns:
        ``(cache, report)``: a :class:`CompactedDynamicCache` ready for
        ``model.generate(..., **cache_kwargs(model, cache))`` with ``"cdlm_fast"`` attention, and a
        :class:`CompactionReport` (plus the :class:`CompactedCache` with ``return_compacted``).
        With a list of ratios, a list of such tuples in the same order.
    """
    if queries not in QUERY_MODES:
        raise ValueError(f"queries must be one of {QUERY_MODES}, got {queries!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    many = isinstance(ratio, (list, tuple))
    ratios = list(ratio) if many else [ratio]
    if not ratios:
        raise ValueError("ratio must not be an empty list")
    for r in ratios:
        _check_ratio(r)
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer tensor of shape [B, T]")
    input_ids = input_ids.to(model.device)
    scale = _scale(model)

    t0 = time.perf_counter()
    instr = None
    if queries != "context":
        instr = instruction_ids(tokenizer, **({"instruction": instruction} if instruction else {}),
                                device=input_ids.device)
    held = None
    T = input_ids.shape[1]
    if queries == "context" or holdout <= 0:
        kv, qs, suffix = prefill_with_queries(model, input_ids, queries, instr)
    else:  # held-out queries from the context's own prefill, every repeat query fits
        pos = torch.randperm(T, generator=torch.Generator().manual_seed(seed))[:min(int(holdout), T // 4)]
        kv, qs, suffix, held = prefill_with_heldout_queries(model, input_ids, queries, instr, pos.sort().values)
    t_prefill = time.perf_counter() - t0
    results = []
    for r in ratios:
        report = CompactionReport(method=method, queries=queries, logical_length=input_ids.shape[1], ratio=float(r))
        report.times["prefill"] = t_prefill if not results else 0.0
        out = _compact_prefilled(model, kv, qs, suffix, report, budget=1.0 / float(r), method=method,
                                 queries=queries, max_queries=max_queries, holdout=holdout, held=held, ridge=ridge,
                                 allocation=allocation, seed=seed, scale=scale, progress=progress, sinks=sinks,
                                 window=window, **kwargs)
        cache, compacted = out
        results.append((cache, report, compacted) if return_compacted else (cache, report))
    return results if many else results[0]


def _compact_prefilled(model, kv, qs, suffix, report: CompactionReport, *, budget, method, queries, max_queries,
                       holdout, held, ridge, allocation, seed, scale, progress, **kwargs):
    """Compact the prefilled ``kv`` layer by layer (fills ``report``): ``(cache, compacted)``.

    ``held``: layer -> held-out queries captured apart from ``qs`` (then every query of ``qs`` may
    fit), or ``None`` (``holdout`` queries of ``qs`` are split off)."""
    gen = torch.Generator().manual_seed(seed)
    if held is not None:
        holdout = 0
    T = kv[0][0].shape[2]
    L = len(kv)
    types = attention_layer_types(model.config)
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    full = [i for i in range(L) if types[i] == "full_attention"]
    budgets = [budget] * L
    if allocation != "uniform":  # the same fit queries as below (same generator sequence)
        g2 = torch.Generator().manual_seed(seed)
        fit_q, targets = {}, {}
        for i in full:
            idx, _ = subsample_index(qs[i].shape[2], max_queries, g2, holdout, qs[i].device)
            fit_q[i] = qs[i][:, :, idx]
            if queries != "context":  # the prefill's queries repeat the context: a copy target each
                targets[i] = repeat_copy_targets(T, idx, device=qs[i].device)
        budgets = _budgets(kv, fit_q, budget, allocation, scale, layers=full, copy_targets=targets or None)
    plain = [CompactedCacheLayer(k, v, None, T) for k, v in kv]
    out_layers: List[CompactedLayer] = []
    t_queries = t_compact = t_eval = 0.0
    stages: Dict[str, float] = {}
    stats: Dict[str, object] = {}
    for i in _tqdm(range(L), progress, L, f"compacting ({method}, {queries})"):
        t1 = time.perf_counter()
        if types[i] == "sliding_attention":
            out_layers.append(_sliding_layer(*kv[i], int(window), T))
            continue
        if queries == "on_policy" and i > 0:
            cache = CompactedDynamicCache.from_layers(
                [CompactedCacheLayer.from_compacted(c, T) for c in out_layers] + plain[i:])
            q_all = capture_layer_queries(model, cache, suffix, i)
        else:
            q_all = qs[i]
        q_fit, q_held = subsample(q_all, max_queries, gen, holdout)
        if held is not None:
            q_held = held[i]
        report.fit_queries = q_fit.shape[2]
        report.heldout_queries = 0 if q_held is None else q_held.shape[2]
        t2 = time.perf_counter()
        k, v = kv[i]
        layer = compact_layer(k, v, q_fit, budgets[i], method, scale=scale, ridge=ridge, logical_length=T,
                              timings=stages, stats=stats, **kwargs)
        stats["usable_slots"] = stats.get("usable_slots", 0) + int(layer.counts.sum())
        stats["compacted_heads"] = stats.get("compacted_heads", 0) + layer.counts.numel()  # B * Hkv per layer
        stats["stored_slots"] = stats.get("stored_slots", 0) + int(layer.bias.numel())  # incl. padding
        t3 = time.perf_counter()
        if q_held is not None:
            m = attention_match_metrics(k, v, layer, q_held, scale=scale)
            report.layers.append({"layer": i, "t": layer.compacted_length, **m})
        t4 = time.perf_counter()
        out_layers.append(layer)
        t_queries += t2 - t1
        t_compact += t3 - t2
        t_eval += t4 - t3
    report.times["queries"] = t_queries
    report.times["compaction"] = t_compact
    report.times["evaluation"] = t_eval
    report.stage_times = stages
    report.stats = stats
    compacted = CompactedCache(out_layers, T)
    report.compacted_length = max(layer.compacted_length for layer in out_layers)
    cache = CompactedDynamicCache.from_compacted(compacted, config=model.config)
    return cache, compacted
