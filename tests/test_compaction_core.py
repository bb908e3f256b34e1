"""Attention Matching core: selection, beta/value fits, budgets, padding -- against float64 oracles."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # cdlm_fast.compaction imports it: a missing one skips this file
from cdlm_fast.compaction import CompactedCache, CompactedLayer, compact_layer, resolve_counts  # noqa: E402
from cdlm_fast.compaction.quality import attention_match_metrics, keep_highest_attention, keep_recent  # noqa: E402
from cdlm_fast.compaction.select import highest_attention_scores  # noqa: E402
from cdlm_fast.reference.attention import attention_reference  # noqa: E402


def _structured(B=1, Hkv=2, G=2, T=97, D=16, n=70, seed=0):
    """Keys with a few dominant directions so attention is compressible (like real caches)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(B, Hkv, 5, D, generator=g) * 2.0
    assign = torch.randint(0, 5, (B, Hkv, T), generator=g)
    k = centers.gather(2, assign[..., None].expand(-1, -1, -1, D)) + 0.4 * torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    qc = centers.repeat_interleave(G, 1)
    qa = torch.randint(0, 5, (B, Hkv * G, n), generator=g)
    q = qc.gather(2, qa[..., None].expand(-1, -1, -1, D)) + 0.5 * torch.randn(B, Hkv * G, n, D, generator=g)
    return k, v, q


def _errors(k, v, layer, q, key_bias=None):
    o, lse = attention_reference(q.double(), k.double(), v.double(), bias=key_bias, return_lse=True)
    oc, lc = attention_reference(q.double(), layer.keys.double(), layer.values.double(),
                                 bias=layer.bias.double(), return_lse=True)
    assert torch.isfinite(oc).all() and torch.isfinite(lc).all()
    return float((oc - o).norm() / o.norm()), float((torch.exp(lc - lse) - 1).abs().mean())


def _with_masks(kw, B, T, n, key_pad, query_pad):
    """``kw`` without its ``"masks"`` flag; with it, a key mask hiding the first ``key_pad`` keys of
    the last sample and a query mask dropping the last ``query_pad`` queries of the first."""
    kw = dict(kw)
    if kw.pop("masks", False):
        km = torch.ones(B, T, dtype=torch.bool)
        km[-1, :key_pad] = False
        qm = torch.ones(B, n, dtype=torch.bool)
        qm[0, -query_pad:] = False
        kw.update(key_mask=km, query_mask=qm)
    return kw


def _assert_same_compaction(got, ref, tol):
    """The same kept keys and usable slots; beta and values within ``tol``."""
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts)
    fin = torch.isfinite(ref.bias)
    assert torch.equal(fin, torch.isfinite(got.bias))
    assert float((got.bias[fin] - ref.bias[fin]).abs().max()) < tol
    assert float((got.values - ref.values).norm() / ref.values.norm()) < tol
    return fin


@pytest.mark.parametrize("method", ["highest_attention", "omp", "omp_fast"])
def test_compact_layer_shapes_dtypes_and_quality(method):
    k, v, q = _structured()
    layer = compact_layer(k, v, q, 13, method)
    assert layer.keys.shape == (1, 2, 13, 16) and layer.values.shape == (1, 2, 13, 16)
    assert layer.bias.shape == (1, 2, 13) and layer.bias.dtype == torch.float32
    assert layer.logical_length == 97 and not torch.isnan(layer.bias).any()
    # selected keys are original keys
    for h in range(2):
        same = (layer.keys[0, h][:, None, :] == k[0, h][None, :, :]).all(-1)
        assert bool(same.any(1).all())
    err, mass = _errors(k, v, layer, q)
    base_err, base_mass = _errors(k, v, keep_highest_attention(k, v, q, 13), q)
    assert err < 0.5 * base_err, (err, base_err)
    assert mass < 0.5 * base_mass, (mass, base_mass)


def test_full_budget_is_exact():
    k, v, q = _structured(T=40, n=60)
    layer = compact_layer(k, v, q, 40, "highest_attention", ridge=0.0)
    err, mass = _errors(k, v, layer, q)
    assert err < 1e-4 and mass < 1e-4


def test_beta_matches_scipy_nnls():
    k, v, q = _structured(Hkv=1, G=3, T=50, n=40, seed=3)
    layer = compact_layer(k, v, q, 12, "highest_attention")
    s = 16 ** -0.5
    Q = q[0].reshape(-1, 16).double()
    lse = torch.logsumexp(s * Q @ k[0, 0].double().T, -1)
    A = torch.exp(s * Q @ layer.keys[0, 0].double().T - lse[:, None]).numpy()
    nnls = pytest.importorskip("scipy.optimize").nnls  # a missing scipy skips, not ends collection
    w, _ = nnls(A, np.ones(len(A)))
    beta = layer.bias[0, 0].double().numpy()
    pos = w > 1e-8
    assert np.allclose(np.log(w[pos]), beta[pos], atol=1e-3)
    assert np.all(beta[~pos] < np.log(1e-6))


def test_values_match_float64_lstsq():
    k, v, q = _structured(Hkv=1, G=2, T=60, n=80, seed=4)
    layer = compact_layer(k, v, q, 10, "highest_attention", ridge=0.0)
    s = 16 ** -0.5
    Q = q[0].reshape(-1, 16).double()
    Y = attention_reference(q.double(), k.double(), v.double())[0].reshape(-1, 16)
    logits = s * Q @ layer.keys[0, 0].double().T + layer.bias[0, 0].double()
    X = torch.softmax(logits, -1)
    keep = torch.isfinite(layer.bias[0, 0])
    sol = torch.linalg.lstsq(X[:, keep], Y).solution
    rel = (layer.values[0, 0][keep].double() - sol).norm() / sol.norm()
    assert rel < 1e-3


def test_gqa_groups_use_all_query_heads():
    # Query head 1 of the group attends to keys that head 0 never looks at; both must be served.
    k, v, q = _structured(Hkv=1, G=2, T=80, n=50, seed=5)
    layer = compact_layer(k, v, q, 16, "highest_attention")
    err_all, _ = _errors(k, v, layer, q)
    only0 = compact_layer(k, v, q[:, :1].repeat(1, 2, 1, 1), 16, "highest_attention")
    err_only0, _ = _errors(k, v, only0, q)
    assert err_all <= err_only0 + 1e-6


