"""Benchmarks of CDLM block decoding (:mod:`cdlm_fast.decode`) against what users run otherwise.

Run ``pytest bench/bench_decode.py --benchmark-only``. Model: a Dream-7B-shaped student on a
GPU (``Qwen2Config`` hidden 3584, 28 layers, 28 query / 4 KV heads, head dim 128, FFN 18944,
vocab 152064, random weights, bf16); on the CPU (or with ``CDLM_FAST_BENCH_QUICK=1``) a tiny
float32 config. Cases: prompt 512 / 2048, batch 1 / 8, block 32, 256 generated tokens on a GPU
(prompt 32 / 96, batch 1 / 2, block 8, 32 tokens on the CPU).

Two groups per case, every implementation side by side on the same model and inputs:

``step``: one denoising step of the first block (forward + the threshold update):

* ``cdlm_fast/cached``: :meth:`BlockCausalStudent.block_forward` on the exact block cache,
  attention by :func:`cdlm_fast.attention` (queries = the block only);
* ``sdpa+mask/cached``: the same cached decoder with SDPA and a mask materialised per forward
  (how Hugging Face-style implementations run it);
* ``nocache``: block-causal recompute of prompt + block every step;
* ``vanilla``: full bidirectional recompute of prompt + all generated slots (Dream / LLaDA).

``block``: one whole block after a finished one, with a fixed schedule of ``STEPS_PER_BLOCK``
steps (random weights make threshold-driven step counts meaningless) plus the commit of the
finished block: ``cdlm_fast/fused`` (the finished block's K/V written in the next block's first
step), ``cdlm_fast/separate`` (a separate commit forward), their ``sdpa+mask`` twins, and the
recompute baselines. ``extra_info`` holds ``median_ms``, ``steps`` and ``ms_per_step``.
"""
from __future__ import annotations

import pytest
import torch
from _common import DEVICE, QUICK, run

from cdlm_fast.decode import denoise_step
from cdlm_fast.student import BlockCausalStudent

transformers = pytest.importorskip("transformers")

if QUICK:
    CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    DTYPE = torch.float32
    BLOCK, NEW = 8, 32
    CASES = [(1, 32), (2, 96)]
    STEPS_PER_BLOCK = 3
else:
    CONFIG = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, rope_theta=1e6)
    DTYPE = torch.bfloat16
    BLOCK, NEW = 32, 256
    CASES = [(1, 512), (1, 2048), (8, 512), (8, 2048)]
    STEPS_PER_BLOCK = 14  # about what CDLM needs for a block of 32 at 2.3 tokens per step

MODEL_NAME = "tiny-qwen2" if QUICK else "dream-7b-shape"
MASK_ID = CONFIG["vocab_size"] - 1
EOS_ID = CONFIG["vocab_size"] - 2
STEP_IMPLS = ["cdlm_fast/cached", "sdpa+mask/cached", "nocache", "vanilla"]
BLOCK_IMPLS = ["cdlm_fast/fused", "cdlm_fast/separate", "sdpa+mask/fused", "sdpa+mask/separate", "nocache",
               "vanilla"]


_MODEL = {}


def model():
    """The random-weight model, built once (directly on the device, in the bench dtype)."""
    if "m" not in _MODEL:
        cfg = transformers.Qwen2Config(max_position_embeddings=8192, **CONFIG)
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(DTYPE)
        try:
            with torch.device(DEVICE):
                m = transformers.Qwen2ForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(old)
        _MODEL["m"] = m
    return _MODEL["m"]


def students():
    m = model()
    return {impl: BlockCausalStudent(m, mask_token_id=MASK_ID, eos_token_id=EOS_ID, attn_impl=impl)
            for impl in ("cdlm", "sdpa")}


