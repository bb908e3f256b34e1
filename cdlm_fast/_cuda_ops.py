"""The ``"cuda"`` backend: the compiled extension ``cdlm_fast._C``.

Importing this module loads ``cdlm_fast._C`` if it was built (its static initialisers
register the ops ``torch.ops.cdlm_fast.*`` with the dispatcher), registers their fake
(meta) implementations so they trace under ``torch.compile`` / ``FakeTensorMode``, and
registers backend ``"cuda"`` for the ops ``"attention"``, ``"exp_gram"``, ``"nnls_gram"`` and
``"lstsq_gram"`` in
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

    cdlm_fast::nnls_admm_step(Tensor M, Tensor h, Tensor z, Tensor u, Tensor rho)
        -> (Tensor z_out, Tensor u_out)
        One ADMM iteration of the NNLS warm-start phase (see ``admm_step_cuda`` below).

    cdlm_fast::lstsq_gram_cholesky(Tensor G, Tensor R, float ridge, float rank_tol)
        -> (Tensor X, Tensor bad)
        Batched small-t (<= 64) Cholesky solve (see ``lstsq_gram_cuda`` below).

    cdlm_fast::layout_selfcheck() -> str
        Host-side check of the kernel's layout assumptions; "" when all hold.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends

__all__ = ["AVAILABLE", "attention_cuda", "exp_gram_cuda", "attention_supports", "exp_gram_supports",
           "admm_step_cuda", "nnls_gram_cuda", "lstsq_gram_cuda"]

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
    # The kernel reads prefix_len[b] / kv_lens[b] densely: a strided [B] view must be copied.
    prefix_len = prefix_len.to(device=q.device, dtype=torch.int32).contiguous()
    if kv_lens is not None:
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
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
    if Q.dim() == 3:
        need, limit = exp_gram_smem_bytes(Q.shape[-1]), _smem_limit(Q.device)
        if limit is not None and need > limit:
            return (f"the CUDA exp_gram kernel needs {need} bytes of shared memory per block for head dim "
                    f"{Q.shape[-1]}, this GPU allows {limit}")
    return None


def exp_gram_smem_bytes(d: int) -> int:
    """Dynamic shared memory of one exp_gram block (the formula of ``launch`` in csrc/exp_gram.cu)."""
    tile, chunk = 64, 16
    return 4 * ((2 * tile + chunk) * (d + 1) + 2 * chunk * tile)


def _smem_limit(device: torch.device) -> Optional[int]:
    """Opt-in shared memory per block of a CUDA ``device`` (``None`` for other devices)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None)


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


# --------------------------------------------------------------------------- NNLS (ADMM phase)
#
#   cdlm_fast::nnls_admm_step(Tensor M, Tensor h, Tensor z, Tensor u, Tensor rho)
#       -> (Tensor z_out, Tensor u_out)
#       One fused ADMM iteration of the NNLS warm-start phase for N problems (csrc/nnls_admm.cu):
#       x = M (h + rho (z - u)), z_out = max(x + u, 0), u_out = u + x - z_out.
#       M [N, t, t], h/z/u [N, t], rho [N], all float32 or all float64.

NNLS_ADMM_DTYPES = (torch.float32, torch.float64)


