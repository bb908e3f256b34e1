"""Gradients of :func:`cdlm_fast.attention` (``dq``, ``dk``, ``dv``, ``dbias``, through ``out`` and ``lse``).

* torch backend: :func:`torch.autograd.gradcheck` in float64 (finite differences), and the key-chunked
  backward against autograd through a dense float64 reference;
* triton backend (on a GPU, or in the Triton interpreter on the CPU): float32 / float16 against
  autograd through the dense float64 reference, with gradient buffers poisoned with NaN, on odd
  sizes, GQA 1/4/7, block masks that cut tiles, ``-inf`` bias, prompt-only and fully masked rows;
* the custom op: ``opcheck`` and ``torch.compile(fullgraph=True)`` of forward + backward.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

import cdlm_fast
from cdlm_fast import backends
from cdlm_fast.ops.attention_grad import attention_backward_torch
from cdlm_fast.reference.attention import visible_mask

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BWD = backends.op("attention_bwd")
BWD._load()
needs_triton = pytest.mark.skipif(backends.device_reason("triton", DEVICE) is not None or "triton" not in BWD.impls,
                                  reason=f"triton backward unavailable: {backends.device_reason('triton', DEVICE)}")


def dense_reference(q, k, v, bias, prefix_len, block_size, q_offset, kv_lens, scale=None):
    """Dense float64 ``(out, lse)``, differentiable by autograd without NaN on fully masked rows
    (their scores are replaced by a constant, their output and weights are zero, lse ``-inf``)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    vis = visible_mask(torch.as_tensor(prefix_len).reshape(-1).expand(b), block_size, q_offset, lq, lk,
                       None if kv_lens is None else torch.as_tensor(kv_lens)).unsqueeze(1)
    if bias is not None:
        bb = bias.double().repeat_interleave(g, 1).unsqueeze(2)
        vis = vis & torch.isfinite(bb)
        s = s + torch.where(torch.isfinite(bb), bb, torch.zeros_like(bb))
    seen = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, torch.full_like(s, -math.inf))
    s = torch.where(seen, s, torch.zeros_like(s))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse) * vis
    out = p @ v
    return out, torch.where(seen, lse, torch.full_like(lse, -math.inf)).squeeze(-1)


