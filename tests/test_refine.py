"""Gradient refinement of compacted layers (:mod:`cdlm_fast.compaction.refine`)."""
from __future__ import annotations

import math

import pytest
import torch

from cdlm_fast.compaction import METHODS, compact_layer
from cdlm_fast.compaction.refine import layer_loss, refine
from cdlm_fast.ops.attention import attention


def _problem(seed=0, B=1, Hkv=2, G=2, T=160, D=16, n=256, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, Hkv, T, D, generator=gen) * 1.5
    values = torch.randn(B, Hkv, T, D, generator=gen)
    centre = keys.mean(2, keepdim=True).repeat_interleave(G, 1)

    def queries(m):
        return torch.randn(B, Hkv * G, m, D, generator=gen) * 1.5 + centre

    return keys.to(dtype), values.to(dtype), queries(n).to(dtype), queries(128).to(dtype)


def _loss(layer, keys, values, q, key_bias=None):
    """Per-head loss ``[B, Hkv]`` of ``layer`` on queries ``q``."""
    q = q.float()
    y, lse = attention(q, keys.float(), values.float(), bias=key_bias, return_lse=True)
    return layer_loss(layer.keys.float(), layer.values.float(), layer.bias, q, y, lse, torch.isfinite(lse).float(),
                      scale=q.shape[-1] ** -0.5)


def _held_split(n, holdout=0.25, seed=0):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:min(n - 1, max(1, round(holdout * n)))]


def test_refine_improves_fresh_queries_and_never_worsens_heldout():
    keys, values, q, q_test = _problem()
    start = compact_layer(keys, values, q, 12, "highest_attention")
    history = []
    out = refine(start, keys, values, q, steps=150, lr=3e-2, history=history)
    held = _held_split(q.shape[2])
    before, after = _loss(start, keys, values, q[:, :, held]), _loss(out, keys, values, q[:, :, held])
    assert (after <= before + 1e-6).all(), (before, after)
    t0, t1 = _loss(start, keys, values, q_test).mean(), _loss(out, keys, values, q_test).mean()
    assert t1 < 0.7 * t0, f"refinement should generalise to fresh queries: {t0:.3f} -> {t1:.3f}"
    assert history and history[-1]["best"] <= history[0]["heldout"]


def test_refine_keeps_masked_slots_dtypes_and_metadata():
    keys, values, q, _ = _problem(seed=1, dtype=torch.float16)
    start = compact_layer(keys, values, q, torch.tensor([[12, 7]]), "omp_fast", logical_length=500)
    assert torch.isneginf(start.bias[0, 1]).sum() >= 5  # head 1 padded to 12 slots
    out = refine(start, keys, values, q, steps=20, lr=1e-2, eval_every=5)
    assert out.keys.dtype == torch.float16 and out.values.dtype == torch.float16 and out.bias.dtype == torch.float32
    assert torch.equal(torch.isneginf(out.bias), torch.isneginf(start.bias))
    assert torch.isfinite(out.keys).all() and torch.isfinite(out.values).all()
    assert out.logical_length == 500 and torch.equal(out.counts, start.counts)
    # a head whose keys moved has no original positions any more; an unmoved head keeps them
    for h in range(2):
        moved = not torch.equal(out.keys[0, h], start.keys[0, h])
        expect = torch.full_like(start.indices[0, h], -1) if moved else start.indices[0, h]
        assert torch.equal(out.indices[0, h], expect)


def test_refine_stops_when_nothing_improves():
    """lr so large that every step makes the heads worse: the start comes back unchanged."""
    keys, values, q, _ = _problem(seed=2)
    start = compact_layer(keys, values, q, 12, "highest_attention")
    history = []
    out = refine(start, keys, values, q, steps=200, lr=50.0, eval_every=2, patience=3, history=history)
    assert [h["step"] for h in history] == [2, 4, 6] and all(h["improved"] == 0 for h in history)
    assert all(h["heldout"] > 100 * h["best"] for h in history)
    assert torch.equal(out.keys, start.keys) and torch.equal(out.values, start.values)
    assert torch.equal(out.bias, start.bias)


@pytest.mark.parametrize("method", METHODS)
def test_compact_layer_refine_steps(method):
    keys, values, q, q_test = _problem(seed=3)
    mask = torch.ones(1, keys.shape[2], dtype=torch.bool)
    mask[:, :9] = False  # padding keys: never selected, never attended
    kb = torch.zeros(1, 2, keys.shape[2]).masked_fill(~mask[:, None], -math.inf)
    timings = {}
    am = compact_layer(keys, values, q, 10, method, key_mask=mask)
    refined = compact_layer(keys, values, q, 10, method, key_mask=mask, refine_steps=60, refine_lr=3e-2,
                            timings=timings)
    assert "refine" in timings
    assert _loss(refined, keys, values, q_test, kb).mean() < _loss(am, keys, values, q_test, kb).mean()


def test_refine_under_inference_mode():
    keys, values, q, _ = _problem(seed=4, T=60, n=40)
    with torch.inference_mode():
        start = compact_layer(keys, values, q, 6, "highest_attention")
        out = compact_layer(keys, values, q, 6, "highest_attention", refine_steps=5)
    assert out.keys.shape == start.keys.shape


@pytest.mark.parametrize("kw,match", [(dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(holdout=1.0), "holdout"),
                                      (dict(key_mask=torch.ones(1, 5, dtype=torch.bool)), "key_mask"),
                                      (dict(eval_every=0), "eval_every")])
def test_refine_bad_args(kw, match):
    keys, values, q, _ = _problem(seed=5, T=40, n=20)
    start = compact_layer(keys, values, q, 4, "highest_attention")
    with pytest.raises(ValueError, match=match):
        refine(start, keys, values, q, **kw)


def test_compact_model_cache_with_refinement():
    """``refine_steps`` passes through ``compact_model_cache``; the held-out report does not get worse."""
    pytest.importorskip("transformers")
    from cdlm_fast.compaction import compact_model_cache
    from tiny_models import tiny_model

    model, _ = tiny_model("qwen2", twin=False)
    ids = torch.randint(0, 200, (1, 120), generator=torch.Generator().manual_seed(0))
    kw = dict(ratio=10, method="highest_attention", queries="context", holdout=32, progress=False)
    _, am = compact_model_cache(model, ids, **kw)
    _, ref = compact_model_cache(model, ids, refine_steps=100, refine_lr=1e-2, **kw)
    assert "refine" in ref.stage_times
    for metric in ("rel_error", "mass_error"):
        e_am = sum(r[metric] for r in am.layers)
        e_ref = sum(r[metric] for r in ref.layers)
        assert e_ref < e_am, (metric, e_am, e_ref)
