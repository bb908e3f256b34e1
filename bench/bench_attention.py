"""Benchmarks of :func:`cdlm_fast.attention` (block-causal attention with a per-key bias).

Run ``pytest bench/bench_attention.py --benchmark-only``. Each case times, on the same inputs:

* ``cdlm_fast/triton`` and ``cdlm_fast/cuda`` (ours; cuda only where the extension provides it);
* ``sdpa+mask``: ``F.scaled_dot_product_attention`` with a materialised float mask (beta + the
  block-causal mask, K/V repeated to the query heads), built outside the timed region;
* ``flex``: FlexAttention with a ``score_mod`` adding beta and a ``BlockMask`` built once outside
  the timed region (``torch.compile``d on a GPU, eager on the CPU);
* ``eager``: the dense PyTorch reference.

Shapes: on a GPU, bf16 head dim 128 with the heads of Llama-3.1-8B (32/8), Qwen2-7B / Dream-7B
(28/4) and Qwen3-4B (32/8): prefill of a prompt plus one block of 32 (prompt 512-8K), and
block decode (a block of 32 against a cache of 1K-128K keys, batch 1-16). The default grid is a
subset that runs in a few minutes; ``CDLM_FAST_BENCH_FULL=1`` runs all combinations. On the CPU
(or with ``CDLM_FAST_BENCH_QUICK=1``) small float32 shapes, the Triton kernels in the interpreter.

``extra_info``: ``median_ms``; ``tflops`` over the visible area (``4 * Hq * visible_pairs * D``,
pairs summed over the batch); for decode ``gbps`` of K/V (+ beta) read.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from _common import DEVICE, HAS_CUDA, MODEL_SHAPES, QUICK, run

import cdlm_fast
from cdlm_fast import backends
from cdlm_fast.reference.attention import attention_reference, key_limits

FULL = os.environ.get("CDLM_FAST_BENCH_FULL", "0") == "1" and not QUICK
BLOCK = 32
OP = backends.op("attention")

# ---------------------------------------------------------------------------------------------
# cases: (kind, model, batch, prompt or cache length)

if QUICK:
    SMALL = dict(hq=4, hkv=2, d=64)
    CASES = [("prefill", "small", 1, 64), ("prefill", "small", 2, 128), ("decode", "small", 2, 256),
             ("decode", "small", 1, 1024)]
    SHAPES = {"small": SMALL}
    BLOCK = 16
elif FULL:
    SHAPES = MODEL_SHAPES
    CASES = ([("prefill", m, 1, p) for m in SHAPES for p in (512, 1024, 2048, 4096, 8192)]
             + [("prefill", m, 4, 2048) for m in SHAPES]
             + [("decode", m, b, c) for m in SHAPES for b in (1, 4, 16) for c in (1024, 8192, 32768, 131072)])
else:
    SHAPES = MODEL_SHAPES
    CASES = [("prefill", "llama3.1-8b", 1, 512), ("prefill", "llama3.1-8b", 1, 2048),
             ("prefill", "llama3.1-8b", 1, 8192), ("prefill", "qwen2-7b", 1, 2048),
             ("prefill", "qwen2-7b", 1, 8192), ("prefill", "qwen3-4b", 4, 2048),
             ("decode", "llama3.1-8b", 1, 1024), ("decode", "llama3.1-8b", 1, 32768),
             ("decode", "llama3.1-8b", 1, 131072), ("decode", "llama3.1-8b", 16, 8192),
             ("decode", "llama3.1-8b", 16, 131072), ("decode", "qwen2-7b", 1, 32768),
             ("decode", "qwen2-7b", 4, 32768), ("decode", "qwen2-7b", 16, 32768),
             ("decode", "qwen3-4b", 1, 8192)]

IMPLS = ["cdlm_fast/triton", "cdlm_fast/cuda", "sdpa+mask", "flex", "eager"]
DTYPE = torch.float32 if QUICK else torch.bfloat16
# the dense baselines materialise [B, Hq, Lq, Lk] scores / masks and repeated K/V: skip them beyond
MEM_LIMIT = (2 if QUICK else 40) * 2 ** 30


def case_id(case):
    kind, model, b, n = case
    return f"attn-{kind}-{model}-b{b}-{'prompt' if kind == 'prefill' else 'cache'}{n}"


class Inputs:
    """Tensors and derived sizes of one case (kept for the impls of that case only)."""

    def __init__(self, case):
        kind, model, b, n = case
        s = SHAPES[model]
        self.kind, self.hq, self.hkv, self.d = kind, s["hq"], s["hkv"], s["d"]
        self.b, self.n = b, n
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        lk = n + BLOCK
        lq = lk if kind == "prefill" else BLOCK
        self.lq, self.lk = lq, lk
        self.q_offset = 0 if kind == "prefill" else n
        self.prefix = n  # prompt of n tokens, then one block (prefill) / the current block (decode)

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(DTYPE)

        self.q, self.k, self.v = rnd(b, self.hq, lq, self.d), rnd(b, self.hkv, lk, self.d), rnd(b, self.hkv, lk, self.d)
        self.beta = torch.randn(b, self.hkv, lk, generator=gen, device=DEVICE) * 0.5  # compacted-cache beta
        self.prefix_t = torch.full((b,), self.prefix, dtype=torch.int32, device=DEVICE)
        limits = key_limits(self.prefix_t, BLOCK, self.q_offset, lq, lk)
        self.visible = int(limits.sum())
        self.flops = 4.0 * self.hq * self.visible * self.d
        keys_read = int(limits.max(dim=1).values.sum())  # per batch row, per KV head
        el = self.q.element_size()
        self.kv_bytes = float(self.hkv * keys_read * (2 * self.d * el + 4))

    def kwargs(self):
        return dict(bias=self.beta, prefix_len=self.prefix, block_size=BLOCK, q_offset=self.q_offset)

    def dense_bytes(self):
        g = self.hq // self.hkv
        scores = self.b * self.hq * self.lq * self.lk * 4
        kv = 2 * self.b * self.hkv * g * self.lk * self.d * 4
        return scores, kv


@functools.lru_cache(maxsize=1)
def inputs(case) -> Inputs:
    return Inputs(case)


def _dense_mask(x: Inputs):
    """[B, Hq, Lq, Lk] additive mask in the input dtype: beta where visible, -inf elsewhere."""
    g = x.hq // x.hkv
    limits = key_limits(x.prefix_t, BLOCK, x.q_offset, x.lq, x.lk)
    vis = torch.arange(x.lk, device=DEVICE).view(1, 1, -1) < limits.unsqueeze(-1)  # [B, Lq, Lk]
    mask = torch.where(vis.unsqueeze(1), x.beta.unsqueeze(2), float("-inf"))  # [B, Hkv, Lq, Lk]
    return mask.to(DTYPE).repeat_interleave(g, dim=1)


_flex_compiled = None


def _flex(x: Inputs):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = x.hq // x.hkv
    prefix = x.prefix_t.to(torch.int64)
    beta, q_offset = x.beta, x.q_offset

    def mask_mod(b, h, q_idx, kv_idx):
        pre = prefix[b]
        rel = q_idx + q_offset - pre
        lim = torch.where(rel < 0, pre, pre + BLOCK * (torch.clamp(rel, min=0) // BLOCK + 1))
        return kv_idx < lim

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + beta[b, h // g, kv_idx]

    block_mask = create_block_mask(mask_mod, x.b, None, x.lq, x.lk, device=str(DEVICE))
    if HAS_CUDA:
        if _flex_compiled is None:
            # one compilation per shape: lift dynamo's recompile limit (8) so no case falls back to eager
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    else:
        fn = flex_attention
    return lambda: fn(x.q, x.k, x.v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def make_call(impl: str, x: Inputs):
    """A no-argument callable for ``impl`` (setup outside the timed region), or a skip reason."""
    if impl.startswith("cdlm_fast/"):
        backend = impl.split("/")[1]
        why = OP.reason(backend, DEVICE, q=x.q, k=x.k, v=x.v, bias=x.beta)
        if why is not None:
            return f"{backend}: {why}"
        kw = x.kwargs()
        return lambda: cdlm_fast.attention(x.q, x.k, x.v, **kw, return_lse=True, backend=backend)
    scores, kv = x.dense_bytes()
    if impl == "sdpa+mask":
        if scores // 2 + kv // 2 > MEM_LIMIT:
            return "the dense mask and repeated K/V would not fit the memory cap"
        g = x.hq // x.hkv
        mask = _dense_mask(x)
        kk, vv = x.k.repeat_interleave(g, dim=1), x.v.repeat_interleave(g, dim=1)
        return lambda: F.scaled_dot_product_attention(x.q, kk, vv, attn_mask=mask)
    if impl == "flex":
        try:
            call = _flex(x)
            call()
        except Exception as e:  # e.g. no flex support for this device / version
            return f"FlexAttention does not run here ({e.__class__.__name__}: {str(e)[:200]})"
        return call
    if impl == "eager":
        if 4 * scores + kv > MEM_LIMIT:
            return "the dense reference would not fit the memory cap"
        kw = x.kwargs()
        return lambda: attention_reference(x.q, x.k, x.v, **kw, return_lse=True)
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention(benchmark, case, impl):
    x = inputs(case)
    call = make_call(impl, x)
    if isinstance(call, str):
        pytest.skip(call)
    rounds = 3 if (QUICK or impl == "eager") else 20
    extra = dict(model=case[1], kind=x.kind, batch=x.b, lq=x.lq, lk=x.lk, hq=x.hq, hkv=x.hkv, head_dim=x.d,
                 block_size=BLOCK, visible_pairs=x.visible, dtype=str(DTYPE).replace("torch.", ""))
    run(benchmark, call, op="attention", case=case_id(case), impl=impl, ours=impl.startswith("cdlm_fast/"),
        x=x.n, x_name="prompt length" if x.kind == "prefill" else "cache length", flops=x.flops,
        bytes_moved=x.kv_bytes if x.kind == "decode" else None, rounds=rounds, **extra)

