"""Reference queries for Attention Matching, captured from a transformers model.

* ``"context"``: the queries of the context's own prefill (positions ``0..T-1``).
* ``"repeat"`` (repeat-prefill): the model reads ``context + instruction + context``, the
  instruction asking it to repeat the context verbatim and the context prefilled as its
  answer; the queries of the answer part are the ones a model produces when it has to
  retrieve the whole context, at positions after ``T``.
* ``"on_policy"``: like ``"repeat"``, but layer ``l``'s queries are captured with layers
  ``0..l-1`` already compacted, so later layers are fitted to the queries they will actually
  see (``L - 1`` extra partial forwards, each stopped right after the layer it needs).

Queries are post-RoPE (as the attention function receives them), recorded by the
``"cdlm_fast"`` attention function (:func:`cdlm_fast.compaction.hf_attention.capture_queries`).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._hf_compat import cache_kwargs
from .hf_attention import ATTN_NAME, QueryCapture, StopForward, capture_queries, register

__all__ = ["QUERY_MODES", "DEFAULT_INSTRUCTION", "use_attention", "instruction_ids", "prefill_with_queries",
           "prefill_with_heldout_queries", "capture_layer_queries", "subsample", "subsample_index",
           "repeat_copy_targets"]

QUERY_MODES = ("repeat", "on_policy", "context")
DEFAULT_INSTRUCTION = "\n\nRepeat the previous context verbatim.\n\n"


@contextlib.contextmanager
def use_attention(model, name: str = ATTN_NAME):
    """Temporarily switch ``model`` to the attention implementation ``name``."""
    register()
    prev = getattr(model.config, "_attn_implementation", None)
    if prev != name:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        if prev != name and prev is not None:
            model.set_attn_implementation(prev)


def instruction_ids(tokenizer=None, instruction: str = DEFAULT_INSTRUCTION, device=None) -> torch.Tensor:
    """``[1, m]`` token ids of the repeat instruction (empty without a tokenizer)."""
    if tokenizer is None:
        return torch.zeros(1, 0, dtype=torch.long, device=device)
    ids = tokenizer(instruction, add_special_tokens=False, return_tensors="pt").input_ids
    return ids.to(device)


def _layer_kv(cache, T: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys[:, :, :T].contiguous(), layer.values[:, :, :T].contiguous()) for layer in cache.layers]


@torch.no_grad()
def prefill_with_queries(model, input_ids: torch.Tensor, mode: str = "repeat",
                         instr_ids: Optional[torch.Tensor] = None):
    """Prefill the context and capture reference queries of every layer.

    Args:
        model: a transformers causal LM (full-attention layers).
        input_ids: ``[B, T]`` context token ids (no padding).
        mode: ``"repeat"``/``"on_policy"`` (queries of the repeated context) or ``"context"``.
        instr_ids: ``[1, m]`` instruction ids for the repeat modes.

    Returns:
        ``(kv, queries, suffix)``: ``kv`` a list per layer of ``(keys, values)`` ``[B, Hkv, T, D]``
        of the context, ``queries`` a dict layer -> ``[B, Hq, n, D]``, and ``suffix`` the ``[B, m+T]``
        ids that follow the context in repeat modes (``None`` for ``"context"``).
    """
    kv, queries, suffix, _ = _prefill(model, input_ids, mode, instr_ids, None)
    return kv, queries, suffix


@torch.no_grad()
def prefill_with_heldout_queries(model, input_ids: torch.Tensor, mode: str, instr_ids: Optional[torch.Tensor],
                                 heldout_positions: torch.Tensor):
    """:func:`prefill_with_queries` in a repeat mode, also keeping the context's own queries at
    ``heldout_positions`` (positions in ``[0, T)``), captured in the same forward: queries that
    evaluate a compaction without being taken from its fit queries.

    Args:
        model, input_ids, instr_ids: as :func:`prefill_with_queries`; ``mode`` ``"repeat"`` or
            ``"on_policy"``.
        heldout_positions: ``[h]`` int64 context positions, each in ``[0, T)``.

    Returns:
        ``(kv, queries, suffix, heldout)``: the first three as :func:`prefill_with_queries`,
        ``heldout`` a dict layer -> ``[B, Hq, h, D]`` queries of the context at those positions.
    """
    if mode == "context":
        raise ValueError("prefill_with_heldout_queries needs mode 'repeat' or 'on_policy' (in 'context' mode the "
                         "held-out queries are a split of the fit queries, see subsample)")
    T = input_ids.shape[1]
    pos = torch.as_tensor(heldout_positions, dtype=torch.int64).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= T):
        raise ValueError(f"heldout_positions must lie in [0, T={T}), got values in "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    return _prefill(model, input_ids, mode, instr_ids, pos)


def _prefill(model, input_ids, mode, instr_ids, extra):
    from transformers import DynamicCache

    B, T = input_ids.shape
    if mode == "context":
        seq, start, suffix = input_ids, 0, None
    else:
        instr = instr_ids if instr_ids is not None else instruction_ids(device=input_ids.device)
        suffix = torch.cat([instr.to(input_ids.device).expand(B, -1), input_ids], 1)
        seq, start = torch.cat([input_ids, suffix], 1), T + instr.shape[1]
    cap = QueryCapture(start=start, extra=extra)
    cache = DynamicCache()
    with use_attention(model), capture_queries(cap):
        model(input_ids=seq, use_cache=True, **cache_kwargs(model, cache))
    queries = {i: cap.get(i) for i in cap.queries}
    held = {i: torch.cat(x, dim=2) for i, x in cap.extra_queries.items()} if extra is not None else None
    return _layer_kv(cache, T), queries, suffix, held


@torch.no_grad()
def capture_layer_queries(model, cache, suffix: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Queries ``[B, Hq, m+T, D]`` of layer ``layer_idx`` for ``suffix`` read after ``cache``.

    ``cache`` (a :class:`~cdlm_fast.compaction.hf_cache.CompactedDynamicCache`) may hold
    compacted layers below ``layer_idx``; it is not modified (the appended tokens are cropped).
    The forward stops right after ``layer_idx``'s attention.
    """
    cap = QueryCapture(layers=[layer_idx], stop_after=layer_idx)
    before = [layer.keys.shape[-2] for layer in cache.layers]
    with use_attention(model), capture_queries(cap):
        try:
            model(input_ids=suffix, use_cache=True, **cache_kwargs(model, cache))
        except StopForward:
            pass
    for layer, n in zip(cache.layers, before):
        extra = layer.keys.shape[-2] - n
        if extra:
            layer.crop(-extra)
    return cap.get(layer_idx)


