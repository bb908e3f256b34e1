"""exp_gram (fused G = A^T A, R = A^T Y of an exponential design matrix) against float64."""
import math

import pytest
import torch

from conftest import HAS_CUDA
import cdlm_fast
from cdlm_fast.backends import op
from cdlm_fast.ops.gram import exp_gram
from cdlm_fast.reference.gram import exp_gram_reference, exp_matrix_reference

BACKENDS = ["torch", "triton", "cuda"]


def _skip_unavailable(backend, device, dtype=torch.float32):
    why = op("exp_gram").reason(backend, torch.device(device),
                                Q=torch.empty(1, 1, 16, dtype=dtype, device=device))
    if why is not None:
        pytest.skip(why)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _problem(P, n, t, D, dtype, device, *, beta=True, e=None, mag=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = (mag * torch.randn(P, n, D, generator=g)).to(dtype)
    C = (mag * torch.randn(P, t, D, generator=g)).to(dtype)
    b = torch.randn(P, t, generator=g) if beta else None
    if beta and t > 2:
        b[:, 1] = -math.inf
    scale = D ** -0.5
    s = scale * Q.double() @ C.double().mT + (0 if b is None else b.double().unsqueeze(1))
    shift = torch.logsumexp(s, -1).float() + 0.25 * torch.randn(P, n, generator=g)
    Y = None if e is None else torch.randn(P, n, e, generator=g)
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(Q), mv(C), mv(b), mv(shift), scale, mv(Y)


def _ref(Q, C, b, shift, scale, Y):
    d = lambda x: None if x is None else x.double().cpu()  # noqa: E731
    return exp_gram_reference(d(Q), d(C), d(b), d(shift), scale, d(Y))


SHAPES = [(2, 37, 5, 9, None), (1, 40, 19, 16, 3), (2, 33, 40, 20, 17), (1, 17, 1, 3, None)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_beta", [True, False])
def test_exp_gram_matches_float64(backend, dtype, shape, with_beta, device):
    _skip_unavailable(backend, device, dtype)
    P, n, t, D, e = shape
    Q, C, b, shift, scale, Y = _problem(P, n, t, D, dtype, device, beta=with_beta, e=e)
    G, R = exp_gram(Q, C, b, shift, scale, Y, backend=backend)
    Gr, Rr = _ref(Q, C, b, shift, scale, Y)
    assert G.shape == (P, t, t) and R.shape == (P, t, 1 if e is None else e)
    assert G.dtype == torch.float32 and R.dtype == torch.float32
    tol = 1e-5 if (dtype == torch.float32 or device == "cpu") else 2e-3
    assert _rel(G, Gr) < tol
    assert _rel(R, Rr) < tol
    if with_beta and t > 2:  # beta = -inf: zero row/column
        assert float(G[:, 1].abs().max()) == 0.0 and float(R[:, 1].abs().max()) == 0.0


@pytest.mark.parametrize("shape", [(2, 37, 19, 9, 5), (1, 20, 33, 16, None)], ids=str)
def test_triton_writes_every_element(shape, device):
    _skip_unavailable("triton", device)
    from cdlm_fast.kernels.gram import exp_gram_triton
    P, n, t, D, e = shape
    Q, C, b, shift, scale, Y = _problem(P, n, t, D, torch.float32, device, e=e)
    G = torch.full((P, t, t), math.nan, device=device)
    R = torch.full((P, t, 1 if e is None else e), math.nan, device=device)
    exp_gram_triton(Q, C, b, shift, scale, Y, out=(G, R))
    Gr, Rr = _ref(Q, C, b, shift, scale, Y)
    assert not torch.isnan(G).any() and not torch.isnan(R).any()
    assert _rel(G, Gr) < 1e-5 and _rel(R, Rr) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_fit_shift_prevents_overflow(backend, device):
    """Scores of magnitude ~1e3: with shift = lse over the original keys every A_ij <= 1."""
    _skip_unavailable(backend, device)
    P, n, L, t, D = 2, 29, 23, 7, 16
    g = torch.Generator().manual_seed(1)
    Q = 40 * torch.randn(P, n, D, generator=g)
    K = 40 * torch.randn(P, L, D, generator=g)
    idx = torch.randperm(L, generator=g)[:t]
    C = K[:, idx].contiguous()
    scale = D ** -0.5
    _, lse = cdlm_fast.attention(Q.unsqueeze(0).transpose(0, 1).double(), K.unsqueeze(1).double(),
                                 K.unsqueeze(1).double(), scale=scale, return_lse=True, backend="torch")
    shift = lse.squeeze(1).float()
    raw = scale * (Q.double() @ C.double().mT)
    assert float(raw.abs().max()) > 200  # exp(raw) alone would overflow float32
    G, R = exp_gram(Q.to(device), C.to(device), None, shift.to(device), scale, backend=backend)
    A = exp_matrix_reference(Q, C, None, shift, scale)
    # <= 1 up to the float32 rounding of lse (relative 2^-24 of the score magnitude)
    assert float(A.max()) <= math.exp(4 * 2.0 ** -24 * float(raw.abs().max()))
    Gr, Rr = exp_gram_reference(Q.double(), C.double(), None, shift.double(), scale)
    # float32 scores of magnitude |s| carry an absolute error ~eps32 |s|, i.e. that relative error in A
    tol = 16 * 2.0 ** -24 * float(raw.abs().max())
    assert _rel(G, Gr) < tol and _rel(R, Rr) < tol
    assert float(G.diagonal(dim1=-2, dim2=-1).max()) <= n * (1 + 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_fit_rows_are_softmax(backend, device):
    """beta = fitted bias, shift = lse over the compacted keys: A is the row softmax, sum_j R_j = n."""
    _skip_unavailable(backend, device)
    P, n, t, D = 2, 31, 9, 8
    g = torch.Generator().manual_seed(2)
    Q, C = torch.randn(P, n, D, generator=g), torch.randn(P, t, D, generator=g)
    beta = torch.randn(P, t, generator=g)
    scale = D ** -0.5
    shift = torch.logsumexp(scale * Q @ C.mT + beta.unsqueeze(1), -1)
    Y = torch.randn(P, n, 5, generator=g)
    G, R = exp_gram(Q.to(device), C.to(device), beta.to(device), shift.to(device), scale, Y.to(device),
                    backend=backend)
    X = torch.softmax(scale * Q.double() @ C.double().mT + beta.double().unsqueeze(1), -1)
    assert _rel(R, X.mT @ Y.double()) < 1e-5
    assert _rel(G, X.mT @ X) < 1e-5
    _, R1 = exp_gram(Q.to(device), C.to(device), beta.to(device), shift.to(device), scale, backend=backend)
    assert abs(float(R1.sum(1).double().mean()) - n) < 1e-4 * n


def test_float64_torch_backend():
    Q, C, b, shift, scale, Y = _problem(2, 11, 4, 5, torch.float64, "cpu", e=2)
    G, R = exp_gram(Q, C, b.double(), shift.double(), scale, Y.double(), backend="torch")
    Gr, Rr = _ref(Q, C, b, shift, scale, Y)
    assert G.dtype == torch.float64 and _rel(G, Gr) < 1e-13 and _rel(R, Rr) < 1e-13


def test_exp_gram_validation():
    Q, C, b, shift, scale, Y = _problem(2, 11, 4, 8, torch.float32, "cpu", e=2)
    bad = [
        (dict(Q=Q[0]), ValueError, "Q must have 3 dimensions"),
        (dict(Q=Q.long()), TypeError, "Q must have dtype"),
        (dict(Q=[1.0]), TypeError, "Q must be a torch.Tensor"),
        (dict(C=C.half()), TypeError, "C must have the dtype of Q"),
        (dict(C=C[:, :, :3]), ValueError, r"C must have shape \[P=2, t, D=8\]"),
        (dict(C=C[:1]), ValueError, r"C must have shape"),
        (dict(beta=b[:, :3]), ValueError, r"beta must have shape \[P=2, t=4\]"),
        (dict(beta=b.half()), TypeError, "beta must have dtype"),
        (dict(shift=shift[:, :3]), ValueError, r"shift must have shape \[P=2, n=11\]"),
        (dict(shift=shift.double()), TypeError, "shift must have dtype"),
        (dict(Y=Y[:, :3]), ValueError, r"Y must have shape \[P=2, n=11, e\]"),
        (dict(Y=Y[..., 0]), ValueError, "Y must have 3 dimensions"),
        (dict(scale="x"), TypeError, "scale must be a float"),
        (dict(scale=math.inf), ValueError, "scale must be finite"),
        (dict(Q=Q.clone().index_fill_(1, torch.tensor([0]), math.nan)), ValueError, "Q must be finite"),
        (dict(shift=shift.clone().fill_(math.inf)), ValueError, "shift must be finite"),
        (dict(Y=Y.clone().fill_(math.nan)), ValueError, "Y must be finite"),
        (dict(beta=b.clone().fill_(math.nan)), ValueError, "beta must not contain NaN"),
        (dict(beta=b.clone().fill_(math.inf)), ValueError, r"beta must not contain NaN or \+inf"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ]
    base = dict(Q=Q, C=C, beta=b, shift=shift, scale=scale, Y=Y)
    for change, exc, msg in bad:
        kw = {**base, **change}
        backend = kw.pop("backend", "torch")
        with pytest.raises(exc, match=msg):
            exp_gram(kw["Q"], kw["C"], kw["beta"], kw["shift"], kw["scale"], kw["Y"], backend=backend)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error message")
def test_cuda_backend_rejects_cpu_tensors():
    Q, C, b, shift, scale, Y = _problem(1, 5, 3, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cuda"):
        exp_gram(Q, C, b, shift, scale, backend="cuda")


def test_auto_order_on_gpu_is_documented_and_can_be_flipped(monkeypatch):
    """``auto`` on a GPU follows EXP_GRAM_GPU_ORDER (Triton's tensor cores first); the first GPU
    run's measurement can flip it with CDLM_FAST_EXP_GRAM_ORDER; a bad value is a clear error."""
    from cdlm_fast.ops import gram
    monkeypatch.delenv("CDLM_FAST_EXP_GRAM_ORDER", raising=False)
    assert gram.gpu_order() == gram.EXP_GRAM_GPU_ORDER == ("triton", "cuda", "torch")
    monkeypatch.setenv("CDLM_FAST_EXP_GRAM_ORDER", "cuda, triton")
    assert gram.gpu_order() == ("cuda", "triton", "torch")
    monkeypatch.setenv("CDLM_FAST_EXP_GRAM_ORDER", "cuda,tpu")
    with pytest.raises(ValueError, match="CDLM_FAST_EXP_GRAM_ORDER"):
        gram.gpu_order()


def test_triton_refuses_float32_above_head_dim_128():
    """float32 at head dim > 128 spills registers on sm_90 (tf32x3 scores): refused with the reason,
    so that ``auto`` falls back; 16-bit inputs at head dim 256 and float32 at 128 are accepted."""
    from cdlm_fast.kernels.gram import _supports
    why = _supports(Q=torch.empty(1, 1, 256, dtype=torch.float32))
    assert why is not None and "float32" in why and "256" in why
    assert _supports(Q=torch.empty(1, 1, 128, dtype=torch.float32)) is None
    assert _supports(Q=torch.empty(1, 1, 256, dtype=torch.float16)) is None
