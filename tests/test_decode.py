"""Decoders: CDLM cached decoding vs the no-cache block-causal and vanilla baselines, the
threshold rule, EOS stopping, padding and batching."""
import pytest
import torch

from cdlm_fast.decode import (GenerateOutput, denoise_step, generate, generate_block_causal_nocache,
                              generate_vanilla)
from cdlm_fast.student import BlockCausalStudent

transformers = pytest.importorskip("transformers")
from tiny_models import EOS_ID, MASK_ID, VOCAB, tiny_model  # noqa: E402,F401
from tiny_models import prompts as tiny_prompts  # noqa: E402



def tiny_student(kind="qwen2", seed=0, peaky=20.0, **kw):
    model, _ = tiny_model(kind, seed, peaky, perturb_bias=False, twin=False)
    return BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, **kw)


def prompts(lengths, seed=1):
    return tiny_prompts(lengths, seed, pad_id=0)


# ---------------------------------------------------------------- the threshold rule
def test_denoise_step_rule():
    v = 5
    logits = torch.full((2, 4, v), -10.0)
    # sample 0: pos0 fixed already, pos1 conf ~1 (token 2), pos2 conf 0.5/0.5, pos3 conf ~0.93 (token 4)
    logits[0, 0, 1] = 10.0
    logits[0, 1, 2] = 10.0
    logits[0, 2, 0] = logits[0, 2, 3] = 5.0
    logits[0, 3, 4] = 4.0
    logits[0, 3, :4] = 0.0
    # sample 1: every position low confidence; the most confident (pos 2) must still be fixed
    logits[1] = torch.randn(4, v, generator=torch.Generator().manual_seed(0)) * 0.1
    logits[1, 2, 1] = 1.0
    block = torch.tensor([[7, MASK_ID, MASK_ID, MASK_ID], [MASK_ID] * 4])
    acc, masked = denoise_step(logits, block, mask_token_id=MASK_ID, threshold=0.9)
    assert masked.tolist() == [[False, True, True, True], [True] * 4]
    assert acc.tolist() == [[False, True, False, True], [False, False, True, False]]
    assert block.tolist() == [[7, 2, MASK_ID, 4], [MASK_ID, MASK_ID, 1, MASK_ID]]
    # threshold None: exactly one per row with a masked position
    block = torch.tensor([[7, MASK_ID, MASK_ID, MASK_ID], [7, 7, 7, 7]])
    acc, _ = denoise_step(logits, block, mask_token_id=MASK_ID, threshold=None)
    assert acc.sum(1).tolist() == [1, 0] and block[0, 1] == 2 and block[1].tolist() == [7] * 4


