"""CPU numbers side by side, in one run: the ``torch`` backend against PyTorch baselines.

Run (about 10 minutes on a 2-core x86 CPU; ``--quick``: about 2)::

    python bench/cpu_report.py [--quick] [--sections attention,prefill,compaction,decode] [--out FILE]

Sections (every comparison calls the implementations in turn, call by call, so that a slow spell
of a shared machine hits all of them alike; each time is the median over all calls):

* ``attention``: :func:`cdlm_fast.attention` (with ``return_lse=True``) against
  ``F.scaled_dot_product_attention`` with a materialised float mask (beta + the block-causal mask,
  K/V repeated to the query heads; mask and repeats built outside the timed region), the mask in
  q's dtype and, for bfloat16 inputs, also in float32 (beta exact, as ours reads it; a bfloat16
  mask rounds beta to 8 bits). Prefill of a
  2K prompt plus one block of 32, and a block of 32 decoded against a 2K / 8K cache, with the
  heads of SmolLM2-135M (9 query, 3 KV, head dim 64) and Llama-3.1-8B (32, 8, 128), float32 and
  bfloat16. ``ratio`` = SDPA time / ours (>= 1: ours is at least as fast).
* ``prefill`` (SmolLM2, the bundled text, 2K context): the repeat-prefill with query capture
  (``cdlm_fast`` attention, ``context + instruction + context``) against a plain SDPA prefill of
  the same tokens.
* ``compaction``: highest attention at 10x on the 30 layers of that prefill, with the same
  reference queries: :func:`cdlm_fast.compaction.compact_layer` (all KV heads batched) against the
  published algorithm written per head in plain PyTorch (``torch_loop_compact`` of
  ``bench_compaction.py``: softmax, RMS over queries, top-k, ``torch.linalg.lstsq`` fits), with
  the held-out attention error of both.
* ``decode``: the demo's block decoding (SmolLM2 weights as a student): ms per step of CDLM
  decoding with the block KV cache, the block-causal decoder without cache and vanilla full
  recompute.

The numbers are written as a markdown table to ``--out`` (default: print only).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cdlm_fast  # noqa: E402
from cdlm_fast.ops.attention_cpu import visible_mask  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama3.1-8b": (32, 8, 128)}
BLOCK = 32


def interleaved(impls, rounds, reps, warmup=True):
    """``{name: seconds}``: the median over ``rounds * reps`` calls of each impl, the impls called in
    turn, call by call, so that a slow spell of a shared machine falls on all of them alike."""
    if warmup:
        for fn in impls.values():
            fn()
    times = {name: [] for name in impls}
    for _ in range(rounds * reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def attention_rows(rounds, quick):
    rows = []
    kinds = [("prefill", 2048), ("decode", 2048), ("decode", 8192)]
    for model, (hq, hkv, d) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for kind, n in kinds:
                if quick and (kind == "prefill" or n > 2048) and model != "smollm2":
                    continue
                g = torch.Generator().manual_seed(0)
                lk = n + BLOCK
                lq = lk if kind == "prefill" else BLOCK
                q_offset = 0 if kind == "prefill" else n
                q = torch.randn(1, hq, lq, d, generator=g).to(dtype)
                k, v = (torch.randn(1, hkv, lk, d, generator=g).to(dtype) for _ in range(2))
                beta = torch.randn(1, hkv, lk, generator=g) * 0.5
                kw = dict(bias=beta, prefix_len=n, block_size=BLOCK, q_offset=q_offset)
                vis = visible_mask(torch.tensor([n]), BLOCK, q_offset, lq, lk)[:, None]
                grp = hq // hkv
                mask32 = torch.where(vis, beta.repeat_interleave(grp, 1)[:, :, None, :], float("-inf"))
                fmask = mask32.to(dtype)
                kr, vr = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
                impls = {
                    "ours": lambda: cdlm_fast.attention(q, k, v, return_lse=True, **kw),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=fmask),
                }
                if dtype != torch.float32:  # beta exact, as ours reads it (the mask in q's dtype rounds it)
                    impls["sdpa_f32"] = lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask32)
                t = interleaved(impls, rounds, 2 if kind == "prefill" else 9)
                name = f"{kind} {'prompt' if kind == 'prefill' else 'cache'} {n // 1024}K"
                rows.append((model, str(dtype).replace("torch.", ""), name, t["ours"], t["sdpa"], t.get("sdpa_f32")))
                f32 = "" if "sdpa_f32" not in t else f"   (float32 mask {1e3 * t['sdpa_f32']:.2f} ms)"
                print(f"  {rows[-1][0]:12s} {rows[-1][1]:9s} {name:18s} ours {1e3 * t['ours']:9.2f} ms   "
                      f"sdpa+mask {1e3 * t['sdpa']:9.2f} ms   ratio {t['sdpa'] / t['ours']:.2f}{f32}", flush=True)
    return rows


def load():
    from cdlm_fast.demo import _context_ids, load_model, read_text

    model, tok = load_model("smollm2")
    return model, tok, _context_ids


def prefill_rows(model, tok, ids, rounds):
    from transformers import DynamicCache

    from cdlm_fast._hf_compat import cache_kwargs
    from cdlm_fast.compaction.queries import instruction_ids, prefill_with_queries

    instr = instruction_ids(tok)
    seq = torch.cat([ids, instr, ids], 1)
    out = {}

    def ours():
        out["res"] = prefill_with_queries(model, ids, "repeat", instr)

    def sdpa():
        prev = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                model(input_ids=seq, use_cache=True, **cache_kwargs(model, DynamicCache()))
        finally:
            model.set_attn_implementation(prev)

    t = interleaved({"ours": ours, "sdpa": sdpa}, rounds, 1, warmup=False)
    return seq.shape[1], t, out["res"]


def compaction_rows(model, kv, queries, rounds):
    from bench_compaction import torch_loop_compact

    from cdlm_fast.compaction import attention_match_metrics, compact_kv, compact_layer
    from cdlm_fast.compaction.api import _scale
    from cdlm_fast.compaction.queries import repeat_copy_targets, subsample_index

    scale = _scale(model)
    gen = torch.Generator().manual_seed(0)
    T = kv[0][0].shape[2]
    split = [subsample_index(queries[i].shape[2], 4096, gen, 256) for i in range(len(kv))]
    fit = [(queries[i][:, :, f], queries[i][:, :, h]) for i, (f, h) in enumerate(split)]
    targets = {i: repeat_copy_targets(T, f) for i, (f, _) in enumerate(split)}  # as compact_model_cache
    t = math.ceil(T / 10)
    res = {}

    def ours():
        res["ours"] = [compact_layer(k, v, qf, 0.1, "highest_attention", scale=scale, logical_length=T)
                       for (k, v), (qf, _) in zip(kv, fit)]

    def loop():
        res["loop"] = [torch_loop_compact(k, v, qf, t, {}) for (k, v), (qf, _) in zip(kv, fit)]

    def pipeline():  # the package's default pipeline: mixed budgets (allocate_counts), 1 sink, recent window
        res["pipeline"] = compact_kv([(k, v) for k, v in kv], {i: qf for i, (qf, _) in enumerate(fit)}, 0.1,
                                     scale=scale, copy_targets=targets).layers

    (k0, v0), (q0, _) = kv[0], fit[0]  # one layer of each, untimed: first calls pay one-time costs
    compact_layer(k0, v0, q0, 0.1, "highest_attention", scale=scale, logical_length=T)
    torch_loop_compact(k0, v0, q0, t, {})
    times = interleaved({"ours": ours, "loop": loop, "pipeline": pipeline}, rounds, 1, warmup=False)
    errs = {}
    for name in ("ours", "loop", "pipeline"):
        m = [attention_match_metrics(k, v, layer, qh, scale=scale)["rel_error"]
             for (k, v), (_, qh), layer in zip(kv, fit, res[name])]
        errs[name] = sum(m) / len(m)
    return T, t, times, errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and rounds (about 2 minutes)")
    ap.add_argument("--sections", default="attention,prefill,compaction,decode")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--context", type=int, default=2048, help="context tokens of the prefill/compaction sections")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    a = ap.parse_args(argv)
    sections = a.sections.split(",")
    rounds = a.rounds or (2 if a.quick else 3)
    lines = [f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}", ""]
    if "attention" in sections:
        print("attention (ours = cdlm_fast.attention with lse; sdpa = SDPA with a materialised float mask)")
        rows = attention_rows(rounds, a.quick)
        lines += ["| heads | dtype | case | cdlm_fast.attention (+lse) | SDPA + float mask in q's dtype | ratio "
                  "| SDPA + float32 mask (beta exact) | ratio |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {m} | {dt} | {c} | {1e3 * o:.2f} ms | {1e3 * s:.2f} ms | {s / o:.2f} | "
                  + ("same | same |" if s32 is None else f"{1e3 * s32:.2f} ms | {s32 / o:.2f} |")
                  for m, dt, c, o, s, s32 in rows]
        lines.append("")
    if {"prefill", "compaction", "decode"} & set(sections):
        model, tok, context_ids = load()
        from cdlm_fast.demo import read_text
        ids = context_ids(tok, read_text(None), 512 if a.quick else a.context)
        if {"prefill", "compaction"} & set(sections):
            n, t, (kv, queries, _) = prefill_rows(model, tok, ids, 1 if a.quick else 2)
            msg = (f"repeat-prefill with query capture, {n} tokens: {t['ours']:.2f} s; plain SDPA prefill of the "
                   f"same tokens: {t['sdpa']:.2f} s (ratio {t['ours'] / t['sdpa']:.2f}x)")
            print(msg, flush=True)
            lines += [f"- {msg}"]
            if "compaction" in sections:
                T, kept, times, errs = compaction_rows(model, kv, queries, 1 if a.quick else 2)
                msg = (f"compaction, highest attention {T} -> {kept} keys ({T / kept:.1f}x), "
                       f"{len(kv)} layers: cdlm_fast {times['ours']:.2f} s (held-out rel. error "
                       f"{errs['ours']:.4f}); per-head PyTorch algorithm {times['loop']:.2f} s "
                       f"(rel. error {errs['loop']:.4f}); speed-up {times['loop'] / times['ours']:.2f}x; the default "
                       f"pipeline (compact_kv: mixed budgets, sinks and recent window) {times['pipeline']:.2f} s "
                       f"(rel. error {errs['pipeline']:.4f})")
                print(msg, flush=True)
                lines += [f"- {msg}"]
        if "decode" in sections:
            from cdlm_fast.demo import block_decode

            dec = block_decode(model, tok, "Once upon a time,", max_new_tokens=32 if a.quick else 64, block_size=16)
            base = dec["baselines"]
            msg = (f"decode step (block 16, SmolLM2): CDLM with block KV cache {dec['time_per_step_ms']:.1f} ms; "
                   f"block-causal without cache {base['block-causal, no cache']['time_per_step_ms']:.1f} ms; "
                   f"vanilla full recompute {base['vanilla full recompute']['time_per_step_ms']:.1f} ms")
            print(msg, flush=True)
            lines += [f"- {msg}"]
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
