"""The transformers cache keyword helper, and the suite's rule that transformers deprecations
triggered from cdlm_fast code are errors (``conftest.py``)."""
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from cdlm_fast._hf_compat import cache_keyword, cache_kwargs, output_cache  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def test_keyword_is_a_forward_parameter_and_does_not_warn():
    model, _ = tiny_model("llama", twin=False)
    kw = cache_keyword(model)
    assert kw in ("cache", "past_key_values")
    assert kw in inspect.signature(type(model).forward).parameters
    ids = torch.randint(0, 100, (1, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, DynamicCache()))
        cache = output_cache(out)
        assert cache.get_seq_length() == 7
        gen = model.generate(torch.randint(0, 100, (1, 9)), max_new_tokens=2, do_sample=False,
                             **cache_kwargs(model, DynamicCache()))
    assert gen.shape == (1, 11)


def _fake(name, src, **glob):
    g = {"__name__": name, "warnings": warnings, **glob}
    exec(src, g)
    return g


def test_transformers_deprecation_from_cdlm_fast_code_is_an_error():
    old = _fake("transformers.fake_models", "def forward():\n"
                "    warnings.warn('`past_key_values` is deprecated. Use `cache` instead.', FutureWarning, 2)\n")
    caller = _fake("cdlm_fast.fake_caller", "def call():\n    forward()\n", forward=old["forward"])
    with pytest.raises(FutureWarning, match="triggered from cdlm_fast code"):
        caller["call"]()
    with pytest.warns(FutureWarning):  # the same warning from test code stays a warning
        old["forward"]()
