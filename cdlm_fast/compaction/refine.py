"""Gradient refinement of a compacted layer (``C_k``, ``beta``, ``C_v``) after Attention Matching.

Attention Matching fits keys, then ``beta`` (NNLS), then values (least squares) one after the
other, each closed-form. :func:`refine` starts from that solution and optimises the three jointly
with Adam on the two Attention-Matching conditions, on the same reference queries::

    loss_h = ||O_c - O||^2 / ||O||^2  +  mass_weight * mean_i (lse_c,i - lse_i)^2

per KV head ``h`` (``O``, ``lse``: attention output and log-mass of the original cache;
``O_c``, ``lse_c``: of the compacted cache, through the differentiable
:func:`cdlm_fast.attention`, which returns ``d beta`` too). All heads of the layer are one batch;
their losses are independent, so the sum is minimised head by head.

A random held-out split of the reference queries is evaluated every ``eval_every`` steps (with
the parameters rounded to the cache dtype, as they will be stored), and every head keeps its best
parameters on that split, starting from the Attention-Matching solution itself: the result is
never worse than the start on the held-out queries, head by head. Training stops when no head
has improved for ``patience`` evaluations.

Slots with ``beta = -inf`` (dropped keys, padding to the largest per-head budget) stay masked.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import _validate as V
from ..ops.attention import attention
from .types import CompactedLayer

__all__ = ["refine", "layer_loss"]


def layer_loss(layer_keys: torch.Tensor, layer_values: torch.Tensor, beta: torch.Tensor, queries: torch.Tensor,
               target_out: torch.Tensor, target_lse: torch.Tensor, weight: torch.Tensor, *, scale: float,
               mass_weight: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Per-head refinement loss ``[B, Hkv]`` (differentiable in keys, values and beta).

    Shapes: ``layer_keys``/``layer_values`` ``[B, Hkv, t, D]`` float32, ``beta`` ``[B, Hkv, t]``,
    ``queries`` ``[B, Hq, n, D]``, ``target_out`` ``[B, Hq, n, D]``, ``target_lse`` ``[B, Hq, n]``,
    ``weight`` ``[B, Hq, n]`` (0/1: which queries count).
    """
    B, Hkv = layer_keys.shape[:2]
    oc, lc = attention(queries, layer_keys, layer_values, bias=beta, scale=scale, return_lse=True, backend=backend)
    w = weight.to(oc.dtype)
    err = ((oc - target_out) ** 2).sum(-1) * w                                   # [B, Hq, n]
    norm = (target_out ** 2).sum(-1) * w
    seen = torch.isfinite(lc) & (w > 0)
    dl = torch.where(seen, lc - torch.where(seen, target_lse, torch.zeros_like(target_lse)), torch.zeros_like(lc))
    per_head = lambda x: x.reshape(B, Hkv, -1).sum(-1)  # noqa: E731  (query heads of a group stacked)
    out_term = per_head(err) / per_head(norm).clamp(min=1e-30)
    mass_term = per_head(dl ** 2) / per_head(w).clamp(min=1.0)
    return out_term + mass_weight * mass_term


def refine(
    layer: CompactedLayer,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-2,
    scale: Optional[float] = None,
    mass_weight: float = 1.0,
    holdout: float = 0.25,
    eval_every: int = 10,
    patience: int = 5,
    key_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    backend: str = "auto",
    history: Optional[List[Dict[str, float]]] = None,
) -> CompactedLayer:
    """Polish a compacted layer by gradient descent on its reference queries.

    Args:
        layer: the :class:`CompactedLayer` to refine (from :func:`compact_layer` with any
            selection method, or any other compaction with a bias).
        keys, values: ``[B, Hkv, T, D]`` the original cache of the layer.
        queries: ``[B, Hq, n, D]`` reference queries; a random ``holdout`` fraction (at least
            one, the same positions for every batch row and head) is held out for early stopping.
        steps: maximal number of Adam steps. lr: Adam learning rate (of keys, values and beta).
        scale: score scale, default ``D ** -0.5``.
        mass_weight: weight of the log-mass term of the loss.
        holdout: fraction of the queries held out (``0 < holdout < 1``).
        eval_every: held-out evaluation period in steps; patience: evaluations without any head
            improving before stopping.
        key_mask: optional ``[B, T]`` bool, False for padding keys of the original cache.
        query_mask: optional ``[B, n]`` bool, False for padding queries.
        seed: seed of the held-out split. backend: attention backend.
        history: optional list; one dict per evaluation (``step``, ``train``, ``heldout`` mean
            losses, ``improved`` heads) is appended to it.

    Returns:
        A new :class:`CompactedLayer` (keys/values in the dtypes of ``layer``, bias float32, same
        ``logical_length`` and ``counts``; ``indices`` -1 on the heads that moved) whose per-head
        held-out loss is at most the start's.
    """
    V.tensor("keys", keys, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hkv, T, D]")
    V.tensor("values", values, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hkv, T, D]")
    V.tensor("queries", queries, ndim=4, dtypes=V.FLOAT_DTYPES, shape_doc="[B, Hq, n, D]")
    if not isinstance(layer, CompactedLayer):
        raise TypeError(f"layer must be a CompactedLayer, got {type(layer).__name__}")
    B, Hkv, T, D = keys.shape
    if tuple(layer.keys.shape[:2]) != (B, Hkv) or layer.keys.shape[-1] != D:
        raise ValueError(f"layer.keys must have shape [B={B}, Hkv={Hkv}, t, D={D}], got {tuple(layer.keys.shape)}")
    if values.shape[-1] != D or layer.values.shape[-1] != D:
        raise ValueError("refine needs values with the head dim of the keys (Dv == D)")
    if queries.shape[0] != B or queries.shape[-1] != D or queries.shape[1] % Hkv:
        raise ValueError(f"queries must have shape [B={B}, Hq (a multiple of Hkv={Hkv}), n, D={D}], "
                         f"got {tuple(queries.shape)}")
    n = queries.shape[2]
    for name, mask, shape in (("key_mask", key_mask, (B, T)), ("query_mask", query_mask, (B, n))):
        if mask is not None and (not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != shape):
            raise ValueError(f"{name} must be a bool tensor of shape {list(shape)}")
    V.non_negative_int("steps", steps)
    V.non_negative_int("eval_every", eval_every, minimum=1)
    V.non_negative_int("patience", patience, minimum=1)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if not (isinstance(holdout, float) and 0.0 < holdout < 1.0):
        raise ValueError(f"holdout must be a float in (0, 1), got {holdout!r}")
    if steps == 0 or n < 2:
        return layer
    # gradients are needed even when the caller runs under no_grad / inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        return _refine(layer, keys.clone(), values.clone(), queries.float().clone(), steps, float(lr),
                       D ** -0.5 if scale is None else float(scale), mass_weight, holdout, eval_every, patience,
                       key_mask, query_mask, seed, backend, history)


