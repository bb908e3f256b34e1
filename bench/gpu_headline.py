"""Headline timings of the first GPU run, in one process, into one JSON.

    python bench/gpu_headline.py --out OUT/headline.json [--dry-run] [--deadline EPOCH_SECONDS]

Cases (each timed with CUDA events: ``triton.testing.do_bench`` median, L2 flushed between
runs; decode also under a CUDA graph with ``do_bench_cudagraph``):

* ``attention/prefill``: an 8K prompt + 4 blocks of 32 generated tokens (block-causal), Llama-3.1-8B
  heads (32 query / 8 KV heads, hd 128), bfloat16, batch 1;
* ``attention/decode``: one block of 32 queries against 8K and 32K cached keys with a per-key
  bias (a compacted cache), batch 1 and 8;
  peers of both: FlexAttention (compiled once, outside the timed loop) and SDPA with a float mask;
* ``fit/exp_gram``, ``fit/nnls``, ``fit/lstsq``: 256 problems, n = 4096 queries, t = 512 keys, hd 128,
  float32, against a dense ``torch`` / ``torch.linalg`` computation and a scipy loop over a few
  problems (extrapolated to 256, and labelled so);
* ``compaction/layer``: one Llama-3.1-8B-shaped layer, 8K tokens, 10x, ``highest_attention``;
* ``denoise/dream7b``: one Dream-7B-shaped (Qwen2-7B) denoising step of a 32-token block against an
  8K cache: 28 layers of bfloat16 projections and MLP (one layer's weights, reused) + attention,
  and the LM head; per attention backend.

Every case is independent: an exception is recorded in the JSON (``error``) and the next case
runs; the JSON is rewritten after every case, so a run killed at its time limit still leaves
what it measured. ``--dry-run`` runs every case on the CPU with tiny shapes (Triton interpreter,
float32, host timers), to check this script, not to measure anything.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv or os.environ.get("CDLM_FAST_GPU_DRY_RUN", "0") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import cdlm_fast  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available() and not DRY
DEV = torch.device("cuda" if CUDA else "cpu")
LOW = torch.bfloat16 if CUDA else torch.float32  # the interpreter has no bfloat16
DEADLINE = [time.time() + 3600]  # set by main(); optional peers are skipped near it


def time_left() -> float:
    return DEADLINE[0] - time.time()


# ----------------------------------------------------------------------------------------------
# timing

def sync():
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn, rep_ms: int = 100) -> float:
    """Median device time of ``fn`` in ms (CUDA events via do_bench; host timer in a dry run)."""
    if CUDA:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(1):  # dry run: the interpreter is slow, one call shows the code runs
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (launch overhead removed)."""
    if not CUDA:
        return time_ms(fn)
    import triton.testing
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def wall_ms(fn, reps: int = 3) -> float:
    """Median of ``reps`` calls of a multi-kernel pipeline, timed by CUDA events around each call."""
    if not CUDA:
        return time_ms(fn)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_us(fn, calls: int = 50) -> float:
    """Host time per call (validation + dispatch + launch) while the device queue absorbs the work."""
    calls = calls if CUDA else 1
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / calls * 1e6


# ----------------------------------------------------------------------------------------------
# results

