"""Benchmarks of the backward of :func:`cdlm_fast.attention` (forward + backward, ``dq, dk, dv, dbias``).

Run ``pytest bench/bench_attention_backward.py --benchmark-only``. Each case times one training
step of the attention (forward, then backward of ``sum(out * dout)`` into q, k, v and the bias):

* ``cdlm_fast/triton``: the Triton forward and the Triton backward kernels;
* ``cdlm_fast/torch``: the torch backend (dense forward, key-chunked torch backward);
* ``flex``: FlexAttention with the same block-causal ``BlockMask`` and a ``score_mod`` adding the
  bias (a captured tensor that requires grad), ``torch.compile``d on a GPU;
* ``eager``: autograd through the dense PyTorch reference.

Shapes: on a GPU bf16, head dim 128, Llama-3.1-8B heads (32/8): block-causal prefill of a prompt
plus blocks of 32 (student training), and the refinement shape (4096 reference queries per head
against a compacted cache of 410 keys with beta, no mask). On the CPU (or with
``CDLM_FAST_BENCH_QUICK=1``) small float32 shapes, the Triton kernels in the interpreter.
``extra_info``: ``median_ms``; ``tflops`` counts forward + backward as 3.5 times the forward's
``4 * Hq * visible_pairs * D``.
"""
from __future__ import annotations

import functools

import pytest
import torch
from _common import DEVICE, HAS_CUDA, QUICK, run

import cdlm_fast
from cdlm_fast import backends
from cdlm_fast.reference.attention import attention_reference, key_limits

OP = backends.op("attention")
DTYPE = torch.float32 if QUICK else torch.bfloat16
# case: (name, hq, hkv, d, batch, prefix, generated length, block or None, number of keys)
if QUICK:
    CASES = [("train-prefill", 4, 2, 64, 1, 64, 64, 16, None), ("refine", 4, 2, 64, 1, 0, 256, None, 48)]
else:
    CASES = [("train-prefill", 32, 8, 128, 1, 512, 1536, 32, None),
             ("train-prefill", 32, 8, 128, 1, 2048, 6144, 32, None),
             ("refine", 32, 8, 128, 1, 0, 4096, None, 410)]
IMPLS = ["cdlm_fast/triton", "cdlm_fast/torch", "flex", "eager"]


def case_id(case):
    name, hq, hkv, d, b, prefix, n, block, t = case
    return f"attnbwd-{name}-h{hq}x{hkv}-d{d}-b{b}-" + (f"p{prefix}-n{n}-blk{block}" if t is None else f"q{n}-t{t}")


class Inputs:
    def __init__(self, case):
        name, hq, hkv, d, b, prefix, n, block, t = case
        lk = prefix + n if t is None else t
        lq = prefix + n if t is None else n
        gen = torch.Generator(device=DEVICE).manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device=DEVICE).to(DTYPE).requires_grad_(True)

        self.hq, self.hkv, self.d, self.b, self.lq, self.lk = hq, hkv, d, b, lq, lk
        self.prefix, self.block = prefix, block
        self.q, self.k, self.v = rnd(b, hq, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, d)
        self.beta = (torch.randn(b, hkv, lk, generator=gen, device=DEVICE) * 0.5).requires_grad_(True)
        self.dout = torch.randn(b, hq, lq, d, generator=gen, device=DEVICE).to(DTYPE)
        limits = key_limits(torch.full((b,), prefix, device=DEVICE), block, 0, lq, lk)
        self.flops = 3.5 * 4.0 * hq * int(limits.sum()) * d

    def leaves(self):
        return self.q, self.k, self.v, self.beta

    def zero_grads(self):
        for t in self.leaves():
            t.grad = None


@functools.lru_cache(maxsize=1)
def inputs(case) -> Inputs:
    return Inputs(case)


def _flex(x: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g, prefix, block, beta = x.hq // x.hkv, x.prefix, x.block, x.beta

    def mask_mod(b, h, q_idx, kv_idx):
        if block is None:
            return kv_idx >= 0
        rel = q_idx - prefix
        lim = torch.where(rel < 0, prefix, prefix + block * (torch.clamp(rel, min=0) // block + 1))
        return kv_idx < lim

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + beta[b, h // g, kv_idx]

    block_mask = create_block_mask(mask_mod, x.b, None, x.lq, x.lk, device=str(DEVICE))
    fn = torch.compile(flex_attention, dynamic=False) if HAS_CUDA else flex_attention

    def step():
        out = fn(x.q, x.k, x.v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
        out.backward(x.dout)
    return step


def make_call(impl: str, x: Inputs):
    """A no-argument training step for ``impl``, or a skip reason."""
    kw = dict(bias=x.beta, prefix_len=x.prefix, block_size=x.block)
    if impl.startswith("cdlm_fast/"):
        backend = impl.split("/")[1]
        why = OP.reason(backend, DEVICE, q=x.q, k=x.k, v=x.v, bias=x.beta)
        if why is not None:
            return f"{backend}: {why}"

        def step():
            cdlm_fast.attention(x.q, x.k, x.v, **kw, backend=backend).backward(x.dout)
        return step
    if impl == "flex":
        try:
            call = _flex(x)
            call()
        except Exception as e:  # e.g. no flex support (or no bias gradient) for this device / version
            return f"FlexAttention backward does not run here ({e.__class__.__name__}: {str(e)[:200]})"
        return call
    if impl == "eager":
        if x.b * x.hq * x.lq * x.lk * 4 * 6 > (2 if QUICK else 40) * 2 ** 30:
            return "the dense reference would not fit the memory cap"

        def step():
            attention_reference(x.q, x.k, x.v, **kw).backward(x.dout)
        return step
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention_backward(benchmark, case, impl):
    x = inputs(case)
    call = make_call(impl, x)
    if isinstance(call, str):
        pytest.skip(call)

    def step():
        x.zero_grads()
        call()

    run(benchmark, step, op="attention_backward", case=case_id(case), impl=impl, ours=impl.startswith("cdlm_fast"),
        x=x.lq, x_name="queries", flops=x.flops, rounds=3 if QUICK else 10)