def test_per_head_budgets_pad_with_neg_inf():
    k, v, q = _structured(B=2, Hkv=2, T=61, n=30, seed=6)
    counts = torch.tensor([[5, 9], [9, 3]])
    layer = compact_layer(k, v, q, counts, "omp_fast")
    assert layer.keys.shape[2] == 9
    assert torch.equal(layer.counts, counts)
    finite = torch.isfinite(layer.bias).sum(-1)
    assert bool((finite <= counts).all())
    assert torch.isneginf(layer.bias[1, 1, 3:]).all() and torch.isneginf(layer.bias[0, 0, 5:]).all()
    _errors(k, v, layer, q)  # finite, no NaN


def test_key_mask_never_selects_padding():
    k, v, q = _structured(B=2, Hkv=1, T=50, n=30, seed=7)
    key_mask = torch.ones(2, 50, dtype=torch.bool)
    key_mask[1, :20] = False  # left padding of sequence 1
    k[1, :, :20] = 50.0  # poison: would dominate attention if ever used
    layer = compact_layer(k, v, q, 8, "omp", key_mask=key_mask)
    assert float(layer.keys[1].abs().max()) < 50.0
    bias = torch.zeros(2, 1, 50).masked_fill(~key_mask[:, None], float("-inf"))
    err, _ = _errors(k, v, layer, q, key_bias=bias)
    assert err < 1.0


@pytest.mark.parametrize("method", ["highest_attention", "omp", "omp_fast"])
def test_key_mask_padding_keys_with_huge_scores_do_not_poison_fits(method):
    # sample 1 has fewer real keys than the budget, so some of its slots are padding; its
    # padding keys score far above the real ones (exp overflows) and must not produce NaN/inf
    k, v, q = _structured(B=2, Hkv=1, T=50, n=40, seed=9)
    key_mask = torch.ones(2, 50, dtype=torch.bool)
    key_mask[1, :45] = False
    k[1, :, :45] = 200.0 * q[1].mean((0, 1))
    layer = compact_layer(k, v, q, 10, method, key_mask=key_mask)
    assert not torch.isnan(layer.bias).any() and torch.isfinite(layer.values).all()
    assert torch.isfinite(layer.bias[1]).sum() <= 5
    bias = torch.zeros(2, 1, 50).masked_fill(~key_mask[:, None], float("-inf"))
    err, _ = _errors(k, v, layer, q, key_bias=bias)
    assert err < 1.0


def test_query_mask_ignores_padded_queries():
    k, v, q = _structured(B=1, Hkv=1, G=1, T=40, n=30, seed=8)
    qm = torch.ones(1, 30, dtype=torch.bool)
    qm[0, 20:] = False
    a = compact_layer(k, v, q, 6, "highest_attention", query_mask=qm)
    b = compact_layer(k, v, q[:, :, :20], 6, "highest_attention")
    assert torch.equal(a.keys, b.keys)
    assert torch.allclose(a.bias, b.bias, atol=1e-4) and torch.allclose(a.values, b.values, atol=1e-3)


def test_low_precision_cache_dtype_kept():
    k, v, q = _structured(seed=9)
    layer = compact_layer(k.half(), v.half(), q.half(), 10, "highest_attention")
    assert layer.keys.dtype == torch.float16 and layer.values.dtype == torch.float16
    assert layer.bias.dtype == torch.float32
    err, _ = _errors(k.half().float(), v.half().float(), layer, q.half().float())
    assert err < 0.5


def test_resolve_counts():
    assert resolve_counts(0.1, 1, 2, 95, "cpu").tolist() == [[10, 10]]
    assert resolve_counts(500, 1, 2, 95, "cpu").tolist() == [[95, 95]]
    assert resolve_counts([3, 4], 2, 2, 95, "cpu").tolist() == [[3, 4], [3, 4]]
    with pytest.raises(ValueError, match="fraction"):
        resolve_counts(2.5, 1, 2, 95, "cpu")
    with pytest.raises(ValueError, match="Hkv=2"):
        resolve_counts([1, 2, 3], 1, 2, 95, "cpu")
    with pytest.raises(ValueError):
        resolve_counts(0, 1, 2, 95, "cpu")


def test_bad_arguments():
    k, v, q = _structured()
    with pytest.raises(ValueError, match="method"):
        compact_layer(k, v, q, 4, "random")
    with pytest.raises(ValueError, match="queries"):
        compact_layer(k, v, q[:, :3], 4)
    with pytest.raises(TypeError, match="keys"):
        compact_layer(k.numpy(), v, q, 4)
    with pytest.raises(ValueError, match="key_mask"):
        compact_layer(k, v, q, 4, key_mask=torch.ones(1, 5, dtype=torch.bool))


def test_metrics_and_baselines():
    k, v, q = _structured(seed=10)
    layer = compact_layer(k, v, q, 12)
    m = attention_match_metrics(k, v, layer, q)
    assert set(m) == {"rel_error", "cosine", "mass_error"}
    assert 0 <= m["rel_error"] < 0.5 and m["cosine"] > 0.8 and math.isfinite(m["mass_error"])
    rec = keep_recent(k, v, 12, sinks=0)
    assert torch.equal(rec.keys, k[:, :, -12:]) and torch.equal(rec.bias, torch.zeros(1, 2, 12))
    sl = keep_recent(k, v, 12)  # StreamingLLM: 4 sinks + the 8 most recent keys
    assert sl.indices[0, 0].tolist() == [0, 1, 2, 3] + list(range(89, 97))
    assert torch.equal(sl.keys, k[:, :, sl.indices[0, 0]]) and sl.counts.tolist() == [[12, 12]]
    cc = CompactedCache([layer, rec], 97)
    assert len(cc) == 2 and cc.memory_bytes() > 0 and isinstance(cc[0], CompactedLayer)


def _check_indices(k, layer):
    """Usable slots hold distinct original keys at ``indices``; the others are -1 with bias -inf."""
    B, Hkv, t, D = layer.keys.shape
    for b in range(B):
        for h in range(Hkv):
            c = int(layer.counts[b, h])
            ind = layer.indices[b, h]
            assert (ind[:c] >= 0).all() and (ind[c:] == -1).all()
            assert len(set(ind[:c].tolist())) == c and ind[:c].tolist() == sorted(ind[:c].tolist())
            assert torch.equal(layer.keys[b, h, :c], k[b, h, ind[:c]])
            assert torch.isfinite(layer.bias[b, h, :c]).all() and torch.isneginf(layer.bias[b, h, c:]).all()


