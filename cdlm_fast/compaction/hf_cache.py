"""A transformers ``Cache`` holding Attention-Matching-compacted layers.

:class:`CompactedDynamicCache` is a ``transformers.DynamicCache`` whose layers are
:class:`CompactedCacheLayer` (a ``DynamicLayer`` with a per-key bias). It reports the
*logical* sequence length ``T + new tokens`` from ``get_seq_length()``, which is what
``generate`` and the models use to derive position ids, so new tokens get the RoPE positions
they would have had with the full cache. Physically each layer stores ``t`` compacted slots
followed by the new tokens' keys/values (bias 0).

Usage::

    cache = CompactedDynamicCache.from_compacted(compacted, config=model.config)
    model.set_attn_implementation("cdlm_fast")
    out = model.generate(torch.cat([context_ids, prompt_ids], 1), **cache_kwargs(model, cache), ...)

``generate`` skips the first ``cache.get_seq_length() = T`` tokens of ``input_ids`` (the
context), exactly as with a regular prefilled cache.
"""
from __future__ import annotations

from typing import Optional

import torch
import transformers

from .hf_attention import ATTN_NAME, BIAS_ATTR, SLOTS_ATTR, check_transformers_version

check_transformers_version(transformers.__version__)
from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402
from .types import CompactedCache, CompactedLayer

__all__ = ["CompactedCacheLayer", "CompactedDynamicCache", "attention_layer_types"]

LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_layer_types(config) -> list:
    """``config``'s decoder layer types (``"full_attention"`` / ``"sliding_attention"``), one per layer.

    From ``layer_types`` when the config has it, else every layer is sliding when the config
    sets a ``sliding_window`` (and ``use_sliding_window`` is not False), full otherwise. Other
    layer types (chunked, linear attention, ...) raise ``NotImplementedError``.
    """
    text_config = config.get_text_config(decoder=True)
    types = getattr(text_config, "layer_types", None)
    if types is None:
        sliding = getattr(text_config, "sliding_window", None) is not None and \
            getattr(text_config, "use_sliding_window", True)
        types = ["sliding_attention" if sliding else "full_attention"] * text_config.num_hidden_layers
    bad = [i for i, tp in enumerate(types) if tp not in LAYER_TYPES]
    if bad:
        raise NotImplementedError(f"layers {bad} are {types[bad[0]]!r} layers; the compacted cache supports "
                                  f"{' and '.join(LAYER_TYPES)} layers only")
    return list(types)