class Results:
    def __init__(self, path: str, deadline: float):
        self.path, self.deadline = path, deadline
        self.data = {"meta": meta(), "peaks": {}, "cases": []}
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def case(self, name: str, fn, min_left_s: float = 10.0):
        """Run one case; its rows (or error) go into the JSON."""
        entry = {"case": name}
        if self.time_left() < min_left_s:
            entry["skipped"] = f"less than {min_left_s:.0f} s left before the deadline"
        else:
            t0 = time.time()
            try:
                entry.update(fn())
            except Exception as e:  # recorded, never fatal: the next case runs
                entry["error"] = f"{e.__class__.__name__}: {e}"
                entry["traceback"] = traceback.format_exc()[-3000:]
            entry["seconds"] = round(time.time() - t0, 2)
        print(f"[headline] {name}: " + ("skipped" if "skipped" in entry else "error: " + entry["error"]
                                       if "error" in entry else "ok") + f" ({entry.get('seconds', 0)} s)", flush=True)
        self.data["cases"].append(entry)
        self.save()
        if CUDA:
            torch.cuda.empty_cache()


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def meta():
    import triton
    m = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(),
         "dry_run": DRY, "python": platform.python_version(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "triton": triton.__version__, "cdlm_fast": cdlm_fast.__version__,
         "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
         "triton_autotune": os.environ.get("CDLM_FAST_AUTOTUNE", "1") != "0",
         "device": torch.cuda.get_device_name(0) if CUDA else f"cpu ({os.cpu_count()} cores)"}
    try:
        import transformers
        m["transformers"] = transformers.__version__
    except Exception as e:
        m["transformers"] = f"not importable ({e.__class__.__name__})"
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        m.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                 memory_gib=round(p.total_memory / 2 ** 30, 1))
    from cdlm_fast.backends import cuda_extension_error
    m["cuda_extension"] = cuda_extension_error() or "loaded"
    return m


def measure_peaks():
    """Copy bandwidth (GB/s, read + write) and dense bf16 matmul throughput (TFLOP/s), measured."""
    n, m = ((1 << 28), 8192) if CUDA else ((1 << 16), 128)
    src = torch.empty(n, dtype=LOW, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 50)
    copy = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(m, m, dtype=LOW, device=DEV)
    b = torch.randn(m, m, dtype=LOW, device=DEV)
    ms = time_ms(lambda: a @ b, 50)
    return {"copy_gbps": copy, "bf16_matmul_tflops": 2 * m ** 3 / (ms * 1e-3) / 1e12,
            "note": "measured on this device" if CUDA else "dry run: host timer, not a peak"}


# ----------------------------------------------------------------------------------------------
# attention

def our_backends():
    from cdlm_fast.backends import op
    o = op("attention")
    return [b for b in ("triton", "cuda") if o.reason(b, DEV) is None]