@pytest.mark.parametrize("method", ["highest_attention", "omp", "omp_fast"])
def test_every_slot_counts(method):
    # clustered keys: plain top-t by attention picks near-duplicates, many of which get NNLS weight 0;
    # their slots must be refilled so that every slot of the budget holds a usable key
    k, v, q = _structured(B=1, Hkv=2, G=2, T=120, n=90, seed=11)
    stats = {}
    layer = compact_layer(k, v, q, 30, method, stats=stats)
    assert layer.counts.tolist() == [[30, 30]], (layer.counts, stats)
    assert stats["dead_slots"] == 0
    _check_indices(k, layer)
    if method == "highest_attention":
        assert stats.get("slots_refilled", 0) > 0  # the case does exercise the refill


def test_dead_slots_only_when_budget_exceeds_useful_keys():
    # 6 useful keys; the 34 others score so low that their softmax weight underflows to exactly 0
    # for every query: with a budget of 20, at most 6 slots can be usable; the rest are reported
    # by counts and indices (-1) and placed after the usable ones
    g = torch.Generator().manual_seed(12)
    D = 16
    u = torch.ones(D) / D ** 0.5
    q = torch.randn(1, 2, 60, D, generator=g) * 0.3 + 2 * u
    k = torch.randn(1, 1, 40, D, generator=g) * 0.5
    far = torch.arange(40) % 7 != 0  # keys 0, 7, 14, ... stay useful
    k[0, 0, far] = -400.0 * u
    v = torch.randn(1, 1, 40, D, generator=g)
    stats = {}
    layer = compact_layer(k, v, q, 20, stats=stats)
    c = int(layer.counts[0, 0])
    assert 1 <= c <= 6 and stats["dead_slots"] == 20 - c, (c, stats)
    assert set(layer.indices[0, 0, :c].tolist()) <= {0, 7, 14, 21, 28, 35}
    _check_indices(k, layer)
    err, _ = _errors(k, v, layer, q)
    assert err < 0.05, err


def test_sinks_and_window_are_kept_within_budget():
    k, v, q = _structured(B=2, Hkv=2, T=90, n=60, seed=13)
    key_mask = torch.ones(2, 90, dtype=torch.bool)
    key_mask[1, :10] = False  # left padding: sinks are the first *real* keys
    for method in ("highest_attention", "omp_fast"):
        layer = compact_layer(k, v, q, 20, method, sinks=3, window=0.25, key_mask=key_mask)
        assert layer.counts.tolist() == [[20, 20], [20, 20]]
        for b, first in ((0, 0), (1, 10)):
            for h in range(2):
                ind = set(layer.indices[b, h].tolist())
                assert {first, first + 1, first + 2} <= ind and set(range(85, 90)) <= ind, (b, h, sorted(ind))
    # budgets that the sinks and the window fill entirely: nothing left to fit, originals kept
    for budget, sinks, window in ((4, 4, 0), (6, 2, 4)):
        layer = compact_layer(k, v, q, budget, "highest_attention", sinks=sinks, window=window)
        assert torch.equal(layer.counts, torch.full_like(layer.counts, budget))
        idx = layer.indices[0, 0].sort().values
        assert idx.tolist() == list(range(sinks)) + list(range(k.shape[2] - (budget - sinks), k.shape[2]))
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    with pytest.raises(ValueError, match="window"):
        compact_layer(k, v, q, 20, window=1.5)
    with pytest.raises(ValueError, match="sinks"):
        compact_layer(k, v, q, 20, sinks=-1)
    with pytest.raises(ValueError, match="aggregate"):
        compact_layer(k, v, q, 20, aggregate="median")


def test_max_aggregation_keeps_a_key_only_few_queries_attend():
    # key 17 takes most of the attention of 1 query out of 2000; 8 "popular" keys take a little
    # of every query's: RMS over queries ranks them above key 17, the maximum keeps key 17
    g = torch.Generator().manual_seed(14)
    D, T, n = 16, 60, 2000
    u = torch.zeros(D)
    u[0] = 1.0
    w = torch.zeros(D)
    w[1] = 1.0
    q = torch.randn(1, 1, n, D, generator=g) * 0.2 + 2 * u
    k = torch.randn(1, 1, T, D, generator=g) * 0.2
    popular = torch.arange(40, 48)
    k[0, 0, popular] += 1.5 * u
    k[0, 0, 17] = 3 * w
    q[0, 0, 0] = 8 * w
    s = 16 ** -0.5
    lse = torch.logsumexp(s * q[0] @ k[0].mT, -1)
    rank = {r: int((highest_attention_scores(q[0], k[0], lse, s, reduce=r)[0] >
                    highest_attention_scores(q[0], k[0], lse, s, reduce=r)[0, 17]).sum()) for r in ("rms", "max")}
    assert rank["max"] == 0 and rank["rms"] >= 8, rank


def test_fit_beta_falls_back_when_the_solver_does_not_converge(monkeypatch):
    from cdlm_fast.compaction import fit as fit_mod
    from cdlm_fast.ops.solvers import NNLSResult

    k, v, q = _structured(Hkv=1, G=1, T=50, n=40, seed=15)
    Q, C = q[0].float(), k[0, :, :10].float()
    lse = torch.logsumexp(16 ** -0.5 * Q @ k[0].float().mT, -1)
    valid = torch.ones(1, 10, dtype=torch.bool)
    good, res = fit_mod.fit_beta(Q, C, lse, 16 ** -0.5, valid)
    assert bool(res.converged.all())

    def broken(G, h, **kw):  # an iterate far from the solution, flagged as not converged
        x = torch.full_like(h, 1e3)
        return NNLSResult(x, torch.zeros(h.shape[0], dtype=torch.int64), torch.ones(h.shape[0]),
                          torch.zeros(h.shape[0], dtype=torch.bool))

    monkeypatch.setattr(fit_mod, "nnls_gram", broken)
    beta, res = fit_mod.fit_beta(Q, C, lse, 16 ** -0.5, valid)
    assert int((~res.converged).sum()) == 1
    # the uniform fallback replaces the bad iterate: finite, and the total mass close to 1
    assert torch.isfinite(beta).all() and float(beta.std()) < 1e-5
    A = torch.exp(16 ** -0.5 * Q @ C[0].mT - lse[0][:, None])
    mass = (A @ beta[0].exp()).mean()
    assert 0.5 < float(mass) < 2.0
    stats = {}
    monkeypatch.setattr("cdlm_fast.compaction.core.fit_beta", fit_mod.fit_beta)
    compact_layer(k, v, q, 10, stats=stats)
    assert stats["beta_not_converged"] >= 1


