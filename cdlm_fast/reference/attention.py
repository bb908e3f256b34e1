"""Pure-PyTorch reference for :func:`cdlm_fast.attention`.

Dense and slow on purpose: it materialises the ``[B, Hq, Lq, Lk]`` score matrix and the
block-causal mask, and is the oracle every kernel is compared with. It runs on any
device and in float64 on the CPU.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = ["key_limits", "visible_mask", "attention_reference"]


def key_limits(
    prefix_len: torch.Tensor,
    block_size: Optional[int],
    q_offset: int,
    lq: int,
    lk: int,
    kv_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Number of visible keys for every query: ``[B, Lq]`` int64.

    Under the block-causal semantics each query sees a *prefix* ``[0, limit)`` of the keys
    (before the ``-inf`` entries of ``bias``):

    * ``block_size is None``: ``limit = Lk`` (bidirectional);
    * query at key index ``p = q_offset + i`` with ``p < prefix_len``: ``limit = prefix_len``;
    * otherwise ``limit = prefix_len + block_size * ((p - prefix_len) // block_size + 1)``;

    then clipped to ``[0, min(Lk, kv_lens)]``.

    Args:
        prefix_len: ``[B]`` integer tensor.
        block_size: ``None`` or an int >= 1.
        q_offset: key index of query 0.
        lq, lk: number of queries and keys.
        kv_lens: optional ``[B]`` integer tensor; keys at or past it are absent.
    """
    device = prefix_len.device
    prefix = prefix_len.to(torch.int64).view(-1, 1)
    pos = torch.arange(lq, device=device, dtype=torch.int64).view(1, -1) + q_offset
    if block_size is None:
        limit = torch.full((prefix.shape[0], lq), lk, device=device, dtype=torch.int64)
    else:
        rel = pos - prefix
        generated = prefix + block_size * (torch.div(rel, block_size, rounding_mode="floor") + 1)
        limit = torch.where(rel < 0, prefix.expand_as(generated), generated)
    cap = torch.full_like(prefix, lk) if kv_lens is None else kv_lens.to(torch.int64).view(-1, 1).clamp(max=lk)
    return torch.minimum(limit, cap).clamp(min=0)


def visible_mask(
    prefix_len: torch.Tensor,
    block_size: Optional[int],
    q_offset: int,
    lq: int,
    lk: int,
    kv_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean ``[B, Lq, Lk]`` mask: ``True`` where key j is visible to query i."""
    limits = key_limits(prefix_len, block_size, q_offset, lq, lk, kv_lens)
    j = torch.arange(lk, device=limits.device).view(1, 1, -1)
    return j < limits.unsqueeze(-1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    prefix_len: Union[int, torch.Tensor] = 0,
    block_size: Optional[int] = None,
    q_offset: int = 0,
    kv_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Dense masked softmax attention with a per-key bias.

    Shapes: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``, bias ``[B, Hkv, Lk]``.
    Computes in float64 when q is float64, else float32. Returns ``out`` ``[B, Hq, Lq, D]``
    in q's dtype (and ``lse`` ``[B, Hq, Lq]`` float32, or float64 for float64 inputs).
    Queries that see no key get zeros and ``lse = -inf``.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = d ** -0.5
    if not torch.is_tensor(prefix_len):
        prefix_len = torch.full((b,), int(prefix_len), dtype=torch.int64, device=q.device)

    kk = k.to(cdt).repeat_interleave(group, dim=1)
    vv = v.to(cdt).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(cdt), kk.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(cdt).repeat_interleave(group, dim=1).unsqueeze(2)
    mask = visible_mask(prefix_len.to(q.device), block_size, q_offset, lq, lk,
                        None if kv_lens is None else kv_lens.to(q.device))
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, torch.zeros_like(probs))
    out = torch.matmul(probs, vv).to(q.dtype)
    if return_lse:
        lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
        return out, lse.to(lse_dtype)
    return out