def block_limits(L_q, q_offset, prefix, block):
    """Per-query number of visible keys (the block-causal rule of cdlm_fast.attention)."""
    pos = torch.arange(L_q, device=DEV) + q_offset
    gen = prefix + block * ((pos - prefix).clamp(min=0) // block + 1)
    return torch.where(pos < prefix, torch.full_like(pos, prefix), gen)


def float_mask(B, Hq, Hkv, Lq, Lk, lim, bias):
    """The additive float mask SDPA needs: ``[B, Hq, Lq, Lk]`` with a bias, else ``[B, 1, Lq, Lk]``."""
    mask = torch.zeros(B, Hkv if bias is not None else 1, Lq, Lk, device=DEV, dtype=LOW)
    if bias is not None:
        mask += bias[:, :, None, :].to(LOW)
    mask.masked_fill_(torch.arange(Lk, device=DEV)[None, :] >= lim[:, None], float("-inf"))
    return mask.repeat_interleave(Hq // Hkv, dim=1) if bias is not None else mask


def flex_call(q, k, v, lim, bias, compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv

    def mask_mod(b, h, qi, kj):
        return kj < lim[qi]

    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, qi, kj):
            return score + bias[b, h // G, kj]
    bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Lq, KV_LEN=Lk, device=str(DEV))
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    call = lambda: fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)  # noqa: E731
    call()  # compile here, outside the timed loop
    return call


def attention_case(B, Hq, Hkv, D, Lq, Lk, q_offset, prefix, block, with_bias, kind):
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=LOW, generator=gen)
    k = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=LOW, generator=gen)
    v = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=LOW, generator=gen)
    bias = torch.randn(B, Hkv, Lk, device=DEV, generator=gen) if with_bias else None
    lim = block_limits(Lq, q_offset, prefix, block).clamp(max=Lk)
    visible = float(lim.sum()) * B * Hq
    flops = 4.0 * D * visible
    kv_bytes = 2.0 * B * Hkv * Lk * D * q.element_size() + (B * Hkv * Lk * 4 if with_bias else 0)
    rows, ref = [], None
    for be in our_backends():
        def call(be=be):
            return cdlm_fast.attention(q, k, v, bias=bias, prefix_len=prefix, block_size=block, q_offset=q_offset,
                                       backend=be)
        out = call()
        row = {"impl": f"cdlm_fast/{be}", "ours": True, "ms": time_ms(call), "host_us_per_call": host_us(call)}
        if kind == "decode":
            try:
                row["graph_ms"] = graph_ms(call)
            except Exception as e:
                row["graph_error"] = f"{e.__class__.__name__}: {e}"
        if ref is None:
            ref = out.float()
        else:
            row["max_abs_diff_vs_first"] = float((out.float() - ref).abs().max())
        rows.append(row)
    mask = float_mask(B, Hq, Hkv, Lq, Lk, lim, bias)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1),  # noqa
                                                                     v.repeat_interleave(Hq // Hkv, 1),
                                                                     attn_mask=mask)
    sdpa()
    rows.append({"impl": "sdpa+float-mask", "ours": False, "ms": time_ms(sdpa),
                 "note": "K/V repeated to Hq heads and the float mask built outside the timing"})
    del mask
    try:
        fl = flex_call(q, k, v, lim, bias, compiled=CUDA)
        rows.append({"impl": "flex_attention", "ours": False, "ms": time_ms(fl), "compiled": CUDA})
    except Exception as e:
        rows.append({"impl": "flex_attention", "ours": False, "error": f"{e.__class__.__name__}: {e}"})
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
            r["gbps"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
    return {"shape": dict(B=B, Hq=Hq, Hkv=Hkv, D=D, Lq=Lq, Lk=Lk, q_offset=q_offset, prefix_len=prefix,
                          block_size=block, bias=with_bias, dtype=str(LOW).replace("torch.", "")),
            "flops": flops, "kv_bytes": kv_bytes, "rows": rows}


# ----------------------------------------------------------------------------------------------
# fits: exp_gram + NNLS + lstsq

def fit_inputs(P, n, t, D):
    gen = torch.Generator(device=DEV).manual_seed(1)
    Q = torch.randn(P, n, D, device=DEV, generator=gen)
    C = Q[:, torch.randperm(n, generator=torch.Generator().manual_seed(2))[:t].to(DEV)].contiguous()
    scale = D ** -0.5
    shift = torch.logsumexp(scale * Q @ Q.mT, -1) if n * n * P <= (1 << 31) else torch.logsumexp(
        scale * Q @ C.mT, -1)  # an upper-bound shift keeps exp <= 1 either way
    Y = torch.randn(P, n, D, device=DEV, generator=gen)
    return Q, C, shift, Y, scale


def fit_cases(P, n, t, D, scipy_subset):
    from cdlm_fast.backends import op
    Q, C, shift, Y, scale = fit_inputs(P, n, t, D)
    out = {"shape": dict(P=P, n=n, t=t, D=D, dtype="float32"), "rows": []}
    rows = out["rows"]
    backs = [b for b in ("triton", "cuda") if op("exp_gram").reason(b, DEV, Q=Q, C=C, Y=Y) is None]
    G = R = None
    for be in backs:
        fn = lambda be=be: cdlm_fast.exp_gram(Q, C, None, shift, scale, Y, backend=be)  # noqa: E731
        G, R = fn()
        rows.append({"op": "exp_gram", "impl": f"cdlm_fast/{be}", "ours": True, "ms": time_ms(fn, 200)})

    def dense():
        A = torch.exp(scale * Q @ C.mT - shift[..., None])
        return A.mT @ A, A.mT @ Y
    G2, R2 = dense()
    rows.append({"op": "exp_gram", "impl": "torch dense (A materialised)", "ours": False, "ms": time_ms(dense, 200)})
    if G is None:
        G, R = G2, R2
    Gd = G.double() + 1e-6 * torch.eye(t, device=DEV, dtype=torch.float64) * G.double().diagonal(
        dim1=-2, dim2=-1).mean(-1)[:, None, None]
    G = Gd.float()
    h = R[..., 0].contiguous()
    for be in ("cuda", "triton", "torch"):
        if op("nnls_gram").reason(be, DEV) is not None or (be == "torch" and time_left() < 90):
            continue
        fn = lambda be=be: cdlm_fast.nnls_gram(G, h, backend=be)  # noqa: E731
        res = fn()
        rows.append({"op": "nnls", "impl": f"cdlm_fast/{be}", "ours": be != "torch", "ms": wall_ms(fn),
                     "converged": bool(getattr(res, "converged", torch.tensor(True)).all())})
    for be in ("cuda", "triton", "torch"):
        if op("lstsq_gram").reason(be, DEV) is not None:
            continue
        fn = lambda be=be: cdlm_fast.lstsq_gram(G, R, ridge=1e-6, backend=be)  # noqa: E731
        fn()
        rows.append({"op": "lstsq", "impl": f"cdlm_fast/{be}", "ours": be != "torch", "ms": wall_ms(fn)})
    rows.append({"op": "lstsq", "impl": "torch.linalg.cholesky_solve on G", "ours": False,
                 "ms": wall_ms(lambda: torch.cholesky_solve(R, torch.linalg.cholesky(G)))})
    try:
        import numpy as np
        import scipy.linalg
        import scipy.optimize
        Gs, hs, Rs = (x[:scipy_subset].double().cpu().numpy() for x in (G, h, R))
        t0 = time.perf_counter()
        for p in range(scipy_subset):  # nnls on the Cholesky factor: same objective as the Gram form
            L = np.linalg.cholesky(Gs[p])
            scipy.optimize.nnls(L.T, scipy.linalg.solve_triangular(L, hs[p], lower=True), maxiter=50 * t)
        ms = (time.perf_counter() - t0) * 1e3 / scipy_subset * P
        rows.append({"op": "nnls", "impl": "scipy.optimize.nnls loop (CPU)", "ours": False, "ms": ms,
                     "extrapolated": f"measured on {scipy_subset} of {P} problems, scaled by {P / scipy_subset:g}"})
        t0 = time.perf_counter()
        for p in range(scipy_subset):
            scipy.linalg.cho_solve(scipy.linalg.cho_factor(Gs[p]), Rs[p])
        ms = (time.perf_counter() - t0) * 1e3 / scipy_subset * P
        rows.append({"op": "lstsq", "impl": "scipy.linalg.cho_solve loop (CPU)", "ours": False, "ms": ms,
                     "extrapolated": f"measured on {scipy_subset} of {P} problems, scaled by {P / scipy_subset:g}"})
    except ImportError as e:
        rows.append({"op": "nnls", "impl": "scipy", "ours": False, "error": f"scipy not importable: {e}"})
    return out


# ----------------------------------------------------------------------------------------------
# compaction and a denoising step

def compaction_case(Hq, Hkv, D, T, n, ratio):
    from cdlm_fast.compaction import compact_layer
    gen = torch.Generator(device=DEV).manual_seed(3)
    k = torch.randn(1, Hkv, T, D, device=DEV, dtype=LOW, generator=gen)
    v = torch.randn(1, Hkv, T, D, device=DEV, dtype=LOW, generator=gen)
    q = torch.randn(1, Hq, n, D, device=DEV, dtype=LOW, generator=gen)
    budget = max(1, int(T / ratio))
    rows = []
    for be in ["auto", "torch"]:
        if be == "torch" and time_left() < 60:
            rows.append({"impl": "cdlm_fast compact_layer backend=torch", "ours": False, "skipped": "time"})
            continue
        fn = lambda be=be: compact_layer(k, v, q, budget, "highest_attention", backend=be)  # noqa: E731
        fn()
        rows.append({"impl": f"cdlm_fast compact_layer backend={be}", "ours": be != "torch",
                     "ms": wall_ms(fn)})
    return {"shape": dict(Hq=Hq, Hkv=Hkv, D=D, T=T, n_queries=n, ratio=ratio, budget=budget,
                          dtype=str(LOW).replace("torch.", "")), "rows": rows}


def denoise_case(layers, hidden, inter, Hq, Hkv, D, vocab, cache, block, B=1):
    """A Dream-7B-shaped denoising step: ``layers`` x (QKV, attention vs the cache, O, SwiGLU MLP)
    on a block of ``block`` tokens, then the LM head; one layer's weights serve every layer."""
    gen = torch.Generator(device=DEV).manual_seed(4)

    def w(*s):
        return torch.randn(*s, device=DEV, dtype=LOW, generator=gen) * 0.02
    wqkv, wo = w((Hq + 2 * Hkv) * D, hidden), w(hidden, Hq * D)
    wgu, wd, head = w(2 * inter, hidden), w(hidden, inter), w(vocab, hidden)
    kc = torch.randn(B, Hkv, cache + block, D, device=DEV, dtype=LOW, generator=gen)
    vc = torch.randn_like(kc)
    x0 = torch.randn(B, block, hidden, device=DEV, dtype=LOW, generator=gen)
    kr, vr = kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1)  # SDPA's GQA, once
    rows = []
    impls = [f"cdlm_fast/{b}" for b in our_backends()] + ["sdpa"]
    for impl in impls:
        def step(impl=impl):
            x = x0
            for _ in range(layers):
                qkv = x @ wqkv.T
                q = qkv[..., :Hq * D].view(B, block, Hq, D).transpose(1, 2)
                if impl == "sdpa":
                    a = torch.nn.functional.scaled_dot_product_attention(q, kr, vr)
                else:
                    a = cdlm_fast.attention(q, kc, vc, prefix_len=cache, block_size=block, q_offset=cache,
                                            backend=impl.split("/")[1])
                x = x + a.transpose(1, 2).reshape(B, block, Hq * D) @ wo.T
                gu = x @ wgu.T
                x = x + (torch.nn.functional.silu(gu[..., :inter]) * gu[..., inter:]) @ wd.T
            return x @ head.T
        step()
        rows.append({"impl": impl, "ours": impl != "sdpa", "ms": time_ms(step, 200)})
    return {"shape": dict(layers=layers, hidden=hidden, intermediate=inter, Hq=Hq, Hkv=Hkv, D=D, vocab=vocab,
                          cache=cache, block=block, B=B, dtype=str(LOW).replace("torch.", "")),
            "note": "synthetic step: projections + attention + MLP of every layer and the LM head; no norms/RoPE",
            "rows": rows}


