"""Tiny random transformers decoders and left-padded prompts shared by the model-level tests."""
import pytest
import torch

# a missing transformers skips the model-level tests that import this module, not the whole run
transformers = pytest.importorskip("transformers")

VOCAB = 300
MASK_ID = VOCAB - 1
EOS_ID = VOCAB - 2

_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def model_classes(arch: str):
    """(config class, causal-LM class) of ``arch`` in ``llama`` / ``qwen2`` / ``qwen3``."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}")
    cfg_name, model_name = _ARCHS[arch]
    return getattr(transformers, cfg_name), getattr(transformers, model_name)


def tiny_model(kind: str, seed: int = 0, peaky: float = 20.0, *, perturb_bias: bool = True, twin: bool = True):
    """A tiny random decoder (float32, peaky logits) and, with ``twin``, its float64 copy with
    eager attention (``None`` otherwise)."""
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256)
    if kind == "qwen3":
        common["head_dim"] = 16
    cfg_cls, cls = model_classes(kind)
    cfg = cfg_cls(**common)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        if perturb_bias:
            for name, p in model.named_parameters():
                if name.endswith("bias"):  # Qwen2 q/k/v biases start at zero: make them matter
                    p.normal_(0, 0.2)
        # peaky logits so that thresholds below 1 accept several tokens per step
        model.lm_head.weight.mul_(peaky)
    if not twin:
        return model, None
    model64 = cls(cfg).eval().double()
    model64.load_state_dict(model.state_dict())
    return model, model64


def prompts(batch_lengths, seed=1, pad_id=EOS_ID):
    """Left-padded random prompts [B, P] and their 0/1 mask (pad tokens are never attended)."""
    g = torch.Generator().manual_seed(seed)
    p = max(batch_lengths)
    ids = torch.randint(0, VOCAB - 2, (len(batch_lengths), p), generator=g)
    mask = torch.zeros(len(batch_lengths), p, dtype=torch.long)
    for i, n in enumerate(batch_lengths):
        mask[i, p - n:] = 1
        ids[i, : p - n] = pad_id
    return ids, mask
