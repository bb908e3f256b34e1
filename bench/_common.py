"""Shared helpers of the pytest-benchmark suites.

Conventions every suite follows, so that ``cdlm-fast bench`` can tabulate and plot them:

* one pytest-benchmark ``group`` per case (same inputs, every implementation side by side);
* ``benchmark.extra_info`` holds ``op``, ``case``, ``impl`` (``cdlm_fast/triton``,
  ``cdlm_fast/cuda``, ``sdpa+mask``, ``flex``, ``eager``, ``scipy`` …), ``ours`` (bool),
  ``x`` / ``x_name`` (the plotted size, e.g. sequence length) and, when known, ``flops`` and
  ``bytes`` of one call — :func:`run` adds ``median_ms``, ``tflops`` and ``gbps``;
* on a GPU ``median_ms`` is the device time from CUDA events (``triton.testing.do_bench``,
  median, L2 flushed between calls), not pytest-benchmark's host timer (kept as
  ``host_timer_median_ms``), which for microsecond-scale kernels measures Python overhead; the
  host cost of one call (validation + dispatch + launch, no synchronisation) is
  ``host_us_per_call``.

``CDLM_FAST_BENCH_QUICK=1`` (and any machine without a GPU) selects small shapes.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
QUICK = os.environ.get("CDLM_FAST_BENCH_QUICK", "0") == "1" or not HAS_CUDA

# Realistic model shapes (attention part): query heads, KV heads, head dim.
MODEL_SHAPES = {
    "llama3.1-8b": dict(hq=32, hkv=8, d=128),
    "qwen2-7b": dict(hq=28, hkv=4, d=128),  # also Dream-7B
    "qwen3-4b": dict(hq=32, hkv=8, d=128),
}


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation (host timers then time device work)."""

    def call():
        out = fn()
        synchronize()
        return out

    return call


def run(benchmark, fn: Callable[[], object], *, op: str, case: str, impl: str, ours: bool,
        x: Optional[float] = None, x_name: str = "", flops: Optional[float] = None,
        bytes_moved: Optional[float] = None, rounds: Optional[int] = None, **extra):
    """Time ``fn`` with pytest-benchmark and record the conventional ``extra_info``."""
    benchmark.group = case
    call = synced(fn)
    call()  # warm-up: compilation, autotuning, caches
    if rounds is None:
        result = benchmark(call)
    else:
        result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    info = dict(op=op, case=case, impl=impl, ours=ours, x=x, x_name=x_name, device=device_name(),
                median_ms=median * 1e3, **extra)
    if HAS_CUDA:
        import triton.testing
        info["host_timer_median_ms"] = median * 1e3
        median = triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") * 1e-3
        info["median_ms"] = median * 1e3
        info["host_us_per_call"] = host_us_per_call(fn)
    if flops:
        info["flops"] = flops
        info["tflops"] = flops / median / 1e12
    if bytes_moved:
        info["bytes"] = bytes_moved
        info["gbps"] = bytes_moved / median / 1e9
    benchmark.extra_info.update(info)
    return result


def host_us_per_call(fn: Callable[[], object], calls: int = 20) -> float:
    """Host time of one call in microseconds (validation, dispatch, launch), without waiting for
    the device: the queue absorbs the work and one synchronisation closes the loop."""
    synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    synchronize()
    return (t1 - t0) / calls * 1e6


def device_name() -> str:
    return torch.cuda.get_device_name(0) if HAS_CUDA else "cpu"


def measure_peaks() -> dict:
    """Measured device peaks: copy bandwidth (GB/s, read + write) and bf16 matmul (TFLOP/s)."""
    if not HAS_CUDA:
        return {}
    import triton.testing

    n = 1 << 28  # 512 MiB of bf16 per buffer
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=100)
    mm_tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "bf16_matmul_tflops": mm_tflops}