# ----------------------------------------------------------------------------------------------

def summarise(data):
    """Per case: ratio of every row to our fastest row, and the fraction of the measured peaks."""
    peaks = data.get("peaks") or {}
    for c in data["cases"]:
        rows = [r for r in c.get("rows", []) if "ms" in r]
        groups = {}
        for r in rows:
            groups.setdefault(r.get("op", ""), []).append(r)
        for grp in groups.values():
            ours = [r["ms"] for r in grp if r.get("ours")]
            best = min(ours) if ours else None
            for r in grp:
                if best:
                    r["x_vs_our_best"] = r["ms"] / best
                if peaks.get("bf16_matmul_tflops") and r.get("tflops"):
                    r["pct_matmul_peak"] = 100 * r["tflops"] / peaks["bf16_matmul_tflops"]
                if peaks.get("copy_gbps") and r.get("gbps"):
                    r["pct_copy_peak"] = 100 * r["gbps"] / peaks["copy_gbps"]
        gram = sorted((r for r in rows if r.get("op") == "exp_gram" and r.get("ours")), key=lambda r: r["ms"])
        if gram:  # decides EXP_GRAM_GPU_ORDER in cdlm_fast/ops/gram.py
            from cdlm_fast.ops.gram import EXP_GRAM_GPU_ORDER
            measured = [r["impl"].split("/")[1] for r in gram]
            data["exp_gram_auto_order"] = {"measured_fastest_first": measured, "current": list(EXP_GRAM_GPU_ORDER),
                                           "agrees": measured[0] == EXP_GRAM_GPU_ORDER[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="path of the JSON to write")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--deadline", type=float, default=0.0, help="epoch seconds after which cases are skipped")
    ap.add_argument("--only", choices=["peaks"], help="measure only the device peaks")
    args = ap.parse_args(argv)
    deadline = args.deadline or time.time() + 3600
    DEADLINE[0] = deadline
    res = Results(args.out, deadline)
    big = not DRY
    res.case("peaks", lambda: {"peaks": measure_peaks()}, min_left_s=5)
    if "peaks" in res.data["cases"][-1]:
        res.data["peaks"] = res.data["cases"][-1]["peaks"]
    if args.only == "peaks":
        res.save()
        return 0 if res.data["peaks"] else 1
    llama = dict(Hq=32, Hkv=8, D=128) if big else dict(Hq=4, Hkv=2, D=16)
    prompt, blk = (8192, 32) if big else (40, 4)
    gen = 4 * blk
    res.case(f"attention/prefill {prompt} prompt + 4 blocks of {blk}, llama-8B heads, B=1",
             lambda: attention_case(1, llama["Hq"], llama["Hkv"], llama["D"], prompt + gen, prompt + gen, 0, prompt,
                                    blk, False, "prefill"), min_left_s=40)
    for Lk in ((8192, 32768) if big else (48,)):
        for B in ((1, 8) if big else (2,)):
            res.case(f"attention/decode {blk} queries vs {Lk} keys + bias, llama-8B heads, B={B}",
                     lambda Lk=Lk, B=B: attention_case(B, llama["Hq"], llama["Hkv"], llama["D"], blk, Lk + blk, Lk,
                                                       Lk, blk, True, "decode"), min_left_s=25)
    fit = (256, 4096, 512, 128, 2) if big else (3, 40, 8, 16, 2)
    res.case("fit/exp_gram+nnls+lstsq {} problems n={} t={} hd{} fp32".format(*fit[:4]),
             lambda: fit_cases(*fit), min_left_s=40)
    res.case("compaction/layer llama-8B shape, {} tokens, 10x".format(8192 if big else 60),
             lambda: compaction_case(**(dict(Hq=32, Hkv=8, D=128, T=8192, n=2048, ratio=10) if big else
                                        dict(Hq=4, Hkv=2, D=16, T=60, n=12, ratio=5))), min_left_s=30)
    res.case("denoise/dream-7B-shaped step, block {} vs {} cache, B=1".format(blk, 8192 if big else 24),
             lambda: denoise_case(**(dict(layers=28, hidden=3584, inter=18944, Hq=28, Hkv=4, D=128, vocab=152064,
                                          cache=8192, block=32) if big else
                                     dict(layers=2, hidden=32, inter=48, Hq=4, Hkv=2, D=16, vocab=50, cache=24,
                                          block=4))), min_left_s=30)
    summarise(res.data)
    res.data["finished"] = True
    res.save()
    errors = [c["case"] for c in res.data["cases"] if "error" in c]
    print(f"[headline] wrote {args.out}; {len(errors)} case(s) with errors" + (f": {errors}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