class Case:
    """Prompt, a finished block and a half-masked current block for one (batch, prompt) case."""

    def __init__(self, batch, prompt):
        g = torch.Generator().manual_seed(batch * 100003 + prompt)
        vocab = CONFIG["vocab_size"] - 2
        self.ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(DEVICE)
        self.mask = torch.ones_like(self.ids)
        if batch > 1:  # left padding: sample 1 is shorter
            self.mask[1, : prompt // 4] = 0
        self.finished = torch.randint(0, vocab, (batch, BLOCK), generator=g).to(DEVICE)
        self.block = self.finished.clone()
        self.block[:, ::2] = MASK_ID
        self.generated = torch.full((batch, NEW), MASK_ID, dtype=torch.int64, device=DEVICE)
        self.generated[:, :BLOCK] = self.finished
        self.generated[:, BLOCK:2 * BLOCK] = self.block


def _update(logits, block):
    scratch = block.clone()
    denoise_step(logits, scratch, mask_token_id=MASK_ID, threshold=0.9)
    return scratch


def step_fn(impl, c: Case, st):
    p = c.ids.shape[1]
    if impl.endswith("/cached"):
        student = st["sdpa" if impl.startswith("sdpa") else "cdlm"]
        cache = student.prefill(c.ids, c.mask, max_new_tokens=NEW, block_size=BLOCK)
        return lambda: _update(student.block_forward(cache, c.block), c.block)
    student = st["cdlm"]
    if impl == "nocache":
        ids = torch.cat([c.ids, c.block], 1)
        return lambda: _update(student.full_forward(ids, c.mask, block_size=BLOCK,
                                                    logits_positions=slice(p - 1, p + BLOCK - 1)), c.block)
    gen = torch.full_like(c.generated, MASK_ID)  # vanilla step of the first block
    gen[:, :BLOCK] = c.block
    ids = torch.cat([c.ids, gen], 1)
    return lambda: _update(student.full_forward(ids, c.mask, block_size=None,
                                                logits_positions=slice(p - 1, p + BLOCK - 1)), c.block)


def block_fn(impl, c: Case, st):
    """One block after a finished one: commit + ``STEPS_PER_BLOCK`` steps."""
    p = c.ids.shape[1]
    if impl.startswith(("cdlm_fast/", "sdpa+mask/")):
        student = st["sdpa" if impl.startswith("sdpa") else "cdlm"]
        cache = student.prefill(c.ids, c.mask, max_new_tokens=NEW, block_size=BLOCK)
        carry = cache.carry_logits
        fused = impl.endswith("/fused")
        both = torch.cat([c.finished, c.block], 1)

        def call():
            cache.length, cache.carry_logits = p, carry  # rewind to "first block finished"
            if fused:
                logits = student.block_forward(cache, both, commit=BLOCK)
            else:
                student.block_forward(cache, c.finished, commit=BLOCK, return_logits=False)
                logits = student.block_forward(cache, c.block)
            _update(logits, c.block)
            for _ in range(STEPS_PER_BLOCK - 1):
                _update(student.block_forward(cache, c.block), c.block)
        return call
    student = st["cdlm"]
    if impl == "nocache":
        ids = torch.cat([c.ids, c.finished, c.block], 1)
        sl, bsz = slice(p + BLOCK - 1, p + 2 * BLOCK - 1), BLOCK
    else:
        ids = torch.cat([c.ids, c.generated], 1)
        sl, bsz = slice(p + BLOCK - 1, p + 2 * BLOCK - 1), None

    def call():
        for _ in range(STEPS_PER_BLOCK):
            _update(student.full_forward(ids, c.mask, block_size=bsz, logits_positions=sl), c.block)
    return call


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """On the CPU, one intra-op thread: the tiny model is overhead-bound and shared machines
    make multi-threaded timings of small matmuls erratic."""
    if DEVICE.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _case_name(kind, b, p):
    return f"decode-{kind}-{MODEL_NAME}-b{b}-prompt{p}-block{BLOCK}"


@pytest.mark.parametrize("case", CASES, ids=[f"b{b}-p{p}" for b, p in CASES])
@pytest.mark.parametrize("impl", STEP_IMPLS)
def test_decode_step(benchmark, case, impl):
    b, p = case
    c = Case(b, p)
    fn = step_fn(impl, c, students())
    with torch.no_grad():
        run(benchmark, fn, op="decode_step", case=_case_name("step", b, p), impl=impl,
            ours=impl.startswith("cdlm_fast"), x=p, x_name="prompt length", batch=b, steps=1,
            rounds=None if QUICK else 5)


@pytest.mark.parametrize("case", CASES, ids=[f"b{b}-p{p}" for b, p in CASES])
@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_decode_block(benchmark, case, impl):
    b, p = case
    c = Case(b, p)
    fn = block_fn(impl, c, students())
    with torch.no_grad():
        run(benchmark, fn, op="decode_block", case=_case_name("block", b, p), impl=impl,
            ours=impl.startswith("cdlm_fast"), x=p, x_name="prompt length", batch=b, steps=STEPS_PER_BLOCK,
            rounds=3 if not QUICK else 5)
    benchmark.extra_info["ms_per_step"] = benchmark.extra_info["median_ms"] / STEPS_PER_BLOCK
