"""Benchmark: Attention Matching compaction of a Llama-3.1-8B-shaped KV cache.

Side by side in one run, on the same random inputs:

* ``cdlm_fast``: :func:`cdlm_fast.compaction.compact_layer` (all KV heads of a layer batched,
  Gram-matrix fits through ``exp_gram`` / ``nnls_gram`` / ``lstsq_gram``);
* ``torch_loop``: a plain PyTorch re-implementation of the published reference algorithm
  (Python loop over layers and KV heads; highest-attention selection by RMS over queries;
  weights by ``torch.linalg.lstsq`` + clamp to ``[e^-3, e^3]`` + two projected-gradient
  steps; values by ``torch.linalg.lstsq`` on the softmax matrix).

Both use highest-attention selection at ratio 10x. Each result records the seconds per
stage and the attention-output relative error / mass error on held-out queries
(``extra_info``). Shapes: 32 layers, 8 KV heads, 32 query heads, head dim 128, with 8K and
32K cached tokens on a GPU; a tiny shape on the CPU (or with ``CDLM_FAST_BENCH_QUICK=1``).

Run::

    pytest bench/bench_compaction.py --benchmark-only      # or: cdlm-fast bench compaction [--quick]
"""
import math
import time

import pytest
import torch
from _common import HAS_CUDA, QUICK, run

from cdlm_fast.compaction import attention_match_metrics, compact_layer
from cdlm_fast.compaction.types import CompactedLayer

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
RATIO = 10

# (name, layers, Hkv, Hq, D, T, reference queries per query head)
GPU_SHAPES = [("llama8b-8k", 32, 8, 32, 128, 8192, 1024), ("llama8b-32k", 32, 8, 32, 128, 32768, 1024)]
CPU_SHAPES = [("llama8b-heads-tiny", 2, 8, 32, 128, 384, 32)]
SHAPES = CPU_SHAPES if QUICK else GPU_SHAPES
IMPLS = ["cdlm_fast", "torch_loop"]


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def make_inputs(layers, hkv, hq, d, T, n, seed=0):
    """Random post-RoPE-like keys with a few outliers, values and queries per layer."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(1, hkv, T, d, generator=g)
        k[:, :, 0] *= 4.0  # an attention-sink-like key
        v = torch.randn(1, hkv, T, d, generator=g)
        q = torch.randn(1, hq, n, d, generator=g) * 1.5
        held = torch.randn(1, hq, max(8, n // 8), d, generator=g) * 1.5
        out.append(tuple(x.to(DEVICE, DTYPE) for x in (k, v, q, held)))
    return out


def torch_loop_compact(k, v, q, t, timings):
    """Reference algorithm, one KV head at a time (float32 math, cache dtype output)."""
    _, hkv, T, d = k.shape
    hq = q.shape[1]
    group = hq // hkv
    scale = d ** -0.5
    keys, vals, bias = [], [], []
    for h in range(hkv):
        t0 = time.perf_counter()
        Q = q[0, h * group:(h + 1) * group].reshape(-1, d).float()
        K, V = k[0, h].float(), v[0, h].float()
        s = (Q @ K.T) * scale
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        mass = e.sum(-1)
        probs = e / mass[:, None]
        Y = probs @ V
        score = probs.pow(2).mean(0).sqrt()
        idx = score.topk(t).indices.sort().values
        _sync()
        t1 = time.perf_counter()
        A = e[:, idx]
        w = torch.linalg.lstsq(A, mass[:, None]).solution[:, 0].clamp(math.exp(-3), math.exp(3))
        lr = 1.0 / torch.linalg.matrix_norm(A, ord=2).pow(2)
        for _ in range(2):
            w = (w - lr * (A.T @ (A @ w - mass))).clamp(math.exp(-3), math.exp(3))
        beta = torch.log(w)
        _sync()
        t2 = time.perf_counter()
        X = torch.softmax(s[:, idx] + beta, dim=-1)
        Cv = torch.linalg.lstsq(X, Y).solution
        _sync()
        t3 = time.perf_counter()
        keys.append(K[idx])
        vals.append(Cv)
        bias.append(beta)
        for name, dt in (("select", t1 - t0), ("beta", t2 - t1), ("values", t3 - t2)):
            timings[name] = timings.get(name, 0.0) + dt
    return CompactedLayer(torch.stack(keys)[None].to(k.dtype), torch.stack(vals)[None].to(v.dtype),
                          torch.stack(bias)[None].float(), T)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_compaction(benchmark, shape, impl):
    name, layers, hkv, hq, d, T, n = shape
    inputs = make_inputs(layers, hkv, hq, d, T, n)
    t = math.ceil(T / RATIO)
    timings = {}
    results = []

    def once():
        timings.clear()
        results.clear()
        for k, v, q, _ in inputs:
            if impl == "cdlm_fast":
                results.append(compact_layer(k, v, q, t, "highest_attention", timings=timings))
            else:
                results.append(torch_loop_compact(k, v, q, t, timings))

    run(benchmark, once, op="compaction", case=f"compaction-{name}", impl=impl, ours=impl == "cdlm_fast",
        x=T, x_name="tokens", rounds=1)
    errs = [attention_match_metrics(k, v, layer, held) for (k, v, _, held), layer in zip(inputs, results)]
    benchmark.extra_info.update({
        "layers": layers, "kept": t, "dtype": str(DTYPE),
        "stage_seconds": {k: round(v, 4) for k, v in timings.items()},
        "heldout_rel_error": sum(e["rel_error"] for e in errs) / len(errs),
        "heldout_mass_error": sum(e["mass_error"] for e in errs) / len(errs),
    })
    assert all(math.isfinite(e["rel_error"]) for e in errs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ratio", [5, 10, 20, 50])
def test_compaction_quality_vs_ratio(benchmark, ratio, impl):
    """Held-out attention error against the compression ratio (first shape, first layer)."""
    name, _, hkv, hq, d, T, n = SHAPES[0]
    (k, v, q, held), = make_inputs(1, hkv, hq, d, T, n)
    t = max(1, math.ceil(T / ratio))
    out = []

    def once():
        out.clear()
        out.append(compact_layer(k, v, q, t, "highest_attention") if impl == "cdlm_fast"
                   else torch_loop_compact(k, v, q, t, {}))

    run(benchmark, once, op="compaction quality", case=f"quality-{name}-{ratio}x", impl=impl,
        ours=impl == "cdlm_fast", x=ratio, x_name="ratio", rounds=1)
    m = attention_match_metrics(k, v, out[0], held)
    assert math.isfinite(m["rel_error"])
    benchmark.extra_info.update({"ratio": ratio, "kept": t, "heldout_rel_error": m["rel_error"],
                                 "heldout_mass_error": m["mass_error"]})