def subsample_index(n: int, max_queries: Optional[int], generator: Optional[torch.Generator] = None,
                    holdout: int = 0, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The random split of :func:`subsample` as indices: ``(fit [<= max_queries] sorted, held-out
    [min(holdout, n // 4)])`` int64 positions in ``[0, n)`` (same draws from ``generator``)."""
    perm = torch.randperm(n, generator=generator).to(device)
    hold = min(holdout, n // 4)
    rest = perm[hold:]
    if max_queries is not None and rest.numel() > max_queries:
        rest = rest[:max_queries]
    return rest.sort().values, perm[:hold]


def subsample(queries: torch.Tensor, max_queries: Optional[int], generator: Optional[torch.Generator] = None,
              holdout: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Random split of ``[B, Hq, n, D]`` queries into ``(fit [<= max_queries], held-out [holdout])``
    (``held-out`` is ``None`` when empty); :func:`subsample_index` gives the positions."""
    fit, held = subsample_index(queries.shape[2], max_queries, generator, holdout, queries.device)
    return queries[:, :, fit], (queries[:, :, held] if held.numel() else None)


def repeat_copy_targets(T: int, index: Optional[torch.Tensor] = None, offset: int = 0, device=None) -> torch.Tensor:
    """``[n]`` int64: for every repeat-prefill query the context key it copies next, ``-1`` for none.

    The query that repeats context token ``j`` has to write token ``j + 1`` next, so an induction
    (copying) head puts its weight on key ``j + 1``; the last token's query has no target. Pass
    the result as ``copy_targets`` of :func:`cdlm_fast.compaction.compact_kv` (with queries of
    :func:`prefill_with_queries` in ``"repeat"`` mode).

    Args:
        T: context length (the queries repeat tokens ``0..T-1``).
        index: the queries kept, ``[n]`` positions among the ``offset + T`` captured ones (e.g. the
            fit indices of :func:`subsample_index`); all of them by default.
        offset: queries before the repeated context (the instruction's, as captured by
            :func:`capture_layer_queries`), whose target is ``-1``.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    t = torch.cat([torch.full((offset,), -1, dtype=torch.int64), torch.arange(1, T + 1, dtype=torch.int64)])
    t[-1] = -1
    if index is not None:
        index = torch.as_tensor(index)
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise TypeError(f"index must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= offset + T):
            raise ValueError(f"index must lie in [0, offset + T = {offset + T}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        t = t[index.long().cpu()]
    return t.to(device)
