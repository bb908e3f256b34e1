"""transformers integration: "cdlm_fast" attention, compacted cache, generate, model-level compaction.

Tiny random Llama / Qwen2 / Qwen3 models (transformers >= 5.0; tested with 5.23).
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from cdlm_fast.compaction import (CompactedCache, CompactedDynamicCache, CompactedLayer,  # noqa: E402
                                  compact_model_cache)
from cdlm_fast.compaction.hf_cache import CompactedCacheLayer  # noqa: E402
from cdlm_fast._hf_compat import cache_kwargs  # noqa: E402
from cdlm_fast.compaction.queries import prefill_with_heldout_queries, prefill_with_queries  # noqa: E402
from tiny_models import model_classes  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3"]


def tiny_model(arch, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, head_dim=16)
    cfg_cls, cls = model_classes(arch)
    return cls(cfg_cls(**common)).eval()


def _subset_cache(model, ctx, keep, seed=1):
    """A hand-made 'compacted' cache: a subset of the real KV with a random bias (-inf included)."""
    with torch.no_grad():
        model.set_attn_implementation("eager")
        pk = model(ctx, use_cache=True).past_key_values
    g = torch.Generator().manual_seed(seed)
    B, T = ctx.shape
    bias = torch.randn(B, 2, len(keep), generator=g)
    bias[0, 1, 2] = float("-inf")
    layers = [CompactedLayer(pk.layers[i].keys[:, :, keep].clone(), pk.layers[i].values[:, :, keep].clone(),
                             bias.clone(), T) for i in range(len(pk.layers))]
    return CompactedCache(layers, T)


def _eager_reference(model, comp, new):
    """Same computation with stock eager attention: physical cache + explicit 4-D float mask + positions."""
    B, Lq = new.shape
    t, T = comp.layers[0].keys.shape[2], comp.logical_length
    dc = DynamicCache()
    for i, layer in enumerate(comp.layers):
        dc.update(layer.keys.clone(), layer.values.clone(), i)
    Hq = model.config.num_attention_heads
    mask = torch.zeros(B, Hq, Lq, t + Lq)
    mask[:, :, :, :t] = comp.layers[0].bias.repeat_interleave(Hq // 2, 1)[:, :, None, :]
    mask[:, :, :, t:] = torch.triu(torch.full((Lq, Lq), float("-inf")), 1)
    pos = torch.arange(T, T + Lq)[None].expand(B, -1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(new, **cache_kwargs(model, dc), attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_sdpa(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        model.set_attn_implementation("cdlm_fast")
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 1e-4


def test_left_padding_matches_sdpa():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (2, 20))
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :6] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, attention_mask=am).logits
        model.set_attn_implementation("cdlm_fast")
        out = model(ids, attention_mask=am).logits
    assert (out[0] - ref[0]).abs().max() < 1e-4
    assert (out[1, 6:] - ref[1, 6:]).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_compacted_cache_bias_and_logical_positions(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (2, 33))
    T = 26
    keep = torch.tensor([0, 1, 4, 7, 9, 13, 17, 20, 24, 25])
    comp = _subset_cache(model, ids[:, :T], keep)
    for layer in comp.layers:  # same bias in every layer so one 4-D mask describes the reference
        layer.bias = comp.layers[0].bias
    cache = CompactedDynamicCache.from_compacted(comp, config=model.config)
    assert cache.get_seq_length() == T
    new = ids[:, T:]
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        out = model(new, **cache_kwargs(model, cache), attention_mask=torch.ones(2, ids.shape[1], dtype=torch.long)).logits
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.layers[0].keys.shape[2] == len(keep) + new.shape[1]
    ref = _eager_reference(model, comp, new)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_continues_from_logical_length(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (1, 30))
    T = 24
    keep = torch.arange(0, T, 2)
    comp = _subset_cache(model, ids[:, :T], keep)
    cache = CompactedDynamicCache.from_compacted(comp, config=model.config)
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        gen = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 34) and torch.equal(gen[:, :30], ids)
    assert cache.get_seq_length() == 33  # T + 6 prompt tokens + 3 fed-back tokens
    # step-by-step greedy decoding with the eager reference gives the same tokens
    comp2 = _subset_cache(model, ids[:, :T], keep)
    for layer in comp2.layers:
        layer.bias = comp.layers[0].bias
    cache2 = CompactedDynamicCache.from_compacted(comp2)
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        gen2 = model.generate(ids, **cache_kwargs(model, cache2), max_new_tokens=3, do_sample=False)
    ref_tokens = []
    seq = ids[:, T:]
    for _ in range(3):
        logits = _eager_reference(model, comp2, seq)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ref_tokens.append(nxt)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen2[:, 30:], torch.cat(ref_tokens, 1))


def test_cache_layer_crop_and_batch_ops():
    k = torch.randn(2, 2, 5, 8)
    layer = CompactedCacheLayer(k, k.clone(), torch.zeros(2, 2, 5), logical_length=40)
    assert layer.get_seq_length() == 40
    keys, _ = layer.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    assert keys.shape[2] == 8 and layer.bias.shape == (2, 2, 8) and layer.get_seq_length() == 43
    assert getattr(keys, "cdlm_fast_slots") == (5, 40)
    layer.crop(-2)
    assert layer.get_seq_length() == 41 and layer.bias.shape[-1] == 6
    with pytest.raises(ValueError, match="appended"):
        layer.crop(-3)
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape[0] == 1 and layer.bias.shape[0] == 1
    with pytest.raises(ValueError, match="logical_length"):
        CompactedCacheLayer(k, k, None, logical_length=3)


def test_attention_rejects_4d_mask_and_softcap():
    from cdlm_fast.compaction.hf_attention import cdlm_fast_attention_forward

    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 3, 16)
    mod = torch.nn.Module()
    with pytest.raises(ValueError, match="2-D"):
        cdlm_fast_attention_forward(mod, q, k, k, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="soft-capping"):
        cdlm_fast_attention_forward(mod, q, k, k, None, softcap=50.0)


def test_sliding_window_attention_matches_float64_reference():
    from cdlm_fast.compaction.hf_attention import cdlm_fast_attention_forward

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Lq, Lk, D, w = 2, 4, 2, 7, 19, 16, 5
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, 13] = False  # a padded key inside the window of the later queries
    mod = torch.nn.Module()
    mod.sliding_window = w
    out, _ = cdlm_fast_attention_forward(mod, q, k, v, mask, scaling=0.3)
    qi = torch.arange(Lk - Lq, Lk)[:, None]
    kj = torch.arange(Lk)[None]
    allowed = (kj <= qi) & (qi - kj < w) & mask[:, None, None, :]
    s = 0.3 * q.double() @ k.double().repeat_interleave(2, 1).mT
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v.double().repeat_interleave(2, 1)
    assert torch.allclose(out.transpose(1, 2).double(), ref, atol=1e-5)


def test_repeat_queries_are_post_rope_and_positioned():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 12))
    instr = torch.tensor([[5, 6, 7]])
    kv, qs, suffix = prefill_with_queries(model, ids, "repeat", instr)
    assert len(kv) == 2 and kv[0][0].shape == (1, 2, 12, 16)
    assert qs[0].shape == (1, 4, 12, 16) and torch.equal(suffix, torch.cat([instr, ids], 1))
    # keys of the context equal a plain prefill's keys
    with torch.no_grad():
        pk = model(ids, use_cache=True).past_key_values
    assert torch.allclose(kv[1][0], pk.layers[1].keys, atol=1e-5)
    # repeat queries differ from context queries (positions T+3.. vs 0..)
    _, qc, _ = prefill_with_queries(model, ids, "context")
    assert qc[0].shape == (1, 4, 12, 16) and not torch.allclose(qc[0], qs[0], atol=1e-3)


@pytest.mark.parametrize("queries", ["repeat", "on_policy", "context"])
def test_compact_model_cache_end_to_end(queries):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 101, (1, 60))
    cache, report = compact_model_cache(model, ids, ratio=4, method="omp_fast", queries=queries, holdout=16,
                                        progress=False)
    assert isinstance(cache, CompactedDynamicCache) and cache.get_seq_length() == 60
    # mixed allocation (default): 15 keys per head on average, heads padded to their layer's largest count
    hkv, L = model.config.num_key_value_heads, model.config.num_hidden_layers
    assert cache.layers[0].keys.shape[2] >= 15 and report.stats["usable_slots"] <= 15 * hkv * L
    assert report.stats["stored_slots"] == sum(layer.keys.shape[2] for layer in cache.layers) * hkv
    assert set(report.times) == {"prefill", "queries", "compaction", "evaluation"}
    assert set(report.stage_times) == {"reference", "select", "beta", "values"}
    assert len(report.layers) == 2
    for row in report.layers:
        assert 0 <= row["rel_error"] < 1.0 and row["cosine"] > 0.5 and row["mass_error"] < 1.0
    # 15 keys per head on average (the largest layer's t is more under mixed budgets)
    assert report.stats["compacted_heads"] == hkv * L and report.stats["usable_slots"] == 15 * hkv * L
    assert "T=60 -> 15.0 keys per head on average (4.0x; largest layer t=" in report.summary()
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        out = model.generate(torch.cat([ids, ids[:, :2]], 1), **cache_kwargs(model, cache), max_new_tokens=3,
                             do_sample=False)
    assert out.shape == (1, 65)


@pytest.mark.parametrize("queries", ["repeat", "on_policy", "context"])
def test_compact_model_cache_passes_copy_targets_of_the_repeat_queries(queries, monkeypatch):
    # the budgets see, for every fit query of the repeated context, the key it copies next (query j
    # repeats token j: key j + 1); the context's own queries copy nothing
    from cdlm_fast.compaction import api
    from cdlm_fast.compaction.queries import repeat_copy_targets, subsample_index

    seen = {}
    real = api.allocate_counts

    def spy(kv, qs, budget, **kw):
        seen["targets"], seen["n"] = kw.get("copy_targets"), {i: q.shape[2] for i, q in qs.items()}
        return real(kv, qs, budget, **kw)

    monkeypatch.setattr(api, "allocate_counts", spy)
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 40))
    compact_model_cache(model, ids, ratio=4, queries=queries, max_queries=25, holdout=8, progress=False)
    if queries == "context":
        assert seen["targets"] is None
        return
    g = torch.Generator().manual_seed(0)  # the same draws as compact_model_cache's seed 0
    for i in range(2):
        idx, _ = subsample_index(40, 25, g, 0)
        assert seen["n"][i] == 25 and torch.equal(seen["targets"][i], repeat_copy_targets(40, idx))
        assert torch.equal(seen["targets"][i], torch.where(idx < 39, idx + 1, -1))


def test_repeat_copy_targets_and_subsample_index():
    from cdlm_fast.compaction.queries import repeat_copy_targets, subsample, subsample_index

    assert repeat_copy_targets(4).tolist() == [1, 2, 3, -1]
    assert repeat_copy_targets(3, offset=2).tolist() == [-1, -1, 1, 2, -1]  # instruction queries first
    assert repeat_copy_targets(5, torch.tensor([4, 0, 2])).tolist() == [-1, 1, 3]
    for bad, match in (({"T": 0}, "T must be an int >= 1"), ({"T": 4, "offset": -1}, "offset must be"),
                       ({"T": 4, "index": torch.tensor([4])}, r"index must lie in \[0, offset \+ T = 4\)"),
                       ({"T": 4, "index": torch.tensor([0.5])}, "index must be a 1-D integer tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            repeat_copy_targets(**bad)
    q = torch.randn(1, 2, 30, 4)
    fit, held = subsample(q, 12, torch.Generator().manual_seed(3), holdout=5)
    i_fit, i_held = subsample_index(30, 12, torch.Generator().manual_seed(3), holdout=5)
    assert i_fit.shape == (12,) and i_held.shape == (5,) and bool((i_fit[1:] > i_fit[:-1]).all())
    assert torch.equal(fit, q[:, :, i_fit]) and torch.equal(held, q[:, :, i_held])
    assert not set(i_fit.tolist()) & set(i_held.tolist())


def test_compact_model_cache_bad_args():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 20))
    with pytest.raises(ValueError, match="ratio"):
        compact_model_cache(model, ids, ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="queries"):
        compact_model_cache(model, ids, queries="self_study", progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        compact_model_cache(model, ids.float(), progress=False)


def hybrid_model(arch, seed=0):
    """Tiny random model whose layers alternate sliding-window (window 8) and full attention."""
    torch.manual_seed(seed)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"] * 2)
    if arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common)
        return transformers.Gemma3ForCausalLM(cfg).eval()
    cfg = transformers.Qwen3Config(use_sliding_window=True, **common)
    return transformers.Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_hybrid_sliding_models_prefill_matches_sdpa(arch):
    model = hybrid_model(arch)
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        model.set_attn_implementation("cdlm_fast")
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_hybrid_models_compact_full_layers_only(arch):
    model = hybrid_model(arch)
    ids = torch.randint(0, 101, (1, 40))
    T = 32
    # a budget that keeps every key: generation matches the uncompacted model
    cache, report, comp = compact_model_cache(model, ids[:, :T], ratio=1, holdout=0, progress=False,
                                              return_compacted=True)
    assert [layer.compacted_length for layer in comp.layers] == [8, 32, 8, 32]  # sliding layers: the window
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        ref_logits = model(ref).logits[:, T:]
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False)
        cache2 = CompactedDynamicCache.from_compacted(comp, config=model.config)
        logits = model(ref[:, T:], **cache_kwargs(model, cache2)).logits
    assert torch.equal(out, ref)
    assert (logits - ref_logits).abs().max() < 1e-3
    # a real budget compacts the full-attention layers only
    _, _, comp4 = compact_model_cache(model, ids[:, :T], ratio=4, holdout=0, progress=False, return_compacted=True,
                                      allocation="uniform")
    assert [layer.compacted_length for layer in comp4.layers] == [8, 8, 8, 8]
    assert torch.equal(comp4.layers[0].keys, comp.layers[0].keys) and torch.equal(comp4.layers[0].indices[0, 0],
                                                                                  torch.arange(24, 32))
    assert torch.isfinite(comp4.layers[1].bias).all()


def test_unsupported_layer_types_are_rejected():
    cfg = transformers.Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(NotImplementedError, match="chunked_attention"):
        CompactedDynamicCache(None, config=cfg)


def test_several_ratios_from_one_prefill_match_single_calls():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 48))
    many = compact_model_cache(model, ids, ratio=[2, 6], holdout=8, progress=False, return_compacted=True)
    assert [r.ratio for _, r, _ in many] == [2.0, 6.0]
    for (_, rep, comp), r in zip(many, (2, 6)):
        _, rep1, comp1 = compact_model_cache(model, ids, ratio=r, holdout=8, progress=False, return_compacted=True)
        assert rep.fit_queries == rep1.fit_queries and rep.heldout_queries == 8
        for a, b in zip(comp.layers, comp1.layers):
            assert torch.equal(a.indices, b.indices) and torch.allclose(a.values, b.values, atol=1e-5)
    cfg = model.config  # 8 keys per head on average over the layers (mixed allocation)
    assert sum(int(c.counts.sum()) for c in many[1][2].layers) <= 8 * cfg.num_key_value_heads * cfg.num_hidden_layers
    assert many[0][1].times["prefill"] > 0 and many[1][1].times["prefill"] == 0
    with pytest.raises(ValueError, match="ratio"):
        compact_model_cache(model, ids, ratio=[2, 0.5], progress=False)


def test_holdout_evaluates_on_context_queries_and_leaves_the_fit_alone():
    model = tiny_model("llama")
    ids = torch.randint(0, 101, (1, 40))
    kw = dict(ratio=4, progress=False, return_compacted=True)
    _, rep0, comp0 = compact_model_cache(model, ids, holdout=0, **kw)
    _, rep8, comp8 = compact_model_cache(model, ids, holdout=8, **kw)
    # every repeat query fits either way (no tokenizer: the suffix is the context itself, 40 queries)
    assert rep0.fit_queries == rep8.fit_queries == 40
    assert rep0.heldout_queries == 0 and rep0.layers == []
    assert rep8.heldout_queries == 8 and len(rep8.layers) == model.config.num_hidden_layers
    assert all(math.isfinite(d["rel_error"]) for d in rep8.layers)
    for a, b in zip(comp0.layers, comp8.layers):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.bias, b.bias) and torch.equal(a.values, b.values)
    # the held-out queries are the context's own queries at those positions, from the same forward
    pos = torch.tensor([0, 5, 39])
    kv, qs, suffix, held = prefill_with_heldout_queries(model, ids, "repeat", None, pos)
    _, qc, _ = prefill_with_queries(model, ids, "context")
    assert qs[1].shape == (1, 4, 40, 16) and torch.equal(suffix, ids)
    assert torch.allclose(held[1], qc[1][:, :, pos], atol=1e-5)
    with pytest.raises(ValueError, match="heldout_positions"):
        prefill_with_heldout_queries(model, ids, "repeat", None, torch.tensor([40]))
    with pytest.raises(ValueError, match="mode"):
        prefill_with_heldout_queries(model, ids, "context", None, pos)


def test_compacted_cache_without_cdlm_fast_attention_is_a_clear_error():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 101, (1, 40))
    cache, _ = compact_model_cache(model, ids[:, :32], ratio=4, holdout=0, progress=False)
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_attn_implementation\\('cdlm_fast'\\)"):
        model(ids[:, 32:], **cache_kwargs(model, cache))
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, 32:], **cache_kwargs(model, cache)).logits).all()


def test_old_transformers_is_refused_with_the_requirement():
    from cdlm_fast.compaction.hf_attention import check_transformers_version

    check_transformers_version("5.17.0")
    check_transformers_version("6.0.0.dev0")
    with pytest.raises(ImportError, match="transformers>=5.17"):
        check_transformers_version("5.2.0")


def test_global_allocation_end_to_end_keeps_the_total():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 101, (1, 40))
    cache, report, comp = compact_model_cache(model, ids, ratio=4, allocation="global", holdout=8, progress=False,
                                              return_compacted=True)
    assert report.stats["usable_slots"] == 10 * 2 * 2  # ceil(40 / 4) keys x 2 KV heads x 2 layers
    assert report.stats["stored_slots"] >= report.stats["usable_slots"]
    assert sum(int(layer.counts.sum()) for layer in comp.layers) == 40
    model.set_attn_implementation("cdlm_fast")
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, :3], **cache_kwargs(model, cache)).logits).all()
