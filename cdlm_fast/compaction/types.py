"""Data structures of a compacted KV cache (Attention Matching).

A compacted layer replaces the ``T`` cached keys/values of every KV head by ``t << T``
keys ``C_k``, values ``C_v`` and a per-key log-weight ``beta`` that is added to the attention
score of that key, so that for typical queries ``q``::

    softmax([scale * q.C_k + beta]) @ C_v   ~=   softmax(scale * q.K) @ V
    log sum_j exp(scale * q.C_k[j] + beta[j])  ~=   log sum_j exp(scale * q.K[j])

Consumers (the transformers cache in :mod:`cdlm_fast.compaction.hf_cache`, block-causal
decoders) only need the attributes below and pass ``bias`` to :func:`cdlm_fast.attention`
as its ``bias`` argument. New tokens keep the RoPE positions of the *original* sequence:
the first new token has position ``logical_length``, not ``t``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

__all__ = ["CompactedLayer", "CompactedCache"]


@dataclass
class CompactedLayer:
    """One attention layer's compacted keys, values and bias.

    Attributes:
        keys: ``[B, Hkv, t, D]`` compacted keys ``C_k`` (post-RoPE, as stored in a KV cache), in
            the cache dtype.
        values: ``[B, Hkv, t, D]`` fitted values ``C_v``, in the cache dtype.
        bias: ``[B, Hkv, t]`` float32, ``beta = log w``; ``-inf`` marks a slot that must be
            ignored (a key whose NNLS weight is exactly zero, or padding when heads have
            different budgets: every head is padded to the largest budget ``t``).
        logical_length: ``T``, the number of original tokens this layer stands for (the RoPE
            position of the next token). ``None`` when the layer was left uncompacted.
        counts: optional ``[B, Hkv]`` int64 number of usable slots per head (finite ``bias``);
            the usable slots come first, the ``-inf`` ones (if any) after them.
        indices: optional ``[B, Hkv, t]`` int64 original position (``0..T-1``) of the key in each
            slot, ``-1`` where the slot is not an original key (padding or a synthetic key).
    """

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    logical_length: Optional[int] = None
    counts: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None

    @property
    def compacted_length(self) -> int:
        """``t``, the number of slots per head (including padding)."""
        return int(self.keys.shape[-2])

    def to(self, *args, **kwargs) -> "CompactedLayer":
        """Move keys/values/bias (bias stays float32) like ``Tensor.to``."""
        keys = self.keys.to(*args, **kwargs)
        values = self.values.to(*args, **kwargs)
        bias = self.bias.to(device=keys.device)
        counts = None if self.counts is None else self.counts.to(device=keys.device)
        indices = None if self.indices is None else self.indices.to(device=keys.device)
        return CompactedLayer(keys, values, bias, self.logical_length, counts, indices)


@dataclass
class CompactedCache:
    """A whole model's compacted KV cache.

    Attributes:
        layers: one :class:`CompactedLayer` per decoder layer, in order (``keys``/``values``
            ``[B, Hkv, t_l, D]``, ``bias`` ``[B, Hkv, t_l]`` float32; ``t_l`` may differ per layer;
            an uncompacted layer has ``bias`` all zeros and ``t_l = T``).
        logical_length: ``T``, the length of the original token sequence. The next token has
            RoPE position ``T`` regardless of how many slots are stored.
    """

    layers: List[CompactedLayer] = field(default_factory=list)
    logical_length: int = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int) -> CompactedLayer:
        return self.layers[idx]

    def __iter__(self):
        return iter(self.layers)

    def memory_bytes(self) -> int:
        """Bytes held by keys, values and bias of all layers."""
        return sum(t.numel() * t.element_size() for l in self.layers for t in (l.keys, l.values, l.bias))
