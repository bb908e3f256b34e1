"""Block-causal student: cached forward vs an independent dense oracle.

The oracle is the Hugging Face model itself, in float64 with the eager attention, fed the
whole sequence with a custom 4D additive mask (block-causal + left padding) and per-sample
position ids. The student runs its own forward in float32 with the block KV cache; at every
denoising step its logits must match the oracle's.
"""
import types

import pytest
import torch

from cdlm_fast.backends import op
from cdlm_fast.decode import generate
from cdlm_fast.reference.attention import visible_mask
from cdlm_fast.student import BlockCausalStudent, default_token_settings

transformers = pytest.importorskip("transformers")
from tiny_models import EOS_ID, MASK_ID, VOCAB, prompts, tiny_model  # noqa: E402,F401

TOL = 2e-5


def oracle_logits(model64, seq, prompt_mask, block_size, extra_hidden=None):
    """Float64 logits [B, L, V] of the HF model on ``seq`` under the block-causal mask.

    ``extra_hidden(i, j) -> bool [B, L, L]`` marks additional invisible (query, key) pairs.
    """
    b, total = seq.shape
    p = prompt_mask.shape[1]
    vis = visible_mask(torch.full((b,), p), block_size, 0, total, total)
    key_ok = torch.cat([prompt_mask.bool(), torch.ones(b, total - p, dtype=torch.bool)], dim=1)
    vis = vis & key_ok[:, None, :]
    if extra_hidden is not None:
        vis = vis & ~extra_hidden
    add = torch.zeros(b, 1, total, total, dtype=torch.float64).masked_fill(~vis[:, None], float("-inf"))
    m = prompt_mask.long()
    pos = torch.cat([(m.cumsum(1) - 1).clamp(min=0),
                     m.sum(1, keepdim=True) + torch.arange(total - p).view(1, -1)], dim=1)
    with torch.no_grad():
        return model64(seq, attention_mask=add, position_ids=pos).logits


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def collect_steps(student, ids, mask, n_new, block_size, threshold, **kw):
    """Run :func:`generate` and record (block, step, tokens, logits) at every step."""
    rec = []

    def hook(bi, step, x, logits):
        rec.append((bi, step, x.clone(), logits.clone()))

    out = generate(student, ids, n_new, block_size=block_size, threshold=threshold, attention_mask=mask,
                   logits_hook=hook, stop_at_eos=False, **kw)
    return out, rec


def check_steps_against_oracle(model64, student, ids, mask, rec, block_size, n_new):
    shift = 1 if student.shifted else 0
    p = ids.shape[1]
    assert rec, "no steps recorded"
    for bi, step, x, logits in rec:
        s, e = bi * block_size, min((bi + 1) * block_size, n_new)
        seq = torch.cat([ids, x[:, :e]], dim=1)
        ref = oracle_logits(model64, seq, mask, block_size)[:, p + s - shift: p + e - shift]
        assert torch.isfinite(logits).all(), f"non-finite logits at block {bi} step {step}"
        err = rel(logits, ref)
        assert err < TOL, f"block {bi} step {step}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("fuse_commit", [True, False])
def test_cached_logits_match_full_recompute_every_step(kind, fuse_commit):
    model, model64 = tiny_model(kind)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, backend="torch")
    assert student.shifted == (kind != "llama")  # Dream default for Qwen, LLaDA for Llama
    ids, mask = prompts([7, 4])
    bs, n_new = 4, 11  # the last block is shorter than block_size
    out, rec = collect_steps(student, ids, mask, n_new, bs, threshold=0.3, fuse_commit=fuse_commit)
    assert len(rec) == out.num_steps >= 3
    check_steps_against_oracle(model64, student, ids, mask, rec, bs, n_new)
    assert not (out.tokens == MASK_ID).any()


@pytest.mark.parametrize("alignment", ["shifted", "unshifted"])
def test_both_alignments_on_one_model(alignment):
    model, model64 = tiny_model("qwen2", seed=3)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, logits_alignment=alignment)
    ids, mask = prompts([5, 9], seed=4)
    out, rec = collect_steps(student, ids, mask, 8, 4, threshold=0.5)
    check_steps_against_oracle(model64, student, ids, mask, rec, 4, 8)


