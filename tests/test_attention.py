"""Conformance suite of :func:`cdlm_fast.attention`, parametrised over its backends.

Every implementation is compared with :func:`attention_reference` run in float64 on the CPU:

* ``torch``: always;
* ``triton-prefill`` / ``triton-decode``: the Triton backend with its path forced (on a GPU, or on
  the CPU in the Triton interpreter, which ``conftest.py`` switches on), through the public API;
* ``triton-splitk``: the decode path with a forced number of key splits (exercises the combine);
* ``cuda``: the CUDA extension, only where a CUDA device exists and ``cdlm_fast._C`` provides it.

Outputs are allocated poisoned with NaN for the Triton runs, so any element a kernel fails to
write shows up. NaN never passes a comparison. Tolerances: the maximum error relative to the
largest reference value, ``1e-5`` for float32, and for float16 / bfloat16 twice the error of a
same-dtype PyTorch reference, at least ``5e-3`` / ``2e-2``.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

import cdlm_fast
from cdlm_fast import backends
from cdlm_fast.reference.attention import attention_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
OP = backends.op("attention")
OP._load()

IMPLS = ["torch", "triton-prefill", "triton-decode", "triton-splitk", "cuda"]


def _backend_of(impl: str) -> str:
    return impl.split("-")[0]


def _unavailable(impl: str):
    """Why ``impl`` cannot run on this machine (``None`` if it can)."""
    backend = _backend_of(impl)
    if backend == "cuda" and not HAS_CUDA:
        return "backend 'cuda' needs a CUDA device"
    why = backends.device_reason(backend, DEVICE)
    if why is None and backend not in OP.impls:
        why = f"no {backend} implementation of attention is registered ({'; '.join(OP.import_errors)})"
    return why


def _triton_module():
    return sys.modules["cdlm_fast.kernels.attention"]


def _poisoned_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    why = _unavailable(request.param)
    if why is not None:
        pytest.skip(f"{request.param}: {why}")
    if request.param.startswith("triton"):
        mod = _triton_module()
        monkeypatch.setattr(mod, "_empty", _poisoned_empty)
        if request.param == "triton-prefill":
            monkeypatch.setattr(mod, "DECODE_MAX_LQ", -1)
        else:
            monkeypatch.setattr(mod, "DECODE_MAX_LQ", 1 << 30)
    return request.param


# --------------------------------------------------------------------------------------------
# inputs and comparison


def _bias(kind, b, hkv, lk, gen):
    if kind is None:
        return None
    if kind == "randn":
        return torch.randn(b, hkv, lk, generator=gen) * 2
    if kind == "large":  # +-30 with some -inf
        bias = torch.where(torch.rand(b, hkv, lk, generator=gen) < 0.5, -30.0, 30.0)
        bias = bias * torch.rand(b, hkv, lk, generator=gen)
        bias[torch.rand(b, hkv, lk, generator=gen) < 0.1] = -math.inf
        return bias
    if kind == "inf":  # dropped keys
        bias = torch.randn(b, hkv, lk, generator=gen)
        bias[torch.rand(b, hkv, lk, generator=gen) < 0.25] = -math.inf
        return bias
    if kind == "leftpad":  # batch row i is left-padded by 3 * i + 1 keys
        bias = torch.randn(b, hkv, lk, generator=gen) * 0.5
        for i in range(b):
            bias[i, :, : 3 * i + 1] = -math.inf
        return bias
    raise AssertionError(kind)


def make_inputs(b, hq, hkv, lq, lk, d, dtype, *, bias=None, seed=0, layout="bhld"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "blhd":  # the transformers layout, transposed: non-contiguous strides
        q = torch.randn(b, lq, hq, d, generator=gen).transpose(1, 2)
        k = torch.randn(b, lk, hkv, d, generator=gen).transpose(1, 2)
        v = torch.randn(b, lk, hkv, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(b, hq, lq, d, generator=gen)
        k = torch.randn(b, hkv, lk, d, generator=gen)
        v = torch.randn(b, hkv, lk, d, generator=gen)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return q, k, v, _bias(bias, b, hkv, lk, gen)


def to_device(x):
    return None if x is None else x.to(DEVICE)


def reference64(q, k, v, bias, prefix, block, q_offset, kv_lens, scale=None):
    """Float64 reference on the CPU (from the same, already rounded, inputs)."""
    b = q.shape[0]
    prefix_t = torch.as_tensor(prefix if isinstance(prefix, list) else [prefix] * b)
    return attention_reference(
        q.cpu().double(), k.cpu().double(), v.cpu().double(),
        bias=None if bias is None else bias.cpu().double(), prefix_len=prefix_t, block_size=block,
        q_offset=q_offset, kv_lens=None if kv_lens is None else torch.as_tensor(kv_lens),
        scale=scale, return_lse=True)


def rel_error(out, ref):
    """max |out - ref| / max |ref| in float64 (NaN if out has NaN)."""
    err = (out.detach().cpu().double() - ref).abs().max().item() if out.numel() else 0.0
    if out.numel() and torch.isnan(out).any():
        return math.nan
    return err / max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)


def tolerance(dtype, same_dtype_err):
    if dtype == torch.float32:
        return 1e-5
    floor = 5e-3 if dtype == torch.float16 else 2e-2
    return max(2.0 * same_dtype_err, floor)


def assert_matches(out, lse, ref_out, ref_lse, q, tol):
    """The conformance check: shapes, dtypes, no NaN, -inf rows, output and lse errors."""
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.device == q.device
    out_c, lse_c = out.detach().cpu(), lse.detach().cpu()
    assert not torch.isnan(out_c).any(), "NaN in the output"
    assert not torch.isnan(lse_c).any(), "NaN in lse"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse_c), empty), "rows that see no key must have lse = -inf (only they)"
    assert torch.isfinite(lse_c[~empty]).all()
    assert (out_c[empty] == 0).all(), "rows that see no key must be zero"
    err = rel_error(out_c, ref_out)
    assert err <= tol, f"output error {err:.3g} > {tol:.3g}"
    if (~empty).any():
        lse_tol = 1e-5 if q.dtype == torch.float32 else 1e-4
        lerr = ((lse_c.double() - ref_lse).abs()[~empty] / (1 + ref_lse.abs()[~empty])).max().item()
        assert lerr <= lse_tol, f"lse error {lerr:.3g} > {lse_tol:.3g}"


def run_impl(impl, q, k, v, bias, prefix, block, q_offset, kv_lens, scale=None):
    """Run ``impl`` on device copies of the inputs; returns ``(out, lse)``."""
    qd, kd, vd, bd = (to_device(t) for t in (q, k, v, bias))
    b = q.shape[0]
    prefix_arg = torch.tensor(prefix, device=DEVICE) if isinstance(prefix, list) else prefix
    kv_arg = None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE)
    if impl == "triton-splitk":
        attention_triton = _triton_module().attention_triton
        prefix_t = prefix_arg if torch.is_tensor(prefix_arg) else torch.full((b,), prefix, device=DEVICE)
        return attention_triton(qd, kd, vd, bd, prefix_t.to(torch.int32),
                                None if kv_arg is None else kv_arg.to(torch.int32), q_offset, block or 0,
                                q.shape[-1] ** -0.5 if scale is None else scale, path="decode", num_splits=3)
    return cdlm_fast.attention(qd, kd, vd, bias=bd, prefix_len=prefix_arg, block_size=block, q_offset=q_offset,
                               kv_lens=kv_arg, scale=scale, return_lse=True, backend=_backend_of(impl))


def skip_unsupported(impl, q, k, v, bias):
    backend = _backend_of(impl)
    check = OP.checks.get(backend)
    why = None if check is None else check(q=to_device(q), k=to_device(k), v=to_device(v), bias=to_device(bias))
    if why is not None:
        pytest.skip(f"{impl}: {why}")


# --------------------------------------------------------------------------------------------
# conformance cases

# id: (b, hq, hkv, lq, lk, d, prefix, block, q_offset, kv_lens, bias)
CASES = {
    "causal-odd": (2, 4, 2, 45, 45, 64, 0, 1, 0, None, None),
    "prefix37-block4": (2, 4, 4, 70, 70, 64, 37, 4, 0, None, "randn"),
    "block32-gqa4": (1, 4, 1, 75, 75, 64, 11, 32, 0, None, "inf"),
    "block-longer-than-seq": (1, 2, 1, 20, 20, 64, 3, 64, 0, None, "randn"),
    "bidirectional-kvlens": (2, 2, 2, 17, 50, 64, 0, None, 0, [50, 23], "randn"),
    "decode-block8-vs-cache": (2, 8, 2, 8, 100, 64, [40, 13], 8, 92, None, "randn"),
    "decode-gqa7-hd128-kvlens": (2, 7, 1, 5, 90, 128, [30, 0], 5, 60, [65, 50], "inf"),
    "leftpad-causal": (2, 4, 2, 33, 33, 64, [0, 6], 1, 0, None, "leftpad"),  # row 0 of batch 0: no key
    "bias-pm30": (1, 4, 2, 40, 60, 64, 20, 4, 20, None, "large"),
    "headdim40-padded": (1, 3, 3, 19, 27, 40, 5, 2, 0, None, "randn"),
    "empty-batch-row": (2, 4, 2, 12, 40, 64, 8, 4, 28, [0, 36], "randn"),
    "prompt-queries-offset": (1, 2, 1, 40, 50, 64, 30, 4, 10, None, None),
    "prefill-hd128": (1, 2, 1, 66, 66, 128, 33, 32, 0, None, "randn"),
    "all-ones": (1, 1, 1, 1, 1, 16, 0, 1, 0, None, "randn"),
    "huge-block-and-prefix": (1, 2, 1, 7, 20, 16, 10 ** 6, 10 ** 12, 3, None, "randn"),
}
# float16 runs on a subset (the interpreter is slow), float32 and bfloat16 (GPU) on all of them
FP16_CASES = {"causal-odd", "prefix37-block4", "decode-block8-vs-cache", "decode-gqa7-hd128-kvlens",
              "leftpad-causal", "bias-pm30", "headdim40-padded", "empty-batch-row"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case_params():
    for name in CASES:
        for dt in DTYPES:
            marks = []
            if dt == torch.float16 and name not in FP16_CASES and not HAS_CUDA:
                continue
            if dt == torch.bfloat16:
                marks.append(pytest.mark.skipif(not HAS_CUDA, reason="bfloat16 runs on a GPU only (the Triton "
                                                "interpreter has no bfloat16)"))
            yield pytest.param(name, dt, id=f"{name}-{str(dt).replace('torch.', '')}", marks=marks)


@pytest.mark.parametrize("case,dtype", list(_case_params()))
def test_conformance(impl, case, dtype):
    b, hq, hkv, lq, lk, d, prefix, block, q_offset, kv_lens, bias_kind = CASES[case]
    layout = "blhd" if case in ("causal-odd", "decode-block8-vs-cache") else "bhld"
    q, k, v, bias = make_inputs(b, hq, hkv, lq, lk, d, dtype, bias=bias_kind, seed=len(case), layout=layout)
    skip_unsupported(impl, q, k, v, bias)
    ref_out, ref_lse = reference64(q, k, v, bias, prefix, block, q_offset, kv_lens)
    same_err = 0.0
    if dtype != torch.float32:  # error of a same-dtype PyTorch reference
        same_out = attention_reference(q, k, v, bias=bias,
                                       prefix_len=torch.as_tensor(prefix if isinstance(prefix, list) else [prefix] * b),
                                       block_size=block, q_offset=q_offset,
                                       kv_lens=None if kv_lens is None else torch.as_tensor(kv_lens))
        same_err = rel_error(same_out, ref_out)
    if case in ("leftpad-causal", "empty-batch-row"):
        assert torch.isneginf(ref_lse).any() and not torch.isneginf(ref_lse).all()
    out, lse = run_impl(impl, q, k, v, bias, prefix, block, q_offset, kv_lens)
    assert_matches(out, lse, ref_out, ref_lse, q.to(DEVICE), tolerance(dtype, same_err))


def _edge_dtype(impl):
    """Float32 for the edge cases below, float16 where the backend has no float32 path (CUDA)."""
    return torch.float16 if _backend_of(impl) == "cuda" else torch.float32


def test_custom_scale_and_no_lse(impl):
    q, k, v, bias = make_inputs(1, 4, 2, 9, 30, 64, _edge_dtype(impl), bias="randn", seed=3)
    skip_unsupported(impl, q, k, v, bias)
    ref_out, ref_lse = reference64(q, k, v, bias, 21, 3, 21, None, scale=0.3)
    out, lse = run_impl(impl, q, k, v, bias, 21, 3, 21, None, scale=0.3)
    assert_matches(out, lse, ref_out, ref_lse, q.to(DEVICE), tolerance(q.dtype, 0.0))
    if impl != "triton-splitk":
        only = cdlm_fast.attention(*(to_device(t) for t in (q, k, v)), bias=to_device(bias), prefix_len=21,
                                   block_size=3, q_offset=21, scale=0.3, backend=_backend_of(impl))
        assert torch.is_tensor(only) and torch.equal(only, out)


def test_no_keys_at_all(impl):
    """Lk = 0: every row sees nothing (zeros, lse -inf), no kernel reads anything."""
    q, k, v, _ = make_inputs(2, 4, 2, 6, 0, 64, _edge_dtype(impl))
    skip_unsupported(impl, q, k, v, None)
    ref_out, ref_lse = reference64(q, k, v, None, 0, 2, 0, None)
    out, lse = run_impl(impl, q, k, v, None, 0, 2, 0, None)
    assert_matches(out, lse, ref_out, ref_lse, q.to(DEVICE), tolerance(q.dtype, 0.0))


def test_all_keys_masked_by_bias(impl):
    q, k, v, _ = make_inputs(1, 2, 1, 5, 40, 64, _edge_dtype(impl))
    bias = torch.full((1, 1, 40), -math.inf)
    skip_unsupported(impl, q, k, v, bias)
    ref_out, ref_lse = reference64(q, k, v, bias, 0, None, 0, None)
    out, lse = run_impl(impl, q, k, v, bias, 0, None, 0, None)
    assert_matches(out, lse, ref_out, ref_lse, q.to(DEVICE), tolerance(q.dtype, 0.0))


def test_edge_cases_use_a_dtype_every_backend_supports():
    """The edge cases above must run (not raise) on every backend: on the CUDA backend, whose
    kernels have no float32 path, they run in float16."""
    from cdlm_fast._cuda_ops import attention_supports
    assert "float32" in attention_supports(q=torch.zeros(1, 1, 1, 64))
    for impl in IMPLS:
        q = torch.zeros(1, 1, 1, 64, dtype=_edge_dtype(impl))
        assert attention_supports(q=q) is None or _backend_of(impl) != "cuda"
    assert _edge_dtype("cuda") == torch.float16 and _edge_dtype("triton-decode") == torch.float32


def test_checker_rejects_nan():
    """NaN never passes: the comparison used above fails on a NaN output or lse."""
    q, k, v, bias = make_inputs(1, 2, 1, 4, 8, 16, torch.float32)
    ref_out, ref_lse = reference64(q, k, v, bias, 0, 1, 0, None)
    out, lse = ref_out.float().clone(), ref_lse.float().clone()
    assert_matches(out, lse, ref_out, ref_lse, q, 1e-5)
    bad = out.clone()
    bad[0, 1, 2, 3] = math.nan
    with pytest.raises(AssertionError):
        assert_matches(bad, lse, ref_out, ref_lse, q, 1e-5)
    bad_lse = lse.clone()
    bad_lse[0, 0, 1] = math.nan
    with pytest.raises(AssertionError):
        assert_matches(out, bad_lse, ref_out, ref_lse, q, 1e-5)
    assert math.isnan(rel_error(bad, ref_out))


# --------------------------------------------------------------------------------------------
# the Triton backend specifically


needs_triton = pytest.mark.skipif(_unavailable("triton") is not None, reason=f"triton: {_unavailable('triton')}")


@needs_triton
def test_triton_supports_reasons():
    supports = _triton_module().supports
    q = torch.zeros(1, 2, 3, 64, device=DEVICE)
    assert supports(q, q, q, None) is None
    assert "float64" in supports(q.double(), q.double(), q.double(), None)
    big = torch.zeros(1, 2, 3, 512, device=DEVICE)
    assert "head dim" in supports(big, big, big, None)
    with pytest.raises(ValueError, match="float64"):
        cdlm_fast.attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        cdlm_fast.attention(big, big, big, backend="triton")


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_triton_decode_splits(splits, monkeypatch):
    """Split-K with empty trailing splits, rows masked in some splits, and the combine."""
    monkeypatch.setattr(_triton_module(), "_empty", _poisoned_empty)
    q, k, v, bias = make_inputs(2, 4, 1, 6, 150, 64, torch.float32, bias="inf", seed=11)
    prefix, block, q_offset, kv_lens = [100, 7], 3, 120, [126, 40]
    ref_out, ref_lse = reference64(q, k, v, bias, prefix, block, q_offset, kv_lens)
    out, lse = _triton_module().attention_triton(
        *(to_device(t) for t in (q, k, v, bias)), torch.tensor(prefix, dtype=torch.int32, device=DEVICE),
        torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE), q_offset, block, 64 ** -0.5,
        path="decode", num_splits=splits)
    assert_matches(out, lse, ref_out, ref_lse, q.to(DEVICE), 1e-5)


@needs_triton
def test_triton_decode_plan():
    from cdlm_fast.kernels.attention_decode import CHUNK_ALIGN, decode_plan
    for B, hkv, rows, lk in [(1, 8, 128, 131072), (16, 8, 128, 1024), (1, 4, 224, 4096), (2, 2, 8, 33)]:
        block_m, m_tiles, splits, chunk = decode_plan(B, hkv, rows, lk, 128, DEVICE)
        assert m_tiles * block_m >= rows and splits >= 1 and chunk % CHUNK_ALIGN == 0
        assert (splits - 1) * chunk < lk <= splits * chunk


@needs_triton
def test_triton_decode_plan_caps_partial_traffic(monkeypatch):
    """The float32 partials of split-K (written and read back: 8 bytes per row x D per split) stay
    at most a quarter of the 16-bit K/V bytes, at batch 1 too (where most splits are wanted);
    planned as on an H100/H200 (132 multiprocessors)."""
    from cdlm_fast.kernels import attention_decode
    from cdlm_fast.kernels.attention_decode import decode_plan
    monkeypatch.setattr(attention_decode, "is_interpreted", lambda: False)
    monkeypatch.setattr(attention_decode, "sm_count", lambda index: 132)
    for B, hkv, rows, lk in [(1, 8, 128, 8192), (1, 8, 128, 32768), (1, 8, 4, 8192), (8, 8, 128, 32768),
                             (1, 4, 224, 4096)]:
        _, _, splits, _ = decode_plan(B, hkv, rows, lk, 128, torch.device("cuda"))
        partial_bytes = splits * rows * 128 * 4 * 2
        kv_bytes = 2 * lk * 128 * 2
        assert partial_bytes <= kv_bytes / 4, (B, hkv, rows, lk, splits)
    # few rows: splitting stays allowed (the partials are small)
    assert decode_plan(1, 8, 4, 65536, 128, torch.device("cuda"))[2] > 1


@needs_triton
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_single_config_launches_without_the_autotuner(path, monkeypatch):
    """When pruning leaves one config, the kernel is launched directly: the autotuner (which in
    Triton 3.6 benchmarks even a single config, and cannot run under CUDA-graph capture) is never
    entered."""
    import importlib
    mod = importlib.import_module(f"cdlm_fast.kernels.attention_{path}")
    kernel = getattr(mod, f"_{path}_kernel")
    assert len(mod.candidate_configs(128, False, 16, 1024) if path == "prefill"
               else mod.candidate_configs(128, 16, False, 1024)) == 1

    def no_autotune(*args, **kwargs):
        raise AssertionError("the autotuner ran for a single config")
    monkeypatch.setattr(kernel, "run", no_autotune)
    q, k, v, bias = (to_device(t) for t in make_inputs(1, 4, 2, 8, 40, 32, torch.float32, bias="randn", seed=5))
    prefix = torch.tensor([32], dtype=torch.int32, device=DEVICE)
    out, lse = _triton_module().attention_triton(q, k, v, bias, prefix, None, 32, 4, 0.2, path=path)
    ref_out, ref_lse = reference64(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), 32, 4, 32, None, scale=0.2)
    assert_matches(out, lse, ref_out, ref_lse, q, 1e-5)


@needs_triton
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_triton_opcheck(path):
    q, k, v, bias = (to_device(t) for t in make_inputs(1, 4, 2, 8, 40, 32, torch.float32, bias="randn", seed=5))
    prefix = torch.tensor([32], dtype=torch.int32, device=DEVICE)
    kvl = torch.tensor([35], dtype=torch.int32, device=DEVICE)
    op = torch.ops.cdlm_fast.attention_triton.default
    torch.library.opcheck(op, (q, k, v, bias, prefix, kvl, 32, 4, 0.2, path, 2))
    torch.library.opcheck(op, (q, k, v, None, prefix, None, 32, 0, 0.2, path, 0))


@needs_triton
def test_triton_torch_compile_fullgraph():
    """``torch.compile(fullgraph=True)`` through the public dispatcher and the custom op."""
    q, k, v, bias = (to_device(t) for t in make_inputs(1, 4, 2, 8, 40, 32, torch.float32, bias="randn", seed=6))
    kv_lens = torch.tensor([38], device=DEVICE)

    def f(q, k, v, bias, kv_lens):
        out, lse = cdlm_fast.attention(q, k, v, bias=bias, prefix_len=32, block_size=4, q_offset=32,
                                       kv_lens=kv_lens, return_lse=True, backend="triton")
        return out * 2.0, lse + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    out, lse = compiled(q, k, v, bias, kv_lens)
    ref_out, ref_lse = f(q, k, v, bias, kv_lens)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# argument validation (backend independent: raised before dispatch)


def _good():
    q = torch.randn(2, 4, 5, 16)
    k = torch.randn(2, 2, 9, 16)
    return dict(q=q, k=k, v=torch.randn(2, 2, 9, 16), bias=torch.zeros(2, 2, 9))


def _call(**over):
    args = _good()
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return cdlm_fast.attention(q, k, v, **args)


BAD = [
    ("q-rank", dict(q=torch.randn(4, 5, 16)), ValueError, "q must have 4 dimensions"),
    ("k-rank", dict(k=torch.randn(2, 2, 9, 16, 1)), ValueError, "k must have 4 dimensions"),
    ("q-not-tensor", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q-int", dict(q=torch.zeros(2, 4, 5, 16, dtype=torch.int32)), TypeError, "q must have dtype"),
    ("dtype-mismatch", dict(k=torch.randn(2, 2, 9, 16, dtype=torch.float64)), TypeError, "share one dtype"),
    ("batch-mismatch", dict(k=torch.randn(3, 2, 9, 16), v=torch.randn(3, 2, 9, 16)), ValueError, "batch size"),
    ("head-dim-mismatch", dict(k=torch.randn(2, 2, 9, 8)), ValueError, "head dim"),
    ("v-shape", dict(v=torch.randn(2, 2, 8, 16)), ValueError, "v must have the shape of k"),
    ("gqa-ratio", dict(k=torch.randn(2, 3, 9, 16), v=torch.randn(2, 3, 9, 16), bias=None), ValueError, "multiple"),
    ("device-mismatch", dict(k=torch.randn(2, 2, 9, 16, device="meta")), ValueError, "same device"),
    ("bias-shape", dict(bias=torch.zeros(2, 4, 9)), ValueError, "bias must have shape"),
    ("bias-rank", dict(bias=torch.zeros(2, 9)), ValueError, "bias must have 3 dimensions"),
    ("bias-dtype", dict(bias=torch.zeros(2, 2, 9, dtype=torch.float16)), TypeError, "bias must have dtype"),
    ("prefix-negative", dict(prefix_len=-1), ValueError, "prefix_len must be >= 0"),
    ("prefix-negative-tensor", dict(prefix_len=torch.tensor([3, -2])), ValueError, "prefix_len must be >= 0"),
    ("prefix-shape", dict(prefix_len=torch.tensor([3])), ValueError, r"prefix_len must have shape \[B=2\]"),
    ("prefix-float", dict(prefix_len=torch.tensor([3.0, 2.0])), TypeError, "prefix_len must be an int32/int64"),
    ("kv-lens-int", dict(kv_lens=9), TypeError, "kv_lens must be a"),
    ("kv-lens-negative", dict(kv_lens=torch.tensor([9, -1])), ValueError, "kv_lens must be >= 0"),
    ("kv-lens-too-long", dict(kv_lens=torch.tensor([9, 10])), ValueError, "kv_lens must be <= 9"),
    ("block-size-0", dict(block_size=0), ValueError, "block_size must be >= 1"),
    ("block-size-float", dict(block_size=2.5), TypeError, "block_size must be an int"),
    ("q-offset-negative", dict(q_offset=-3), ValueError, "q_offset must be >= 0"),
    ("scale-negative", dict(scale=-1.0), ValueError, "scale must be a finite positive"),
    ("scale-type", dict(scale="0.1"), TypeError, "scale must be a float"),
    ("backend-name", dict(backend="flash"), ValueError, "backend must be one of"),
    ("backend-type", dict(backend=None), TypeError, "backend must be a str"),
]


@pytest.mark.parametrize("over,exc,match", [pytest.param(o, e, m, id=i) for i, o, e, m in BAD])
def test_validation_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(ValueError, match="cuda"):
        _call(backend="cuda")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("CDLM_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="CDLM_FAST_BACKEND"):
        _call()
    monkeypatch.setenv("CDLM_FAST_BACKEND", "torch")
    out = _call()
    assert out.shape == (2, 4, 5, 16)