def test_ridge_auto_is_chosen_per_head_and_not_worse_than_ridge_zero():
    # head 0: many queries (ridge 0 is best); head 1: few queries for the slots (ill-posed fit)
    k, v, q = _structured(B=1, Hkv=2, G=1, T=200, n=400, seed=16)
    k2, v2, q2 = _structured(B=1, Hkv=2, G=1, T=200, n=400, seed=17)
    stats = {}
    auto = compact_layer(k, v, q[:, :, :300], 60, stats=stats)
    zero = compact_layer(k, v, q[:, :, :300], 60, ridge=0.0)
    assert sum(stats["ridge_chosen"].values()) == 2
    held = q[:, :, 300:]
    e_auto = [_errors(k[:, h:h + 1], v[:, h:h + 1], _head(auto, h), held[:, h:h + 1])[0] for h in range(2)]
    e_zero = [_errors(k[:, h:h + 1], v[:, h:h + 1], _head(zero, h), held[:, h:h + 1])[0] for h in range(2)]
    for a, z in zip(e_auto, e_zero):
        assert a <= 1.02 * z, (e_auto, e_zero)


def _head(layer, h):
    return CompactedLayer(layer.keys[:, h:h + 1], layer.values[:, h:h + 1], layer.bias[:, h:h + 1],
                          layer.logical_length)


def _copying_and_diffuse_heads(layers: int, diffuse: float, T: int = 64, D: int = 16):
    """``(kv, queries)`` of ``layers`` layers with two KV heads: in head 0 every query looks at one key of
    its own (a copying head, all keys needed; spread 1), in head 1 keys scaled by ``diffuse`` make the
    attention diffuse (a few keys summarise it; spread near ``T`` for a small ``diffuse``)."""
    g = torch.Generator().manual_seed(18)
    kv, qs = [], {}
    for layer in range(layers):
        k = torch.randn(1, 2, T, D, generator=g)
        k[0, 0] = k[0, 0] / k[0, 0].norm(dim=-1, keepdim=True) * 6
        k[0, 1] *= diffuse
        q = torch.randn(1, 2, T, D, generator=g) * 0.2
        q[0, 0] = k[0, 0] * 2  # query i copies key i
        kv.append((k, torch.randn(1, 2, T, D, generator=g)))
        qs[layer] = q
    return kv, qs


def test_global_allocation_gives_sharp_heads_more_keys_at_the_same_total(monkeypatch):
    from cdlm_fast.compaction import api, compact_kv
    from cdlm_fast.compaction.api import mixed_floor
    from cdlm_fast.compaction.core import allocate_counts

    kv, qs = _copying_and_diffuse_heads(2, 0.2)
    counts = allocate_counts(kv, qs, 0.25)
    c = torch.stack([x[0] for x in counts])  # [L, Hkv]
    assert int(c.sum()) == 16 * 2 * 2
    assert bool((c[:, 0] > 2 * c[:, 1]).all()), c
    comp = compact_kv(kv, qs, 0.25, allocation="global")
    for layer, cnt in zip(comp.layers, counts):
        assert torch.equal(layer.counts, cnt) and layer.keys.shape[2] == int(cnt.max())
    # mixed: every head keeps at least mixed_floor of its uniform count, the same total
    floor = mixed_floor(16)
    assert floor == 16 and mixed_floor(41) == 20 and mixed_floor(103) == 20 and mixed_floor(410) == 41
    monkeypatch.setattr(api, "MIXED_FLOOR_MIN_KEYS", 4)  # 4 of 16 here: a floor the global top-k can exceed
    floor = mixed_floor(16)
    mixed = compact_kv(kv, qs, 0.25, allocation="mixed")
    cm = torch.stack([layer.counts[0] for layer in mixed.layers])
    assert int(cm.sum()) == 16 * 2 * 2 and int(cm.min()) >= floor, cm
    assert bool((cm[:, 0] > cm[:, 1]).all()) and bool((cm[:, 1] < c[:, 1] + floor).all()), (cm, c)
    assert bool((cm[:, 1] > c[:, 1]).all()), "the floor raised the diffuse heads above their global count"
    with pytest.raises(ValueError, match="allocation"):
        compact_kv(kv, qs, 0.25, allocation="greedy")
    by_count = compact_kv(kv, qs, 16, allocation="global")  # 16 keys per head = 0.25 on average
    assert [torch.equal(a.counts, b.counts) for a, b in zip(by_count.layers, comp.layers)] == [True, True]
    with pytest.raises(ValueError, match="budget"):
        compact_kv(kv, qs, 100, allocation="global")  # more keys than the 64 a head has


def test_mass_gram_column_updates_match_a_fresh_gram():
    from cdlm_fast.compaction.fit import MassGram, fit_beta

    g = torch.Generator().manual_seed(5)
    P, N, T, t, D = 3, 200, 90, 17, 16
    K = torch.randn(P, T, D, generator=g)
    Q = torch.randn(P, N, D, generator=g)
    lse = torch.logsumexp(Q @ K.mT * D ** -0.5, -1)
    qw = (torch.rand(P, N, generator=g) > 0.1).float()
    idx = torch.stack([torch.randperm(T, generator=g)[:t] for _ in range(P)])
    valid = torch.ones(P, t, dtype=torch.bool)
    C = K.gather(1, idx[:, :, None].expand(-1, -1, D))
    gram = MassGram(Q, C, lse, D ** -0.5, query_weight=qw)
    # problem 0: three slots change; problem 1: one; problem 2: none (one slot becomes padding)
    new = idx.clone()
    new[0, [1, 5, 16]] = torch.tensor([t + 1, t + 2, t + 3])
    new[1, 0] = t + 4
    valid[2, 3] = False
    C2 = K.gather(1, new[:, :, None].expand(-1, -1, D))
    gram.replace(new != idx, C2)
    fresh = MassGram(Q, C2, lse, D ** -0.5, query_weight=qw)
    torch.testing.assert_close(gram.G, fresh.G, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram.h, fresh.h, rtol=1e-5, atol=1e-6)
    beta, res = gram.solve(valid)
    ref, _ = fit_beta(Q, C2, lse, D ** -0.5, valid, query_weight=qw)
    torch.testing.assert_close(beta.exp(), ref.exp(), rtol=1e-4, atol=1e-6)
    assert bool(torch.isneginf(beta[2, 3]))
    sub, _ = gram.solve(valid, problems=torch.tensor([0, 2]))
    torch.testing.assert_close(sub.exp(), beta[[0, 2]].exp())