def test_block_forward_reads_no_uncommitted_slot():
    """Slots past the current block are poisoned with NaN; the logits stay exact and finite."""
    model, model64 = tiny_model("qwen2", seed=5)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([6, 3], seed=6)
    bs = 4
    cache = student.prefill(ids, mask, max_new_tokens=3 * bs, block_size=bs)
    assert cache.length == cache.prefix_len == ids.shape[1]
    assert cache.capacity >= ids.shape[1] + 3 * bs and cache.capacity % 16 == 0
    g = torch.Generator().manual_seed(7)
    blocks = [torch.randint(0, VOCAB - 2, (2, bs), generator=g) for _ in range(3)]
    for blk in blocks:
        blk[:, ::2] = MASK_ID
    done = []
    for bi, blk in enumerate(blocks):
        cache.keys[:, :, :, cache.length:] = float("nan")
        cache.values[:, :, :, cache.length:] = float("nan")
        logits = student.block_forward(cache, blk)
        seq = torch.cat([ids] + done + [blk], dim=1)
        p = ids.shape[1]
        s = bi * bs
        ref = oracle_logits(model64, seq, mask, bs)[:, p + s - 1: p + s + bs - 1]
        assert torch.isfinite(logits).all()
        assert rel(logits, ref) < TOL
        assert student.block_forward(cache, blk, commit=bs) is None
        assert cache.length == p + (bi + 1) * bs
        done.append(blk)


def test_fused_commit_equals_separate_commit():
    model, _ = tiny_model("llama", seed=8)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([5, 8], seed=9)
    bs = 4
    g = torch.Generator().manual_seed(10)
    b0 = torch.randint(0, VOCAB - 2, (2, bs), generator=g)
    b1 = torch.randint(0, VOCAB - 2, (2, bs), generator=g)
    b1[:, 1:] = MASK_ID
    c1 = student.prefill(ids, mask, max_new_tokens=2 * bs, block_size=bs)
    c2 = student.prefill(ids, mask, max_new_tokens=2 * bs, block_size=bs)
    fused = student.block_forward(c1, torch.cat([b0, b1], 1), commit=bs)
    student.block_forward(c2, b0, commit=bs, return_logits=False)
    separate = student.block_forward(c2, b1)
    assert c1.length == c2.length
    assert rel(fused, separate) < 1e-6
    p = ids.shape[1]
    assert rel(c1.keys[:, :, :, : p + 2 * bs], c2.keys[:, :, :, : p + 2 * bs]) < 1e-6


def test_sdpa_impl_matches_cdlm_attention():
    model, _ = tiny_model("qwen2", seed=11)
    ids, mask = prompts([6, 2], seed=12)
    outs = []
    for impl in ("cdlm", "sdpa"):
        student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, attn_impl=impl)
        out, rec = collect_steps(student, ids, mask, 8, 4, threshold=0.4)
        outs.append((out, torch.cat([r[3] for r in rec], dim=1)))
    assert torch.equal(outs[0][0].tokens, outs[1][0].tokens)
    assert rel(outs[1][1], outs[0][1]) < 1e-5


# ---------------------------------------------------------------- compacted prompt caches
def cache_as_prompt_cache(student, ids, mask, *, bias_zero_when_unpadded=True):
    """Export a prefilled cache in the duck-typed compacted-cache interface (t = T)."""
    cache = student.prefill(ids, mask, max_new_tokens=0, block_size=1)
    p = ids.shape[1]
    layers = []
    for i in range(student.num_layers):
        bias = cache.bias[i, :, :, :p].clone()
        if bias_zero_when_unpadded and bool(mask.bool().all()):
            bias = None
        layers.append(types.SimpleNamespace(keys=cache.keys[i, :, :, :p].clone(),
                                            values=cache.values[i, :, :, :p].clone(), bias=bias))
    lengths = mask.long().sum(1)
    logical = int(lengths[0]) if bool((lengths == lengths[0]).all()) else lengths
    return types.SimpleNamespace(layers=layers, logical_length=logical, last_logits=cache.carry_logits)


