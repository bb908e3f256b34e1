"""The ``"cuda"`` backend: the compiled extension ``cdlm_fast._C``.

Importing this module loads ``cdlm_fast._C`` if it was built (its static initialisers
register the ops ``torch.ops.cdlm_fast.*`` with the dispatcher), registers their fake
(meta) implementations so they trace under ``torch.compile`` / ``FakeTensorMode``, and
registers backend ``"cuda"`` for the ops ``"attention"`` and ``"exp_gram"`` in
:mod:`cdlm_fast.backends`. Without the extension it registers nothing (the registry then
reports why the backend is unavailable).

Ops (schemas are defined in ``csrc/bindings.cpp``)::

    cdlm_fast::attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor prefix_len,
                             Tensor? kv_lens, int q_offset, int block_size, float scale)
        -> (Tensor out, Tensor lse)
        q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] float16/bfloat16, D in {64, 128}; bias
        [B, Hkv, Lk] float32; prefix_len / kv_lens int32 [B]; block_size 0 = no mask.
        out [B, Hq, Lq, D] (q's dtype), lse [B, Hq, Lq] float32.

    cdlm_fast::exp_gram(Tensor Q, Tensor C, Tensor? beta, Tensor shift, float scale, Tensor? Y)
        -> (Tensor G, Tensor R)
        Q [P, n, D], C [P, t, D] float16/bfloat16/float32 (D <= 256), beta [P, t] float32,
        shift [P, n] float32, Y [P, n, e] float32. With
        A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i]):
        G = A^T A [P, t, t] and R = A^T Y [P, t, e] (Y None: a column of ones, e = 1), float32.

    cdlm_fast::layout_selfcheck() -> str
        Host-side check of the kernel's layout assumptions; "" when all hold.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends

__all__ = ["AVAILABLE", "attention_cuda", "exp_gram_cuda", "attention_supports", "exp_gram_supports"]

AVAILABLE = backends.cuda_extension() is not None

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (64, 128)
EXP_GRAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EXP_GRAM_MAX_DIM = 256


def _need_cuda(op_name: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"{op_name}: the 'cuda' backend needs CUDA tensors, got {name} on {t.device}; "
                             "use backend='torch' (or 'triton' under TRITON_INTERPRET=1) for CPU tensors")


def _vector_loadable(t: torch.Tensor) -> torch.Tensor:
    """``t`` if the kernel can read it with 16-byte loads (last dim contiguous, other strides
    multiples of 8 elements, 16-byte aligned base), else a contiguous copy."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def attention_supports(q=None, k=None, v=None, bias=None, **_) -> Optional[str]:
    """``None`` if the CUDA attention kernel handles these inputs, else the reason."""
    if q is None:
        return None
    if q.dtype not in ATTENTION_DTYPES:
        return f"the CUDA attention kernel supports float16 and bfloat16, got {str(q.dtype).replace('torch.', '')}"
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        return f"the CUDA attention kernel supports head dim 64 or 128, got {q.shape[-1]}"
    return None


def attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                   prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend function of :func:`cdlm_fast.attention` (arguments already validated).

    q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (fp16/bf16, D 64 or 128), bias ``[B, Hkv, Lk]``
    float32 or None, prefix_len / kv_lens ``[B]`` int, ``block_size`` 0 for no mask.
    Returns ``out [B, Hq, Lq, D]`` (q's dtype) and ``lse [B, Hq, Lq]`` float32.
    """
    _need_cuda("attention", q=q, k=k, v=v, bias=bias)
    why = attention_supports(q=q)
    if why is not None:
        raise ValueError(f"attention: backend 'cuda' cannot run these inputs: {why}")
    q, k, v = _vector_loadable(q), _vector_loadable(k), _vector_loadable(v)
    prefix_len = prefix_len.to(device=q.device, dtype=torch.int32)
    if kv_lens is not None:
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32)
    if bias is not None:
        bias = bias.to(torch.float32)
    return torch.ops.cdlm_fast.attention_fwd(q, k, v, bias, prefix_len, kv_lens, int(q_offset), int(block_size),
                                             float(scale))


def exp_gram_supports(Q=None, C=None, **meta) -> Optional[str]:
    """``None`` if the CUDA exp-Gram kernel handles these inputs, else the reason."""
    Q = Q if Q is not None else meta.get("q")
    if Q is None:
        return None
    if Q.dtype not in EXP_GRAM_DTYPES:
        return f"the CUDA exp_gram kernel supports float16, bfloat16 and float32, got " \
               f"{str(Q.dtype).replace('torch.', '')}"
    if Q.dim() == 3 and Q.shape[-1] > EXP_GRAM_MAX_DIM:
        return f"the CUDA exp_gram kernel supports head dim <= {EXP_GRAM_MAX_DIM}, got {Q.shape[-1]}"
    return None


def exp_gram_cuda(Q: torch.Tensor, C: torch.Tensor, beta: Optional[torch.Tensor], shift: torch.Tensor,
                  scale: float, Y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend function of the ``exp_gram`` op.

    Q ``[P, n, D]``, C ``[P, t, D]``, beta ``[P, t]`` float32 or None, shift ``[P, n]`` float32,
    Y ``[P, n, e]`` float32 or None. Returns ``G = A^T A`` ``[P, t, t]`` and ``R = A^T Y``
    ``[P, t, e]`` (``[P, t, 1]`` for Y None), float32, with
    ``A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i])``.
    """
    _need_cuda("exp_gram", Q=Q, C=C, beta=beta, shift=shift, Y=Y)
    why = exp_gram_supports(Q=Q)
    if why is not None:
        raise ValueError(f"exp_gram: backend 'cuda' cannot run these inputs: {why}")
    beta = None if beta is None else beta.to(torch.float32)
    shift = shift.to(torch.float32)
    Y = None if Y is None else Y.to(torch.float32)
    return torch.ops.cdlm_fast.exp_gram(Q, C, beta, shift, float(scale), Y)


def _register_fakes() -> None:
    @torch.library.register_fake("cdlm_fast::attention_fwd")
    def _attention_fwd_fake(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale):
        torch._check(q.dim() == 4, lambda: f"q must be [B, Hq, Lq, D], got {tuple(q.shape)}")
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("cdlm_fast::exp_gram")
    def _exp_gram_fake(Q, C, beta, shift, scale, Y):
        torch._check(Q.dim() == 3 and C.dim() == 3, lambda: "Q and C must be [P, n, D] and [P, t, D]")
        p, t = Q.shape[0], C.shape[1]
        e = 1 if Y is None else Y.shape[2]
        return Q.new_empty((p, t, t), dtype=torch.float32), Q.new_empty((p, t, e), dtype=torch.float32)


if AVAILABLE:
    _register_fakes()
    backends.op("attention").register("cuda", attention_cuda, supports=attention_supports)
    backends.op("exp_gram").register("cuda", exp_gram_cuda, supports=exp_gram_supports)
