"""The GPU run script (bench/gpu_run.sh) in its CPU dry run, and its per-test time box.

The dry run executes every stage of the one GPU call here (Triton interpreter, tiny shapes,
build and sanitizer skipped), so the script itself cannot carry a bug into that call.
"""
import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-run")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    return r, out


def test_dry_run_every_stage_succeeds(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = {}
    for line in (out / "summary.txt").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and (parts[1].isdigit() or parts[1] == "skip"):
            stages[parts[0]] = parts[1]
    expected = {"preflight", "build", "test_attention_triton", "test_gram_triton", "test_student",
                "test_cuda_extension", "test_attention_cuda", "test_gram_cuda", "test_solvers", "headline",
                "sanitizer"}
    assert set(stages) == expected, stages
    assert stages["build"] == "skip" and stages["sanitizer"] == "skip"
    failed = {k: v for k, v in stages.items() if v not in ("0", "skip")}
    assert not failed, (failed, {k: (out / f"{k}.log").read_text()[-2000:] for k in failed})
    for stage in expected - {"build", "sanitizer"}:
        assert (out / f"{stage}.log").stat().st_size > 0


def test_dry_run_junit_per_test_file(dry_run):
    _, out = dry_run
    xmls = sorted(out.glob("test_*.xml"))
    assert [x.stem for x in xmls] == ["test_attention_cuda", "test_attention_triton", "test_cuda_extension",
                                      "test_gram_cuda", "test_gram_triton", "test_solvers", "test_student"]
    ran = 0
    for x in xmls:
        root = ET.parse(x).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, x.name
        ran += int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= 4  # the selections really ran tests, not only skips


def test_dry_run_headline_json(dry_run):
    _, out = dry_run
    data = json.loads((out / "headline.json").read_text())
    meta = data["meta"]
    assert meta["dry_run"] is True and meta["torch"] and meta["triton"] and "device" in meta
    assert data["finished"] is True and data["peaks"]["copy_gbps"] > 0
    names = [c["case"] for c in data["cases"]]
    for prefix in ("peaks", "attention/prefill", "attention/decode", "fit/", "compaction/", "denoise/"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    for case in data["cases"]:
        assert "error" not in case and "skipped" not in case, case
    decode = next(c for c in data["cases"] if c["case"].startswith("attention/decode"))
    impls = {r["impl"] for r in decode["rows"]}
    assert {"cdlm_fast/triton", "sdpa+float-mask", "flex_attention"} <= impls
    for r in decode["rows"]:
        assert r.get("ms", 0) > 0 and "error" not in r, r
    ours = next(r for r in decode["rows"] if r["impl"] == "cdlm_fast/triton")
    assert ours["host_us_per_call"] > 0 and ours["x_vs_our_best"] == 1.0
    fit = next(c for c in data["cases"] if c["case"].startswith("fit/"))
    ops = {(r["op"], r["impl"]) for r in fit["rows"]}
    assert ("exp_gram", "cdlm_fast/triton") in ops and ("nnls", "cdlm_fast/triton") in ops
    assert any("scipy" in impl and op == "nnls" for op, impl in ops)
    assert all(r.get("extrapolated") for r in fit["rows"] if "scipy" in r["impl"])
    assert data["exp_gram_auto_order"]["measured_fastest_first"]
    named = [p for p in out.glob("*-dryrun.json")]
    assert len(named) == 1 and json.loads(named[0].read_text())["meta"] == meta


def test_time_box_fails_a_slow_test_and_the_next_runs(tmp_path):
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(30)\n\ndef test_next():\n    assert True\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_time_box",
                        "--time-box=1", str(tmp_path / "test_slow.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert "exceeded its time box of 1 s" in r.stdout and "1 failed, 1 passed" in r.stdout, r.stdout