def first_block_logit_drift(student, ids, mask, prompt_cache, block_size=4, suffix=None, suffix_mask=None):
    """Relative change of the first block's first-step logits when the prompt comes from
    ``prompt_cache`` instead of a full prefill. 0 for an uncompacted cache; the Attention
    Matching tests bound it for real compacted caches."""
    rec = {}

    def grab(key):
        def hook(bi, step, x, logits):
            if bi == 0 and step == 0:
                rec[key] = logits.clone()
        return hook

    full_ids = ids if suffix is None else torch.cat([ids, suffix], 1)
    full_mask = mask if suffix is None else torch.cat([mask, suffix_mask], 1)
    generate(student, full_ids, block_size, block_size=block_size, attention_mask=full_mask,
             logits_hook=grab("full"))
    generate(student, suffix, block_size, block_size=block_size, attention_mask=suffix_mask,
             prompt_cache=prompt_cache, logits_hook=grab("cache"))
    return rel(rec["cache"], rec["full"])


@pytest.mark.parametrize("lengths", [[6, 6], [7, 3]])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_uncompacted_prompt_cache_gives_identical_results(kind, lengths):
    model, _ = tiny_model(kind, seed=13)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts(lengths, seed=14)
    pc = cache_as_prompt_cache(student, ids, mask)
    kw = dict(block_size=4, threshold=0.5)
    ref, rec_ref = collect_steps(student, ids, mask, 10, **kw)
    rec = []
    out = generate(student, None, 10, prompt_cache=pc, stop_at_eos=False,
                   logits_hook=lambda *a: rec.append(a[3].clone()), **kw)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.steps_per_block == ref.steps_per_block
    assert len(rec) == len(rec_ref)
    for a, (_, _, _, b) in zip(rec, rec_ref):
        assert torch.equal(a, b)


def test_prompt_cache_with_suffix_matches_oracle():
    """Cached context (bias zeros) + uncached question: exact against the dense oracle where
    the context's keys were computed without seeing the question."""
    model, model64 = tiny_model("qwen2", seed=15)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ctx, ctx_mask = prompts([6, 6], seed=16)
    q, q_mask = prompts([3, 2], seed=17)
    pc = cache_as_prompt_cache(student, ctx, ctx_mask)
    assert pc.layers[0].bias is None and pc.logical_length == 6
    bs, n_new = 4, 8
    rec = []
    generate(student, q, n_new, block_size=bs, threshold=0.5, attention_mask=q_mask, prompt_cache=pc,
             stop_at_eos=False, logits_hook=lambda bi, st, x, lg: rec.append((bi, x.clone(), lg.clone())))
    ids, mask = torch.cat([ctx, q], 1), torch.cat([ctx_mask, q_mask], 1)
    t, p = ctx.shape[1], ids.shape[1]
    for bi, x, logits in rec:
        s, e = bi * bs, (bi + 1) * bs
        seq = torch.cat([ids, x[:, :e]], 1)
        total = seq.shape[1]
        qi = torch.arange(total).view(1, -1, 1)
        kj = torch.arange(total).view(1, 1, -1)
        hidden = ((qi < t) & (kj >= t)).expand(2, total, total)  # the context never saw the question
        ref = oracle_logits(model64, seq, mask, bs, extra_hidden=hidden)[:, p + s - 1: p + e - 1]
        assert rel(logits, ref) < TOL


def test_first_block_logit_drift_hook_is_zero_without_compaction():
    model, _ = tiny_model("qwen2", seed=18)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([8, 8], seed=19)
    pc = cache_as_prompt_cache(student, ids, mask)
    assert first_block_logit_drift(student, ids, mask, pc) == 0.0
    # a perturbed cache (one layer's values scaled) must register as drift
    pc.layers[1].values = pc.layers[1].values * 1.5
    assert first_block_logit_drift(student, ids, mask, pc) > 1e-3


