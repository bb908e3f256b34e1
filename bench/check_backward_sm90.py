"""Compile the Triton attention backward kernels ahead of time for sm_90 (no GPU needed) and report
shared memory, registers and spills from ``ptxas -v`` for the configs of ``block_config``.

    python bench/check_backward_sm90.py        # exit status 1 if any config spills registers
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kernels import attention_backward as AB  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CASES = [("fp16", 64), ("fp16", 128), ("bf16", 64), ("bf16", 128), ("bf16", 256), ("fp32", 64), ("fp32", 128)]


def _signature(kernel, dt, consts):
    pointers = {"Bias": "*fp32", "Prefix": "*i32", "KvLens": "*i32", "Lse": "*fp32", "Delta": "*fp32", "DB": "*fp32"}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ("Q", "K", "V", "DO", "DQ", "DK", "DV"):
            sig[name] = "*" + dt
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    spilled = False
    for dt, d in CASES:
        bm, bn, warps, stages = AB.block_config(d, DTYPES[dt])
        consts = dict(HEAD_DIM=d, BLOCK_D=d, HAS_BIAS=True, HAS_KVLENS=True, HAS_BLOCK=True, IS_FP32=dt == "fp32",
                      BLOCK_M=bm, BLOCK_N=bn)
        for kernel in (AB._bwd_dq_kernel, AB._bwd_dkv_kernel):
            src = ASTSource(fn=kernel, signature=_signature(kernel, dt, consts),
                            constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(compiled.asm["ptx"])
            info = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                  capture_output=True, text=True).stderr
            os.unlink(f.name)
            lines = " | ".join(l.split(":", 1)[-1].strip() for l in info.splitlines() if "registers" in l or "spill" in l)
            spilled |= " 0 bytes spill stores" not in info
            print(f"{dt} hd{d} {kernel.fn.__name__} tiles {bm}x{bn} warps {warps} stages {stages} "
                  f"smem {compiled.metadata.shared} B: {lines}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
