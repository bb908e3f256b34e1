"""The ``"torch"`` backend of :func:`cdlm_fast.attention` (:mod:`cdlm_fast.ops.attention_cpu`).

Shapes and masks that exercise its paths (causal rows through the kernel's causal mask; tiles of
runs of equal key limits, a common part plus a band, merges through the lse), in every dtype the CPU kernel takes, and its dense path
for other devices (forced here on the CPU). Compared with the float64 reference.
"""
from __future__ import annotations

import math

import pytest
import torch

import cdlm_fast
from cdlm_fast.ops import attention_cpu
from cdlm_fast.reference.attention import attention_reference, key_limits

# (b, hq, hkv, lq, lk, d, prefix, block, q_offset, kv_lens, bias)
CASES = {
    "causal-offset": (1, 3, 1, 600, 700, 64, 50, 1, 100, None, "inf"),
    "causal-prefill-gqa-dropped": (2, 6, 2, 300, 300, 64, 0, 1, 0, None, "head-inf"),
    "causal-offset-no-bias": (1, 4, 1, 100, 250, 32, 0, 1, 150, None, None),
    "causal-batch-kvlens": (2, 6, 2, 530, 530, 40, [0, 17], 1, 0, [530, 400], "large"),
    "prompt-then-blocks": (1, 4, 2, 300, 300, 32, 200, 16, 0, None, "randn"),
    "block7-no-bias": (1, 4, 2, 300, 300, 64, 0, 7, 0, None, None),
    "decode-aligned": (1, 9, 3, 32, 2080, 64, 2048, 32, 2048, None, "randn"),
    "decode-unaligned": (2, 8, 2, 8, 100, 64, [40, 13], 8, 92, None, "inf"),
    "bidirectional": (2, 2, 2, 17, 50, 64, 0, None, 0, [50, 23], "randn"),
    "empty-rows": (2, 4, 2, 12, 40, 64, 8, 4, 28, [0, 36], "randn"),
    "all-keys-dropped": (1, 2, 1, 5, 40, 64, 0, None, 0, None, "all-inf"),
    "prefix-rows-dropped": (1, 2, 1, 40, 40, 16, 10, 1, 0, None, "head-inf"),
    "decode-one-kv-head-dropped": (2, 6, 2, 8, 64, 32, 32, 8, 56, None, "kvhead-inf"),
    "decode-mid-cache": (1, 4, 2, 8, 100, 64, 40, 8, 48, None, "inf"),
    # a prompt then blocks (the prompt's queries over it in one call, the blocks' keys merged in)
    "prompt-blocks-kvlens": (2, 6, 2, 261, 261, 32, 200, 16, 0, [261, 209], "inf"),
    "prompt-blocks-prompt-dropped": (2, 6, 2, 230, 230, 32, 200, 16, 0, None, "prompt-inf"),
}
PROMPT_THEN_REST = ("prompt-then-blocks", "prompt-blocks-kvlens", "prompt-blocks-prompt-dropped")
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-4),
       torch.float16: (5e-3, 1e-4)}


def _inputs(case, dtype, seed=0):
    b, hq, hkv, lq, lk, d, prefix, block, q_offset, kv_lens, kind = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    bias = None
    if kind is not None:
        bias = torch.randn(b, hkv, lk, generator=g)
        if kind == "inf":
            bias[torch.rand(b, hkv, lk, generator=g) < 0.25] = -math.inf
        elif kind == "large":
            bias = torch.where(torch.rand(b, hkv, lk, generator=g) < 0.5, -30.0, 30.0) * torch.rand(b, hkv, lk,
                                                                                                   generator=g)
            bias[torch.rand(b, hkv, lk, generator=g) < 0.1] = -math.inf
        elif kind == "all-inf":
            bias.fill_(-math.inf)
        elif kind == "kvhead-inf":  # every key of KV head 1 of sample 0 dropped (GQA: 3 query heads)
            bias[0, 1] = -math.inf
        elif kind == "prompt-inf":  # KV head 1 of sample 0 sees nothing in the prompt, only in the blocks
            bias[0, 1, :prefix] = -math.inf
        elif kind == "head-inf":  # the first 12 keys dropped: the first queries see nothing
            bias[:, :, :12] = -math.inf
    prefix_t = torch.tensor(prefix if isinstance(prefix, list) else [prefix] * b)
    kv = None if kv_lens is None else torch.tensor(kv_lens)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if bias is not None and dtype == torch.float64:
        bias = bias.double()
    return q, k, v, bias, dict(prefix_len=prefix_t, block_size=block, q_offset=q_offset, kv_lens=kv)