def _inputs(b, hq, hkv, lq, lk, d, dtype, bias_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    bias = None
    if bias_kind is not None:
        bias = torch.randn(b, hkv, lk, generator=gen) * (3.0 if bias_kind == "large" else 1.0)
        if bias_kind in ("inf", "large"):
            bias[torch.rand(b, hkv, lk, generator=gen) < 0.25] = -math.inf
        if bias_kind == "leftpad":  # batch row i is left-padded by 2 * i + 1 keys
            for i in range(b):
                bias[i, :, : 2 * i + 1] = -math.inf
        if bias.dtype != torch.float64 and dtype == torch.float64:
            bias = bias.double()
    dout = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    dlse = torch.randn(b, hq, lq, generator=gen)
    return q, k, v, bias, dout, dlse


def _grads(fn, q, k, v, bias, dout, dlse, with_lse=True):
    """Gradients of ``sum(out * dout) + sum(lse * dlse)`` (lse of rows that see no key left out)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, v, bias)]
    out, lse = fn(*leaves)
    assert torch.isfinite(out).all()
    loss = (out.double() * dout.double()).sum()
    if with_lse:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse.double(), torch.zeros_like(lse.double())) * dlse.double()).sum()
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


# id: (b, hq, hkv, lq, lk, d, prefix, block, q_offset, kv_lens, bias)
CASES = {
    "odd-causal-gqa2": (2, 4, 2, 19, 19, 20, 0, 1, 0, None, "inf"),
    "block3-prefix5-kvlens": (2, 4, 2, 19, 37, 24, [5, 0], 3, 18, [37, 30], "randn"),
    "gqa4-block5-cuts-tiles": (1, 4, 1, 23, 41, 16, 9, 5, 18, None, "inf"),
    "gqa7-decode-block": (1, 7, 1, 9, 40, 16, 10, 4, 31, None, "large"),
    "gqa1-bidirectional": (1, 3, 3, 13, 29, 32, 0, None, 0, [29], "randn"),
    "prompt-only-queries": (1, 2, 1, 12, 40, 16, 30, 4, 6, None, "randn"),
    "fully-masked-rows": (2, 4, 2, 17, 17, 16, [0, 6], 1, 0, None, "leftpad"),
    "empty-batch-row": (2, 2, 1, 8, 30, 16, 8, 4, 20, [0, 26], "randn"),
}


def _case(name, dtype, seed=0):
    b, hq, hkv, lq, lk, d, prefix, block, q_offset, kv_lens, bias_kind = CASES[name]
    q, k, v, bias, dout, dlse = _inputs(b, hq, hkv, lq, lk, d, dtype, bias_kind, seed + len(name))
    prefix_t = torch.as_tensor(prefix if isinstance(prefix, list) else [prefix] * b)
    kvl = None if kv_lens is None else torch.as_tensor(kv_lens)
    return (q, k, v, bias, dout, dlse), dict(prefix_len=prefix_t, block_size=block, q_offset=q_offset, kv_lens=kvl)


def _api(backend, mask, device=None):
    def fn(q, k, v, bias):
        m = dict(mask)
        if device is not None:
            m = {key: (val.to(device) if torch.is_tensor(val) else val) for key, val in m.items()}
        return cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend=backend, **m)
    return fn


def _ref(mask):
    def fn(q, k, v, bias):
        return dense_reference(q, k, v, bias, mask["prefix_len"], mask["block_size"], mask["q_offset"],
                               mask["kv_lens"])
    return fn


def _rel(a, r):
    a, r = a.detach().cpu().double(), r.detach().cpu().double()
    if torch.isnan(a).any():
        return math.nan
    return (a - r).abs().max().item() / max(r.abs().max().item(), 1.0)


# --------------------------------------------------------------------------------------------
# torch backend


@pytest.mark.parametrize("name", ["block3-prefix5-kvlens", "gqa7-decode-block", "fully-masked-rows",
                                  "prompt-only-queries"])
def test_gradcheck_torch_float64(name):
    (q, k, v, bias, _, _), mask = _case(name, torch.float64)
    q, k, v = (t[..., :6].contiguous() for t in (q, k, v))  # small head dim: fewer finite differences
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]

    def fn(q, k, v, bias):
        out, lse = _api("torch", mask)(q, k, v, bias)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_backward_matches_dense_reference(name):
    args, mask = _case(name, torch.float64)
    got = _grads(_api("torch", mask), *args)
    ref = _grads(_ref(mask), *args)
    for g, r, what in zip(got, ref, ("dq", "dk", "dv", "dbias")):
        if r is None:
            assert g is None
            continue
        assert g.dtype == r.dtype and not torch.isnan(g).any(), what
        assert _rel(g, r) < 1e-10, f"{what}: {_rel(g, r):.3g}"


def test_torch_backward_chunked_equals_unchunked():
    (q, k, v, bias, dout, dlse), mask = _case("block3-prefix5-kvlens", torch.float32)
    out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend="torch", **mask)
    args = (dout, dlse, q, k, v, bias, out, lse, mask["prefix_len"], mask["kv_lens"], mask["q_offset"],
            mask["block_size"], q.shape[-1] ** -0.5)
    whole = attention_backward_torch(*args, chunk=10 ** 6)
    for chunk in (1, 5):
        for a, b_ in zip(attention_backward_torch(*args, chunk=chunk), whole):
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_masked_keys_and_rows_get_zero_gradients():
    """``-inf`` bias entries, keys past kv_lens and rows that see no key: gradient exactly 0."""
    (q, k, v, bias, dout, dlse), mask = _case("fully-masked-rows", torch.float32)
    mask["kv_lens"] = torch.tensor([17, 12])
    dq, dk, dv, db = _grads(_api("torch", mask), q, k, v, bias, dout, dlse)
    assert db[torch.isneginf(bias)].eq(0).all()
    assert dk[1, :, 12:].eq(0).all() and dv[1, :, 12:].eq(0).all() and db[1, :, 12:].eq(0).all()
    assert dq[0, :, 0].eq(0).all(), "query 0 of batch 0 sees only a -inf key"
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv, db))


def test_no_grad_path_is_not_recorded():
    (q, k, v, bias, _, _), mask = _case("odd-causal-gqa2", torch.float32)
    q.requires_grad_(True)
    with torch.no_grad():
        out = cdlm_fast.attention(q, k, v, bias=bias, backend="torch", **mask)
    assert out.grad_fn is None
    out = cdlm_fast.attention(q, k, v, bias=bias, backend="torch", **mask)
    assert out.grad_fn is not None


def test_opcheck_train_op():
    (q, k, v, bias, _, _), mask = _case("block3-prefix5-kvlens", torch.float32)
    q, k, v, bias = (t.requires_grad_(True) for t in (q, k, v, bias))
    prefix = mask["prefix_len"].to(torch.int32)
    kvl = mask["kv_lens"].to(torch.int32)
    torch.library.opcheck(torch.ops.cdlm_fast.attention_train.default,
                          (q, k, v, bias, prefix, kvl, 18, 3, 0.2, "torch"))


def test_compile_fullgraph_forward_and_backward():
    (q, k, v, bias, dout, dlse), mask = _case("block3-prefix5-kvlens", torch.float32)

    def loss(q, k, v, bias):
        out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend="torch", **mask)
        return (out * dout).sum() + (lse * dlse).sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    loss(*eager).backward()
    for a, b_ in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# triton backend


def _triton_bwd_module():
    return sys.modules["cdlm_fast.kernels.attention_backward"]


TRITON_FP16 = ["odd-causal-gqa2", "gqa4-block5-cuts-tiles", "gqa7-decode-block", "fully-masked-rows"]


def _triton_params():
    for name in CASES:
        yield pytest.param(name, torch.float32, id=f"{name}-float32")
        if name in TRITON_FP16 or HAS_CUDA:
            yield pytest.param(name, torch.float16, id=f"{name}-float16")
        if HAS_CUDA:  # the Triton interpreter has no bfloat16
            yield pytest.param(name, torch.bfloat16, id=f"{name}-bfloat16")


@needs_triton
@pytest.mark.parametrize("name,dtype", list(_triton_params()))
def test_triton_backward_matches_dense_reference(name, dtype, monkeypatch):
    monkeypatch.setattr(_triton_bwd_module(), "_empty",
                        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))
    args, mask = _case(name, dtype)
    dev_args = [None if t is None else t.to(DEVICE) for t in args]
    got = _grads(_api("triton", mask, DEVICE), *dev_args)
    ref = _grads(_ref(mask), *[None if t is None else t.double() for t in args])
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    for g, r, what in zip(got, ref, ("dq", "dk", "dv", "dbias")):
        if r is None:
            assert g is None
            continue
        assert g.device.type == DEVICE.type and g.dtype == (torch.float32 if what == "dbias" else dtype)
        err = _rel(g, r)
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"
    if args[3] is not None:
        assert got[3].cpu()[torch.isneginf(args[3])].eq(0).all(), "-inf bias entries must get zero gradient"


@needs_triton
def test_triton_backward_is_selected_after_triton_forward(monkeypatch):
    calls = []
    impl = BWD.impls["triton"]
    monkeypatch.setitem(BWD.impls, "triton", lambda *a: calls.append(1) or impl(*a))
    (q, k, v, bias, dout, dlse), mask = _case("odd-causal-gqa2", torch.float32)
    _grads(_api("triton", mask, DEVICE), *(t.to(DEVICE) for t in (q, k, v, bias, dout, dlse)))
    assert calls == [1]


@pytest.mark.skipif(not HAS_CUDA or backends.cuda_extension_error() is not None,
                    reason="needs a CUDA device and the cdlm_fast._C extension")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_forward_with_torch_backward(dtype):
    """The CUDA backend has no backward kernel: its forward is paired with the torch backward."""
    args = _inputs(2, 8, 2, 40, 70, 64, dtype, "inf", seed=11)  # head dim 64: a CUDA kernel exists
    mask = dict(prefix_len=torch.tensor([20, 9]), block_size=8, q_offset=30, kv_lens=torch.tensor([70, 61]))
    got = _grads(_api("cuda", mask, DEVICE), *[None if t is None else t.to(DEVICE) for t in args])
    ref = _grads(_ref(mask), *[None if t is None else t.double() for t in args])
    tol = 3e-3 if dtype == torch.float16 else 3e-2
    for g, r, what in zip(got, ref, ("dq", "dk", "dv", "dbias")):
        err = _rel(g, r)
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"
