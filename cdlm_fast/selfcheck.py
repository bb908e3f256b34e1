"""Self-check: every available backend of every op against the float64 reference.

Small random problems with odd sizes, GQA, a block-causal mask that cuts tiles and a bias
with ``-inf`` entries; outputs are compared by ``||out - ref|| / ||ref||``. Run with
``python -m cdlm_fast selfcheck``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from .backends import BACKENDS
from .env import default_device


@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    rel_error: Optional[float]
    tolerance: float
    passed: Optional[bool]  # None: skipped
    detail: str = ""

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if ``out`` has a NaN."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out64).any():
        return math.inf
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def _attention_case(device, dtype, gen):
    import cdlm_fast

    b, hq, hkv, lq, prefix, d = 2, 4, 2, 19, 13, 64
    lk = prefix + lq
    q = torch.randn(b, hq, lq, d, generator=gen).to(device, dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(device, dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(device, dtype)
    bias = torch.randn(b, hkv, lk, generator=gen).mul(3.0)
    bias[0, :, :3] = float("-inf")  # left padding of sample 0
    bias = bias.to(device)
    kw = dict(bias=bias, prefix_len=prefix, block_size=4, q_offset=prefix, return_lse=True)
    ref_out, ref_lse = cdlm_fast.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                           **{**kw, "bias": bias.double().cpu()}, backend="torch")

    def run(backend):
        out, lse = cdlm_fast.attention(q, k, v, **kw, backend=backend)
        return max(rel_error(out, ref_out), rel_error(lse, ref_lse))

    return run


def _solver_cases(device, gen) -> Dict[str, Callable[[str], float]]:
    from .ops import solvers

    b, n, t = 3, 40, 11
    a = torch.rand(b, n, t, generator=gen, dtype=torch.float64)
    x_true = torch.rand(b, t, generator=gen, dtype=torch.float64) - 0.3
    rhs = a @ x_true.unsqueeze(-1)
    rhs = rhs.squeeze(-1) + 0.01 * torch.randn(b, n, generator=gen, dtype=torch.float64)
    ref = solvers.nnls(a, rhs, backend="torch").x
    ref_ls = solvers.lstsq(a, rhs.unsqueeze(-1), backend="torch")
    a32, rhs32 = a.float().to(device), rhs.float().to(device)

    def run_nnls(backend):
        return rel_error(solvers.nnls(a32, rhs32, backend=backend).x, ref)

    def run_lstsq(backend):
        return rel_error(solvers.lstsq(a32, rhs32.unsqueeze(-1), backend=backend), ref_ls)

    return {"nnls": run_nnls, "lstsq": run_lstsq}


def _exp_gram_case(device, gen) -> Callable[[str], float]:
    import cdlm_fast

    p, n, t, d = 3, 37, 21, 64
    q = torch.randn(p, n, d, generator=gen, dtype=torch.float64)
    c = torch.randn(p, t, d, generator=gen, dtype=torch.float64)
    beta = torch.randn(p, t, generator=gen, dtype=torch.float64)
    beta[0, 2] = float("-inf")
    y = torch.randn(p, n, 5, generator=gen, dtype=torch.float64)
    scale = d ** -0.5
    s = scale * q @ c.mT + beta[:, None, :]
    shift = torch.logsumexp(s, -1)
    a = torch.exp(s - shift[..., None])
    ref = torch.cat([(a.mT @ a).flatten(1), (a.mT @ y).flatten(1)], 1)

    def run(backend):
        g, r = cdlm_fast.exp_gram(q.float().to(device), c.float().to(device), beta.float().to(device),
                                  shift.float().to(device), scale, y.float().to(device), backend=backend)
        return rel_error(torch.cat([g.flatten(1), r.flatten(1)], 1), ref)

    return run


def run_selfcheck(device: Optional[torch.device] = None) -> List[CheckResult]:
    """Check every (op, backend) that can run on ``device``; unavailable ones are reported skipped."""
    device = device or default_device()
    gen = torch.Generator().manual_seed(0)
    results: List[CheckResult] = []
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        run = _attention_case(device, dtype, gen)
        for backend in BACKENDS:
            results.append(_one("attention", backend, dtype, device, run))
    cases = _solver_cases(device, gen)
    cases["exp_gram"] = _exp_gram_case(device, gen)
    for name, run in cases.items():
        for backend in BACKENDS:
            results.append(_one(name, backend, torch.float32, device, run, tol=1e-4))
    return results


def _one(name, backend, dtype, device, run, tol=None) -> CheckResult:
    """Run one check; a backend that cannot run here (``ValueError`` from dispatch) is skipped."""
    tol = _TOL[dtype] if tol is None else tol
    dt = str(dtype).replace("torch.", "")
    try:
        err = run(backend)
    except ValueError as e:
        return CheckResult(name, backend, dt, None, tol, None, str(e).split("cannot run these inputs: ", 1)[-1])
    return CheckResult(name, backend, dt, err, tol, err <= tol)


def format_results(results: List[CheckResult]) -> str:
    lines = [f"{'op':<11}{'backend':<9}{'dtype':<10}{'rel error':<12}{'result'}"]
    for r in results:
        err = "-" if r.rel_error is None else f"{r.rel_error:.2e}"
        status = "skipped: " + r.detail if r.passed is None else ("ok" if r.passed else f"FAIL (tol {r.tolerance:g})")
        lines.append(f"{r.op:<11}{r.backend:<9}{r.dtype:<10}{err:<12}{status}")
    return "\n".join(lines)
