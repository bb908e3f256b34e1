"""The CUDA extension ``cdlm_fast._C``: build, op registration, fake (meta) implementations,
host-side layout checks and errors without a GPU.

The numerical conformance of backend "cuda" against the float64 reference is in
tests/test_attention.py and tests/test_gram.py; the GPU tests at the end of this file are a
small self-contained smoke set (poisoned outputs, GQA, split-K decode, -inf bias).
"""
import os

import pytest
import torch

import cdlm_fast
from cdlm_fast import backends
from cdlm_fast import _cuda_ops
from cdlm_fast.reference.attention import attention_reference

HAS_CUDA = torch.cuda.is_available()


def _toolchain_present() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))


needs_ext = pytest.mark.skipif(backends.cuda_extension() is None and not _toolchain_present(),
                               reason="cdlm_fast._C is not built and no CUDA toolchain is present")
needs_gpu = pytest.mark.skipif(not HAS_CUDA or backends.cuda_extension() is None,
                               reason="needs a CUDA device and the built extension")


@needs_ext
def test_extension_is_built_and_loads():
    assert backends.cuda_extension_error() is None, backends.cuda_extension_error()
    assert _cuda_ops.AVAILABLE
    assert torch.ops.cdlm_fast.build_info() >= 2


@needs_ext
def test_ops_are_registered_with_schemas():
    schema = str(torch.ops.cdlm_fast.attention_fwd.default._schema)
    for arg in ("Tensor q", "Tensor k", "Tensor v", "Tensor? bias", "Tensor prefix_len", "Tensor? kv_lens",
                "int q_offset", "int block_size", "float scale"):
        assert arg in schema, schema
    assert "(Tensor out, Tensor lse)" in schema
    schema = str(torch.ops.cdlm_fast.exp_gram.default._schema)
    for arg in ("Tensor Q", "Tensor C", "Tensor? beta", "Tensor shift", "float scale", "Tensor? Y"):
        assert arg in schema, schema
    assert "cuda" in backends.op("attention").impls
    assert "cuda" in backends.op("exp_gram").impls


@needs_ext
def test_kernel_layout_assumptions_hold():
    # Host-side evaluation of the CuTe layouts the kernel uses (see csrc/layout_selfcheck.cu).
    assert torch.ops.cdlm_fast.layout_selfcheck() == ""


def _attn_args(device, dtype=torch.bfloat16, b=2, hq=6, hkv=2, lq=5, lk=37, d=64, bias=True, kv_lens=True):
    q = torch.empty(b, hq, lq, d, dtype=dtype, device=device)
    k = torch.empty(b, hkv, lk, d, dtype=dtype, device=device)
    v = torch.empty(b, hkv, lk, d, dtype=dtype, device=device)
    bi = torch.empty(b, hkv, lk, dtype=torch.float32, device=device) if bias else None
    pre = torch.empty(b, dtype=torch.int32, device=device)
    kl = torch.empty(b, dtype=torch.int32, device=device) if kv_lens else None
    return (q, k, v, bi, pre, kl, 32, 8, 0.125)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_optional", [True, False])
def test_attention_fwd_meta_shapes(dtype, with_optional):
    args = _attn_args("meta", dtype, bias=with_optional, kv_lens=with_optional)
    out, lse = torch.ops.cdlm_fast.attention_fwd(*args)
    assert out.shape == (2, 6, 5, 64) and out.dtype == dtype and out.device.type == "meta"
    assert lse.shape == (2, 6, 5) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()


@needs_ext
@pytest.mark.parametrize("with_y", [True, False])
def test_exp_gram_meta_shapes(with_y):
    Q = torch.empty(3, 11, 64, dtype=torch.bfloat16, device="meta")
    C = torch.empty(3, 7, 64, dtype=torch.bfloat16, device="meta")
    beta = torch.empty(3, 7, device="meta")
    shift = torch.empty(3, 11, device="meta")
    Y = torch.empty(3, 11, 5, device="meta") if with_y else None
    G, R = torch.ops.cdlm_fast.exp_gram(Q, C, beta, shift, 0.125, Y)
    assert G.shape == (3, 7, 7) and G.dtype == torch.float32
    assert R.shape == (3, 7, 5 if with_y else 1) and R.dtype == torch.float32


