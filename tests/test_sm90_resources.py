"""Ahead-of-time compile of the Triton kernels for sm_90 (H100/H200) on the CPU: the configs
launched without autotuning must fit the 227 KiB of shared memory per block and not spill
registers. Compiled with Triton's own ptxas; no GPU needed (``bench/sm90_resources.py``)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
triton = pytest.importorskip("triton")

# one representative per fixed defect (each compile takes seconds on a CPU)
CHECKED = [
    "exp_gram G float32 hd128",  # was 262 KB of shared memory and a 2 KB spill (64 x 64, 4 warps, 3 stages)
    "exp_gram R float32 hd128",
    "exp_gram G float32 hd64",
    "exp_gram G bfloat16 hd128",
    "decode bf16 hd128 rows4 ",  # Lq = 1 with GQA 4 (128 registers, no spill)
    "decode bf16 hd256 rows128 ",  # spilled 120 B on 4 warps
    "prefill bf16 hd256 ",  # spilled 32 B on 4 warps
]


def test_triton_launch_configs_fit_sm90():
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0")
    args = [a for m in CHECKED for a in ("--match", m)]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_resources.py"), "--json", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1200)
    rows = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else []
    assert len(rows) == len(CHECKED), r.stderr[-3000:]
    bad = [row for row in rows if not row["fits"]]
    assert not bad, bad
    assert r.returncode == 0