def _check(out, lse, q, k, v, bias, kw, dtype):
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(),
                                       bias=None if bias is None else bias.double(), return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "exactly the rows that see no key have lse = -inf"
    assert (out[empty] == 0).all()
    tol_out, tol_lse = TOL[dtype]
    err = (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
    assert err <= tol_out, f"output error {err:.3g}"
    if (~empty).any():
        lerr = ((lse.double() - ref_lse).abs() / (1 + ref_lse.abs()))[~empty].max().item()
        assert lerr <= tol_lse, f"lse error {lerr:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_reference(case, dtype):
    q, k, v, bias, kw = _inputs(case, dtype)
    out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend="torch", **kw)
    _check(out, lse, q, k, v, bias, kw, dtype)


@pytest.mark.parametrize("case", PROMPT_THEN_REST)
def test_prompt_then_blocks_take_one_call_over_the_prompt(case, monkeypatch):
    """A prompt and a few blocks: every query over the prompt's keys in one call, the blocks' keys by
    tiles merged into the later rows (checked against the reference above in every dtype)."""
    q, k, v, bias, kw = _inputs(case, torch.float32, seed=3)
    calls = []
    inner = attention_cpu._prompt_then_rest
    monkeypatch.setattr(attention_cpu, "_prompt_then_rest", lambda *a: calls.append(a[6:8]) or inner(*a))
    out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend="torch", **kw)
    _check(out, lse, q, k, v, bias, kw, torch.float32)
    assert [tuple(c) for c in calls] == [(200, 200)]  # (keys seen by all, queries that see only those)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if isinstance(spec[6], int) and spec[9] is None])
def test_int_lengths_fast_path(case, dtype, monkeypatch):
    """Host-int lengths take the one-pass CPU path when all rows share a key limit (decode blocks,
    bidirectional calls; dead heads, a limit inside the cache) and the general path otherwise."""
    q, k, v, bias, kw = _inputs(case, dtype, seed=2)
    kw["prefix_len"] = int(kw["prefix_len"][0])
    calls = []
    shared_call = attention_cpu.shared_call
    monkeypatch.setattr(cdlm_fast.ops.attention, "shared_call", lambda *a: calls.append(r := shared_call(*a)) or r)
    out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, **kw)
    _check(out, lse, q, k, v, bias, kw, dtype)
    lim = key_limits(torch.tensor([kw["prefix_len"]]), kw["block_size"], kw["q_offset"], q.shape[2], k.shape[2])
    assert len(calls) == 1 and (calls[0] is not None) == bool((lim == lim[0, 0]).all())
    assert torch.equal(cdlm_fast.attention(q, k, v, bias=bias, **kw), out)
    q.requires_grad_(True)  # autograd needs the general path
    calls.clear()
    cdlm_fast.attention(q, k, v, bias=bias, **kw)
    assert not calls


