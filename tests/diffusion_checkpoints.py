"""Tiny Dream / LLaDA checkpoints in their real on-disk formats, and independent dense forwards.

The writers produce what the released checkpoints hold: ``config.json`` with the upstream field
names and ``model_type`` and ``model.safetensors`` with the upstream parameter names
(Dream: Qwen2's names; LLaDA: ``model.transformer.{wte, blocks.N.*, ln_f, ff_out}``, separate
projections for ``block_type="llama"``, fused ``att_proj`` / SwiGLU ``ff_proj`` for
``"sequential"``). The dense forwards read those raw tensors by their upstream names and compute
the logits in float64 from first principles (RMSNorm, rotate-half RoPE, GQA softmax attention
under an explicit visibility matrix, SwiGLU), sharing no code with the package.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

VOCAB = 320
MASK_ID = 310
EOS_ID = 300
EOT_ID = 301


def _randn(g, *shape, std=0.3):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def llada_config(block_type="llama", n_heads=4, n_kv_heads=None, weight_tying=False, include_qkv_bias=False,
                 d_model=32, n_layers=2, mlp_hidden=48, **extra):
    """A LLaDA ``config.json`` (upstream field names; the 8B values are d_model 4096, n_heads 32, ...)."""
    cfg = {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada",
        "activation_type": "silu" if block_type == "llama" else "swiglu",
        "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "block_group_size": 1,
        "block_type": block_type, "d_model": d_model, "embedding_dropout": 0.0, "embedding_size": VOCAB,
        "eos_token_id": EOS_ID, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": include_qkv_bias, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": MASK_ID, "max_sequence_length": 4096,
        "mlp_hidden_size": mlp_hidden * (1 if block_type == "llama" else 2), "mlp_ratio": 4,
        "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_kv_heads if n_kv_heads else n_heads,
        "n_layers": n_layers, "pad_token_id": EOS_ID, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "vocab_size": VOCAB, "weight_tying": weight_tying, "use_cache": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    }
    cfg.update(extra)
    return cfg


def llada_weights(cfg, seed=0):
    """Random LLaDA weights under the upstream parameter names (float64)."""
    g = torch.Generator().manual_seed(seed)
    d, h = cfg["d_model"], cfg["n_heads"]
    hd = d // h
    kv = cfg["n_kv_heads"] * hd
    hidden = cfg["mlp_hidden_size"]
    w = {"model.transformer.wte.weight": _randn(g, VOCAB, d, std=1.0),
         "model.transformer.ln_f.weight": 1 + _randn(g, d, std=0.1)}
    if not cfg["weight_tying"]:
        w["model.transformer.ff_out.weight"] = _randn(g, VOCAB, d, std=1.0)
    qkv_bias = cfg["include_qkv_bias"] or cfg["include_bias"]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        w[p + "attn_norm.weight"] = 1 + _randn(g, d, std=0.1)
        w[p + "ff_norm.weight"] = 1 + _randn(g, d, std=0.1)
        if cfg["block_type"] == "llama":
            for name, out in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
                w[p + name + ".weight"] = _randn(g, out, d)
                if qkv_bias:
                    w[p + name + ".bias"] = _randn(g, out)
            w[p + "ff_proj.weight"] = _randn(g, hidden, d)
            w[p + "up_proj.weight"] = _randn(g, hidden, d)
            w[p + "ff_out.weight"] = _randn(g, d, hidden)
        else:
            w[p + "att_proj.weight"] = _randn(g, d + 2 * kv, d)
            if qkv_bias:
                w[p + "att_proj.bias"] = _randn(g, d + 2 * kv)
            w[p + "ff_proj.weight"] = _randn(g, hidden, d)
            w[p + "ff_out.weight"] = _randn(g, d, hidden // 2)
        w[p + "attn_out.weight"] = _randn(g, d, d)
    return w


def dream_config(n_heads=4, n_kv_heads=2, hidden=32, layers=2, inter=48, **extra):
    """A Dream ``config.json`` (Qwen2 field names, ``model_type "Dream"``)."""
    cfg = {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "model_type": "Dream", "attention_dropout": 0.0, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": inter,
        "mask_token_id": MASK_ID, "max_position_embeddings": 4096, "max_window_layers": 28,
        "num_attention_heads": n_heads, "num_hidden_layers": layers, "num_key_value_heads": n_kv_heads,
        "pad_token_id": EOS_ID, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }
    cfg.update(extra)
    return cfg


def dream_weights(cfg, seed=0):
    """Random Dream weights under the upstream (Qwen2) parameter names (float64)."""
    g = torch.Generator().manual_seed(seed)
    d, h, hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    inter = cfg["intermediate_size"]
    w = {"model.embed_tokens.weight": _randn(g, VOCAB, d, std=1.0), "model.norm.weight": 1 + _randn(g, d, std=0.1)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = _randn(g, VOCAB, d, std=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + _randn(g, d, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + _randn(g, d, std=0.1)
        for name, out in (("q_proj", h * hd), ("k_proj", hkv * hd), ("v_proj", hkv * hd)):
            w[p + f"self_attn.{name}.weight"] = _randn(g, out, d)
            w[p + f"self_attn.{name}.bias"] = _randn(g, out)
        w[p + "self_attn.o_proj.weight"] = _randn(g, d, h * hd)
        w[p + "mlp.gate_proj.weight"] = _randn(g, inter, d)
        w[p + "mlp.up_proj.weight"] = _randn(g, inter, d)
        w[p + "mlp.down_proj.weight"] = _randn(g, d, inter)
    return w


def write_checkpoint(folder, cfg, weights, *, generation_config=None, dtype=torch.float32, shards=1):
    """``config.json`` + ``model.safetensors`` (or ``shards`` files with an index) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if generation_config is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(generation_config, f, indent=2)
    tensors = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def write_lora_adapter(folder, base_folder, lora, *, r, alpha, target_modules):
    """A PEFT LoRA adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``lora``: ``{module path: (A [r, in], B [out, r])}`` in the base checkpoint's names.
    """
    os.makedirs(folder, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_folder, "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": target_modules, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
           "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {}
    for module, (a, b) in lora.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def merged(weights, lora, r, alpha):
    """The base weights with each LoRA folded in (``W + alpha / r * B A``), upstream names."""
    out = dict(weights)
    for module, (a, b) in lora.items():
        out[module + ".weight"] = out[module + ".weight"] + (alpha / r) * (b.double() @ a.double())
    return out


# ------------------------------------------------------------------ dense float64 forwards
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    """Rotate-half RoPE of ``x`` [B, H, L, D] at integer positions ``pos`` [B, L]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[..., None] * inv  # [B, L, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attend(q, k, v, visible):
    """Softmax attention; ``visible`` [B, Lq, Lk] bool; GQA by repeating KV heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _lin(w, x, name):
    y = x @ w[name + ".weight"].double().T
    if name + ".bias" in w:
        y = y + w[name + ".bias"].double()
    return y


def _heads(x, n):
    b, l, _ = x.shape
    return x.view(b, l, n, -1).transpose(1, 2)


def dense_llada(w, cfg, ids, visible, pos):
    """LLaDA logits [B, L, V] (float64) from the raw upstream weights."""
    d, h = cfg["d_model"], cfg["n_heads"]
    hkv = cfg["n_kv_heads"] or h
    kvd = hkv * (d // h)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = w["model.transformer.wte.weight"].double()[ids]
    b, l = ids.shape
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        y = _rms(x, w[p + "attn_norm.weight"].double(), eps)
        if cfg["block_type"] == "sequential":
            q, k, v = _lin(w, y, p + "att_proj").split([d, kvd, kvd], dim=-1)
        else:
            q, k, v = _lin(w, y, p + "q_proj"), _lin(w, y, p + "k_proj"), _lin(w, y, p + "v_proj")
        q, k, v = _heads(q, h), _heads(k, hkv), _heads(v, hkv)
        o = _attend(_rope(q, pos, theta), _rope(k, pos, theta), v, visible)
        x = x + _lin(w, o.transpose(1, 2).reshape(b, l, d), p + "attn_out")
        y = _rms(x, w[p + "ff_norm.weight"].double(), eps)
        if cfg["block_type"] == "sequential":
            up, gate = _lin(w, y, p + "ff_proj").chunk(2, dim=-1)
            m = F.silu(gate) * up
        else:
            m = F.silu(_lin(w, y, p + "ff_proj")) * _lin(w, y, p + "up_proj")
        x = x + _lin(w, m, p + "ff_out")
    x = _rms(x, w["model.transformer.ln_f.weight"].double(), eps)
    head = w["model.transformer.wte.weight"] if cfg["weight_tying"] else w["model.transformer.ff_out.weight"]
    return x @ head.double().T


def dense_dream(w, cfg, ids, visible, pos):
    """Dream logits [B, L, V] (float64) from the raw upstream weights."""
    h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = w["model.embed_tokens.weight"].double()[ids]
    b, l = ids.shape
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"].double(), eps)
        q = _heads(_lin(w, y, p + "self_attn.q_proj"), h)
        k = _heads(_lin(w, y, p + "self_attn.k_proj"), hkv)
        v = _heads(_lin(w, y, p + "self_attn.v_proj"), hkv)
        o = _attend(_rope(q, pos, theta), _rope(k, pos, theta), v, visible)
        x = x + _lin(w, o.transpose(1, 2).reshape(b, l, -1), p + "self_attn.o_proj")
        y = _rms(x, w[p + "post_attention_layernorm.weight"].double(), eps)
        m = F.silu(_lin(w, y, p + "mlp.gate_proj")) * _lin(w, y, p + "mlp.up_proj")
        x = x + _lin(w, m, p + "mlp.down_proj")
    x = _rms(x, w["model.norm.weight"].double(), eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.double().T


def dense_forward(family, w, cfg, ids, visible, pos):
    return (dense_llada if family == "llada" else dense_dream)(w, cfg, ids, visible, pos)


def layout(prompt_mask, total, block_size):
    """(visible [B, L, L], positions [B, L]) of a left-padded prompt + generated slots.

    ``block_size=None``: every real token sees every real token (bidirectional). Else prompt
    queries see the prompt, a generated query sees the prompt and the blocks up to its own.
    """
    b, p = prompt_mask.shape
    real = torch.cat([prompt_mask.bool(), torch.ones(b, total - p, dtype=torch.bool)], dim=1)
    idx = torch.arange(total)
    if block_size is None:
        vis = torch.ones(total, total, dtype=torch.bool)
    else:
        blk = torch.where(idx < p, torch.full_like(idx, -1), (idx - p) // block_size)
        vis = (blk[None, :] <= blk[:, None]) | (idx[None, :] < p)
        vis &= ~((idx[:, None] < p) & (idx[None, :] >= p))
    visible = vis[None] & real[:, None, :]
    m = prompt_mask.long()
    pos = torch.cat([(m.cumsum(1) - 1).clamp(min=0), m.sum(1, keepdim=True) + torch.arange(total - p)[None]], dim=1)
    return visible, pos


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.randint(0, EOS_ID, (len(lengths), p), generator=g)
    mask = torch.zeros(len(lengths), p, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, p - n:] = 1
        ids[i, : p - n] = EOS_ID
    return ids, mask


def write_tokenizer(folder):
    """A word-level tokenizer over the tiny vocabulary (``w0`` .. ``w319``), saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token=f"w{EOS_ID}",
                                   mask_token=f"w{MASK_ID}")
    fast.save_pretrained(folder)
    return folder
