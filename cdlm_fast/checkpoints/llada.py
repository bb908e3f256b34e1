"""LLaDA checkpoints as a stock ``LlamaForCausalLM``: the config, the parameter names, the fused splits."""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

from .settings import _rope_kwargs


# ---------------------------------------------------------------------------- configs
def _llada_effective_kv_heads(cfg: Mapping) -> int:
    n_kv = cfg.get("n_kv_heads")
    if n_kv is None:
        return 1 if cfg.get("multi_query_attention") else int(cfg["n_heads"])
    return int(n_kv)


def _llada_check_supported(cfg: Mapping) -> None:
    problems = []
    block_type = cfg.get("block_type", "sequential")
    act = cfg.get("activation_type", "swiglu")
    if block_type not in ("llama", "sequential"):
        problems.append(f"block_type={block_type!r} (supported: 'llama', 'sequential')")
    if block_type == "llama" and act != "silu":
        problems.append(f"activation_type={act!r} with block_type 'llama' (expected 'silu')")
    if block_type == "sequential" and act != "swiglu":
        problems.append(f"activation_type={act!r} with block_type 'sequential' (expected 'swiglu')")
    if not cfg.get("rope", False) or cfg.get("alibi", False):
        problems.append("no RoPE (rope must be true, alibi false)")
    if cfg.get("layer_norm_type", "default") not in ("rms",):
        problems.append(f"layer_norm_type={cfg.get('layer_norm_type', 'default')!r} (expected 'rms')")
    bias_ln = cfg.get("bias_for_layer_norm")
    if bias_ln or (bias_ln is None and cfg.get("include_bias", False)):
        problems.append("layer norms with a bias")
    for flag in ("attention_layer_norm", "input_emb_norm", "scale_logits"):
        if cfg.get(flag, False):
            problems.append(f"{flag}=true")
    if problems:
        raise ValueError("this LLaDA configuration has no stock Llama equivalent: " + "; ".join(problems))


def _llada_hidden(cfg: Mapping) -> int:
    return int(cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"])


def _llada_stock_config(cfg: Mapping):
    import transformers

    _llada_check_supported(cfg)
    hidden = _llada_hidden(cfg)
    if cfg.get("block_type", "sequential") == "sequential":
        hidden //= 2  # fused SwiGLU: [up; gate]
    include_bias = bool(cfg.get("include_bias", False))
    kw = dict(
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        hidden_size=int(cfg["d_model"]), intermediate_size=hidden,
        num_hidden_layers=int(cfg["n_layers"]), num_attention_heads=int(cfg["n_heads"]),
        num_key_value_heads=_llada_effective_kv_heads(cfg), head_dim=int(cfg["d_model"]) // int(cfg["n_heads"]),
        hidden_act="silu", max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        attention_bias=include_bias or bool(cfg.get("include_qkv_bias", False)), mlp_bias=include_bias,
        tie_word_embeddings=bool(cfg.get("weight_tying", True)),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return transformers.LlamaConfig(**kw, **_rope_kwargs(transformers.LlamaConfig, float(theta)))


# ---------------------------------------------------------------------------- renaming
_LLADA_LAYER = re.compile(r"^(?:model\.)?transformer\.(?:blocks\.(\d+)|block_groups\.(\d+)\.(\d+))\.(.+)$")
_LLADA_TOP = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm",
              "transformer.ff_out": "lm_head"}


def _llada_leaf_map(block_type: str) -> Dict[str, str]:
    common = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
              "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
              "ff_out": "mlp.down_proj", "up_proj": "mlp.up_proj"}
    if block_type == "llama":
        common["ff_proj"] = "mlp.gate_proj"
    return common


def _llada_fused(cfg: Mapping) -> Dict[str, List[Tuple[str, Tuple[int, int]]]]:
    """Fused leaf -> [(new leaf, (row start, row end))] of a sequential block."""
    d = int(cfg["d_model"])
    kv = _llada_effective_kv_heads(cfg) * (d // int(cfg["n_heads"]))
    h = _llada_hidden(cfg) // 2
    return {"att_proj": [("self_attn.q_proj", (0, d)), ("self_attn.k_proj", (d, d + kv)),
                         ("self_attn.v_proj", (d + kv, d + 2 * kv))],
            "ff_proj": [("mlp.up_proj", (0, h)), ("mlp.gate_proj", (h, 2 * h))]}


def llada_module_names(cfg: Mapping, module: str) -> List[Tuple[str, Optional[Tuple[int, int]]]]:
    """Stock module path(s) of a LLaDA module path (``model.transformer.blocks.3.att_proj`` -> q/k/v)."""
    group = int(cfg.get("block_group_size", 1) or 1)
    top = module[len("model."):] if module.startswith("model.") else module
    if top in _LLADA_TOP:
        return [(_LLADA_TOP[top], None)]
    m = _LLADA_LAYER.match(module)
    if m is None:
        return []
    layer = int(m.group(1)) if m.group(1) is not None else int(m.group(2)) * group + int(m.group(3))
    leaf = m.group(4)
    block_type = cfg.get("block_type", "sequential")
    fused = _llada_fused(cfg) if block_type == "sequential" else {}
    if leaf in fused:
        return [(f"model.layers.{layer}.{new}", rows) for new, rows in fused[leaf]]
    mapped = _llada_leaf_map(block_type).get(leaf)
    return [] if mapped is None else [(f"model.layers.{layer}.{mapped}", None)]