@pytest.mark.parametrize("case", ["decode-one-kv-head-dropped", "decode-aligned"])
def test_shared_limit_call_with_kv_in_sequence_major_layout(case):
    """K/V stored ``[B, Lk, Hkv, D]`` and viewed as ``[B, Hkv, Lk, D]`` (batch and head strides do
    not merge when ``B > 1``): the one-call path keeps the KV heads as heads there, and gives the
    same result as with contiguous K/V."""
    q, k, v, bias, kw = _inputs(case, torch.float32, seed=3)
    kw["prefix_len"] = int(kw["prefix_len"][0])
    ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    assert ks.shape[0] == 1 or ks.stride(0) != ks.shape[1] * ks.stride(1)
    out, lse = cdlm_fast.attention(q, ks, vs, bias=bias, return_lse=True, **kw)
    ref_out, ref_lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, **kw)
    _check(out, lse, q, k, v, bias, {**kw, "prefix_len": torch.tensor([kw["prefix_len"]] * q.shape[0])},
           torch.float32)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_row_chunks_balance_the_kernel_items_over_threads():
    """The chunk count divides the rows, is 1 where the kernel's items already balance, and splits
    SmolLM2's decode block (3 KV heads x 96 folded rows) on 2 threads (9 blocks of 32 split 5:4)."""
    assert attention_cpu.row_chunks(3, 96, 2) == 2
    assert attention_cpu.row_chunks(8, 128, 2) == 1  # Llama-8B heads: 32 blocks, 16 per thread
    assert attention_cpu.row_chunks(3, 3, 2) == 1  # one query: no split
    assert attention_cpu.row_chunks(3, 96, 1) == 1  # one thread: nothing to balance
    for problems, rows, threads in [(3, 96, 16), (1, 7, 2), (2, 600, 3), (6, 40, 4)]:
        c = attention_cpu.row_chunks(problems, rows, threads)
        assert 1 <= c <= 16 and rows % c == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("threads", [1, 2, 3, 16])
@pytest.mark.parametrize("case", ["decode-aligned", "decode-one-kv-head-dropped", "decode-mid-cache"])
def test_row_chunked_decode_matches_reference(case, threads, dtype):
    """The one-call path with each KV head's rows cut into chunks (K/V and bias expanded with stride
    0) at several thread counts: same result as the float64 reference, dead heads still -inf; without
    the lse the output is the same."""
    q, k, v, bias, kw = _inputs(case, dtype, seed=5)
    kw["prefix_len"] = int(kw["prefix_len"][0])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        R = q.shape[1] // k.shape[1] * q.shape[2]
        chunks = attention_cpu.row_chunks(q.shape[0] * k.shape[1], R, threads)
        out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, **kw)
        out_only = cdlm_fast.attention(q, k, v, bias=bias, **kw)
    finally:
        torch.set_num_threads(old)
    if case == "decode-aligned" and threads in (2, 16):
        assert chunks > 1
    _check(out, lse, q, k, v, bias, {**kw, "prefix_len": torch.tensor([kw["prefix_len"]] * q.shape[0])},
           dtype)
    assert torch.equal(out_only, out)


@pytest.mark.skipif(attention_cpu._DECODE_CPP is None, reason=f"cdlm_fast._cpu: {attention_cpu.CPU_EXTENSION_ERROR}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ["decode-aligned", "decode-one-kv-head-dropped", "decode-mid-cache", "all-keys-dropped"])
def test_cpp_decode_call_is_the_python_one(case, dtype, monkeypatch):
    """The C++ decode call (csrc/cpu/decode.cpp) takes the one-call path where it is built and gives
    bit for bit what the same path gives in Python (same kernel, same views): outputs, lse, dead heads
    at -inf, with and without the lse, at 2 threads (2 row chunks in float32 for SmolLM2's heads)."""
    q, k, v, bias, kw = _inputs(case, dtype, seed=7)
    kw["prefix_len"] = int(kw["prefix_len"][0])
    calls = []
    cpp = attention_cpu._DECODE_CPP
    monkeypatch.setattr(attention_cpu, "_DECODE_CPP", lambda *a: calls.append(a[6]) or cpp(*a))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, **kw)
        out_only = cdlm_fast.attention(q, k, v, bias=bias, **kw)
        monkeypatch.setattr(attention_cpu, "_DECODE_CPP", None)
        ref_out, ref_lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, **kw)
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 2 and (case != "decode-aligned" or dtype == torch.bfloat16 or calls[0] == 2)
    assert out.dtype == ref_out.dtype and lse.dtype == ref_lse.dtype
    assert torch.equal(out, ref_out) and torch.equal(out_only, ref_out) and torch.equal(lse, ref_lse)
    _check(out, lse, q, k, v, bias, {**kw, "prefix_len": torch.tensor([kw["prefix_len"]] * q.shape[0])}, dtype)