def test_compacted_cache_positions_and_bias_are_used():
    """t < T: new tokens take RoPE positions from T and the bias enters the scores."""
    model, _ = tiny_model("qwen2", seed=20)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([8, 8], seed=21)
    pc = cache_as_prompt_cache(student, ids, mask)
    q, q_mask = prompts([2, 2], seed=22)
    c1 = student.prefill(q, q_mask, max_new_tokens=4, block_size=4, prompt_cache=pc)
    assert c1.position_base.tolist() == [10, 10] and c1.prefix_len == 10
    pc.logical_length = 20
    c2 = student.prefill(q, q_mask, max_new_tokens=4, block_size=4, prompt_cache=pc)
    assert c2.position_base.tolist() == [22, 22]
    assert rel(c2.keys[:, :, :, 8:10], c1.keys[:, :, :, 8:10]) > 1e-3  # suffix keys rotated differently
    pc.logical_length = 8
    for lay in pc.layers:
        lay.bias = torch.zeros(2, 2, 8)
        lay.bias[:, :, :3] = float("-inf")
    c3 = student.prefill(q, q_mask, max_new_tokens=4, block_size=4, prompt_cache=pc)
    assert torch.isfinite(c3.carry_logits).all()
    assert rel(c3.carry_logits, c1.carry_logits) > 1e-3
    assert torch.isinf(c3.bias[:, :, :, :3]).all() and c3.per_layer_bias


def test_prompt_cache_layers_with_different_slot_counts():
    """Layer 1 stores 3 extra (-inf bias) slots: the cache pads every layer to the largest
    count and the result is identical to the plain prompt."""
    model, _ = tiny_model("llama", seed=26)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([6, 6], seed=27)
    pc = cache_as_prompt_cache(student, ids, mask)
    lay = pc.layers[1]
    junk = torch.randn(2, 2, 3, 16)
    lay.keys, lay.values = torch.cat([lay.keys, junk], 2), torch.cat([lay.values, junk], 2)
    lay.bias = torch.cat([torch.zeros(2, 2, 6), torch.full((2, 2, 3), float("-inf"))], 2)
    kw = dict(block_size=4, threshold=0.5)
    ref, rec_ref = collect_steps(student, ids, mask, 8, **kw)
    rec = []
    out = generate(student, None, 8, prompt_cache=pc, stop_at_eos=False,
                   logits_hook=lambda *a: rec.append(a[3].clone()), **kw)
    assert torch.equal(out.tokens, ref.tokens)
    for a, (_, _, _, b) in zip(rec, rec_ref):
        assert rel(a, b) < 1e-6
    cache = student.prefill(None, max_new_tokens=4, block_size=4, prompt_cache=pc)
    assert cache.prefix_len == 9 and torch.isinf(cache.bias[0, :, :, 6:9]).all()


def test_attention_matching_compacted_prompt_changes_first_block_logits_slightly():
    """5x Attention-Matching compaction of the prompt (reference queries = the prompt's own
    post-RoPE queries) barely moves the first block's logits, far less than keeping the most
    recent keys."""
    compaction = pytest.importorskip("cdlm_fast.compaction")
    model, _ = tiny_model("qwen2", seed=30)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([40, 40], seed=31)
    queries = []
    original = student._attention
    student._attention = lambda q, *a, **k: (queries.append(q.clone()), original(q, *a, **k))[1]
    try:
        cache = student.prefill(ids, mask, max_new_tokens=0, block_size=1)
    finally:
        del student._attention
    p, t = ids.shape[1], 8
    kv = [(cache.keys[i, :, :, :p], cache.values[i, :, :, :p]) for i in range(student.num_layers)]
    compacted = compaction.compact_kv(kv, dict(enumerate(queries)), t, "highest_attention",
                                      allocation="uniform")  # t slots in every head, as the recent-keys baseline
    assert compacted.logical_length == p and all(lay.keys.shape[2] == t for lay in compacted.layers)
    compacted.last_logits = cache.carry_logits  # the prompt's last logit, computed before compaction
    drift = first_block_logit_drift(student, ids, mask, compacted)
    recent = types.SimpleNamespace(
        layers=[types.SimpleNamespace(keys=k[:, :, p - t:], values=v[:, :, p - t:], bias=None) for k, v in kv],
        logical_length=p, last_logits=cache.carry_logits)
    drift_recent = first_block_logit_drift(student, ids, mask, recent)
    assert 0 < drift < 0.02, drift
    assert drift < drift_recent / 10, (drift, drift_recent)