class CompactedCacheLayer(DynamicLayer):
    """One layer: ``t`` compacted slots (keys, values, bias) standing for ``T`` tokens, then new tokens.

    Attributes (after initialisation):
        keys, values: ``[B, Hkv, t + new, D]``.
        bias: ``[B, Hkv, t + new]`` float32 (``beta`` on the compacted slots, 0 on new tokens),
            or ``None`` for a plain layer.
        compacted_length: ``t``. logical_length: ``T``.
    """

    def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, logical_length: Optional[int] = None, **kwargs):
        super().__init__()
        self.bias: Optional[torch.Tensor] = None
        self.compacted_length = 0
        self.logical_length = 0
        if keys is not None:
            if values is None or values.shape[:3] != keys.shape[:3]:
                raise ValueError("values must be given with keys and have shape [B, Hkv, t, Dv] like keys "
                                 f"{tuple(keys.shape)}")
            t = keys.shape[2]
            if bias is not None and tuple(bias.shape) != tuple(keys.shape[:3]):
                raise ValueError(f"bias must have shape [B, Hkv, t] = {tuple(keys.shape[:3])}, got {tuple(bias.shape)}")
            T = t if logical_length is None else int(logical_length)
            if T < t:
                raise ValueError(f"logical_length ({T}) must be >= the number of stored slots ({t})")
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys, values
            self.bias = None if bias is None else bias.to(device=keys.device, dtype=torch.float32)
            self.compacted_length, self.logical_length = t, T
            self.is_initialized = True

    @classmethod
    def from_compacted(cls, layer: CompactedLayer, logical_length: Optional[int] = None) -> "CompactedCacheLayer":
        """Build from a :class:`CompactedLayer` (``logical_length`` defaults to the layer's own)."""
        T = logical_length if logical_length is not None else layer.logical_length
        return cls(layer.keys, layer.values, layer.bias, T)

    def _tag(self, keys: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            setattr(keys, BIAS_ATTR, self.bias)
        setattr(keys, SLOTS_ATTR, (self.compacted_length, self.logical_length))
        return keys

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new keys/values ``[B, Hkv, L, D]``; returns all keys (tagged with the bias) and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.bias is not None:
            zeros = torch.zeros(*key_states.shape[:3], dtype=torch.float32, device=self.bias.device)
            self.bias = torch.cat([self.bias, zeros], dim=-1)
        return self._tag(self.keys), self.values

    def get_seq_length(self) -> int:
        """Logical length: original tokens ``T`` plus tokens appended since compaction."""
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2] - self.compacted_length + self.logical_length

    def get_mask_sizes(self, query_length):
        """``(kv_length, kv_offset)`` in logical positions (older transformers pass ``cache_position``)."""
        if torch.is_tensor(query_length):
            query_length = query_length.shape[-1]
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` appended tokens (never the compacted slots)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2] - self.compacted_length:
            raise ValueError(f"cannot crop {n} tokens: only {self.keys.shape[-2] - self.compacted_length} tokens were "
                             "appended after compaction")
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        if self.bias is not None:
            self.bias = self.bias[..., :-n]

    def reset(self) -> None:
        super().reset()
        self.bias, self.compacted_length, self.logical_length = None, 0, 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.bias is not None:
            self.bias = self.bias.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.bias is not None:
            self.bias = self.bias[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.bias is not None:
            self.bias = self.bias.index_select(0, beam_idx.to(self.bias.device))


class CompactedDynamicCache(DynamicCache):
    """``DynamicCache`` of :class:`CompactedCacheLayer` (one per decoder layer).

    Args:
        compacted: optional :class:`CompactedCache` to start from (``layers[l].keys`` etc.
            ``[B, Hkv, t_l, D]``, bias ``[B, Hkv, t_l]``).
        config: optional model config; used to reject layer types other than full and
            sliding-window attention and, at every
            ``update``, to check that the model runs the ``"cdlm_fast"`` attention (any other
            attention ignores the bias and the logical positions of the compacted slots).
    """

    def __init__(self, compacted: Optional[CompactedCache] = None, config=None):
        self._attn_config = None if config is None else config.get_text_config(decoder=True)
        if config is not None:
            attention_layer_types(config)  # raises on layer types the cache cannot serve
        if compacted is None:
            super().__init__()
            self.layer_class_to_replicate = CompactedCacheLayer
            return
        layers = [CompactedCacheLayer.from_compacted(layer, compacted.logical_length) for layer in compacted.layers]
        super(DynamicCache, self).__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``DynamicCache.update``, after checking that a compacted layer is read by ``"cdlm_fast"``."""
        impl = getattr(getattr(self, "_attn_config", None), "_attn_implementation", None)
        if impl is not None and impl != ATTN_NAME and layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if isinstance(layer, CompactedCacheLayer) and (
                    layer.bias is not None or layer.compacted_length != layer.logical_length):
                raise RuntimeError(
                    f"this CompactedDynamicCache holds Attention-Matching-compacted layers, which only the "
                    f"{ATTN_NAME!r} attention can read (per-key bias, logical positions), but the model runs "
                    f"attn_implementation={impl!r}. Call model.set_attn_implementation({ATTN_NAME!r}) (or run "
                    f"inside `with cdlm_fast.compaction.queries.use_attention(model):`) first.")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def from_compacted(cls, compacted: CompactedCache, config=None) -> "CompactedDynamicCache":
        """Wrap a :class:`CompactedCache` for ``model.generate(..., **cache_kwargs(model, cache))``."""
        return cls(compacted, config=config)

    @classmethod
    def from_layers(cls, layers) -> "CompactedDynamicCache":
        """Build from a list of :class:`CompactedCacheLayer` (mixing compacted and plain layers)."""
        cache = cls()
        cache.layer_class_to_replicate = None
        cache.layers = list(layers)
        return cache
