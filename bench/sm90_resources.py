"""Ahead-of-time compile of the Triton kernels' launch configs for sm_90, on any machine.

    TRITON_INTERPRET=0 python bench/sm90_resources.py [--json]

No GPU needed: ``triton.compile`` targets ``GPUTarget("cuda", 90, 32)`` and ``ptxas -v`` (Triton's
own) reports registers and spills of the PTX. For each config the kernels launch without
autotuning (the defaults and the ``exp_gram`` tiles) it prints the shared memory per block
(``metadata.shared``), registers per thread and spill bytes, against the H100/H200 limits
(227 KiB of shared memory per block, 255 registers per thread). ``tests/test_sm90_resources.py``
asserts that every config fits and does not spill (but for the spills in ``ALLOWED_SPILL``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET=0: the interpreter has no compiler")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SM90_SMEM_LIMIT = 227 * 1024
# spills accepted with a reason (bytes): float32 tf32x3 scores keep the loop-invariant key slices
# in registers; 68 B (Triton 3.6) / 12 B (3.8) measured for the tiles chosen (kernels/gram.py, _blocks)
ALLOWED_SPILL = {"exp_gram G float32 hd": 128}


def allowed_spill(name: str) -> int:
    return max((v for k, v in ALLOWED_SPILL.items() if name.startswith(k)), default=0)
TARGET = GPUTarget("cuda", 90, 32)
_TY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def ptxas_path() -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return here if os.path.exists(here) else "ptxas"


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, ones=(),
                 not_div16=()) -> dict:
    """Compile ``fn`` for sm_90; ``{"shared", "regs", "spill_bytes"}``.

    Specialised as a launch on contiguous tensors is: integer arguments in ``ones`` (unit
    strides) become the constant 1, every pointer and every other integer argument but those in
    ``not_div16`` is known to be a multiple of 16 (Triton's launch-time specialisation).
    """
    sig = dict(signature)
    constexprs = dict(constexprs)
    for name in ones:
        constexprs[name] = 1
    for name in constexprs:
        sig[name] = "constexpr"
    dns = set(getattr(fn, "do_not_specialize", ()) or ())
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items()
             if ty != "constexpr" and ty != "fp32" and name not in not_div16 and name not in dns}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        rep = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    text = rep.stdout + rep.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return {"shared": int(k.metadata.shared), "regs": int(regs.group(1)) if regs else None,
            "spill_bytes": max(spills) if spills else 0}


def _ptrs(names, ty):
    return {n: f"*{ty}" for n in names}


def _ints(names):
    return {n: "i32" for n in names}


def exp_gram_configs():
    """The tiles ``exp_gram_triton`` launches, per input dtype and head dim."""
    import torch
    from kernels.gram import _blocks, _exp_gram_kernel, _exp_rhs_kernel, _supports
    out = []
    for dtype in ("float32", "bfloat16"):
        for D in (64, 128, 256):
            if _supports(Q=torch.empty(1, 1, D, dtype=getattr(torch, dtype))) is not None:
                continue  # refused: auto falls back to another backend
            t, n, e = 512, 4096, 128
            bt, bn, bd, bk, be, warps, stages = _blocks(t, n, D, e, dtype == "float32", interpreted=False)
            prec = "tf32x3" if dtype == "float32" else None
            common = dict(HAS_BETA=True, BT=bt, BN=bn, BD=bd, BK=bk, QK_PREC=prec, G_PREC="tf32x3")
            ty = _TY[dtype]
            strides = _ints(["sqp", "sqn", "sqd", "scp", "sct", "scd", "sbp", "sbt", "ssp", "ssn"])
            sig = {**_ptrs(["Q", "C"], ty), **_ptrs(["BETA", "SHIFT", "G"], "fp32"), **_ints(["n", "t", "D"]),
                   "qk_scale": "fp32", **strides, **_ints(["sgp", "sgi", "sgj"])}
            ones = ("sqd", "scd", "sbt", "ssn")
            loose = ("n", "t", "sbp", "ssp", "sgp", "sgi")
            out.append((f"exp_gram G {dtype} hd{D} BT{bt} BN{bn} BK{bk} w{warps} s{stages}", _exp_gram_kernel, sig, common,
                        warps, stages, ones + ("sgj",), loose))
            sig_r = {**_ptrs(["Q", "C"], ty), **_ptrs(["BETA", "SHIFT", "Y", "R"], "fp32"),
                     **_ints(["n", "t", "D", "e"]), "qk_scale": "fp32", **strides,
                     **_ints(["syp", "syn", "sye", "srp", "srt", "sre"])}
            out.append((f"exp_gram R {dtype} hd{D} BT{bt} BN{bn} BK{bk} BE{be} w{warps} s{stages}", _exp_rhs_kernel, sig_r,
                        dict(common, HAS_Y=True, BE=be), warps, stages, ones + ("sye", "sre"),
                        loose + ("e", "syp", "syn", "srp", "srt")))
    return out


# contiguous [B, H, L, D] tensors: unit last-dim strides; bias [B, Hkv, Lk] and lse [B, Hq, Lq]
# strides follow Lk / Lq, not known to be multiples of 16
ATTN_ONES = ("sqd", "skd", "svd", "sbn", "sod", "slm")
ATTN_LOOSE = ("sbb", "sbh", "slb", "slh")


def decode_configs_sm90():
    """The configs the decode kernel launches without autotuning (``candidate_configs`` of one)."""
    from kernels.attention_decode import _decode_kernel, candidate_configs, decode_block_m
    fn = _decode_kernel.fn
    strides = ["sqb", "sqh", "sqm", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd", "sbb", "sbh",
               "sbn", "sob", "soh", "som", "sod", "slb", "slh", "slm"]
    out = []
    for D in (64, 128, 256):
        for rows in (4, 32, 128):
            block_m = decode_block_m(rows, D)
            for cfg in candidate_configs(D, block_m, False, 1024, True):
                ty = "bf16"
                sig = {**_ptrs(["Q", "K", "V", "Out"], ty), **_ptrs(["Bias", "Lse", "OPart", "LPart"], "fp32"),
                       **_ptrs(["Prefix", "KvLens"], "i32"), **_ints(strides),
                       **_ints(["Hkv", "G", "Lq", "Lk", "q_offset", "block_size"]), "qk_scale": "fp32",
                       **_ints(["chunk", "num_splits", "LK_KEY"])}
                cx = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_BIAS=True, HAS_KVLENS=False,
                          HAS_BLOCK=True, IS_FP32=False, DIRECT=False, BLOCK_M=block_m, **cfg.kwargs)
                out.append((f"decode bf16 hd{D} rows{rows} BM{block_m} BN{cfg.kwargs['BLOCK_N']} "
                            f"w{cfg.num_warps} s{cfg.num_stages}", fn, sig, cx, cfg.num_warps, cfg.num_stages,
                            ATTN_ONES, ATTN_LOOSE))
    return out


def prefill_configs_sm90():
    from kernels.attention_prefill import _prefill_kernel, default_config
    fn = _prefill_kernel.fn
    strides = ["sqb", "sqh", "sqm", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd", "sbb", "sbh",
               "sbn", "sob", "soh", "som", "sod", "slb", "slh", "slm"]
    out = []
    for D in (64, 128, 256):
        cfg = default_config(D, True)
        sig = {**_ptrs(["Q", "K", "V", "Out"], "bf16"), **_ptrs(["Bias", "Lse"], "fp32"),
               **_ptrs(["Prefix", "KvLens"], "i32"), **_ints(strides),
               **_ints(["Hq", "G", "Lq", "Lk", "q_offset", "block_size"]), "qk_scale": "fp32",
               **_ints(["LQ_KEY", "LK_KEY"])}
        cx = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_BIAS=True, HAS_KVLENS=False,
                  HAS_BLOCK=True, IS_FP32=False, **cfg.kwargs)
        out.append((f"prefill bf16 hd{D} BM{cfg.kwargs['BLOCK_M']} BN{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} "
                    f"s{cfg.num_stages}", fn, sig, cx, cfg.num_warps, cfg.num_stages, ATTN_ONES, ATTN_LOOSE))
    return out


GROUPS = {"exp_gram": exp_gram_configs, "decode": decode_configs_sm90, "prefill": prefill_configs_sm90}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--match", action="append", default=[],
                    help="only configs whose name contains this text (repeatable: any of them)")
    ap.add_argument("groups", nargs="*", help="kernel groups (default: all of " + ", ".join(GROUPS) + ")")
    args = ap.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    rows = []
    for g in args.groups or list(GROUPS):
        for name, fn, sig, cx, warps, stages, ones, loose in GROUPS[g]():
            if args.match and not any(m in name for m in args.match):
                continue
            try:
                r = compile_sm90(fn, sig, cx, warps, stages, ones, loose)
            except Exception as e:
                r = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
            r["config"] = name
            r["fits"] = "error" not in r and r["shared"] <= SM90_SMEM_LIMIT and r["spill_bytes"] <= allowed_spill(name)
            rows.append(r)
            if not args.json:
                print(f"{name:58s} " + (r.get("error") or f"smem {r['shared'] / 1024:6.1f} KiB  regs {r['regs']:>3}  "
                                        f"spill {r['spill_bytes']:>4} B  {'ok' if r['fits'] else 'DOES NOT FIT'}"),
                      flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
