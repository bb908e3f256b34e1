"""Triton backend of :func:`cdlm_fast.attention` (registered as backend ``"triton"`` at import).

Two kernels share one contract (``attention_triton(q, k, v, bias, prefix_len, kv_lens, q_offset,
block_size, scale) -> (out, lse)``, with ``prefix_len`` an int32 ``[B]`` tensor, ``kv_lens`` one or
``None``, ``block_size`` ``0`` for "no mask"):

* prefill (:mod:`.attention_prefill`): flash attention over query tiles that visit only the key
  tiles they can see;
* block decode (:mod:`.attention_decode`): ``Lq <= DECODE_MAX_LQ`` queries against a long cache,
  split-K with the ``G`` query heads of a KV head packed into the rows of one tile.

The launch is wrapped in the custom op ``torch.ops.cdlm_fast.attention_triton`` (with a fake
implementation), so ``torch.compile(fullgraph=True)`` traces through ``cdlm_fast.attention``.
No per-call host work beyond the launch: no mask tensors, no ``.item()``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from cdlm_fast.backends import op

from .attention_decode import decode
from .attention_prefill import prefill

__all__ = ["attention_triton", "supports", "DECODE_MAX_LQ", "MAX_HEAD_DIM"]

DECODE_MAX_LQ = 64
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q, k, v, bias=None, **_) -> Optional[str]:
    """``None`` if the Triton kernels handle these inputs, else the reason."""
    if q.dtype not in _DTYPES:
        return (f"dtype {str(q.dtype).replace('torch.', '')} is not supported by the triton kernels "
                "(float16, bfloat16, float32); use backend='torch' for float64")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bfloat16 does not run in the Triton interpreter (CPU); use a GPU or backend='torch'"
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        return f"head dim {d} is not supported by the triton kernels (1..{MAX_HEAD_DIM}; padded to a power of two)"
    if bias is not None and bias.dtype != torch.float32:
        return f"bias must be float32 for the triton kernels, got {str(bias.dtype).replace('torch.', '')}"
    return None


def _empty(shape, dtype, device):
    """Output allocation (a hook: the tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, path, num_splits):
    B, Hq, Lq, D = q.shape
    out = _empty((B, Hq, Lq, D), q.dtype, q.device)
    lse = _empty((B, Hq, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    Lk = k.shape[2]
    # Block sizes beyond every position give the same limits; clamping keeps int32 math exact.
    block_size = min(block_size, q_offset + Lq + Lk + 1) if block_size > 0 else 0
    if path == "auto":
        path = "decode" if Lq <= DECODE_MAX_LQ else "prefill"
    prefix_len = prefix_len.to(device=q.device, dtype=torch.int32).contiguous()
    if kv_lens is not None:
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    if path == "decode":
        decode(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, out, lse, _empty, num_splits)
    elif path == "prefill":
        prefill(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, out, lse)
    else:
        raise ValueError(f"path must be 'auto', 'prefill' or 'decode', got {path!r}")
    return out, lse


@torch.library.custom_op("cdlm_fast::attention_triton", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int,
                  scale: float, path: str, num_splits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, path, num_splits)


@_attention_op.register_fake
def _attention_fake(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale, path, num_splits):
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     prefix_len: torch.Tensor, kv_lens: Optional[torch.Tensor], q_offset: int, block_size: int,
                     scale: float, *, path: str = "auto", num_splits: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-causal attention with a per-key bias; returns ``(out, lse)``.

    Arguments as validated by :func:`cdlm_fast.attention` (``block_size = 0``: no mask). ``path``
    (``"auto"``, ``"prefill"``, ``"decode"``) and ``num_splits`` (decode; ``0`` = from the shape)
    override the heuristics, for tests and benchmarks.
    """
    return torch.ops.cdlm_fast.attention_triton(q, k, v, bias, prefix_len, kv_lens, int(q_offset),
                                                int(block_size), float(scale), path, int(num_splits))


op("attention").register("triton", attention_triton, supports=supports)