def test_slots_the_refills_cannot_fill_are_floored_not_dead(monkeypatch):
    # clustered keys (as in test_every_slot_counts): the first NNLS leaves dead slots; with the
    # refill rounds capped, the slots still dead must be floored (finite beta >= -3), not dropped
    import cdlm_fast.compaction.core as core

    monkeypatch.setattr(core, "MAX_REFILL_ROUNDS", 0)  # the first solve's dead slots stay for the floor
    k, v, q = _structured(B=1, Hkv=2, G=2, T=120, n=90, seed=11)
    stats = {}
    layer = compact_layer(k, v, q, 30, ridge=0.0, stats=stats)
    assert stats["dead_slots"] == 0 and stats.get("slots_floored", 0) > 0, stats
    assert layer.counts.tolist() == [[30, 30]]
    assert (layer.bias >= -3.0 - 1e-5).all() and torch.isfinite(layer.bias).all()
    _check_indices(k, layer)
    err, mass = _errors(k, v, layer, q)
    monkeypatch.setattr(core, "MAX_REFILL_ROUNDS", 8)
    err_refilled, _ = _errors(k, v, compact_layer(k, v, q, 30, ridge=0.0), q)
    assert err < 1.5 * err_refilled + 0.01 and mass < 0.05, (err, err_refilled, mass)


def test_fit_beta_floor_only_where_a_key_has_mass():
    from cdlm_fast.compaction.fit import WEIGHT_FLOOR, fit_beta

    g = torch.Generator().manual_seed(6)
    D = 8
    u = torch.ones(D) / D ** 0.5
    Q = torch.randn(1, 50, D, generator=g) * 0.3 + 2 * u
    K = torch.randn(1, 40, D, generator=g) * 0.5
    C = torch.cat([K[:, :5], -400.0 * u.view(1, 1, D)], 1)  # key 5: no mass for any query (exp underflows)
    C[0, 1] = C[0, 0]  # a duplicate: NNLS leaves one copy at 0 without the floor
    lse = torch.logsumexp(Q @ K[0].T, dim=-1)
    valid = torch.ones(1, 6, dtype=torch.bool)
    scale = 1.0
    beta0, _ = fit_beta(Q, C, lse, scale, valid)
    beta1, res = fit_beta(Q, C, lse, scale, valid, floor=valid)
    # the duplicate makes the passive set singular; with float32 G, h the KKT residual is at their
    # rounding level (about 2.6e-9), which nnls_gram reports as converged for float32 data
    assert bool(res.converged.all()) and float(res.kkt_residual.max()) < 1.2e-8, res
    assert float(torch.exp(beta0[0, :5]).min()) < WEIGHT_FLOOR, beta0  # the floor binds somewhere
    w1 = torch.exp(beta1[0])
    assert (w1[:5] >= WEIGHT_FLOOR * (1 - 1e-5)).all(), w1
    assert torch.isneginf(beta1[0, 5]), beta1  # no mass: the floor does not apply


def test_residual_gain_matches_dense_float64():
    from cdlm_fast.compaction.select import residual_gain

    g = torch.Generator().manual_seed(7)
    P, N, T, D, t = 3, 37, 53, 8, 6
    Q, K = torch.randn(P, N, D, generator=g), torch.randn(P, T, D, generator=g)
    scale = D ** -0.5
    S = scale * Q.double() @ K.double().transpose(1, 2)
    lse = torch.logsumexp(S, -1)
    A = torch.exp(S - lse[:, :, None])  # [P, N, T]
    sel = torch.randperm(T, generator=g)[:t]
    w = torch.rand(P, t, generator=g, dtype=torch.float64) * 5
    qw = (torch.rand(P, N, generator=g) > 0.2).float()
    bias = torch.zeros(P, T)
    bias[:, 3] = float("-inf")
    r = (qw.double() - (A[:, :, sel] @ w[:, :, None])[:, :, 0]) * qw.double()
    want = (A.transpose(1, 2) @ r[:, :, None])[:, :, 0] / A.norm(dim=1)
    fitted = (A[:, :, sel] @ w[:, :, None])[:, :, 0]
    got = residual_gain(Q, K, lse.float(), scale, fitted.float(), bias, query_weight=qw)
    assert torch.isneginf(got[:, 3]).all()
    keep = torch.arange(T) != 3
    err = (got[:, keep].double() - want[:, keep]).norm() / want[:, keep].norm()
    assert err < 1e-5, err


def test_refill_without_the_kept_design_matrix(monkeypatch):
    # where A is not kept (a GPU, or too large), the refill measures each query's fitted mass through
    # the attention op: the same slots are refilled and the fit is as good
    from cdlm_fast.compaction.fit import MassGram

    k, v, q = _structured(B=1, Hkv=2, G=2, T=120, n=90, seed=11)
    st_kept, st_op = {}, {}
    kept = compact_layer(k, v, q, 30, ridge=0.0, stats=st_kept)
    monkeypatch.setattr(MassGram, "MAX_BYTES", 0)
    via_op = compact_layer(k, v, q, 30, ridge=0.0, stats=st_op)
    assert st_kept["slots_refilled"] > 0 and st_op["slots_refilled"] == st_kept["slots_refilled"]
    assert torch.equal(kept.indices, via_op.indices)
    assert st_op["dead_slots"] == 0
    e_kept, _ = _errors(k, v, kept, q)
    e_op, _ = _errors(k, v, via_op, q)
    assert abs(e_kept - e_op) < 1e-3, (e_kept, e_op)