def admm_step_cuda(M: torch.Tensor, h: torch.Tensor, z: torch.Tensor, u: torch.Tensor,
                   rho: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ADMM iteration on the GPU; same contract as
    :func:`cdlm_fast.ops.nnls_active_set.admm_step_torch`.

    ``M [N, t, t]``, ``h, z, u [N, t]``, ``rho [N]``, all float32 or all float64 (mixed inputs
    are cast to ``M``'s dtype). Returns ``(z' [N, t], u' [N, t])`` in that dtype.
    """
    _need_cuda("nnls_admm_step", M=M, h=h, z=z, u=u, rho=rho)
    if M.dtype not in NNLS_ADMM_DTYPES:
        raise ValueError(f"nnls_admm_step: M must be float32 or float64, got {str(M.dtype).replace('torch.', '')}")
    h, z, u, rho = (x.to(M.dtype) for x in (h, z, u, rho))
    return torch.ops.cdlm_fast.nnls_admm_step(M, h, z, u, rho)


def nnls_gram_cuda(G: torch.Tensor, h: torch.Tensor, x0: Optional[torch.Tensor], max_iter: Optional[int],
                   tol: float, **kwargs):
    """``nnls_gram`` backend: the shared active-set solver
    (:func:`cdlm_fast.ops.nnls_active_set.nnls_gram_active_set`) with the CUDA ADMM phase.

    ``G [N, t, t]``, ``h [N, t]``, ``x0 [N, t]`` or None (CUDA tensors). Returns
    ``(x [N, t] float64, iterations [N] int64, kkt_residual [N] float64, converged [N] bool)``.
    """
    _need_cuda("nnls_gram", G=G, h=h, x0=x0)
    from .ops.nnls_active_set import nnls_gram_active_set
    return nnls_gram_active_set(G, h, x0, max_iter, tol, admm_step=admm_step_cuda, **kwargs)


def _register_nnls_fakes() -> None:
    @torch.library.register_fake("cdlm_fast::nnls_admm_step")
    def _nnls_admm_step_fake(M, h, z, u, rho):
        torch._check(M.dim() == 3 and M.shape[1] == M.shape[2], lambda: f"M must be [N, t, t], got {tuple(M.shape)}")
        torch._check(z.dim() == 2 and u.dim() == 2, lambda: "z and u must be [N, t]")
        return z.new_empty(z.shape), u.new_empty(u.shape)


# An extension built before this op existed loads without it: register only what is there.
if AVAILABLE and hasattr(torch.ops.cdlm_fast, "nnls_admm_step"):
    _register_nnls_fakes()
    backends.op("nnls_gram").register("cuda", nnls_gram_cuda)


# --------------------------------------------------------------------------- least squares
#
#   cdlm_fast::lstsq_gram_cholesky(Tensor G, Tensor R, float ridge, float rank_tol)
#       -> (Tensor X, Tensor bad)
#       X = (sym(G) + ridge I)^{-1} R by a shared-memory Cholesky, one CTA per problem
#       (csrc/lstsq_cholesky.cu). G [N, t, t], R [N, t, d] float64, t <= 64. bad [N] bool marks
#       the problems whose factorisation failed or had a pivot below rank_tol * max(diag)
#       (their X is 0).

LSTSQ_CHOLESKY_MAX_T = 64


def lstsq_gram_cuda(G: torch.Tensor, R: torch.Tensor, ridge: float) -> torch.Tensor:
    """``lstsq_gram`` backend: ``(G + ridge I)^{-1} R`` in float64 for ``G [N, t, t]``, ``R [N, t, d]``.

    ``t <= 64``: the shared-memory Cholesky kernel; the problems it flags as (numerically)
    singular, and every problem with ``t > 64``, are solved by the torch backend
    (``cholesky_ex`` / eigendecomposition pseudo-inverse, cuSOLVER), so the result follows the
    rules of :func:`cdlm_fast.ops.solvers.lstsq_gram` for any input. Returns ``X [N, t, d]`` float64.
    """
    _need_cuda("lstsq_gram", G=G, R=R)
    from .ops import solvers
    N, t, _ = G.shape
    if N == 0 or t == 0 or t > LSTSQ_CHOLESKY_MAX_T:
        return solvers._lstsq_gram_torch(G, R, ridge)
    X, bad = torch.ops.cdlm_fast.lstsq_gram_cholesky(G.double(), R.double(), float(ridge), solvers._RANK_TOL)
    return solvers._resolve_singular(X, bad, G, R, ridge)


def _register_lstsq_fakes() -> None:
    @torch.library.register_fake("cdlm_fast::lstsq_gram_cholesky")
    def _lstsq_gram_cholesky_fake(G, R, ridge, rank_tol):
        torch._check(G.dim() == 3 and R.dim() == 3, lambda: "G and R must be [N, t, t] and [N, t, d]")
        return R.new_empty(R.shape), G.new_empty(G.shape[:1], dtype=torch.bool)


if AVAILABLE and hasattr(torch.ops.cdlm_fast, "lstsq_gram_cholesky"):
    _register_lstsq_fakes()
    backends.op("lstsq_gram").register("cuda", lstsq_gram_cuda)
