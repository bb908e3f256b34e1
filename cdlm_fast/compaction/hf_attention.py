"""transformers integration: the ``"cdlm_fast"`` attention and mask functions.

After :func:`register` (called on import of :mod:`cdlm_fast.compaction`), any model whose
attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen3, ...)
can run with ``model.set_attn_implementation("cdlm_fast")`` (or
``model.config._attn_implementation = "cdlm_fast"``). Each call runs
:func:`cdlm_fast.attention` with causal masking (``block_size=1``) and the per-key bias of a
compacted cache.

How the bias reaches the attention function: transformers does not pass the cache object
to attention functions, so the cache layer
(:class:`cdlm_fast.compaction.hf_cache.CompactedCacheLayer`) attaches its bias to the key
tensor it returns from ``update`` (attribute ``cdlm_fast_bias``, ``[B, Hkv, Lk]`` float32,
plus ``cdlm_fast_slots = (t, T)``: ``t`` compacted slots standing for ``T`` original
tokens). Keys from any other cache carry no bias and are attended normally.

Masks: the registered mask function returns the 2-D boolean padding mask (``[B, kv_len]``
over *logical* positions) or ``None``; causality is applied inside the kernel. Padding of the
compacted part is already folded into its bias (``-inf``). Custom 4-D masks are rejected.

Sliding-window layers (``module.sliding_window`` set, e.g. in Gemma-3 or Qwen3 with
``layer_types``) are computed densely over the last ``sliding_window`` keys (torch, float32
softmax); their keys must be contiguous token positions ending at the queries, which holds for
any uncompacted cache layer (compaction leaves sliding layers uncompacted).

Reference-query capture (:func:`capture_queries`) records the post-RoPE queries each layer
receives, which is how repeat-prefill and on-policy queries are collected.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..ops.attention import attention

__all__ = ["ATTN_NAME", "BIAS_ATTR", "SLOTS_ATTR", "cdlm_fast_attention_forward", "cdlm_fast_mask",
           "register", "capture_queries", "QueryCapture", "StopForward"]

ATTN_NAME = "cdlm_fast"
BIAS_ATTR = "cdlm_fast_bias"
SLOTS_ATTR = "cdlm_fast_slots"


class StopForward(Exception):
    """Raised by a capture to end a forward pass early (after the last layer it needs)."""


@dataclass
class QueryCapture:
    """Collects post-RoPE queries ``[B, Hq, L, D]`` per layer index during forward passes.

    Attributes:
        layers: layer indices to record (``None``: all).
        start, stop: slice of the query positions of each forward to keep.
        stop_after: raise :class:`StopForward` after this layer has been recorded.
        extra: optional 1-D int64 tensor of further query positions of each forward to keep apart
            (e.g. held-out queries outside ``[start, stop)``), recorded in ``extra_queries``.
        queries: layer index -> list of recorded ``[B, Hq, l, D]`` tensors (detached).
        extra_queries: layer index -> list of recorded ``[B, Hq, len(extra), D]`` tensors.
    """

    layers: Optional[Sequence[int]] = None
    start: int = 0
    stop: Optional[int] = None
    stop_after: Optional[int] = None
    extra: Optional[torch.Tensor] = None
    queries: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    extra_queries: Dict[int, List[torch.Tensor]] = field(default_factory=dict)

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        if self.layers is None or layer_idx in self.layers:
            self.queries.setdefault(layer_idx, []).append(query[:, :, self.start:self.stop].detach())
            if self.extra is not None:
                pos = self.extra.to(query.device)
                self.extra_queries.setdefault(layer_idx, []).append(query.detach().index_select(2, pos))
        if self.stop_after is not None and layer_idx == self.stop_after:
            raise StopForward()

    def get(self, layer_idx: int) -> torch.Tensor:
        """All recorded queries of a layer concatenated along the sequence: ``[B, Hq, n, D]``."""
        return torch.cat(self.queries[layer_idx], dim=2)


_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("cdlm_fast_query_capture", default=None)
_BACKEND: contextvars.ContextVar = contextvars.ContextVar("cdlm_fast_hf_backend", default="auto")


@contextlib.contextmanager
def capture_queries(capture: QueryCapture):
    """Record queries into ``capture`` for forwards run with the ``"cdlm_fast"`` attention."""
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


@contextlib.contextmanager
def attention_backend(backend: str):
    """Select the :func:`cdlm_fast.attention` backend used by the ``"cdlm_fast"`` function."""
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def _key_bias(key: torch.Tensor, attention_mask: Optional[torch.Tensor], B: int, Hkv: int) -> Optional[torch.Tensor]:
    """``[B, Hkv, Lk]`` float32 bias for the physical keys (cache bias + padding), or None."""
    Lk = key.shape[2]
    bias = getattr(key, BIAS_ATTR, None)
    t, T = getattr(key, SLOTS_ATTR, (0, 0))
    if attention_mask is None:
        return bias
    if attention_mask.dim() != 2:
        raise ValueError("the 'cdlm_fast' attention takes a 2-D padding mask [B, kv_len] (or None); got a mask of "
                         f"shape {tuple(attention_mask.shape)}. Custom 4-D masks are not supported.")
    need = T + (Lk - t)
    if attention_mask.shape[-1] < need:
        raise ValueError(f"attention_mask must cover the {need} logical key positions, got shape "
                         f"{tuple(attention_mask.shape)}")
    new = attention_mask[:, T:need].to(torch.bool)
    pad = torch.zeros(B, Lk - t, dtype=torch.float32, device=key.device).masked_fill(~new.to(key.device),
                                                                                     float("-inf"))
    if t:
        pad = torch.cat([torch.zeros(B, t, dtype=torch.float32, device=key.device), pad], dim=1)
    pad = pad[:, None, :].expand(B, Hkv, Lk)
    return pad.contiguous() if bias is None else bias + pad


def cdlm_fast_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """Attention function for ``AttentionInterface`` (name ``"cdlm_fast"``).

    Args:
        module: the attention module (``layer_idx``, ``sliding_window`` are read).
        query: ``[B, Hq, Lq, D]`` post-RoPE queries.
        key, value: ``[B, Hkv, Lk, D]`` all keys/values of the layer (cache + new), possibly
            carrying a compacted cache's bias (see the module docstring).
        attention_mask: ``None`` or a 2-D bool ``[B, kv_len]`` padding mask (logical positions).
        scaling: score scale (default ``D ** -0.5``).
        dropout: must be 0 (inference only).

    Returns:
        ``(out [B, Lq, Hq, D], None)``: causal attention of the ``Lq`` new queries, which sit at the
        end of the ``Lk`` keys.
    """
    if dropout and module.training:
        raise NotImplementedError("the 'cdlm_fast' attention is inference-only (dropout must be 0)")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("the 'cdlm_fast' attention does not implement attention logit soft-capping")
    capture = _CAPTURE.get()
    if capture is not None:  # may raise StopForward: record before computing
        capture.record(getattr(module, "layer_idx", -1), query)
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    bias = _key_bias(key, attention_mask, B, Hkv)
    if key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    window = getattr(module, "sliding_window", None)
    if window is not None:
        return _sliding_window_attention(query, key, value, bias, int(window), scaling), None
    out = attention(query, key, value, bias=bias, block_size=1, q_offset=Lk - Lq, scale=scaling,
                    backend=_BACKEND.get())
    return out.transpose(1, 2).contiguous(), None


def _sliding_window_attention(query, key, value, bias, window: int, scaling, chunk: int = 512):
    """``[B, Lq, Hq, D]`` causal attention limited to the ``window`` most recent keys (``q - k < window``).

    query ``[B, Hq, Lq, D]`` sits at the end of key/value ``[B, Hkv, Lk, D]`` (contiguous positions);
    bias ``[B, Hkv, Lk]`` float32 or None (padding, ``-inf``). Rows with no visible key give 0.
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scaling is None else float(scaling)
    off = Lk - Lq
    outs = []
    for s in range(0, Lq, chunk):
        e = min(Lq, s + chunk)
        k0, k1 = max(0, off + s - window + 1), off + e
        q = query[:, :, s:e].float()
        k = key[:, :, k0:k1].float().repeat_interleave(G, 1)
        v = value[:, :, k0:k1].float().repeat_interleave(G, 1)
        qi = torch.arange(off + s, off + e, device=query.device)[:, None]
        kj = torch.arange(k0, k1, device=query.device)[None, :]
        allowed = (kj <= qi) & (qi - kj < window)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        if bias is not None:
            scores = scores + bias[:, :, k0:k1].repeat_interleave(G, 1)[:, :, None, :]
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(p, v))
    out = torch.cat(outs, dim=2).to(query.dtype)
    return out.transpose(1, 2).contiguous()


def cdlm_fast_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """Mask function for ``AttentionMaskInterface`` (name ``"cdlm_fast"``).

    Returns the 2-D boolean padding mask ``[B, kv_length]`` (logical key positions) or ``None``;
    causality and the compacted cache's bias are handled by the attention function.
    """
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


_REGISTERED = False
# The mask-function signature and the cache-layer API used here exist from this transformers on.
MIN_TRANSFORMERS = (5, 17)


def check_transformers_version(version: str) -> None:
    """Raise ``ImportError`` naming the requirement when ``version`` is older than 5.17."""
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_TRANSFORMERS:
        raise ImportError(f"cdlm_fast.compaction needs transformers>={MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]} "
                          f"(found {version}); install it with: pip install 'cdlm_fast[hf]' or "
                          f"pip install 'transformers>={MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]}'")


def register() -> str:
    """Register ``"cdlm_fast"`` with transformers' attention and mask interfaces; returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        import transformers
        from transformers import AttentionInterface

        check_transformers_version(transformers.__version__)
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, cdlm_fast_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, cdlm_fast_mask)
        _REGISTERED = True
    return ATTN_NAME
