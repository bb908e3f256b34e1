"""Runs kvpress presses on given token ids and prints continuation NLLs (JSON).

Executed by ``bench/bench_quality.py`` with the Python of a separate virtual environment that
holds ``kvpress==0.5.5`` (it pins ``transformers<5.3``, which this package does not support),
so it imports neither ``cdlm_fast`` nor anything but torch, transformers and kvpress.

Usage: ``python kvpress_runner.py JOB.json OUT.json``. The job holds ``gguf_dir``, ``gguf_file``,
``ratios`` (compression ``T / t``), ``presses`` (names, see :data:`PRESSES`) and ``texts``: a list
of ``{"name", "context": [ids], "continuation": [ids], "target_mask": [bools] or null}``. The
output maps ``text -> press -> ratio -> {"nll", "seconds"}`` (or ``{"error": ...}``).
"""
import json
import sys
import time

import torch

# name -> (constructor taking the kvpress compression ratio, attention implementation it needs[, keywords])
PRESSES = {
    "SnapKV": ("SnapKVPress", "sdpa"),
    "ExpectedAttention": ("ExpectedAttentionPress", "sdpa"),
    "ObservedAttention": ("ObservedAttentionPress", "eager"),
    "TOVA": ("TOVAPress", "sdpa"),
    "Knorm": ("KnormPress", "sdpa"),
    "StreamingLLM": ("StreamingLLMPress", "sdpa"),
    "KVzip": ("KVzipPress", "sdpa"),
    "KVzip+": ("KVzipPress", "sdpa", {"kvzip_plus_normalization": True}),
    "CriticalAdaKV(ExpectedAttention)": ("CriticalAdaKVPress:ExpectedAttentionPress", "sdpa"),
    "CriticalKV(ExpectedAttention)": ("CriticalKVPress:ExpectedAttentionPress", "sdpa"),
    "AdaKV(ExpectedAttention)": ("AdaKVPress:ExpectedAttentionPress", "sdpa"),
    "ChunkKV(SnapKV)": ("ChunkKVPress:SnapKVPress", "sdpa"),
    "Merging(ExpectedAttention)": ("MergingPress:ExpectedAttentionPress", "sdpa"),
}


def make_press(name: str, compression: float):
    import kvpress

    spec, _, *rest = PRESSES[name]
    extra = rest[0] if rest else {}
    if ":" in spec:
        outer, inner = spec.split(":")
        return getattr(kvpress, outer)(press=getattr(kvpress, inner)(compression_ratio=compression))
    return getattr(kvpress, spec)(compression_ratio=compression, **extra)


@torch.no_grad()
def nll_after(model, cache, T: int, cont: torch.Tensor, mask) -> float:
    pos = torch.arange(T, T + cont.shape[1])[None]
    logits = model(input_ids=cont, past_key_values=cache, position_ids=pos, use_cache=True).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, cont[:, 1:, None])[..., 0]
    if mask is None:
        return float(nll.mean())
    return float(nll[torch.tensor([mask])[:, 1:]].mean())


def main(job_path: str, out_path: str) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    job = json.load(open(job_path))
    tok = AutoTokenizer.from_pretrained(job["gguf_dir"], gguf_file=job["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(job["gguf_dir"], gguf_file=job["gguf_file"],
                                                 dtype=torch.float32).eval()
    import kvpress.presses.kvzip_press as kz  # KVzip reloads the tokenizer by name: hand it ours

    kz.AutoTokenizer = type("_Tok", (), {"from_pretrained": staticmethod(lambda *a, **k: tok)})
    out = {"kvpress": __import__("kvpress").__version__ if hasattr(__import__("kvpress"), "__version__") else "0.5.5",
           "transformers": __import__("transformers").__version__, "results": {}}
    for text in job["texts"]:
        ctx = torch.tensor([text["context"]])
        cont = torch.tensor([text["continuation"]])
        res = out["results"].setdefault(text["name"], {})
        for name in job["presses"]:
            impl = PRESSES[name][1]
            model.set_attn_implementation(impl)
            for r in job["ratios"]:
                try:
                    press = make_press(name, 1.0 - 1.0 / float(r))
                    cache = DynamicCache()
                    t0 = time.perf_counter()
                    with press(model):
                        model.model(input_ids=ctx, past_key_values=cache)
                    dt = time.perf_counter() - t0
                    model.set_attn_implementation("sdpa")
                    res.setdefault(name, {})[str(r)] = {
                        "nll": nll_after(model, cache, ctx.shape[1], cont, text.get("target_mask")), "seconds": dt}
                except Exception as e:  # noqa: BLE001 - one failing press must not stop the others
                    res.setdefault(name, {})[str(r)] = {"error": f"{type(e).__name__}: {e}"[:300]}
                model.set_attn_implementation(impl)
                print(text["name"], name, r, res[name][str(r)], file=sys.stderr, flush=True)
                json.dump(out, open(out_path, "w"), indent=1)
    json.dump(out, open(out_path, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
