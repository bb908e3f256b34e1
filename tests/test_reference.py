"""The attention reference against an independent float64 formula.

The formula below is written from the *definition* of the mask ("key j is visible to the
query at key index p iff j < prefix_len or block(j) <= block(p)", with kv_lens and -inf
bias), one query at a time, so it shares no code with ``key_limits``.
"""
import math

import pytest
import torch

import cdlm_fast
from cdlm_fast.reference.attention import attention_reference, key_limits


def _loop_attention(q, k, v, bias, prefix, block_size, q_offset, kv_lens, scale):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    lse = torch.full((b, hq, lq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        pl = int(prefix[bi])
        n_keys = lk if kv_lens is None else int(kv_lens[bi])
        for h in range(hq):
            for i in range(lq):
                p = q_offset + i
                vis = []
                for j in range(n_keys):
                    if block_size is None:
                        ok = True
                    else:
                        ok = j < pl or (j - pl) // block_size <= (p - pl) // block_size
                    if ok and (bias is None or bias[bi, h // g, j] != -math.inf):
                        vis.append(j)
                if not vis:
                    continue
                idx = torch.tensor(vis)
                s = (k[bi, h // g, idx].double() @ q[bi, h, i].double()) * scale
                if bias is not None:
                    s = s + bias[bi, h // g, idx].double()
                m = s.max()
                w = torch.exp(s - m)
                lse[bi, h, i] = m + torch.log(w.sum())
                out[bi, h, i] = (w / w.sum()) @ v[bi, h // g, idx].double()
    return out, lse


CASES = [
    # b, hq, hkv, lq, lk, prefix, block, q_offset, kv_lens
    (1, 2, 2, 7, 7, 0, None, 0, None),
    (2, 4, 1, 9, 9, 3, 1, 0, None),
    (2, 7, 1, 11, 17, 5, 4, 6, [17, 12]),
    (1, 3, 3, 6, 30, 21, 3, 24, None),
    (2, 2, 1, 13, 13, 13, 32, 0, [13, 9]),
    (2, 4, 2, 5, 12, 2, 5, 7, None),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_reference_matches_definition(case):
    b, hq, hkv, lq, lk, prefix, block, q_off, kv = case
    gen = torch.Generator().manual_seed(1000 + CASES.index(case))
    d = 8
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(b, hkv, lk, generator=gen, dtype=torch.float64) * 5
    bias[0, 0, 1] = -math.inf
    bias[-1, -1, ::3] = 40.0
    kv_t = None if kv is None else torch.tensor(kv)
    prefix_t = torch.full((b,), prefix)
    out, lse = attention_reference(q, k, v, bias=bias, prefix_len=prefix_t, block_size=block, q_offset=q_off,
                                   kv_lens=kv_t, scale=0.3, return_lse=True)
    ref_out, ref_lse = _loop_attention(q, k, v, bias, prefix_t, block, q_off, kv_t, 0.3)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_query_seeing_nothing_gets_zeros_and_minus_inf():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    bias = torch.full((1, 1, 6), -math.inf, dtype=torch.float64)
    bias[0, 0, 4:] = 0.0  # keys 4, 5 exist only for queries that see them
    out, lse = cdlm_fast.attention(q, k, k, bias=bias, prefix_len=2, block_size=2, q_offset=0, return_lse=True,
                                   backend="torch")
    # queries 0,1 are prompt queries (see keys 0,1: both -inf); queries 2,3 see keys 0..3 (all -inf)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_key_limits_prompt_and_blocks():
    lim = key_limits(torch.tensor([4]), 3, 0, 12, 12)
    # prompt queries 0..3 see the prompt; blocks [4,7) [7,10) [10,12)
    assert lim.tolist() == [[4, 4, 4, 4, 7, 7, 7, 10, 10, 10, 12, 12]]
    causal = key_limits(torch.tensor([0]), 1, 2, 3, 5)
    assert causal.tolist() == [[3, 4, 5]]
    capped = key_limits(torch.tensor([2, 2]), None, 0, 2, 9, torch.tensor([9, 5]))
    assert capped.tolist() == [[9, 9], [5, 5]]


def test_default_scale_and_dtype():
    q = torch.randn(1, 1, 3, 16, dtype=torch.float16)
    k = torch.randn(1, 1, 5, 16, dtype=torch.float16)
    out = cdlm_fast.attention(q, k, k, backend="torch")
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4.0, -1) @ k.double()
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
