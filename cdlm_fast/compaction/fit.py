"""Least-squares fits of Attention Matching: the key weights (beta) and the values (C_v).

Both fits go through the Gram matrices of the problem (``exp_gram``), never a dense
``[N, T]`` float64 design matrix, and batch every KV head of a layer into one solver call.
Shapes as in :mod:`cdlm_fast.compaction.select` (``P`` problems, ``N`` queries, ``t`` slots).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..ops.gram import exp_gram, exp_rows
from ..ops.solvers import lstsq_gram, nnls_gram
from .select import _mask_problem, _masked_shift, softmax_rows_

__all__ = ["fit_beta", "MassGram", "compacted_lse", "fit_values", "RIDGE_CANDIDATES", "WEIGHT_FLOOR"]


def fit_beta(Q: torch.Tensor, C: torch.Tensor, lse: torch.Tensor, scale: float, valid: torch.Tensor,
             query_weight: Optional[torch.Tensor] = None,
             x0: Optional[torch.Tensor] = None, floor: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, object]:
    """Fit ``beta = log w`` so that the compacted keys reproduce each query's attention mass.

    Solves, per problem, ``min_{w >= 0} sum_i (sum_j exp(scale q_i.c_j - lse_i) w_j - 1)^2``
    (relative mass error of every reference query; ``lse_i`` is its log-mass over the original
    keys) with ``nnls_gram`` on ``G = A^T A``, ``h = A^T 1``.

    Problems whose active-set solve did not converge (``converged`` False: iteration cap or a
    numerically singular passive set) keep the better, by the NNLS objective, of the solver's
    (clamped, feasible) iterate and the best uniform weight ``w = c * 1``; count them with
    ``(~result.converged).sum()``.

    Args:
        Q: ``[P, N, D]`` float32 queries. C: ``[P, t, D]`` selected keys.
        lse: ``[P, N]`` float32 log-mass over the original keys.
        valid: ``[P, t]`` bool, False for padding slots.
        query_weight: optional ``[P, N]`` 0/1 weights (0 excludes a padded query).
        x0: optional ``[P, t]`` warm start of the NNLS solver (e.g. the previous weights).
        floor: optional ``[P, t]`` bool: those slots keep ``w >= WEIGHT_FLOOR`` (``beta >= -3``), as
            the authors' fit clamps every weight, unless their key has no attention mass at all
            (every ``exp`` underflows). Used for slots the refill rounds could not make live.

    Returns:
        ``beta`` ``[P, t]`` float32 (``-inf`` where ``w = 0`` or the slot is padding: such a key
        gets no attention) and the solver's ``NNLSResult``.
    """
    shift = lse if query_weight is None else _masked_shift(lse, query_weight)
    G, R = exp_gram(Q, C.float(), None, shift, scale, None)
    return _solve_mass(G, R[..., 0], Q.shape[1], valid, x0, floor)


# The floor on a key's weight ``w = exp(beta)`` in a floored re-solve (:func:`fit_beta`'s ``floor``):
# the lower clamp of the authors' reference fit (``w`` in ``[e^-3, e^3]``). ``w`` is relative to the
# key's own attention (``w = 1``: it counts as itself), about ``T / t`` on average.
WEIGHT_FLOOR = math.exp(-3.0)


def _solve_mass(G, h, N, valid, x0, floor=None):
    """NNLS of the mass fit from its Gram system (see :func:`fit_beta`): ``(beta, result)``.

    ``floor`` ``[P, t]`` bool: those slots are solved with ``w >= WEIGHT_FLOOR`` (as ``w = l + w'``,
    ``w' >= 0``: the same Gram matrix, right-hand side ``h - G l``), where their key has any mass
    (``G_jj > 0``; a key whose attention underflows everywhere stays at ``w >= 0``)."""
    G, h = _mask_problem(G, h, valid)
    G, h = G / N, h / N
    low = None
    if floor is not None:
        low = (floor & valid & (torch.diagonal(G, dim1=-2, dim2=-1) > 0)).to(G.dtype) * WEIGHT_FLOOR
        h = h - (G @ low[:, :, None])[:, :, 0]
        if x0 is not None:
            x0 = x0.float() - low
    res = nnls_gram(G, h, x0=None if x0 is None else (x0.float() * valid).clamp(min=0))
    w = res.x.float().clamp(min=0) * valid
    bad = ~res.converged.to(torch.bool)
    if bool(bad.any()):
        w = torch.where(bad[:, None], _better_of_uniform(G.float(), h.float(), w, valid), w)
    if low is not None:
        w = w + low.float()
    beta = torch.log(w)  # log(0) = -inf: the key is dropped
    return beta, res


class MassGram:
    """The mass fit's Gram system kept across refills: after a few slots change, only their
    columns of ``A`` and rows/columns of ``G = A^T A`` are recomputed (``n * t * k`` work for ``k``
    changed slots instead of ``n * t^2``). It holds ``A`` ``[P, N, t]`` float32, so callers use
    it when that fits their memory budget (:func:`fits`), else :func:`fit_beta` every round.

    Args (as :func:`fit_beta`): Q ``[P, N, D]`` float32, C ``[P, t, D]``, lse ``[P, N]``, scale,
    query_weight ``[P, N]`` 0/1 or ``None``.
    """

    MAX_BYTES = 1 << 29  # 512 MiB of A

    @classmethod
    def fits(cls, P: int, N: int, t: int) -> bool:
        """Whether ``A`` for ``P`` problems of ``N`` queries and ``t`` slots stays under ``MAX_BYTES``."""
        return P * N * t * 4 <= cls.MAX_BYTES

    def __init__(self, Q: torch.Tensor, C: torch.Tensor, lse: torch.Tensor, scale: float,
                 query_weight: Optional[torch.Tensor] = None):
        self.Q, self.scale = Q, scale
        self.shift = lse if query_weight is None else _masked_shift(lse, query_weight)
        self.A = exp_rows(Q, C.float(), self.shift, scale)
        self.G = torch.bmm(self.A.transpose(1, 2), self.A)
        self.h = self.A.sum(1)

    def replace(self, changed: torch.Tensor, C: torch.Tensor) -> None:
        """Slots ``changed`` ``[P, t]`` bool now hold the keys of ``C`` ``[P, t, D]``: update ``A``, ``G``, ``h``."""
        k = int(changed.sum(1).max())
        if k == 0:
            return
        # the changed slots of every problem, padded with its first slot (recomputed unchanged)
        cols = torch.where(changed, torch.arange(changed.shape[1], device=changed.device), changed.shape[1])
        cols = cols.sort(1).values[:, :k]
        cols = torch.where(cols == changed.shape[1], cols[:, :1].clamp(max=changed.shape[1] - 1), cols)
        Cn = C.float().gather(1, cols[:, :, None].expand(-1, -1, C.shape[-1]))
        An = exp_rows(self.Q, Cn, self.shift, self.scale)  # [P, N, k]
        self.A.scatter_(2, cols[:, None, :].expand(-1, self.A.shape[1], -1), An)
        Gc = torch.bmm(self.A.transpose(1, 2), An)  # [P, t, k]
        self.G.scatter_(2, cols[:, None, :].expand(-1, self.G.shape[1], -1), Gc)
        self.G.scatter_(1, cols[:, :, None].expand(-1, -1, self.G.shape[2]), Gc.transpose(1, 2))
        self.h.scatter_(1, cols, An.sum(1))

    def solve(self, valid: torch.Tensor, x0: Optional[torch.Tensor] = None,
              problems: Optional[torch.Tensor] = None,
              floor: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, object]:
        """``(beta, NNLSResult)`` of the current slots, as :func:`fit_beta` returns (``floor`` too), for
        all problems or only the ``problems`` (int64 indices; ``beta`` is then ``[len(problems), t]``)."""
        if problems is None:
            return _solve_mass(self.G, self.h, self.Q.shape[1], valid, x0, floor)
        return _solve_mass(self.G[problems], self.h[problems], self.Q.shape[1], valid[problems],
                           None if x0 is None else x0[problems], None if floor is None else floor[problems])


def _nnls_objective(G, h, w):
    """``w^T G w - 2 h^T w`` per problem (the NNLS objective up to a constant)."""
    return (w * (G @ w[:, :, None])[:, :, 0]).sum(1) - 2 * (h * w).sum(1)


def _better_of_uniform(G, h, w, valid):
    """Per problem, ``w`` or the best uniform weight ``c * valid`` (``c >= 0``), whichever fits better."""
    u = valid.to(G.dtype)
    den = (u * (G @ u[:, :, None])[:, :, 0]).sum(1)
    c = ((h * u).sum(1) / den.clamp(min=1e-30)).clamp(min=0)
    wu = c[:, None] * u
    take_u = _nnls_objective(G, h, wu) < _nnls_objective(G, h, w)
    return torch.where(take_u[:, None], wu, w)


def compacted_lse(Q: torch.Tensor, C: torch.Tensor, beta: torch.Tensor, scale: float,
                  backend: str = "auto") -> torch.Tensor:
    """``[P, N]`` float32 log-mass of every query over the compacted keys (with ``beta``)."""
    from ..ops.attention import attention

    q = Q[:, None]
    k = C.float()[:, None]
    _, lse = attention(q, k, k, bias=beta[:, None].contiguous(), scale=scale, return_lse=True, backend=backend)
    return lse[:, 0].float()


RIDGE_CANDIDATES = (0.0, 1e-6, 1e-4, 1e-2)


def fit_values(Q: torch.Tensor, C: torch.Tensor, beta: torch.Tensor, Y: torch.Tensor, scale: float,
               *, ridge="auto", query_weight: Optional[torch.Tensor] = None,
               backend: str = "auto", stats: Optional[dict] = None) -> torch.Tensor:
    """Fit the compacted values ``C_v`` so that attention outputs are preserved.

    ``X = softmax(scale * Q C^T + beta)`` (``[N, t]`` per problem) and ``Y`` the original
    attention outputs; solves ``(X^T X + lambda I) C_v = X^T Y`` with ``lstsq_gram``, where
    ``lambda = ridge * mean(diag(X^T X))`` (a relative ridge; 0 gives plain least squares).
    Slots with ``beta = -inf`` get zero values.

    ``ridge="auto"`` chooses the relative ridge per problem (KV head) from
    :data:`RIDGE_CANDIDATES` by the output error on a held-out fifth of the queries (every
    fifth one) of a fit on the other four fifths, then refits on all queries with it. Ridge 0 is
    a candidate, so the chosen value is never worse than ridge 0 on that split.

    Args:
        Q: ``[P, N, D]`` float32. C: ``[P, t, D]``. beta: ``[P, t]`` float32.
        Y: ``[P, N, Dv]`` float32 original attention outputs.
        ridge: a float ``>= 0`` or ``"auto"``.
        stats: optional dict; ``"ridge_chosen"`` (a dict candidate -> number of problems) is
            accumulated into it with ``ridge="auto"``.

    Returns:
        ``C_v`` ``[P, t, Dv]`` float32.
    """
    if not (ridge == "auto" or (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and ridge >= 0)):
        raise ValueError(f"ridge must be a float >= 0 or 'auto', got {ridge!r}")
    P, N = Q.shape[:2]
    if C.shape[1] == 0:  # no slot to fit (e.g. all of the budget went to sinks and the recent window)
        return torch.zeros(P, 0, Y.shape[-1], dtype=torch.float32, device=Q.device)
    valid = torch.isfinite(beta)
    vf = valid.float()
    qw = torch.ones(P, N, dtype=torch.bool, device=Q.device) if query_weight is None else query_weight > 0
    auto = ridge == "auto" and N >= 5
    if Q.device.type == "cpu" and MassGram.fits(P, N, C.shape[1]):
        G, R, Gh, Rh = _value_grams_dense(Q, C, beta, Y, scale, qw & valid.any(1, keepdim=True), auto)
    else:
        G, R, Gh, Rh = _value_grams_streamed(Q, C, beta, Y, scale, qw, valid, auto, backend)
    auto = auto and Gh is not None
    if auto:
        Gf, Rf = G - Gh, R - Rh
    d = (torch.diagonal(G, dim1=1, dim2=2) * vf).sum(1) / vf.sum(1).clamp(min=1)
    d = torch.where(d > 0, d, torch.ones_like(d))[:, None, None]
    # Normalising every problem by its mean diagonal makes one scalar ridge relative for all.
    pad_rows = torch.diag_embed(1.0 - vf)
    eye = torch.diag_embed(vf)

    def solve(Gs, Rs, lam):
        """lam: ``[P]`` relative ridge per problem."""
        Gn = Gs / d + pad_rows + lam[:, None, None] * eye
        return lstsq_gram(Gn, Rs / d, ridge=0.0) * valid[:, :, None]

    if auto:
        lams = torch.tensor(RIDGE_CANDIDATES, dtype=torch.float32, device=Q.device)
        errs = []
        for lam in RIDGE_CANDIDATES:
            X = solve(Gf, Rf, torch.full((P,), lam, device=Q.device)).float()
            # held-out ||A X - Y||^2 up to the constant ||Y||^2, from the held-out Gram
            errs.append((X * (Gh @ X)).sum((1, 2)) - 2 * (X * Rh).sum((1, 2)))
        best = torch.stack(errs, 1).argmin(1)
        lam = lams[best]
        if stats is not None:
            chosen = stats.setdefault("ridge_chosen", {})
            for i, c in enumerate(RIDGE_CANDIDATES):
                chosen[c] = chosen.get(c, 0) + int((best == i).sum())
    else:  # a fixed ridge, or "auto" without a held-out query (then the smallest candidate)
        lam = torch.full((P,), RIDGE_CANDIDATES[0] if ridge == "auto" else float(ridge), device=Q.device)
    return solve(G, R, lam).float()


# The held-out queries of ridge="auto": every fifth one.
_HELD = slice(4, None, 5)


def _held_rows(N: int, device) -> torch.Tensor:
    """``[N]`` bool: the queries of ``_HELD``."""
    rows = torch.zeros(N, dtype=torch.bool, device=device)
    rows[_HELD] = True
    return rows


def _value_grams_dense(Q, C, beta, Y, scale, rows, held):
    """``(G, R, G_held, R_held)`` of the value fit from ``X = softmax(scale Q C^T + beta)`` ``[P, N, t]``
    held in memory (one GEMM, one row softmax, two Gram products; a CPU path): the exact softmax
    of every query with a usable slot, ``rows`` ``[P, N]`` bool the queries that count. The held
    part (``None`` when ``held`` is False or no query is held out) is the Gram of the held-out
    queries alone, already inside ``G``."""
    valid = torch.isfinite(beta)
    logits = torch.baddbmm(beta.masked_fill(~valid, float("-inf"))[:, None, :], Q, C.float().transpose(1, 2),
                           alpha=scale)
    X = softmax_rows_(logits).masked_fill_(~rows[:, :, None], 0.0)  # in place; no usable slot: NaN rows
    Yf = torch.where(rows[:, :, None], Y.float(), torch.zeros((), dtype=torch.float32))
    Xt = X.transpose(1, 2)
    G, R = torch.bmm(Xt, X), torch.bmm(Xt, Yf)
    G, _ = _mask_problem(G, R[..., 0], valid)
    R = R * valid[:, :, None]
    if not held:
        return G, R, None, None
    if not bool(rows[:, _HELD].any()):
        return G, R, None, None
    Xh = X[:, _HELD]
    Gh = torch.bmm(Xh.transpose(1, 2), Xh) * (valid[:, :, None] & valid[:, None, :])
    Rh = torch.bmm(Xh.transpose(1, 2), Yf[:, _HELD]) * valid[:, :, None]
    return G, R, Gh, Rh


def _value_grams_streamed(Q, C, beta, Y, scale, qw, valid, held, backend):
    """:func:`_value_grams_dense` without holding ``X``: the log-masses of the compacted keys through
    the attention op, then ``exp_gram`` over the fitted and the held-out rows (GPUs, large problems)."""
    lse_c = compacted_lse(Q, C, beta, scale, backend=backend)
    finite = torch.isfinite(lse_c) & qw

    def gram(rows):
        shift = torch.where(rows, lse_c, torch.full_like(lse_c, 1e30))
        G, R = exp_gram(Q, C.float(), beta, shift, scale, Y.float())
        G, _ = _mask_problem(G, R[..., 0], valid)
        return G, R * valid[:, :, None]

    hrows = finite & _held_rows(Q.shape[1], Q.device)[None, :]
    if not (held and bool(hrows.any())):
        G, R = gram(finite)
        return G, R, None, None
    Gf, Rf = gram(finite & ~hrows)
    Gh, Rh = gram(hrows)
    Gh = Gh * (valid[:, :, None] & valid[:, None, :])
    return Gf + Gh, Rf + Rh, Gh, Rh