def test_fast_path_leaves_bad_arguments_to_the_checks():
    """Arguments the one-pass path does not accept still get the general path's precise errors."""
    q, k, v, bias, kw = _inputs("decode-aligned", torch.float32)
    kw["prefix_len"] = 2048
    with pytest.raises(TypeError, match="bias must have dtype"):
        cdlm_fast.attention(q, k, v, bias=bias.double(), **kw)
    with pytest.raises(ValueError, match="bias must have shape"):
        cdlm_fast.attention(q, k, v, bias=bias[:, :, 1:], **kw)
    with pytest.raises(ValueError, match="scale must be a finite positive"):
        cdlm_fast.attention(q, k, v, bias=bias, scale=-1.0, **kw)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        cdlm_fast.attention(q, k, v, bias=bias, **{**kw, "prefix_len": -1})
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        cdlm_fast.attention(q, k, v, bias=bias, **{**kw, "block_size": 0})
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        cdlm_fast.attention(q[:, :8], k, v, bias=bias, **kw)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        cdlm_fast.attention(q, k.double(), v, bias=bias, **kw)


@pytest.mark.parametrize("case", ["causal-offset", "causal-prefill-gqa-dropped", "causal-batch-kvlens",
                                  "decode-unaligned", "empty-rows", "prefix-rows-dropped", *PROMPT_THEN_REST])
def test_dense_path_for_other_devices(case, monkeypatch):
    """Without the CPU flash kernel (as on a CUDA device) every part is a dense tile softmax."""
    monkeypatch.setattr(attention_cpu, "_FLASH_CPU", None)
    for dtype in (torch.float32, torch.float64):
        q, k, v, bias, kw = _inputs(case, dtype, seed=1)
        out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend="torch", **kw)
        _check(out, lse, q, k, v, bias, kw, dtype)


def test_small_tiles_and_strided_inputs(monkeypatch):
    """Tiles of 7 queries (many merges), transformers-layout (non-contiguous) q/k/v."""
    monkeypatch.setattr(attention_cpu, "QUERY_TILE", 7)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 45, 4, 64, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 60, 2, 64, generator=g).transpose(1, 2) for _ in range(2))
    bias = torch.randn(2, 2, 60, generator=g)
    kw = dict(prefix_len=torch.tensor([9, 0]), block_size=3, q_offset=15, kv_lens=torch.tensor([60, 52]))
    out, lse = cdlm_fast.attention(q, k, v, bias=bias, return_lse=True, backend="torch", **kw)
    _check(out, lse, q, k, v, bias, kw, torch.float32)


def test_tiles_follow_runs_of_equal_limits():
    """A prompt is one tile (one kernel call), blocks are packed, causal rows are cut at the tile size."""
    lim = key_limits(torch.tensor([100]), 8, 0, 132, 132)[0]
    tiles = attention_cpu._tiles(lim, lim, 16)
    assert tiles[0] == (0, 100, 100, 100)
    assert [t[:2] for t in tiles[1:]] == [(100, 116), (116, 132)]
    assert all(lo == int(lim[i0]) and hi == int(lim[i1 - 1]) for i0, i1, lo, hi in tiles)
    causal = key_limits(torch.tensor([0]), 1, 0, 50, 50)[0]
    assert [t[:2] for t in attention_cpu._tiles(causal, causal, 16)] == [(0, 16), (16, 32), (32, 48), (48, 50)]


def test_key_limits_agree_with_reference():
    for prefix, block, off, lq, lk, kv in [([3, 40], 4, 0, 50, 60, None), ([0, 7], None, 5, 9, 30, [30, 2]),
                                           ([10 ** 6, 5], 10 ** 12, 3, 7, 20, None), ([0, 0], 1, 0, 0, 0, None)]:
        args = (torch.tensor(prefix), block, off, lq, lk, None if kv is None else torch.tensor(kv))
        assert torch.equal(attention_cpu.key_limits(*args), key_limits(*args))