def test_denoise_step_float64_confidence_and_sampling():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 50, generator=g) * 4
    b1 = torch.full((3, 6), MASK_ID)
    b2 = b1.clone()
    a1, _ = denoise_step(logits, b1, mask_token_id=MASK_ID, threshold=0.5)
    a2, _ = denoise_step(logits, b2, mask_token_id=MASK_ID, threshold=0.5, confidence_dtype=torch.float64)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    conf = torch.softmax(logits.double(), -1).max(-1).values
    want = (conf >= 0.5) | (conf == conf.max(-1, keepdim=True).values)
    assert torch.equal(a1, want)
    # sampling: reproducible with a generator, always fixes >= 1 per row
    s1, s2 = torch.full((3, 6), MASK_ID), torch.full((3, 6), MASK_ID)
    denoise_step(logits, s1, mask_token_id=MASK_ID, threshold=0.9, temperature=1.0,
                 generator=torch.Generator().manual_seed(5))
    denoise_step(logits, s2, mask_token_id=MASK_ID, threshold=0.9, temperature=1.0,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and ((s1 != MASK_ID).sum(1) >= 1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host-sync check)")
def test_denoise_step_has_no_host_sync_on_gpu():
    # the one host sync of a decoding step is the "block done?" check in the decoder loop;
    # the rule itself must stay on the device
    logits = torch.randn(2, 8, VOCAB, device="cuda")
    block = torch.full((2, 8), MASK_ID, device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        denoise_step(logits, block, mask_token_id=MASK_ID, threshold=0.9)
    finally:
        torch.cuda.set_sync_debug_mode(prev)


# ---------------------------------------------------------------- cached == no-cache
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("threshold", [0.9, 0.3, 0.0, None])
def test_cached_equals_nocache_block_causal(kind, threshold):
    student = tiny_student(kind, seed=2)
    ids, mask = prompts([7, 3], seed=3)
    kw = dict(block_size=4, threshold=threshold, attention_mask=mask, stop_at_eos=False)
    fused = generate(student, ids, 10, **kw)
    sep = generate(student, ids, 10, fuse_commit=False, **kw)
    ref = generate_block_causal_nocache(student, ids, 10, **kw)
    assert not (ref.tokens == MASK_ID).any()
    assert torch.equal(fused.tokens, ref.tokens) and torch.equal(sep.tokens, ref.tokens)
    assert fused.steps_per_block == sep.steps_per_block == ref.steps_per_block
    assert torch.equal(fused.sequences, torch.cat([ids, fused.tokens], 1))
    nb = 3
    assert fused.num_forwards == fused.num_steps and sep.num_forwards == sep.num_steps + nb - 1
    if threshold is None:
        assert fused.steps_per_block == [4, 4, 2] and fused.tokens_per_step == 1.0
    if threshold == 0.0:
        assert fused.steps_per_block == [1, 1, 1]
    assert fused.decoded_tokens.tolist() == [10, 10]


def test_sampling_is_reproducible_and_cache_exact():
    student = tiny_student("qwen2", seed=4, peaky=3.0)
    ids, mask = prompts([6, 6], seed=5)
    kw = dict(block_size=4, threshold=0.2, temperature=0.7, attention_mask=mask, stop_at_eos=False)
    a = generate(student, ids, 8, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(student, ids, 8, generator=torch.Generator().manual_seed(0), **kw)
    c = generate_block_causal_nocache(student, ids, 8, generator=torch.Generator().manual_seed(0), **kw)
    greedy = generate(student, ids, 8, block_size=4, threshold=0.2, attention_mask=mask, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, greedy.tokens)


# ---------------------------------------------------------------- padding and batching
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_batch_with_left_padding_equals_single_samples(kind):
    student = tiny_student(kind, seed=6)
    ids, mask = prompts([8, 3, 5], seed=7)
    kw = dict(block_size=4, threshold=0.4, stop_at_eos=False)
    batch = generate(student, ids, 8, attention_mask=mask, **kw)
    for i, n in enumerate([8, 3, 5]):
        single = generate(student, ids[i:i + 1, -n:], 8, **kw)
        assert torch.equal(batch.tokens[i], single.tokens[0]), f"sample {i}"


# ---------------------------------------------------------------- EOS stopping
def test_stop_at_eos_per_sample():
    student = tiny_student("qwen2", seed=8)
    ids, mask = prompts([6, 4], seed=9)
    kw = dict(block_size=4, threshold=0.5, attention_mask=mask)
    free = generate(student, ids, 12, stop_at_eos=False, **kw)
    first0, rest1 = set(free.tokens[0, :4].tolist()), set(free.tokens[1].tolist())
    cands = sorted(first0 - rest1)
    assert cands, "test setup: need a token in sample 0's first block that sample 1 never produces"
    eos = cands[0]
    out = generate(student, ids, 12, eos_token_id=eos, **kw)
    assert torch.equal(out.tokens[0, :4], free.tokens[0, :4])
    assert (out.tokens[0, 4:] == eos).all()
    assert torch.equal(out.tokens[1], free.tokens[1])  # samples are independent
    assert out.decoded_tokens.tolist() == [4, 12]
    # both samples stop: the loop ends early and the rest is EOS
    eos_both = sorted(set(free.tokens[0, :4].tolist()) & set(free.tokens[1, :4].tolist()))
    common = eos_both[0] if eos_both else None
    if common is not None:
        both = generate(student, ids, 12, eos_token_id=common, **kw)
        assert len(both.steps_per_block) == 1 and (both.tokens[:, 4:] == common).all()


def test_stop_when_every_sample_finished_skips_blocks():
    student = tiny_student("llama", seed=10)
    with torch.no_grad():
        student.norm.weight.zero_()  # all logits 0: argmax = token 0 everywhere
    ids, mask = prompts([4, 4], seed=11)
    out = generate(student, ids, 12, block_size=4, threshold=0.9, eos_token_id=0, attention_mask=mask)
    assert out.steps_per_block == [4] and len(out.block_times) == 1
    assert (out.tokens == 0).all() and out.decoded_tokens.tolist() == [4, 4]


# ---------------------------------------------------------------- vanilla baseline
def test_vanilla_one_token_per_step_and_logits_bidirectional():
    student = tiny_student("qwen2", seed=12)
    ids, mask = prompts([5, 5], seed=13)
    rec = []
    out = generate_vanilla(student, ids, 6, attention_mask=mask, stop_at_eos=False,
                           logits_hook=lambda bi, st, x, lg: rec.append((x.clone(), lg.clone())))
    assert out.steps_per_block == [6] and out.num_steps == 6 and out.tokens_per_step == 1.0
    assert not (out.tokens == MASK_ID).any()
    # each step's logits = full bidirectional forward over prompt + all slots
    x, lg = rec[2]
    full = student.full_forward(torch.cat([ids, x], 1), mask, block_size=None)
    assert torch.allclose(lg, full[:, 4:10], rtol=0, atol=1e-5)
    # and not the block-causal logits (future masked slots are visible in vanilla decoding)
    bc = student.full_forward(torch.cat([ids, x], 1), mask, block_size=2)
    assert (lg - bc[:, 4:10]).abs().max() > 1e-3
    # semi-autoregressive blocks with a threshold run fewer steps
    fast = generate_vanilla(student, ids, 6, block_size=2, threshold=0.0, attention_mask=mask, stop_at_eos=False)
    assert fast.steps_per_block == [1, 1, 1]


# ---------------------------------------------------------------- SDPA baseline and stats
def test_sdpa_nocache_baseline_matches():
    student = tiny_student("qwen2", seed=16)
    ids, mask = prompts([5, 7], seed=17)
    kw = dict(block_size=4, threshold=0.5, attention_mask=mask, stop_at_eos=False)
    a = generate(student, ids, 8, **kw)
    b = generate_block_causal_nocache(student, ids, 8, attn_impl="sdpa", **kw)
    sd = BlockCausalStudent(student.model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, attn_impl="sdpa")
    c = generate(sd, ids, 8, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)


def test_output_statistics():
    student = tiny_student("qwen2", seed=18)
    ids, mask = prompts([4, 6], seed=19)
    out = generate(student, ids, 8, block_size=4, threshold=0.5, attention_mask=mask, stop_at_eos=False)
    assert isinstance(out, GenerateOutput)
    assert len(out.step_times) == out.num_steps == sum(out.steps_per_block)
    assert len(out.block_times) == 2 and all(t > 0 for t in out.step_times)
    assert out.decoded_tokens.tolist() == [8, 8]
    assert (out.active_steps <= out.num_steps).all() and (out.active_steps >= 2).all()
    expect = float((out.decoded_tokens.double() / out.active_steps.double()).mean())
    assert out.tokens_per_step == pytest.approx(expect)
    assert out.total_time >= sum(out.block_times) and out.time_per_step > 0


def test_hf_model_is_wrapped_without_copying_weights():
    student = tiny_student("llama", seed=20)
    ids, mask = prompts([4, 4], seed=21)
    a = generate(student.model, ids, 4, block_size=4, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
                 attention_mask=mask, threshold=0.5)
    b = generate(student, ids, 4, block_size=4, attention_mask=mask, threshold=0.5)
    assert torch.equal(a.tokens, b.tokens)
    assert student.layers[0].self_attn.q_proj.weight.data_ptr() == \
        student.model.model.layers[0].self_attn.q_proj.weight.data_ptr()


def test_generate_bad_arguments():
    student = tiny_student("qwen2", seed=22)
    ids, mask = prompts([4, 4])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(student, ids, 0)
    with pytest.raises(ValueError, match="block_size"):
        generate(student, ids, 4, block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        generate(student, ids, 4, threshold=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(student, ids, 4, temperature=-1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            generate(student, ids, 4, temperature=bad)
    with pytest.raises(ValueError, match="logits_alignment"):
        generate(student, ids, 4, logits_alignment="unshifted")
    for fn in (generate, generate_block_causal_nocache, generate_vanilla):
        with pytest.raises(ValueError, match="eos_token_id must differ"):
            fn(student, ids, 4, eos_token_id=MASK_ID)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate_block_causal_nocache(student, None, 4)
    with pytest.raises(TypeError, match="prompt_ids"):
        generate_vanilla(student, ids.float(), 4)
