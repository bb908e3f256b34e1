"""pytest-benchmark configuration: record versions, device, measured peaks and the commit.

Run ``pytest bench/ --benchmark-only`` (GPU shapes on a GPU, small shapes on the CPU or with
``CDLM_FAST_BENCH_QUICK=1``), or ``cdlm-fast bench`` for a table and a plot.
"""
import os
import subprocess

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _common import DEVICE, QUICK, device_name, measure_peaks  # noqa: E402


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except Exception:
        return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import triton

    output_json["cdlm_fast"] = {
        "device": device_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "quick": QUICK,
        "commit": _git_commit(),
        "peaks": measure_peaks() if DEVICE.type == "cuda" else {},
    }
