"""Attention Matching core: selection, beta/value fits, budgets, padding -- against float64 oracles."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # cdlm_fast.compaction imports it: a missing one skips this file
from cdlm_fast.compaction import CompactedCache, CompactedLayer, compact_layer, resolve_counts  # noqa: E402
from cdlm_fast.compaction.quality import attention_match_metrics, keep_highest_attention, keep_recent  # noqa: E402
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
    rec = keep_recent(k, v, 12)
    assert torch.equal(rec.keys, k[:, :, -12:]) and torch.equal(rec.bias, torch.zeros(1, 2, 12))
    cc = CompactedCache([layer, rec], 97)
    assert len(cc) == 2 and cc.memory_bytes() > 0 and isinstance(cc[0], CompactedLayer)