def test_softmax_weights_match_float64_attention(monkeypatch):
    # the CPU path that keeps A [P, N, T], built in blocks of queries: its outputs and log-masses are the
    # attention's, with masked keys and a query whose keys are all masked (zeros, lse = -inf); its column
    # sums of squares are over the weighted queries only
    from cdlm_fast.compaction.select import SoftmaxWeights

    g = torch.Generator().manual_seed(3)
    P, N, T, D = 3, 41, 67, 16
    Q, K, V = (torch.randn(P, x, D, generator=g) * s for x, s in ((N, 2.0), (T, 1.0), (T, 1.0)))
    bias = torch.randn(P, T, generator=g)
    bias[:, 5:9] = float("-inf")
    bias[2] = float("-inf")  # problem 2 sees no key at all
    qw = (torch.rand(P, N, generator=g) > 0.3).float()
    monkeypatch.setattr(SoftmaxWeights, "ROWS", 16)  # blocks of 16, 16 and 9 queries
    sw = SoftmaxWeights.maybe(Q, K, V, 0.3, bias, qw)
    o, lse = attention_reference(Q.double()[:, None], K.double()[:, None], V.double()[:, None],
                                 bias=bias.double()[:, None], scale=0.3, return_lse=True)
    assert torch.isfinite(sw.Y).all() and torch.isfinite(sw.A).all()
    assert float((sw.Y[:2].double() - o[:2, 0]).norm() / o[:2, 0].norm()) < 1e-5
    assert float((sw.lse[:2].double() - lse[:2, 0]).abs().max()) < 1e-4
    assert torch.isneginf(sw.lse[2]).all() and (sw.Y[2] == 0).all()
    assert (sw.A[:, :, 5:9] == 0).all()
    A = torch.softmax(0.3 * Q.double() @ K.double().mT + bias.double()[:, None], -1)[:2]
    assert float((sw.A[:2].double() - A).abs().max()) < 1e-6
    sq = (qw[:2, :, None].double() * A.square()).sum(1)
    assert float((sw.col_sq[:2].double() - sq).norm() / sq.norm()) < 1e-5 and (sw.col_sq[2] == 0).all()
    for reduce in ("rms", "max", "mean"):  # the scores from the held weights are the chunked scores
        lse_in = torch.where(torch.isfinite(sw.lse), sw.lse, torch.full_like(sw.lse, 1e30))
        held = highest_attention_scores(Q, K, lse_in, 0.3, bias, reduce=reduce, query_weight=qw,
                                        weights=sw.A, col_sq=sw.col_sq)
        chunked = highest_attention_scores(Q, K, lse_in, 0.3, bias, reduce=reduce, query_weight=qw)
        assert float((held[:2] - chunked[:2]).abs().max()) < 1e-5 * float(chunked[:2].abs().max()), reduce


@pytest.mark.parametrize("kw", [{}, {"sinks": 4, "window": 0.25}, {"aggregate": "max"}, {"masks": True}],
                         ids=["default", "window", "max", "masks"])
def test_compact_layer_kept_softmax_weights_match_the_chunked_path(monkeypatch, kw):
    # keeping A on the CPU changes where the scores come from, not what is chosen or fitted
    from cdlm_fast.compaction.select import SoftmaxWeights

    k, v, q = _structured(B=2, Hkv=2, G=3, T=150, n=80, seed=5)
    kw = _with_masks(kw, 2, 150, 80, key_pad=13, query_pad=7)
    st_kept, st_chunked = {}, {}
    kept = compact_layer(k, v, q, 0.1, stats=st_kept, **kw)
    monkeypatch.setattr(SoftmaxWeights, "MAX_BYTES", 0)
    chunked = compact_layer(k, v, q, 0.1, stats=st_chunked, **kw)
    _assert_same_compaction(kept, chunked, 1e-4)
    st_kept.pop("ridge_chosen"), st_chunked.pop("ridge_chosen")  # ridge 0 and 1e-6 can tie to rounding
    assert st_kept == st_chunked


@pytest.mark.parametrize("ridge", ["auto", 0.0, 1e-3])
def test_value_fit_held_softmax_matches_the_streamed_grams(monkeypatch, ridge):
    # the CPU value fit builds X = softmax(Q C^T + beta) and its Grams directly; GPUs (and problems too
    # large to hold X) stream exp_gram over the rows: the same fit, with a dead slot, excluded queries and
    # a problem whose slots are all dead (zero values, no NaN)
    from cdlm_fast.compaction.fit import MassGram, fit_values

    g = torch.Generator().manual_seed(21)
    P, N, t, D = 3, 203, 17, 16
    Q, C = torch.randn(P, N, D, generator=g) * 1.5, torch.randn(P, t, D, generator=g)
    Y = torch.randn(P, N, D, generator=g)
    beta = torch.randn(P, t, generator=g)
    beta[0, 3] = float("-inf")
    beta[2] = float("-inf")
    qw = (torch.rand(P, N, generator=g) > 0.2).float()
    st_dense, st_streamed = {}, {}
    dense = fit_values(Q, C, beta, Y, 0.25, ridge=ridge, query_weight=qw, stats=st_dense)
    monkeypatch.setattr(MassGram, "MAX_BYTES", 0)
    streamed = fit_values(Q, C, beta, Y, 0.25, ridge=ridge, query_weight=qw, stats=st_streamed)
    assert torch.isfinite(dense).all() and (dense[2] == 0).all() and (dense[0, 3] == 0).all()
    assert float((dense - streamed).norm() / streamed.norm()) < 1e-4
    assert st_dense == st_streamed
    if ridge == 0.0:  # and both are the float64 least squares over the weighted queries
        for p in range(2):
            keep = torch.isfinite(beta[p])
            rows = qw[p] > 0
            X = torch.softmax(0.25 * Q[p].double() @ C[p].double().T + beta[p].double(), -1)[rows][:, keep]
            sol = torch.linalg.lstsq(X, Y[p].double()[rows]).solution
            assert float((dense[p][keep].double() - sol).norm() / sol.norm()) < 1e-3


def test_softmax_rows_in_place_and_without_output_aliasing(monkeypatch):
    # the held softmax weights are normalised in place; a build that refuses out= aliasing its input
    # gets the same rows through a copy
    from cdlm_fast.compaction.select import softmax_rows_

    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(2)) * 4
    x[1, :7] = float("-inf")
    ref = torch.softmax(x.double(), -1)
    y = x.clone()
    assert softmax_rows_(y) is y and float((y.double() - ref).abs().max()) < 1e-6
    real = torch.softmax

    def no_alias(t, dim, *args, **kw):
        if kw.get("out") is not None:
            raise RuntimeError("unsupported operation: the output aliases the input")
        return real(t, dim, *args, **kw)

    monkeypatch.setattr(torch, "softmax", no_alias)
    z = x.clone()
    assert softmax_rows_(z) is z and float((z.double() - ref).abs().max()) < 1e-6


