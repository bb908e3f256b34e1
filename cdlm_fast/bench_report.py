"""Run the pytest-benchmark suites under ``bench/`` and summarise them.

``cdlm-fast bench [attention|solvers|compaction|decode|all] [--quick]`` runs each suite in a
subprocess (``pytest bench/bench_<suite>.py --benchmark-only --benchmark-json=...``), then
prints one table row per (case, implementation): median time, the ratio to our fastest
backend in the same case, TFLOP/s and GB/s and, on a GPU, their fraction of the device's
measured peaks; it also writes a PNG plot of latency against size per implementation.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import re
import subprocess
import sys
from collections import defaultdict
from typing import Dict, List, Optional

SUITES = ("attention", "solvers", "compaction", "decode")


def bench_dir() -> pathlib.Path:
    """The ``bench/`` folder of the source tree (the suites are not part of the wheel)."""
    here = pathlib.Path(__file__).resolve().parent.parent / "bench"
    if not (here / "conftest.py").exists():
        raise FileNotFoundError("the benchmark suites ship with the source tree (bench/); install cdlm_fast "
                                "from a checkout with `pip install -e .` to run them")
    return here


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def run_suite(suite: str, *, quick: bool, out_dir: pathlib.Path, quiet: bool = False,
              extra_args: Optional[List[str]] = None) -> pathlib.Path:
    """Run one suite; returns the path of its pytest-benchmark JSON. Raises on failure."""
    import torch

    path = bench_dir() / f"bench_{suite}.py"
    if not path.exists():
        raise FileNotFoundError(f"no benchmark suite {suite!r} ({path.name} is missing)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{_slug(device)}-{suite}{'-quick' if quick else ''}-{stamp}.json"
    env = dict(os.environ)
    if quick:
        env["CDLM_FAST_BENCH_QUICK"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(path), "--benchmark-only", f"--benchmark-json={json_path}",
           "-q", "-p", "no:cacheprovider", "--rootdir", str(bench_dir())] + list(extra_args or [])
    proc = subprocess.run(cmd, env=env, cwd=str(bench_dir().parent),
                          stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not json_path.exists():
        raise RuntimeError(f"benchmark suite {suite!r} failed (pytest exit {proc.returncode}); "
                           f"rerun: {' '.join(cmd)}")
    return json_path


def load_rows(json_path: pathlib.Path) -> Dict[str, object]:
    """Rows (one per benchmark) and run metadata from a pytest-benchmark JSON."""
    data = json.loads(pathlib.Path(json_path).read_text())
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        info.setdefault("case", b.get("group") or b["name"])
        info.setdefault("impl", b["name"])
        info.setdefault("ours", info["impl"].startswith("cdlm_fast"))
        info.setdefault("median_ms", b["stats"]["median"] * 1e3)
        rows.append(info)
    return {"rows": rows, "meta": data.get("cdlm_fast", {}), "path": str(json_path)}


def summarise(rows: List[dict], peaks: Optional[dict] = None) -> List[dict]:
    """Add ``vs_ours`` (median / our best median in the case) and peak fractions."""
    peaks = peaks or {}
    best: Dict[str, float] = {}
    for r in rows:
        if r.get("ours"):
            best[r["case"]] = min(best.get(r["case"], float("inf")), r["median_ms"])
    out = []
    for r in rows:
        r = dict(r)
        if r["case"] in best:
            r["vs_ours"] = r["median_ms"] / best[r["case"]]
        if peaks.get("bf16_matmul_tflops") and r.get("tflops"):
            r["tflops_frac"] = r["tflops"] / peaks["bf16_matmul_tflops"]
        if peaks.get("copy_gbps") and r.get("gbps"):
            r["gbps_frac"] = r["gbps"] / peaks["copy_gbps"]
        out.append(r)
    return out


def format_table(rows: List[dict]) -> str:
    head = f"{'case':<44}{'impl':<22}{'median ms':>11}{'x ours':>9}{'TFLOP/s':>10}{'GB/s':>10}"
    lines = [head, "-" * len(head)]
    last = None
    for r in sorted(rows, key=lambda r: (r["case"], r["median_ms"])):
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        tf = "" if r.get("tflops") is None else f"{r['tflops']:.1f}" + (
            f" ({100 * r['tflops_frac']:.0f}%)" if "tflops_frac" in r else "")
        gb = "" if r.get("gbps") is None else f"{r['gbps']:.0f}" + (
            f" ({100 * r['gbps_frac']:.0f}%)" if "gbps_frac" in r else "")
        ratio = "" if "vs_ours" not in r else f"{r['vs_ours']:.2f}"
        lines.append(f"{case[:43]:<44}{str(r['impl'])[:21]:<22}{r['median_ms']:>11.3f}{ratio:>9}{tf:>10}{gb:>10}")
    return "\n".join(lines)


def plot_quality(rows: List[dict], png_path: pathlib.Path, title: str) -> Optional[pathlib.Path]:
    """Compaction quality (held-out attention error) against the ratio, per implementation."""
    series = defaultdict(list)
    for r in rows:
        if r.get("ratio") is not None and r.get("heldout_rel_error") is not None:
            series[r["impl"]].append((r["ratio"], r["heldout_rel_error"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for impl, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio T/t")
    ax.set_ylabel("held-out attention output rel. error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot(rows: List[dict], png_path: pathlib.Path, title: str) -> Optional[pathlib.Path]:
    """Latency against size (``x``) per implementation, one panel per op; ``None`` if nothing to plot."""
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("x") is not None and r.get("x_name") != "ratio":
            key = (r.get("op", "op"), r.get("x_name", "size"))
            series[key][r["impl"]].append((r["x"], r["median_ms"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.2), squeeze=False)
    for ax, ((op, x_name), impls) in zip(axes[0], sorted(series.items())):
        for impl, pts in sorted(impls.items()):
            agg = defaultdict(list)
            for x, y in pts:
                agg[x].append(y)
            xs = sorted(agg)
            ax.plot(xs, [min(agg[x]) for x in xs], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_name or "size")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
