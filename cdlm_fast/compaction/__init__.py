"""Attention Matching KV-cache compaction (arXiv 2602.16284) with transformers integration.

Core: :func:`compact_layer` (one layer's ``[B, Hkv, T, D]`` keys/values -> :class:`CompactedLayer`).
Models: :func:`compact_model_cache` (prefill, reference queries, compaction of every layer,
quality report) returning a :class:`CompactedDynamicCache` for ``model.generate`` with
``attn_implementation="cdlm_fast"`` (registered on import).
"""
from .types import CompactedCache, CompactedLayer  # noqa: F401  (dependency-free; import first)
from .core import METHODS, allocate_counts, compact_layer, resolve_counts  # noqa: E402
from .hf_attention import ATTN_NAME, register  # noqa: E402
from .hf_cache import CompactedCacheLayer, CompactedDynamicCache  # noqa: E402
from .api import CompactionReport, compact_kv, compact_model_cache  # noqa: E402
from .quality import attention_match_metrics, keep_highest_attention, keep_recent, nll_table  # noqa: E402

register()

__all__ = ["CompactedLayer", "CompactedCache", "METHODS", "compact_layer", "resolve_counts", "allocate_counts", "ATTN_NAME", "register",
           "CompactedCacheLayer", "CompactedDynamicCache", "CompactionReport", "compact_kv", "compact_model_cache",
           "attention_match_metrics", "keep_highest_attention", "keep_recent", "nll_table"]
