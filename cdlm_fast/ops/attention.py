"""``cdlm_fast.attention``: block-causal attention with a per-key bias.

Semantics (identical in every backend; the reference is
:func:`cdlm_fast.reference.attention.attention_reference`)::

    score[b, h, i, j] = scale * q[b, h, i] . k[b, h // G, j] + bias[b, h // G, j]
    visible(i, j)     = j < limit(b, i)                      (and bias != -inf)
    out[b, h, i]      = softmax_j(score over visible j) @ v[b, h // G]
    lse[b, h, i]      = log sum_{visible j} exp(score[b, h, i, j])

with ``G = Hq // Hkv``, query ``i`` at key index ``p = q_offset + i`` and
``limit = prefix_len`` if ``p < prefix_len``, else
``prefix_len + block_size * ((p - prefix_len) // block_size + 1)`` (``Lk`` when
``block_size is None``), capped by ``kv_lens``. This is exactly "key j is visible iff
``j < prefix_len`` or ``block(j) <= block(p)``" with ``block(p) = (p - prefix_len) //
block_size``: the prompt is visible to everyone, prompt queries see no generated key,
a generated query sees its own block bidirectionally and every earlier block.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _validate as V
from ..backends import forced_backend, op
from .attention_cpu import attention_torch, shared_call
from .attention_grad import attention_train

__all__ = ["attention"]

_OP = op("attention")


def _torch_impl(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale):
    """The ``"torch"`` backend (CPU flash kernel, tiled; see :mod:`cdlm_fast.ops.attention_cpu`)."""
    return attention_torch(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale)


_OP.register("torch", _torch_impl)
_OP.lazy("cdlm_fast.kernels.attention", "cdlm_fast._cuda_ops")


def _check(q, k, v, bias, prefix_len, block_size, q_offset, kv_lens, scale):
    V.tensor("q", q, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hq, Lq, D]")
    V.tensor("k", k, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hkv, Lk, D]")
    V.tensor("v", v, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hkv, Lk, D]")
    b, hq, lq, d = q.shape
    bk, hkv, lk, dk = k.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if bk != b:
        raise ValueError(f"k must have batch size B={b} like q, got shape {tuple(k.shape)}")
    if dk != d:
        raise ValueError(f"k must have head dim D={d} like q, got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} ([B, Hkv, Lk, D]), got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the number of KV heads "
                         f"Hkv={hkv} (GQA)")
    V.same_device([("q", q), ("k", k), ("v", v), ("bias", bias)])
    if bias is not None:
        allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        V.tensor("bias", bias, ndim=3, dtypes=allowed, shape_doc=f"[B={b}, Hkv={hkv}, Lk={lk}]")
        if tuple(bias.shape) != (b, hkv, lk):
            raise ValueError(f"bias must have shape [B={b}, Hkv={hkv}, Lk={lk}], got {tuple(bias.shape)}")
    if block_size is not None:
        V.non_negative_int("block_size", block_size, minimum=1)
    V.non_negative_int("q_offset", q_offset)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not scale > 0 or scale == float("inf"):
            raise ValueError(f"scale must be a finite positive float, got {scale}")
    prefix_t = V.lengths("prefix_len", prefix_len, batch=b, device=q.device)
    kv_t = None if kv_lens is None else V.lengths("kv_lens", kv_lens, batch=b, device=q.device, upper=lk,
                                                  allow_int=False)
    return prefix_t, kv_t


_FLOATS = frozenset(V.FLOAT_DTYPES)


_T, _F32, _F64, _INF = torch.Tensor, torch.float32, torch.float64, float("inf")


def _cpu_decode(q, k, v, bias, prefix_len, block_size, q_offset, kv_lens, scale, backend, need_lse=True):
    """The common CPU inference call (int lengths, no grad, all rows sharing one key limit, e.g. a
    decode block on the block grid), checked in one pass: ``(out, lse)``, or ``None`` when the call
    is anything else (the general path then checks it argument by argument and raises the precise
    error). Right after a kernel call every tensor attribute read or op costs several times its
    warm cost (measured on 2-core x86 CPUs), so this path reads each attribute once, compares
    dtypes by identity and builds no length tensor: on a 1 ms SmolLM2 decode call it saves about
    0.1 ms over the general path's separate checks, the margin over SDPA there."""
    if not (type(prefix_len) is int and type(q_offset) is int and kv_lens is None and type(q) is _T
            and type(k) is _T and type(v) is _T and (block_size is None or type(block_size) is int)):
        return None
    if backend != "torch" and (backend != "auto" or forced_backend()):
        return None
    dt = q.dtype
    if not (dt in _FLOATS and k.dtype is dt and v.dtype is dt and q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or v.shape != ks:
        return None
    b, hq, lq, d = qs
    bk, hkv, lk, dk = ks
    if not (bk == b and dk == d and hkv > 0 and hq % hkv == 0 and q_offset >= 0 and prefix_len >= 0
            and (block_size is None or block_size >= 1)):
        return None
    if bias is not None and not (type(bias) is _T and bias.is_cpu and bias.shape == (b, hkv, lk)
                                 and (bias.dtype is _F32 or bias.dtype is dt is _F64)):
        return None
    if scale is None:
        scale = d ** -0.5
    elif not (type(scale) is float and 0 < scale < _INF):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    return shared_call(q, k, v, bias, prefix_len, block_size or 0, q_offset, scale, need_lse)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    prefix_len: Union[int, torch.Tensor] = 0,
    block_size: Optional[int] = None,
    q_offset: int = 0,
    kv_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused block-causal attention with a per-key bias.

    Args:
        q: ``[B, Hq, Lq, D]`` float16 / bfloat16 / float32 (float64: torch backend only).
        k, v: ``[B, Hkv, Lk, D]``, same dtype and device; ``Hq`` a multiple of ``Hkv`` (GQA;
            K/V are never repeated in memory by the kernels).
        bias: optional ``[B, Hkv, Lk]`` float32 added to the scaled scores; ``-inf`` masks a key
            (left padding, dropped compacted keys), finite values are the compacted cache's beta.
        prefix_len: int or ``[B]`` int tensor: keys ``< prefix_len`` are the prompt, visible to all.
        block_size: block length B of the generated part; ``1`` is causal, ``None`` no mask.
        q_offset: key index of query 0 (e.g. the cache length when decoding a block).
        kv_lens: optional ``[B]`` int tensor; keys at or past ``kv_lens[b]`` are absent.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return ``lse`` ``[B, Hq, Lq]`` float32 (natural log of the attention mass).
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in q's dtype, or ``(out, lse)``. A query that sees no key gets
        zeros and ``lse = -inf``.

    Differentiable in ``q``, ``k``, ``v`` and ``bias`` (through ``out`` and ``lse``) when grad mode
    is on and one of them requires grad: see :mod:`cdlm_fast.ops.attention_grad`.

    Example::

        >>> q = torch.randn(1, 4, 8, 64); k = v = torch.randn(1, 2, 40, 64)
        >>> out = cdlm_fast.attention(q, k, v, prefix_len=32, block_size=8, q_offset=32)
    """
    fast = _cpu_decode(q, k, v, bias, prefix_len, block_size, q_offset, kv_lens, scale, backend, return_lse)
    if fast is not None:
        return fast if return_lse else fast[0]
    prefix_t, kv_t = _check(q, k, v, bias, prefix_len, block_size, q_offset, kv_lens, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = _OP.select(backend, q.device, q=q, k=k, v=v, bias=bias)
    args = (q, k, v, bias, prefix_t, kv_t, int(q_offset), int(block_size or 0), float(scale))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        out, lse = attention_train(name, *args)  # differentiable: backward in ops/attention_grad.py
    else:
        out, lse = _OP.impls[name](*args)
    return (out, lse) if return_lse else out