# ---------------------------------------------------------------- other backends
def test_triton_backend_matches_torch_backend():
    ok = op("attention").reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if ok is not None:
        pytest.skip(f"triton attention backend unavailable: {ok}")
    model, _ = tiny_model("qwen2", seed=23)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    ids, mask = prompts([5, 3], seed=24)
    ids, mask = ids.to(dev), mask.to(dev)
    res = []
    for backend in ("torch", "triton"):
        student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, backend=backend)
        out, rec = collect_steps(student, ids, mask, 4, 4, threshold=0.5)
        res.append((out.tokens, torch.cat([r[3] for r in rec], 1)))
    assert torch.equal(res[0][0], res[1][0])
    assert rel(res[1][1], res[0][1]) < 1e-4


# ---------------------------------------------------------------- settings and errors
def test_default_token_settings():
    assert default_token_settings("qwen2") == (151666, 151643, "shifted")
    assert default_token_settings("llama") == (126336, 126081, "unshifted")


def test_bad_inputs_raise_named_errors():
    model, _ = tiny_model("qwen2", seed=25)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    ids, mask = prompts([4, 4])
    with pytest.raises(TypeError, match="prompt_ids"):
        student.prefill(ids.float(), mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt_ids"):
        student.prefill(ids[0], None, max_new_tokens=4)
    right = torch.ones_like(mask)
    right[0, -1] = 0
    with pytest.raises(ValueError, match="attention_mask.*left padding"):
        student.prefill(ids, right, max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask"):
        student.prefill(ids, mask[:, 1:], max_new_tokens=4)
    with pytest.raises(ValueError, match="block_size"):
        student.prefill(ids, mask, max_new_tokens=4, block_size=0)
    pc = cache_as_prompt_cache(student, ids, mask)
    with pytest.raises(ValueError, match="prompt_cache.layers must have 2"):
        student.prefill(None, max_new_tokens=4, prompt_cache=types.SimpleNamespace(layers=pc.layers[:1],
                                                                                  logical_length=4))
    bad = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=lay.keys[:, :1], values=lay.values, bias=None)
                                        for lay in pc.layers], logical_length=4)
    with pytest.raises(ValueError, match=r"keys must have shape \[B, Hkv, t, D\]"):
        student.prefill(None, max_new_tokens=4, prompt_cache=bad)
    with pytest.raises(TypeError, match="prompt_cache must have .layers"):
        student.prefill(None, max_new_tokens=4, prompt_cache=object())
    nolast = types.SimpleNamespace(layers=pc.layers, logical_length=4)
    with pytest.raises(ValueError, match="last logit"):
        student.prefill(None, max_new_tokens=4, prompt_cache=nolast)
    cache = student.prefill(ids, mask, max_new_tokens=8, block_size=4)
    with pytest.raises(ValueError, match="commit"):
        student.block_forward(cache, torch.full((2, 6), MASK_ID), commit=2)
    with pytest.raises(ValueError, match="block_ids"):
        student.block_forward(cache, torch.full((3, 4), MASK_ID))
    with pytest.raises(ValueError, match="cache holds"):
        student.block_forward(cache, torch.full((2, 20), MASK_ID))
    with pytest.raises(ValueError, match="logits_alignment"):
        BlockCausalStudent(model, logits_alignment="left")
    with pytest.raises(ValueError, match="attn_impl"):
        BlockCausalStudent(model, attn_impl="flash")
    with pytest.raises(TypeError, match="model"):
        BlockCausalStudent(torch.nn.Linear(2, 2))


def test_sliding_window_layers_are_rejected():
    cfg = transformers.Qwen2Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, num_hidden_layers=2, vocab_size=64,
                                   use_sliding_window=True, sliding_window=8, max_window_layers=0)
    model = transformers.Qwen2ForCausalLM(cfg)
    if all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        pytest.skip("this transformers version does not mark sliding-window layers")
    with pytest.raises(ValueError, match="sliding-window"):
        BlockCausalStudent(model)
