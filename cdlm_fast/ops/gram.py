"""``exp_gram``: fused Gram matrix of an exponential (attention-score) design matrix.

With ``A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i])`` it returns
``G = A^T A`` and ``R = A^T Y`` without materialising ``A`` in the fused backends. This is the
single kernel behind both Attention Matching fits:

* **mass (beta) fit**: ``beta = None``, ``shift[p, i]`` = the log attention mass of query ``i``
  over the *original* keys (the ``lse`` of ``cdlm_fast.attention(..., return_lse=True)``),
  ``Y = None``. Because the compacted keys ``C`` are a subset of the original keys,
  ``A_ij = exp(s_ij - lse_i) <= 1`` for every entry (up to the float32 rounding of ``lse``,
  a factor ``exp(~1e-7 |s|)``), whatever the magnitude of the scores: no overflow, and the target mass of every query becomes 1, so ``nnls_gram(G, R[..., 0])``
  gives the weights ``w = exp(beta)``.
* **value fit**: ``beta`` = the fitted bias, ``shift[p, i]`` = the ``lse`` of query ``i`` over the
  compacted keys with ``beta``, so ``A`` is the row-softmax ``X`` and ``R = X^T Y`` for the
  original attention outputs ``Y``; then ``lstsq_gram(G, R)`` gives the compacted values.

Backends: ``"torch"`` (blocked over ``n``; any device and float64), ``"triton"``
(:mod:`cdlm_fast.kernels.gram`), ``"cuda"`` (CUDA C++ extension, when built). ``"auto"`` on a GPU
follows ``EXP_GRAM_GPU_ORDER`` (Triton first), not the global CUDA-first order.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from .. import _validate as V
from ..backends import BACKENDS, forced_backend, op

__all__ = ["exp_gram", "exp_rows"]

_OP = op("exp_gram")
_LOW = (torch.float16, torch.bfloat16, torch.float32)

# ``backend="auto"`` on a GPU: the first backend in this order whose ``supports`` check accepts the
# inputs. Triton first: its kernel runs both products on tensor cores (tf32x3 for float32, about
# float32 accuracy; native float16/bfloat16), while the CUDA kernel does scalar float32 FMAs from
# shared memory. Unmeasured on a GPU so far: the first GPU run times both (``bench/gpu_run.sh``,
# case ``fit/...``, op ``exp_gram``) and this order follows the faster one. The environment
# variable ``CDLM_FAST_EXP_GRAM_ORDER`` (e.g. ``cuda,triton``) overrides it at run time.
EXP_GRAM_GPU_ORDER = ("triton", "cuda", "torch")


def gpu_order() -> Tuple[str, ...]:
    """The ``auto`` order of the ``exp_gram`` backends on a GPU (see ``EXP_GRAM_GPU_ORDER``)."""
    env = os.environ.get("CDLM_FAST_EXP_GRAM_ORDER", "").strip()
    if not env:
        return EXP_GRAM_GPU_ORDER
    order = tuple(b.strip() for b in env.split(",") if b.strip())
    bad = [b for b in order if b not in BACKENDS]
    if bad or not order:
        raise ValueError(f"CDLM_FAST_EXP_GRAM_ORDER must list backends among {BACKENDS}, got {env!r}")
    return order + tuple(b for b in EXP_GRAM_GPU_ORDER if b not in order)


def _exp_rows(Q, C, beta, shift, scale, dtype):
    """``A = exp(scale * Q C^T + beta - shift)`` for a chunk of rows: ``[P, c, t]`` in ``dtype``.

    One GEMM with the additive term fused (``baddbmm``) and an in-place ``exp``: three passes
    over ``A`` instead of five."""
    add = -shift.to(dtype).unsqueeze(-1)
    if beta is not None:
        add = add + beta.to(dtype).unsqueeze(-2)
    else:
        add = add.expand(-1, -1, C.shape[1])
    return torch.baddbmm(add, Q.to(dtype), C.to(dtype).transpose(-1, -2), alpha=scale).exp_()


def exp_rows(Q: torch.Tensor, C: torch.Tensor, shift: torch.Tensor, scale: float) -> torch.Tensor:
    """The design matrix itself, ``A = exp(scale * Q C^T - shift)`` ``[P, n, t]`` float32 (float64 for
    float64 ``Q``), for callers that keep it and update a few columns of ``A^T A`` at a time
    (the refills of :func:`cdlm_fast.compaction.compact_layer`). Q ``[P, n, D]``, C ``[P, t, D]``,
    shift ``[P, n]``."""
    dtype = torch.float64 if Q.dtype == torch.float64 else torch.float32
    return _exp_rows(Q, C, None, shift, scale, dtype)


def _exp_gram_torch(Q, C, beta, shift, scale, Y):
    """Blocked backend: ``A`` in chunks of rows (bounded memory), accumulated in place into
    ``G``/``R``; float32 (float64 when an input is float64). On the CPU the float32 result
    matches the float64 reference to ~1e-6 relative (``tests/test_gram.py``)."""
    dtype = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in (Q, C, beta, shift, Y)) \
        else torch.float32
    P, n, _ = Q.shape
    t = C.shape[1]
    e = 1 if Y is None else Y.shape[-1]
    G = torch.zeros(P, t, t, dtype=dtype, device=Q.device)
    R = torch.zeros(P, t, e, dtype=dtype, device=Q.device)
    Cd = C.to(dtype)
    chunk = max(1, (1 << 22) // max(1, P * t))
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        A = _exp_rows(Q[:, i0:i1], Cd, beta, shift[:, i0:i1], scale, dtype)
        At = A.transpose(-1, -2)
        G.baddbmm_(At, A)
        if Y is None:
            R += A.sum(-2).unsqueeze(-1)
        else:
            R.baddbmm_(At, Y[:, i0:i1].to(dtype))
    return G, R


_OP.register("torch", _exp_gram_torch)
_OP.lazy("cdlm_fast.kernels.gram", "cdlm_fast._cuda_ops")


def _check(Q, C, beta, shift, scale, Y):
    V.tensor("Q", Q, ndim=3, dtypes=V.FLOAT_DTYPES, shape_doc="[P, n, D]")
    P, n, D = Q.shape
    V.tensor("C", C, ndim=3, dtypes=V.FLOAT_DTYPES, shape_doc=f"[P={P}, t, D={D}]")
    if C.dtype != Q.dtype:
        raise TypeError(f"C must have the dtype of Q ({Q.dtype}), got {C.dtype}")
    if C.shape[0] != P or C.shape[2] != D:
        raise ValueError(f"C must have shape [P={P}, t, D={D}], got {tuple(C.shape)}")
    t = C.shape[1]
    f32 = (torch.float32, torch.float64) if Q.dtype == torch.float64 else (torch.float32,)
    V.same_device([("Q", Q), ("C", C), ("beta", beta), ("shift", shift), ("Y", Y)])
    if beta is not None:
        V.tensor("beta", beta, ndim=2, dtypes=f32, shape_doc=f"[P={P}, t={t}]")
        if tuple(beta.shape) != (P, t):
            raise ValueError(f"beta must have shape [P={P}, t={t}], got {tuple(beta.shape)}")
    V.tensor("shift", shift, ndim=2, dtypes=f32, shape_doc=f"[P={P}, n={n}]")
    if tuple(shift.shape) != (P, n):
        raise ValueError(f"shift must have shape [P={P}, n={n}], got {tuple(shift.shape)}")
    if Y is not None:
        V.tensor("Y", Y, ndim=3, dtypes=f32, shape_doc=f"[P={P}, n={n}, e]")
        if Y.shape[:2] != (P, n):
            raise ValueError(f"Y must have shape [P={P}, n={n}, e], got {tuple(Y.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    V.finite_tensor("Q", Q)
    V.finite_tensor("C", C)
    V.finite_tensor("shift", shift)
    if Y is not None:
        V.finite_tensor("Y", Y)
    if beta is not None and beta.numel() and bool((torch.isnan(beta) | (beta == float("inf"))).any()):
        raise ValueError("beta must not contain NaN or +inf (-inf is allowed and removes a key)")


def exp_gram(Q: torch.Tensor, C: torch.Tensor, beta: Optional[torch.Tensor], shift: torch.Tensor, scale: float,
             Y: Optional[torch.Tensor] = None, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ``G = A^T A`` and ``R = A^T Y`` for ``A = exp(scale * Q C^T + beta - shift)``.

    Args:
        Q: ``[P, n, D]`` float16 / bfloat16 / float32 (float64: torch backend) queries.
        C: ``[P, t, D]`` keys, Q's dtype.
        beta: ``[P, t]`` float32 per-key bias or ``None`` (zeros); ``-inf`` gives a zero column.
        shift: ``[P, n]`` float32 per-row log shift (finite), e.g. the row's lse.
        scale: score scale (e.g. ``D ** -0.5``).
        Y: ``[P, n, e]`` float32 targets or ``None`` (ones: ``R`` is the column sums).
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(G [P, t, t], R [P, t, e])`` float32 (float64 for float64 input on the torch backend);
        ``e = 1`` when ``Y`` is None.

    Example::

        >>> Q = torch.randn(4, 1000, 64); C = Q[:, :32]
        >>> shift = torch.logsumexp(Q @ Q.mT * 64 ** -0.5, -1)       # lse over all keys
        >>> G, R = exp_gram(Q, C, None, shift, 64 ** -0.5)             # mass fit
    """
    _check(Q, C, beta, shift, scale, Y)
    meta = dict(Q=Q, C=C, beta=beta, shift=shift, Y=Y)
    if backend == "auto" and Q.device.type == "cuda" and not forced_backend():
        backend = next((b for b in gpu_order() if _OP.reason(b, Q.device, **meta) is None), "torch")
    name = _OP.select(backend, Q.device, **meta)
    return _OP.impls[name](Q, C, beta, shift, float(scale), Y)