@pytest.mark.parametrize("kw", [{}, {"sinks": 2, "window": 0.25}, {"masks": True}], ids=["default", "window", "masks"])
def test_uneven_budgets_compacted_head_by_head_match_the_batched_path(monkeypatch, kw):
    # on the CPU, heads whose budgets differ a lot are compacted one at a time (no work on padding):
    # the same keys, weights and values as the batched path, padded the same way
    from cdlm_fast.compaction import core

    k, v, q = _structured(B=2, Hkv=2, G=2, T=120, n=90, seed=9)
    counts = torch.tensor([[60, 6], [9, 40]])
    kw = _with_masks(kw, 2, 120, 90, key_pad=11, query_pad=5)
    assert core._split_by_head(counts, torch.device("cpu"))
    st_split, st_batched = {}, {}
    calls = []
    inner = core._compact_heads_apart
    monkeypatch.setattr(core, "_compact_heads_apart", lambda *a, **k_: calls.append(1) or inner(*a, **k_))
    split = compact_layer(k, v, q, counts, stats=st_split, **kw)
    assert calls == [1]
    monkeypatch.setattr(core, "SPLIT_PADDED_WORK", float("inf"))
    batched = compact_layer(k, v, q, counts, stats=st_batched, **kw)
    assert split.keys.shape == batched.keys.shape == (2, 2, 60, 16)
    # (float32 products over a different padded width round differently; the NNLS carries it to 1e-3)
    fin = _assert_same_compaction(split, batched, 2e-3)
    assert (split.values[~fin] == 0).all() and (split.keys[~fin] == 0).all()
    for st in (st_split, st_batched):  # refill rounds count per call (per head when split); ridge ties
        st.pop("ridge_chosen"), st.pop("refill_rounds", None)
    assert st_split == st_batched


def _masked_problems(seed: int):
    """``(g, Q [3, 70, 16], K [3, 45, 16], bias [3, 45])`` for the blocked-softmax tests: keys 3-5
    masked in every problem, every key of problem 2 masked; ``g`` continues the draws."""
    g = torch.Generator().manual_seed(seed)
    P, N, T, D = 3, 70, 45, 16
    Q, K = torch.randn(P, N, D, generator=g) * 2, torch.randn(P, T, D, generator=g)
    bias = torch.zeros(P, T)
    bias[:, 3:6] = float("-inf")
    bias[2] = float("-inf")
    return g, Q, K, bias


def test_max_softmax_weights_match_the_max_scores():
    # the blocked maximum (the CPU path of allocate_counts) is highest_attention_scores(reduce="max"),
    # with masked keys, excluded queries and a problem whose keys are all masked
    from cdlm_fast.compaction.select import max_softmax_weights

    g, Q, K, bias = _masked_problems(8)
    P, N, T = 3, 70, 45
    qw = (torch.rand(P, N, generator=g) > 0.3).float()
    got = max_softmax_weights(Q, K, 0.3, bias, qw, rows=16)
    S = 0.3 * Q.double() @ K.double().mT + bias.double()[:, None]
    A = torch.softmax(S[:2], -1) * qw[:2, :, None].double()
    live = torch.isfinite(bias[:2])
    assert float((got[:2].double() - A.amax(1))[live].abs().max()) < 1e-6
    assert (got[:, 3:6] == -1).all() and (got[2] == -1).all()
    assert torch.isfinite(got).all()


def test_attention_spread_matches_the_participation_ratio_on_both_paths():
    # 1 / sum_j a_ij^2 per query, from the blocked softmax (CPU path of allocate_counts) and from the
    # log-masses (generic path); NaN for excluded queries and for a problem whose keys are all masked
    from cdlm_fast.compaction.select import attention_spread, max_softmax_weights

    g, Q, K, bias = _masked_problems(21)
    P, N, T = 3, 70, 45
    Q[0, :5] = 0.0  # uniform queries: spread T (minus the 3 masked keys)
    qw = (torch.rand(P, N, generator=g) > 0.3).float()
    qw[0, :5] = 1.0
    S = 0.3 * Q.double() @ K.double().mT + bias.double()[:, None]
    ref = 1.0 / torch.softmax(S[:2], -1).square().sum(-1)
    lse = torch.logsumexp(S, -1).float()
    mx, blocked = max_softmax_weights(Q, K, 0.3, bias, qw, rows=16, with_spread=True)
    assert torch.equal(mx, max_softmax_weights(Q, K, 0.3, bias, qw, rows=16))
    chunked = attention_spread(Q, K, lse, 0.3, bias, qw)
    keep = qw[:2] > 0
    for got in (blocked, chunked):
        assert float(((got[:2].double() - ref) / ref)[keep].abs().max()) < 1e-5
        assert torch.isnan(got[:2][~keep]).all() and torch.isnan(got[2]).all()
    assert float((blocked[0, :5] - (T - 3)).abs().max()) < 1e-3


def test_spread_allocation_floors_diffuse_heads_and_keeps_the_total(monkeypatch):
    from cdlm_fast.compaction import api, compact_kv
    from cdlm_fast.compaction.core import allocate_counts

    kv, qs = _copying_and_diffuse_heads(3, 0.05)
    plain = torch.stack([c[0] for c in allocate_counts(kv, qs, 0.25)])
    spread = torch.stack([c[0] for c in allocate_counts(kv, qs, 0.25, spread_floor=6)])
    assert int(spread.sum()) == int(plain.sum()) == 16 * 2 * 3
    assert bool((plain[:, 1] < 6).all()), plain  # the global top-k alone starves the diffuse heads
    assert bool((spread[:, 1] == 6).all()), spread  # a diffuse head's spread is above the cap of 6
    assert bool((spread[:, 0] > spread[:, 1]).all()), spread  # the copying heads still get the most
    # the path through the log-masses (other aggregates, GPUs) takes the same floors
    rms = torch.stack([c[0] for c in allocate_counts(kv, qs, 0.25, aggregate="rms", spread_floor=6)])
    assert int(rms.sum()) == 16 * 2 * 3 and bool((rms[:, 1] >= 6).all()), rms
    monkeypatch.setattr(api, "SPREAD_FLOOR_MAX", 6)
    comp = compact_kv(kv, qs, 0.25, allocation="spread", window=0)
    assert torch.equal(torch.stack([layer.counts[0] for layer in comp.layers]), spread)
    with pytest.raises(ValueError, match="spread_floor"):
        allocate_counts(kv, qs, 0.125, spread_floor=0)


