"""The ``cdlm-fast`` / ``python -m cdlm_fast`` command line.

Subcommands: ``env``, ``selfcheck``, ``bench``, ``compact``, ``generate`` and ``demo`` (the
default). Every subcommand takes ``--json`` (machine-readable output on stdout) and
``--quiet``; a bad argument prints one line to stderr and exits with status 2, a failed
check exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command-line argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def _prepare_runtime() -> None:
    """On a machine without a GPU, run the Triton kernels in the Triton interpreter."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _emit(args, payload, text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif not args.quiet:
        print(text)


def cmd_env(args) -> int:
    from .env import format_info, info

    data = info()
    _emit(args, data, format_info(data))
    return EXIT_OK


def cmd_selfcheck(args) -> int:
    from .selfcheck import format_results, run_selfcheck

    results = run_selfcheck()
    failed = [r for r in results if r.passed is False]
    _emit(args, {"results": [r.as_dict() for r in results], "failed": len(failed)},
          format_results(results) + f"\n\n{len(results) - len(failed)} ok or skipped, {len(failed)} failed")
    return EXIT_FAIL if failed else EXIT_OK


def cmd_main_job(args) -> int:
    """The default job: environment report plus a self-check of every available backend."""
    from .env import format_info, info
    from .selfcheck import format_results, run_selfcheck

    data = info()
    results = run_selfcheck()
    failed = [r for r in results if r.passed is False]
    if args.json:
        print(json.dumps({"env": data, "selfcheck": [r.as_dict() for r in results], "failed": len(failed)},
                         indent=2, default=str))
    elif not args.quiet:
        print(format_info(data))
        print()
        print(format_results(results))
        print(f"\nself-check: {len(results) - len(failed)} ok or skipped, {len(failed)} failed")
    return EXIT_FAIL if failed else EXIT_OK


def cmd_bench(args) -> int:
    import pathlib

    from . import bench_report as br

    suites = br.SUITES if args.suite == "all" else (args.suite,)
    out_dir = pathlib.Path(args.out) if args.out else br.bench_dir() / "results"
    report = {}
    for suite in suites:
        path = br.run_suite(suite, quick=args.quick, out_dir=out_dir, quiet=args.quiet or args.json)
        loaded = br.load_rows(path)
        rows = br.summarise(loaded["rows"], loaded["meta"].get("peaks"))
        png = br.plot(rows, path.with_suffix(".png"), f"{suite} on {loaded['meta'].get('device', '?')}")
        report[suite] = {"json": str(path), "png": None if png is None else str(png), "meta": loaded["meta"],
                         "rows": rows}
        if not args.json and not args.quiet:
            meta = loaded["meta"]
            peaks = meta.get("peaks") or {}
            print(f"\n== {suite} on {meta.get('device', '?')} (torch {meta.get('torch')}, triton {meta.get('triton')}"
                  + (", Triton interpreter" if meta.get("triton_interpreter") else "") + ")")
            if peaks:
                print(f"   measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul "
                      f"{peaks['bf16_matmul_tflops']:.0f} TFLOP/s")
            print(br.format_table(rows))
            print(f"   results: {path}" + (f"\n   plot:    {png}" if png else ""))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser = _Parser(prog="cdlm-fast", description="cdlm_fast: kernels for CDLM decoding and KV compaction",
                     parents=[common])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("env", parents=[common], help="versions, device and available backends per op")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("selfcheck", parents=[common], help="check every available backend against the reference")
    p.set_defaults(fn=cmd_selfcheck)
    p = sub.add_parser("bench", parents=[common], help="run the latency suites against their peers")
    p.add_argument("suite", nargs="?", default="all", choices=("attention", "solvers", "compaction", "decode", "all"))
    p.add_argument("--quick", action="store_true", help="small shapes (the default without a GPU)")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default bench/results)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("check", parents=[common], help="env report + self-check (the default job)")
    p.set_defaults(fn=cmd_main_job)
    parser.set_defaults(fn=cmd_main_job)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _prepare_runtime()
        return int(args.fn(args) or 0)
    except UsageError as e:
        print(f"cdlm-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"cdlm-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
