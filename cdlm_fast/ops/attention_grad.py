"""Autograd of :func:`cdlm_fast.attention`: gradients for ``q``, ``k``, ``v`` and the per-key ``bias``.

The differentiable path is one ``torch.library`` custom op, ``cdlm_fast::attention_train``, whose
forward runs the selected backend's forward (``(out, lse)``) and whose backward
(:func:`torch.library.register_autograd`) is a second custom op, ``cdlm_fast::attention_backward``,
so ``torch.compile`` sees one node in the forward graph and one in the backward graph.

Backward math (flash-attention style: ``P`` is recomputed from ``q``, ``k``, ``bias`` and the saved
``lse``, never stored). With ``s_ij = scale * q_i . k_j + bias_j`` on visible keys::

    P_ij   = exp(s_ij - lse_i)                  (0 for invisible keys and rows that see no key)
    D_i    = dout_i . out_i - dlse_i
    dS_ij  = P_ij * (dout_i . v_j - D_i)
    dq_i   = scale * sum_j dS_ij k_j
    dk_j   = scale * sum_{i, group heads} dS_ij q_i
    dv_j   = sum_{i, group heads} P_ij dout_i
    dbias_j = sum_{i, group heads} dS_ij

(``dlse`` is the gradient flowing into the returned ``lse``: ``d lse_i / d s_ij = P_ij``.) Keys
masked by ``bias = -inf`` and rows that see no key get exactly zero gradients, never NaN.

Backward backends: ``"triton"`` (:mod:`cdlm_fast.kernels.attention_backward`, registered on first
use) for the triton forward; ``"torch"`` (:func:`attention_backward_torch`, key-chunked so the
memory is bounded) for every other forward (``torch``, ``cuda``) and wherever triton cannot run.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends import op
from .attention_cpu import key_limits

__all__ = ["attention_train", "attention_backward_torch", "backward_backend", "CHUNK_ELEMENTS"]

_FWD = op("attention")
_BWD = op("attention_bwd")

# Score-matrix elements per key chunk of the torch backward (a few such [B, Hq, Lq, chunk]
# tensors are alive at once): 2**24 float32 elements = 64 MiB each.
CHUNK_ELEMENTS = 1 << 24


def attention_backward_torch(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                             prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int,
                             block_size: int, scale: float, *, chunk: Optional[int] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward of the attention forward in plain PyTorch, in key chunks.

    Shapes: ``dout``/``out``/``q`` ``[B, Hq, Lq, D]``, ``dlse``/``lse`` ``[B, Hq, Lq]`` (``dlse`` may be
    ``None``), ``k``/``v`` ``[B, Hkv, Lk, D]``, ``bias`` ``[B, Hkv, Lk]`` or ``None``, ``prefix_len``
    ``[B]``, ``kv_lens`` ``[B]`` or ``None``; ``block_size = 0`` means no mask. Computes in float64
    for float64 inputs, else float32, over key chunks of ``chunk`` keys (default: about
    :data:`CHUNK_ELEMENTS` score elements per chunk).

    Returns ``(dq, dk, dv, dbias)`` in the dtypes of ``q``, ``k``, ``v``, ``bias`` (``dbias`` is
    ``None`` without a bias); ``dk``, ``dv``, ``dbias`` summed over the query heads of a GQA group.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = G * Lq
    qf = q.to(cdt).reshape(B, Hkv, rows, D)
    do = dout.to(cdt).reshape(B, Hkv, rows, D)
    lse_f = lse.to(cdt).reshape(B, Hkv, rows)
    seen = torch.isfinite(lse_f)
    lse_s = torch.where(seen, lse_f, torch.zeros_like(lse_f)).unsqueeze(-1)
    delta = (do * out.to(cdt).reshape(B, Hkv, rows, D)).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(seen, dlse.to(cdt).reshape(B, Hkv, rows), torch.zeros_like(delta))
    delta = delta.unsqueeze(-1)
    limits = key_limits(prefix_len.to(q.device), block_size or None, q_offset, Lq, Lk,
                        None if kv_lens is None else kv_lens.to(q.device))          # [B, Lq]
    limits = limits[:, None, None, :].expand(B, 1, G, Lq).reshape(B, 1, rows)
    limits = torch.where(seen, limits, torch.zeros_like(limits)).unsqueeze(-1)     # [B, Hkv, rows, 1]

    dq = torch.zeros_like(qf)
    dk = torch.empty(B, Hkv, Lk, D, dtype=cdt, device=q.device)
    dv = torch.empty(B, Hkv, Lk, v.shape[-1], dtype=cdt, device=q.device)
    dbias = torch.empty(B, Hkv, Lk, dtype=cdt, device=q.device) if bias is not None else None
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, B * Hq * Lq))
    for j0 in range(0, Lk, chunk):
        j1 = min(Lk, j0 + chunk)
        kc = k[:, :, j0:j1].to(cdt)
        vc = v[:, :, j0:j1].to(cdt)
        s = torch.matmul(qf, kc.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias[:, :, None, j0:j1].to(cdt)
        visible = torch.arange(j0, j1, device=q.device) < limits
        p = torch.where(visible, torch.exp(torch.where(visible, s, torch.zeros_like(s)) - lse_s),
                        torch.zeros_like(s))
        ds = p * (torch.matmul(do, vc.transpose(-1, -2)) - delta)
        dq += torch.matmul(ds, kc)
        dk[:, :, j0:j1] = torch.matmul(ds.transpose(-1, -2), qf) * scale
        dv[:, :, j0:j1] = torch.matmul(p.transpose(-1, -2), do)
        if dbias is not None:
            dbias[:, :, j0:j1] = ds.sum(-2)
    dq = (dq * scale).reshape(B, Hq, Lq, D).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype)


def _torch_backward(dout, dlse, q, k, v, bias, out, lse, prefix_len, kv_lens, q_offset, block_size, scale):
    return attention_backward_torch(dout, dlse, q, k, v, bias, out, lse, prefix_len, kv_lens, q_offset,
                                    block_size, scale)


_BWD.register("torch", _torch_backward)
_BWD.lazy("cdlm_fast.kernels.attention_backward")


def backward_backend(forward_backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> str:
    """The backward backend used after a ``forward_backend`` forward: ``"triton"`` after a triton
    forward when the triton backward supports the inputs, else ``"torch"``."""
    if forward_backend == "triton" and _BWD.reason("triton", q.device, q=q, k=k, v=v, bias=bias) is None:
        return "triton"
    return "torch"


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("cdlm_fast::attention_train", mutates_args=())
def _train_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
              prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int,
              scale: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = _FWD.impls[backend](q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale)
    # custom ops must not return views of their inputs, and lse has one dtype per input dtype
    return out.clone() if out._base is not None else out, lse.to(_lse_dtype(q))


@_train_op.register_fake
def _train_fake(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("cdlm_fast::attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, prefix_len: torch.Tensor,
                 kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int, scale: float,
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _BWD._load()
    name = backward_backend(backend, q, k, v, bias)
    dq, dk, dv, db = _BWD.impls[name](dout.contiguous(), dlse, q, k, v, bias, out, lse, prefix_len, kv_lens,
                                      q_offset, block_size, scale)
    if db is None:
        db = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, db


@_backward_op.register_fake
def _backward_fake(dout, dlse, q, k, v, bias, out, lse, prefix_len, kv_lens, q_offset, block_size, scale, backend):
    db = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _setup_context(ctx, inputs, output):
    q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, prefix_len, kv_lens)
    ctx.args = (q_offset, block_size, scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, bias, out, lse, prefix_len, kv_lens = ctx.saved_tensors
    q_offset, block_size, scale, backend = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, db = torch.ops.cdlm_fast.attention_backward(dout, dlse, q, k, v, bias, out, lse, prefix_len,
                                                            kv_lens, q_offset, block_size, scale, backend)
    return dq, dk, dv, (db if bias is not None else None), None, None, None, None, None, None


_train_op.register_autograd(_backward, setup_context=_setup_context)


def attention_train(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                    prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int,
                    scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out, lse)`` of :func:`cdlm_fast.attention` (arguments already validated:
    ``prefix_len`` an int32 ``[B]`` tensor, ``block_size = 0`` for no mask, ``backend`` a resolved
    forward backend name). Gradients flow to ``q``, ``k``, ``v``, ``bias`` from both outputs."""
    return torch.ops.cdlm_fast.attention_train(q, k, v, bias, prefix_len, kv_lens, int(q_offset), int(block_size),
                                               float(scale), backend)