def _refine(layer, keys, values, q, steps, lr, scale, mass_weight, holdout, eval_every, patience, key_mask,
            query_mask, seed, backend, history):
    B, Hkv, T, D = keys.shape
    n = q.shape[2]
    dev = keys.device
    start_indices = layer.indices
    layer = CompactedLayer(*(t.clone() for t in (layer.keys, layer.values, layer.bias)), layer.logical_length,
                           layer.counts)
    kb = None
    if key_mask is not None:
        kb = torch.zeros(B, Hkv, T, device=dev).masked_fill(~key_mask.to(dev)[:, None, :], float("-inf"))
    with torch.no_grad():
        y, lse = attention(q, keys.float(), values.float(), bias=kb, scale=scale, return_lse=True, backend=backend)
    w = torch.isfinite(lse)
    if query_mask is not None:
        w = w & query_mask.to(dev)[:, None, :]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(dev)
    n_held = min(n - 1, max(1, round(holdout * n)))
    held, fit = perm[:n_held], perm[n_held:]
    split = [(q[:, :, idx], y[:, :, idx], lse[:, :, idx], w[:, :, idx]) for idx in (fit, held)]

    finite = torch.isfinite(layer.bias)
    ck = layer.keys.detach().float().clone().requires_grad_(True)
    cv = layer.values.detach().float().clone().requires_grad_(True)
    bp = torch.where(finite, layer.bias.float(), torch.zeros_like(layer.bias, dtype=torch.float32))
    bp = bp.detach().clone().requires_grad_(True)
    neg_inf = torch.full_like(bp, float("-inf"))

    def params(rounded: bool):
        k, v = ck, cv
        if rounded:  # evaluate what will be stored
            k, v = k.to(layer.keys.dtype).float(), v.to(layer.values.dtype).float()
        return k, v, torch.where(finite, bp, neg_inf)

    def loss_on(part, rounded=False):
        qq, yy, ll, ww = split[part]
        return layer_loss(*params(rounded), qq, yy, ll, ww, scale=scale, mass_weight=mass_weight, backend=backend)

    with torch.no_grad():
        best = loss_on(1, rounded=True)
    best_k, best_v, best_b = (t.detach().clone() for t in params(rounded=True))
    moved = torch.zeros_like(best, dtype=torch.bool)  # heads whose parameters left the start
    opt = torch.optim.Adam([ck, cv, bp], lr=lr)
    stale = 0
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        train = loss_on(0)
        train.sum().backward()
        opt.step()
        if step % eval_every and step != steps:
            continue
        with torch.no_grad():
            cur = loss_on(1, rounded=True)
            better = cur < best
            if better.any():
                k, v, b = params(rounded=True)
                best_k = torch.where(better[..., None, None], k, best_k)
                best_v = torch.where(better[..., None, None], v, best_v)
                best_b = torch.where(better[..., None], b, best_b)
                best = torch.where(better, cur, best)
                moved |= better
                stale = 0
            else:
                stale += 1
        if history is not None:
            history.append({"step": step, "train": float(train.detach().mean()), "heldout": float(cur.mean()),
                            "best": float(best.mean()), "improved": int(better.sum())})
        if stale >= patience:
            break
    # A refined head's keys are no longer original keys: its slots' indices become -1.
    indices = None if start_indices is None else torch.where(moved[..., None], torch.full_like(start_indices, -1),
                                                             start_indices)
    return CompactedLayer(keys=best_k.to(layer.keys.dtype), values=best_v.to(layer.values.dtype),
                          bias=best_b.float().contiguous(), logical_length=layer.logical_length, counts=layer.counts,
                          indices=indices)