@needs_ext
def test_fake_tensor_mode_and_opcheck_schema():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        args = _attn_args("cpu", torch.float16)
        out, lse = torch.ops.cdlm_fast.attention_fwd(*args)
        assert out.shape == args[0].shape and lse.shape == args[0].shape[:3]
    # Schema and fake-tensor consistency checks that need no real run.
    torch.library.opcheck(torch.ops.cdlm_fast.attention_fwd.default, _attn_args("meta"),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_cpu_tensors_raise_value_error_not_crash():
    q = torch.randn(1, 2, 3, 64, dtype=torch.float16)
    k = v = torch.randn(1, 2, 9, 64, dtype=torch.float16)
    pre = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA"):
        torch.ops.cdlm_fast.attention_fwd(q, k, v, None, pre, None, 0, 0, 0.125)
    with pytest.raises(ValueError, match="CUDA"):
        _cuda_ops.attention_cuda(q, k, v, None, pre, None, 0, 0, 0.125)
    Q = torch.randn(1, 4, 64)
    C = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="CUDA"):
        torch.ops.cdlm_fast.exp_gram(Q, C, None, torch.zeros(1, 4), 0.125, None)
    with pytest.raises(ValueError, match="CUDA"):
        _cuda_ops.exp_gram_cuda(Q, C, None, torch.zeros(1, 4), 0.125, None)


def test_public_api_backend_cuda_on_cpu_is_a_value_error():
    q = torch.randn(1, 2, 3, 64, dtype=torch.float16)
    k = v = torch.randn(1, 2, 9, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="cuda"):
        cdlm_fast.attention(q, k, v, backend="cuda")


def test_supports_reasons():
    q = torch.empty(1, 2, 3, 64, dtype=torch.float32)
    assert "float16" in _cuda_ops.attention_supports(q=q)
    assert "head dim" in _cuda_ops.attention_supports(q=torch.empty(1, 2, 3, 96, dtype=torch.bfloat16))
    assert _cuda_ops.attention_supports(q=torch.empty(1, 2, 3, 128, dtype=torch.bfloat16)) is None
    assert _cuda_ops.attention_supports(q=torch.empty(1, 2, 3, 64, dtype=torch.float16)) is None
    assert "float64" in _cuda_ops.exp_gram_supports(Q=torch.empty(1, 2, 64, dtype=torch.float64))
    assert "head dim" in _cuda_ops.exp_gram_supports(Q=torch.empty(1, 2, 512))
    assert _cuda_ops.exp_gram_supports(Q=torch.empty(1, 2, 128)) is None


# ---------------------------------------------------------------------------------------
# GPU smoke tests (the full conformance matrix lives in test_attention.py / test_gram.py).

def test_attention_cuda_passes_dense_lengths(monkeypatch):
    # The kernel reads prefix_len[b] and kv_lens[b] densely: strided [B] int32 views (a column
    # of a [B, 2] table, a step-2 slice) must reach the op as contiguous tensors.
    seen = {}

    def spy(q, k, v, bias, prefix_len, kv_lens, q_offset, block_size, scale):
        seen["prefix_len"], seen["kv_lens"] = prefix_len, kv_lens
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=torch.float32)

    monkeypatch.setattr(_cuda_ops, "_need_cuda", lambda *a, **kw: None)
    monkeypatch.setattr(torch.ops.cdlm_fast, "attention_fwd", spy, raising=False)
    q = torch.zeros(3, 2, 4, 64, dtype=torch.float16)
    k = v = torch.zeros(3, 1, 40, 64, dtype=torch.float16)
    table = torch.tensor([[5, 30], [7, 31], [9, 32]], dtype=torch.int32)
    kl = torch.tensor([33, 0, 35, 0, 37, 0], dtype=torch.int32)[::2]
    _cuda_ops.attention_cuda(q, k, v, None, table[:, 0], kl, 0, 8, 0.125)
    assert seen["prefix_len"].is_contiguous() and seen["prefix_len"].tolist() == [5, 7, 9]
    assert seen["kv_lens"].is_contiguous() and seen["kv_lens"].tolist() == [33, 35, 37]


@needs_gpu
def test_gpu_attention_fwd_strided_lengths():
    # Strided prefix_len / kv_lens given straight to the op (the host copies them densely).
    g = torch.Generator(device="cuda").manual_seed(11)
    b, hq, hkv, lq, lk, d = 3, 4, 2, 20, 150, 64
    q = torch.randn(b, hq, lq, d, generator=g, device="cuda").half()
    k = torch.randn(b, hkv, lk, d, generator=g, device="cuda").half()
    v = torch.randn(b, hkv, lk, d, generator=g, device="cuda").half()
    table = torch.tensor([[60, 120], [10, 150], [90, 100]], dtype=torch.int32, device="cuda")
    pre, kl = table[:, 0], table[:, 1]
    assert not pre.is_contiguous() and not kl.is_contiguous()
    out, lse = torch.ops.cdlm_fast.attention_fwd(q, k, v, None, pre, kl, 100, 4, d ** -0.5)
    ref, ref_lse = attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                       prefix_len=pre.cpu(), block_size=4, q_offset=100, kv_lens=kl.cpu(),
                                       scale=d ** -0.5, return_lse=True)
    assert _rel(out.cpu(), ref) < 5e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite].double() - ref_lse[finite]).abs().max().item() < 1e-2


