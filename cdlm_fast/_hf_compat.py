"""transformers version compatibility: the name of the KV-cache keyword.

transformers renamed the ``past_key_values`` argument of ``forward`` / ``generate`` (and the
output field) to ``cache``; the old name warns (``FutureWarning``) and will be removed. The
package supports both sides of the rename (5.17 .. newest), so every call site passes the cache
through :func:`cache_kwargs` and reads it back with :func:`output_cache`.

Example::

    >>> out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    >>> cache = output_cache(out)
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict

__all__ = ["cache_keyword", "cache_kwargs", "output_cache"]


@functools.lru_cache(maxsize=None)
def _keyword_of(forward_fn) -> str:
    try:
        params = inspect.signature(forward_fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """``"cache"`` if ``model.forward`` takes the new keyword (newer transformers), else ``"past_key_values"``."""
    return _keyword_of(type(model).forward)


def cache_kwargs(model, cache) -> Dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)`` / ``model.generate(...)`` with the installed transformers."""
    return {cache_keyword(model): cache}


def output_cache(output):
    """The cache of a model output (field ``cache`` in newer transformers, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):  # a ModelOutput is a dict of its non-None fields
        if name in output:
            return output[name]
    return None