def test_copy_weights_match_a_float64_softmax_on_both_paths():
    # every query's softmax weight on its target key: from the log-masses (copy_weights) and from the
    # blocked softmax of max_softmax_weights; 0 for queries without a target, left out by
    # query_weight, or in a problem whose keys are all masked
    from cdlm_fast.compaction.select import copy_weights, max_softmax_weights

    g, Q, K, bias = _masked_problems(31)
    P, N, T = 3, 70, 45
    tgt = torch.randint(0, T, (P, N), generator=g)
    tgt[:, ::7] = -1
    tgt[0, 1] = 4  # a masked target: weight 0
    S = 0.3 * Q.double() @ K.double().mT + bias.double()[:, None]
    A = torch.softmax(S, -1).nan_to_num(0.0)
    ref = torch.where(tgt >= 0, A.gather(2, tgt.clamp(min=0)[..., None])[..., 0], torch.zeros_like(tgt, dtype=A.dtype))
    lse = torch.logsumexp(S, -1).float()
    chunked = copy_weights(Q, K, lse, 0.3, tgt, bias)
    qw = torch.ones(P, N)
    qw[1, 10:20] = 0.0
    mx, spread, blocked = max_softmax_weights(Q, K, 0.3, bias, qw, rows=16, copy_targets=tgt)
    assert spread is None and torch.equal(mx, max_softmax_weights(Q, K, 0.3, bias, qw, rows=16))
    assert float((chunked.double() - ref).abs().max()) < 1e-5 and torch.isfinite(chunked).all()
    ref_b = ref * qw.double()
    assert float((blocked.double() - ref_b).abs().max()) < 1e-5 and torch.isfinite(blocked).all()
    assert float(ref[:2][tgt[:2] >= 0].max()) > 0.5 and (blocked[2] == 0).all() and blocked[0, 1] == 0
    _, spread2, _ = max_softmax_weights(Q, K, 0.3, bias, qw, rows=16, copy_targets=tgt, with_spread=True)
    torch.testing.assert_close(spread2, max_softmax_weights(Q, K, 0.3, bias, qw, rows=16, with_spread=True)[1],
                               rtol=0, atol=0, equal_nan=True)


def _induction_and_sharp_heads(T: int = 64, copy_weight: float = 0.4):
    """One layer, two KV heads, one-hot keys: in head 0 query ``i`` puts ``copy_weight`` on key ``i+1``
    (an induction head reading the repeated context: every key read once, moderately); in head 1
    ten queries each read one of keys 0-9 with weight 0.95 and the others one of keys 10-63 with 0.5
    (a sharper head whose every key outscores the induction head's)."""
    D = T
    K = torch.eye(T)[None, None].repeat(1, 2, 1, 1) * 4.0

    def logit(w):  # the target logit giving weight w against T - 1 zero logits
        return math.log(w * (T - 1) / (1 - w))

    q = torch.zeros(1, 2, T, D)
    for i in range(T - 1):
        q[0, 0, i, i + 1] = logit(copy_weight) / 4.0
    for i in range(T):
        q[0, 1, i, i] = logit(0.95 if i < 10 else 0.5) / 4.0
    v = torch.randn(1, 2, T, D, generator=torch.Generator().manual_seed(3))
    targets = torch.cat([torch.arange(1, T), torch.tensor([-1])])
    return [(K, v)], {0: q}, targets


def test_allocate_counts_gives_a_copying_head_the_keys_it_copies():
    from cdlm_fast.compaction.core import allocate_counts
    from cdlm_fast.compaction.queries import repeat_copy_targets

    kv, qs, targets = _induction_and_sharp_heads()
    assert torch.equal(targets, repeat_copy_targets(64))
    plain = allocate_counts(kv, qs, 0.25, scale=1.0)[0][0]
    lifted = allocate_counts(kv, qs, 0.25, scale=1.0, copy_targets={0: targets})[0][0]
    assert int(plain.sum()) == int(lifted.sum()) == 32
    # top-k alone: head 1's 0.95 and 0.5 keys take every slot but the floor of head 0
    assert plain.tolist() == [1, 31], plain
    # head 0 copies ~0.4 * 64 = 25.6 keys: lifted (0.4 ** 0.36 = 0.72 > 0.5) it wins every slot left
    # after head 1's ten sharp keys
    assert lifted.tolist() == [22, 10], lifted
    # GQA: two query heads per KV head, the second of head 0's group not copying (uniform queries):
    # a group's copy count is its largest, so the counts are the same
    q = qs[0]
    gqa = {0: torch.stack([q[:, 0], torch.zeros_like(q[:, 0]), q[:, 1], q[:, 1]], 1)}
    assert allocate_counts(kv, gqa, 0.25, scale=1.0, copy_targets={0: targets})[0][0].tolist() == [22, 10]
    # the generic path (log-masses: other aggregates, GPUs) computes the same copy counts
    rms = allocate_counts(kv, qs, 0.25, scale=1.0, aggregate="rms", copy_targets={0: targets})[0][0]
    assert int(rms.sum()) == 32 and int(rms[0]) >= 20, rms
    # a head that already holds its copy count is not lifted: the counts are unchanged
    roomy = allocate_counts(kv, qs, 0.75, scale=1.0)[0][0]
    assert int(roomy[0]) >= 26 and torch.equal(roomy, allocate_counts(kv, qs, 0.75, scale=1.0,
                                                                          copy_targets={0: targets})[0][0])


def test_copy_targets_are_checked():
    from cdlm_fast.compaction import compact_kv
    from cdlm_fast.compaction.core import allocate_counts

    kv, qs, targets = _induction_and_sharp_heads()
    with pytest.raises(ValueError, match=r"copy_targets must be int64 tensors of shape \[n=64\]"):
        allocate_counts(kv, qs, 0.25, copy_targets={0: targets[:10]})
    with pytest.raises(ValueError, match="copy_targets must be int64"):
        allocate_counts(kv, qs, 0.25, copy_targets={0: targets.float()})
    with pytest.raises(ValueError, match=r"copy_targets must lie in \[-1, T=64\)"):
        allocate_counts(kv, qs, 0.25, copy_targets={0: targets + 1})
    with pytest.raises(ValueError, match=r"no entry for layers \[0\]"):
        compact_kv(kv, qs, 0.25, copy_targets={1: targets})
    with pytest.raises(TypeError, match="copy_targets must be None, an int64 tensor or a dict"):
        compact_kv(kv, qs, 0.25, copy_targets=targets.tolist())
    # a tensor serves every layer, as the dict does
    a = compact_kv(kv, qs, 0.25, scale=1.0, copy_targets=targets)
    b = compact_kv(kv, qs, 0.25, scale=1.0, copy_targets={0: targets})
    assert torch.equal(a.layers[0].counts, b.layers[0].counts)