def _poison_allocator(nbytes=64 << 20):
    """Fill a block of the caching allocator with NaN and free it, so the op's output
    buffers (allocated with torch.empty) start as NaN and unwritten elements show."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


ATTN_CASES = [
    # b, hq, hkv, lq, lk, d, prefix, block, q_offset, with kv_lens, non-contiguous
    (2, 4, 4, 200, 331, 64, 77, 16, 120, False, False),   # prefill, MHA, mask cutting tiles
    (1, 8, 2, 150, 150, 128, 40, 32, 0, True, True),      # prefill, GQA, kv_lens, strided q/k/v
    (2, 7, 1, 32, 1500, 128, 1000, 32, 1468, True, False),  # block decode, G=7, split-K
    (3, 4, 2, 17, 90, 64, 50, 0, 0, True, False),         # no mask, kv_lens
    (1, 2, 1, 64, 700, 64, 600, 1, 636, False, True),     # causal decode
    (1, 2, 2, 8, 1500, 128, 1000, 8, 1492, True, False),  # block decode, many splits
]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_gpu_attention_matches_float64_reference(dtype, case):
    b, hq, hkv, lq, lk, d, prefix, block, q_offset, with_kv, strided = case
    g = torch.Generator(device="cuda").manual_seed(hash(case) % 1000)
    dev = "cuda"

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32)

    if strided:  # [B, L, H, D] memory, viewed as [B, H, L, D]
        q = rnd(b, lq, hq, d).to(dtype).transpose(1, 2)
        k = rnd(b, lk, hkv, d).to(dtype).transpose(1, 2)
        v = rnd(b, lk, hkv, d).to(dtype).transpose(1, 2)
    else:
        q, k, v = rnd(b, hq, lq, d).to(dtype), rnd(b, hkv, lk, d).to(dtype), rnd(b, hkv, lk, d).to(dtype)
    bias = rnd(b, hkv, lk) * 3
    bias[:, :, ::7] = float("-inf")
    bias[:, :, 5] = 30.0
    kv_lens = torch.randint(lk // 2, lk + 1, (b,), device=dev, dtype=torch.int32) if with_kv else None
    pre = torch.full((b,), prefix, dtype=torch.int32, device=dev)
    _poison_allocator()
    out, lse = _cuda_ops.attention_cuda(q, k, v, bias, pre, kv_lens, q_offset, block, d ** -0.5)
    ref, ref_lse = attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), bias=bias.double().cpu(),
                                       prefix_len=pre.cpu(), block_size=block or None, q_offset=q_offset,
                                       kv_lens=None if kv_lens is None else kv_lens.cpu(), scale=d ** -0.5,
                                       return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert _rel(out.cpu(), ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite].double() - ref_lse[finite]).abs().max().item() < 1e-2
    assert (out.cpu()[~finite] == 0).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_y", [True, False])
def test_gpu_exp_gram_matches_float64(dtype, with_y):
    g = torch.Generator(device="cuda").manual_seed(3)
    P, n, t, D, e = 3, 77, 70, 64, 9
    Q = torch.randn(P, n, D, generator=g, device="cuda").to(dtype)
    C = torch.randn(P, t, D, generator=g, device="cuda").to(dtype)
    beta = torch.randn(P, t, generator=g, device="cuda")
    beta[:, ::5] = float("-inf")
    scale = D ** -0.5
    s = scale * torch.einsum("pnd,ptd->pnt", Q.double(), C.double()) + beta.double()[:, None, :]
    shift = s.amax(-1).float()
    Y = torch.randn(P, n, e, generator=g, device="cuda") if with_y else None
    _poison_allocator()
    G, R = _cuda_ops.exp_gram_cuda(Q, C, beta, shift, scale, Y)
    A = torch.exp(s - shift.double()[:, :, None])
    Yd = torch.ones(P, n, 1, dtype=torch.float64, device="cuda") if Y is None else Y.double()
    assert not torch.isnan(G).any() and not torch.isnan(R).any()
    assert _rel(G, A.transpose(1, 2) @ A) < 1e-4
    assert _rel(R, A.transpose(1, 2) @ Yd) < 1e-4


@needs_gpu
def test_gpu_opcheck():
    args = list(_attn_args("cuda", torch.bfloat16, lq=40, lk=70))
    for i in (0, 1, 2):
        args[i].normal_()
    args[3].normal_()
    args[4].fill_(20)
    args[5].fill_(60)
    torch.library.opcheck(torch.ops.cdlm_fast.attention_fwd.default, tuple(args))


# ---------------------------------------------------------------------------------------
# Solver ops: nnls_admm_step (ADMM phase of the NNLS solver) and lstsq_gram_cholesky.

@needs_ext
def test_solver_ops_are_registered_with_schemas():
    schema = str(torch.ops.cdlm_fast.nnls_admm_step.default._schema)
    for arg in ("Tensor M", "Tensor h", "Tensor z", "Tensor u", "Tensor rho", "(Tensor z_out, Tensor u_out)"):
        assert arg in schema, schema
    schema = str(torch.ops.cdlm_fast.lstsq_gram_cholesky.default._schema)
    for arg in ("Tensor G", "Tensor R", "float ridge", "float rank_tol", "(Tensor X, Tensor bad)"):
        assert arg in schema, schema
    assert backends.op("nnls_gram").impls.get("cuda") is _cuda_ops.nnls_gram_cuda
    assert backends.op("lstsq_gram").impls.get("cuda") is _cuda_ops.lstsq_gram_cuda


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solver_ops_meta_shapes(dtype):
    M = torch.empty(3, 37, 37, dtype=dtype, device="meta")
    v = torch.empty(3, 37, dtype=dtype, device="meta")
    z, u = torch.ops.cdlm_fast.nnls_admm_step(M, v, v, v, torch.empty(3, dtype=dtype, device="meta"))
    assert z.shape == u.shape == (3, 37) and z.dtype == u.dtype == dtype and z.device.type == "meta"
    G = torch.empty(4, 9, 9, dtype=torch.float64, device="meta")
    R = torch.empty(4, 9, 5, dtype=torch.float64, device="meta")
    X, bad = torch.ops.cdlm_fast.lstsq_gram_cholesky(G, R, 0.0, 1e-12)
    assert X.shape == (4, 9, 5) and X.dtype == torch.float64
    assert bad.shape == (4,) and bad.dtype == torch.bool
    torch.library.opcheck(torch.ops.cdlm_fast.nnls_admm_step.default,
                          (M, v, v, v, torch.empty(3, dtype=dtype, device="meta")),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_solver_ops_cpu_tensors_raise_value_error():
    M = torch.eye(4).expand(2, 4, 4).contiguous()
    v = torch.ones(2, 4)
    with pytest.raises(ValueError, match="CUDA"):
        torch.ops.cdlm_fast.nnls_admm_step(M, v, v, v, torch.ones(2))
    with pytest.raises(ValueError, match="CUDA"):
        _cuda_ops.admm_step_cuda(M, v, v, v, torch.ones(2))
    with pytest.raises(ValueError, match="CUDA"):
        _cuda_ops.nnls_gram_cuda(M.double(), v.double(), None, None, 1e-7)
    with pytest.raises(ValueError, match="CUDA"):
        torch.ops.cdlm_fast.lstsq_gram_cholesky(M.double(), v.double().unsqueeze(-1), 0.0, 1e-12)
    with pytest.raises(ValueError, match="CUDA"):
        _cuda_ops.lstsq_gram_cuda(M.double(), v.double().unsqueeze(-1), 0.0)


def test_public_solvers_backend_cuda_on_cpu_is_a_value_error():
    G = torch.eye(3).expand(2, 3, 3).contiguous()
    h = torch.ones(2, 3)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        cdlm_fast.nnls_gram(G, h, backend="cuda")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        cdlm_fast.nnls(torch.rand(2, 5, 3), torch.rand(2, 5), backend="cuda")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        cdlm_fast.lstsq_gram(G, h, backend="cuda")


def _admm_inputs(N, t, dtype, seed, strided):
    g = torch.Generator(device="cuda").manual_seed(seed)
    A = torch.randn(N, t + 3, t, generator=g, device="cuda", dtype=torch.float64)
    G = A.mT @ A
    rho = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    M = torch.linalg.inv(G + rho.view(N, 1, 1) * torch.eye(t, device="cuda", dtype=torch.float64))
    h = torch.randn(N, t, generator=g, device="cuda", dtype=torch.float64) * 3
    z = torch.randn(N, t, generator=g, device="cuda", dtype=torch.float64).clamp_min(0)
    u = torch.randn(N, t, generator=g, device="cuda", dtype=torch.float64)
    M, h, z, u, rho = (x.to(dtype) for x in (M, h, z, u, rho))
    if strided:  # rows of M with stride t + 5 (a view into a wider buffer)
        wide = torch.full((N, t, t + 5), float("nan"), device="cuda", dtype=dtype)
        wide[:, :, :t] = M
        M = wide[:, :, :t]
        assert M.stride(1) == t + 5
    return [M, h, z, u, rho]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,t,strided", [(3, 1, False), (2, 37, True), (5, 300, False), (2, 1100, True)], ids=str)
def test_gpu_nnls_admm_step_matches_torch(dtype, N, t, strided):
    """Odd t, t above the kernel's 1024-entry staging chunk, strided M; three chained steps."""
    from cdlm_fast.ops.nnls_active_set import admm_step_torch
    M, h, z, u, rho = _admm_inputs(N, t, dtype, seed=t, strided=strided)
    z_ref, u_ref = z.double(), u.double()
    for _ in range(3):
        _poison_allocator()
        z, u = _cuda_ops.admm_step_cuda(M, h, z, u, rho)
        assert z.dtype == u.dtype == dtype and z.shape == u.shape == (N, t)
        assert not torch.isnan(z).any() and not torch.isnan(u).any()
        z_ref, u_ref = admm_step_torch(M.double(), h.double(), z_ref, u_ref, rho.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    assert (z >= 0).all()
    assert _rel(z, z_ref) < tol and _rel(u, u_ref) < tol


@needs_gpu
def test_gpu_nnls_admm_step_empty_and_wrong_dtype():
    z, u = _cuda_ops.admm_step_cuda(*(torch.empty(0, 5, 5, device="cuda"), torch.empty(0, 5, device="cuda"),
                                      torch.empty(0, 5, device="cuda"), torch.empty(0, 5, device="cuda"),
                                      torch.empty(0, device="cuda")))
    assert z.shape == u.shape == (0, 5)
    with pytest.raises(ValueError, match="float32 or float64"):
        _cuda_ops.admm_step_cuda(torch.empty(1, 5, 5, device="cuda", dtype=torch.float16),
                                 *(torch.empty(1, 5, device="cuda"),) * 3, torch.ones(1, device="cuda"))


@needs_gpu
def test_gpu_lstsq_gram_cholesky_flags_singular_problems():
    g = torch.Generator(device="cuda").manual_seed(5)
    t, d = 40, 7
    A = torch.randn(3, 60, t, generator=g, device="cuda", dtype=torch.float64)
    A[1, :, 3] = A[1, :, 2]
    G, R = A.mT @ A, torch.randn(3, t, d, generator=g, device="cuda", dtype=torch.float64)
    _poison_allocator()
    X, bad = torch.ops.cdlm_fast.lstsq_gram_cholesky(G, R, 0.0, 1e-12)
    assert bad.tolist() == [False, True, False]
    assert (X[1] == 0).all() and not torch.isnan(X).any()
    ref = torch.linalg.solve(G[[0, 2]], R[[0, 2]])
    assert _rel(X[[0, 2]], ref) < 1e-10
    torch.library.opcheck(torch.ops.cdlm_fast.lstsq_gram_cholesky.default, (G, R, 0.0, 1e-12))
    torch.library.opcheck(torch.ops.cdlm_fast.nnls_admm_step.default,
                          tuple(_admm_inputs(2, 33, torch.float32, seed=1, strided=False)))


def test_exp_gram_supports_checks_shared_memory(monkeypatch):
    """A head dim whose shared memory exceeds the GPU's opt-in limit is refused with a reason
    (so backend="auto" falls back instead of failing in the launch)."""
    from cdlm_fast import _cuda_ops

    assert _cuda_ops.exp_gram_smem_bytes(256) == 4 * ((2 * 64 + 16) * 257 + 2 * 16 * 64)
    q = torch.empty(2, 8, 256)
    monkeypatch.setattr(_cuda_ops, "_smem_limit", lambda device: 99 * 1024)
    why = _cuda_ops.exp_gram_supports(Q=q)
    assert why is not None and "shared memory" in why
    assert _cuda_ops.exp_gram_supports(Q=torch.empty(2, 8, 128)) is None
    monkeypatch.setattr(_cuda_ops, "_smem_limit", lambda device: None)
    assert _cuda_ops.exp_gram_supports(Q=q) is None
