"""Training the block-causal student through the differentiable :func:`cdlm_fast.attention`.

Gradients of the masked-diffusion loss with respect to every weight are compared with those of
the dense reference forward: the Hugging Face model in float64 with eager attention and an
explicit 4D block-causal mask (autograd through the materialised softmax).
"""
import pytest
import torch
import torch.nn.functional as F

from cdlm_fast import backends
from cdlm_fast.reference.attention import visible_mask
from cdlm_fast.student import BlockCausalStudent
from cdlm_fast.training import mask_tokens, masked_diffusion_loss, student_logits

pytest.importorskip("transformers")
from tiny_models import EOS_ID, MASK_ID, VOCAB, prompts, tiny_model  # noqa: E402

BLOCK = 4


def dense_logits(model, seq, prompt_mask, block_size):
    """Logits ``[B, L, V]`` of the HF model under the block-causal mask (with autograd; use SDPA attention,
    whose math kernel stays in float64)."""
    b, total = seq.shape
    p = prompt_mask.shape[1]
    vis = visible_mask(torch.full((b,), p), block_size, 0, total, total)
    key_ok = torch.cat([prompt_mask.bool(), torch.ones(b, total - p, dtype=torch.bool)], dim=1)
    vis = vis & key_ok[:, None, :]
    add = torch.zeros(b, 1, total, total, dtype=torch.float64).masked_fill(~vis[:, None], float("-inf"))
    m = prompt_mask.long()
    pos = torch.cat([(m.cumsum(1) - 1).clamp(min=0), m.sum(1, keepdim=True) + torch.arange(total - p).view(1, -1)], 1)
    return model(seq, attention_mask=add.to(model.dtype), position_ids=pos).logits


def _batch(n_gen=10, lengths=(5, 3), seed=3):
    ids, mask = prompts(list(lengths), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, VOCAB - 2, (ids.shape[0], n_gen), generator=gen)
    full = torch.cat([ids, target], 1)
    noisy, masked = mask_tokens(full, ids.shape[1], MASK_ID, ratio=0.5, generator=gen)
    return full, mask, noisy, masked


def _ce(logits, full, masked, p, shift):
    pred = logits[:, p - shift: full.shape[1] - shift]
    return F.cross_entropy(pred[masked].double(), full[:, p:][masked])


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,backend", [("qwen2", "torch"), ("llama", "torch"), ("qwen3", "triton")])
def test_student_gradients_equal_dense_reference(kind, backend):
    if backends.device_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(backends.device_reason(backend, torch.device("cpu")))
    model, model64 = tiny_model(kind)
    full, mask, noisy, masked = _batch()
    p = mask.shape[1]
    # the torch backend runs in float64 (exact comparison); triton in float32 (the interpreter)
    net = model64 if backend == "torch" else model
    student = BlockCausalStudent(net, mask_token_id=MASK_ID, eos_token_id=EOS_ID, backend=backend)
    shift = 1 if student.shifted else 0
    net.zero_grad(set_to_none=True)
    _ce(student_logits(student, noisy, mask, block_size=BLOCK), full, masked, p, shift).backward()
    got = _param_grads(net)

    ref_model = tiny_model(kind)[1]
    ref_model.set_attn_implementation("sdpa")  # eager attention takes its softmax in float32
    ref_model.zero_grad(set_to_none=True)
    _ce(dense_logits(ref_model, noisy, mask, BLOCK), full, masked, p, shift).backward()
    ref = _param_grads(ref_model)
    assert set(got) == set(ref) and len(ref) > 10
    tol = 1e-10 if backend == "torch" else 1e-4
    for name, g in got.items():
        r = ref[name]
        assert torch.isfinite(g).all(), name
        err = float((g.double() - r).norm() / r.norm().clamp(min=1e-30))
        assert err < tol, f"{name}: relative gradient error {err:.2e}"


def test_attention_grads_reach_q_and_k_projections():
    """The attention op is on the gradient path: q/k projections (which only act through the
    attention scores) get nonzero gradients."""
    model, _ = tiny_model("llama", twin=False)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, backend="torch")
    full, mask, _, _ = _batch()
    masked_diffusion_loss(student, full, mask, block_size=BLOCK, generator=torch.Generator().manual_seed(0)).backward()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0


def test_tiny_student_finetune_loss_decreases():
    torch.manual_seed(0)
    model, _ = tiny_model("qwen2", twin=False, peaky=1.0)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID, backend="torch")
    full, mask, _, _ = _batch(n_gen=12, lengths=(6, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        opt.zero_grad(set_to_none=True)
        # a fresh masking every step (the masked-diffusion objective), same seeds every run
        loss = masked_diffusion_loss(student, full, mask, block_size=BLOCK,
                                     generator=torch.Generator().manual_seed(step))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = [float(masked_diffusion_loss(student, full, mask, block_size=BLOCK,
                                             generator=torch.Generator().manual_seed(s))) for s in range(12)]
    assert sum(final) / 12 < 0.7 * sum(losses[:3]) / 3, (losses, final)


def test_bad_inputs():
    model, _ = tiny_model("qwen2", twin=False)
    student = BlockCausalStudent(model, mask_token_id=MASK_ID, eos_token_id=EOS_ID)
    full, mask, _, _ = _batch()
    with pytest.raises(TypeError, match="student"):
        student_logits(model, full, mask, block_size=BLOCK)
    with pytest.raises(ValueError, match="prompt_mask"):
        student_logits(student, full, mask[:1], block_size=BLOCK)
    with pytest.raises(ValueError, match="ratio"):
        mask_tokens(full, mask.shape[1], MASK_ID, ratio=1.5)
    with pytest.raises(ValueError, match="shifted"):
        masked_diffusion_loss(student, full, mask[:, :0], block_size=BLOCK)
