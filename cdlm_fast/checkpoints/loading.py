"""Entry points: a checkpoint folder or a model object as a stock transformers model."""
from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import torch

from .lora import _apply_lora, _clean_base_state, _peft_base, _read_adapter, _rename_lora
from .settings import (STOCK_TYPES, CheckpointInfo, _info_from_config, _read_json, check_token_ids,
                       inspect_checkpoint)
from .weights import _build_stock, _default_dtype, _match_keys, _meta_model, _read_weights, _weight_files


def check_weight_names(path, *, base=None) -> CheckpointInfo:
    """:func:`inspect_checkpoint` plus a check of the weight names and shapes (tensors are not read).

    Raises the same ValueError as loading would for missing / unexpected keys.
    """
    from safetensors import safe_open

    info = inspect_checkpoint(path, base=base)
    model_path = info.base_path or os.fspath(path)
    cfg = _read_json(os.path.join(model_path, "config.json"))
    _, stock_cfg, model = _meta_model(info.family, cfg)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for f in _weight_files(model_path):
        if not f.endswith(".safetensors"):
            return info  # a pickled checkpoint: names only known after loading
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    plan, expected, _ = _match_keys(info.family, cfg, list(shapes), model, stock_cfg, model_path)
    for new, (old, rows) in plan.items():
        shape = shapes[old] if rows is None else (rows[1] - rows[0],) + shapes[old][1:]
        if shape != tuple(expected[new].shape):
            raise ValueError(f"{model_path}: {old} has shape {shapes[old]}, {new} needs {tuple(expected[new].shape)} "
                             "(config.json and the weights disagree)")
    if info.adapter:
        lora_cfg, lora_state = _read_adapter(os.fspath(path), meta=True)
        _, renamed = _rename_lora(info.family, cfg, lora_cfg, lora_state)
        modules = dict(model.named_modules())
        for key, t in renamed.items():
            module = re.sub(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\..*)?$", "",
                            key[len("base_model.model."):])
            target = modules.get(module)
            if target is None:
                raise ValueError(f"{path}: the LoRA weight {key} targets {module!r}, which the "
                                 f"{type(model).__name__} does not have")
            w = getattr(target, "weight", None)
            if w is not None and key.endswith("lora_A.weight") and t.shape[-1] != w.shape[1]:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, {module} takes {w.shape[1]} inputs")
            if w is not None and key.endswith("lora_B.weight") and t.shape[0] != w.shape[0]:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, {module} has {w.shape[0]} outputs")
    check_token_ids(info)
    return info


def is_stock_model(model) -> bool:
    """Whether ``model`` is (or wraps through PEFT) a Llama / Qwen2 / Qwen3 ``*ForCausalLM``."""
    base = _peft_base(model) or model
    cfg = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    return (getattr(cfg, "model_type", None) in STOCK_TYPES and inner is not None
            and all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and hasattr(base, "lm_head"))


# ---------------------------------------------------------------------------- entry points
def load_stock_model(path, *, base=None, dtype=None, device=None, merge_adapter: bool = False, **overrides):
    """``(model, info)``: a checkpoint folder loaded into a stock transformers model.

    Args:
        path: a model folder (``config.json`` + ``model.safetensors`` / sharded safetensors /
            ``pytorch_model*.bin``) of a Dream, LLaDA, Llama, Qwen2 or Qwen3 checkpoint, or a
            PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: the base model folder of an adapter (default: the adapter's
            ``base_model_name_or_path`` when that is a local folder).
        dtype: parameter dtype (default: the checkpoint's ``torch_dtype`` / ``dtype``, else float32).
        device: target device (default CPU).
        merge_adapter: merge the LoRA into the weights (else separate PEFT LoRA layers).
        overrides: ``mask_token_id``, ``eos_token_id``, ``eot_token_id``, ``logits_alignment``,
            ``block_size``, ``threshold`` (``None`` = from the checkpoint or the table).

    Returns:
        ``(model, CheckpointInfo)``; ``model`` is a ``*ForCausalLM`` or a ``peft.PeftModel`` of one.
    """
    path = os.fspath(path)
    info = inspect_checkpoint(path, base=base, **overrides)
    model_path = info.base_path or path
    cfg = _read_json(os.path.join(model_path, "config.json"))
    dt = _default_dtype(cfg, dtype)
    model = _build_stock(info.family, cfg, _read_weights(model_path), dtype=dt, device=device, what=model_path)
    if info.adapter:
        lora_cfg, lora_state = _read_adapter(path)
        lora_cfg, lora_state = _rename_lora(info.family, cfg, lora_cfg, lora_state)
        model = _apply_lora(model, lora_cfg, lora_state, merge=merge_adapter, what=path)
        info.adapter = "lora (merged)" if merge_adapter else "lora"
    check_token_ids(info)
    return model, info


def _config_dict(config) -> Dict:
    if hasattr(config, "to_dict"):
        d = config.to_dict()
    else:
        d = dict(vars(config))
    d.setdefault("model_type", getattr(config, "model_type", ""))
    return d


def as_stock_model(model, *, merge_adapter: bool = False, dtype=None, **overrides):
    """``(stock_model, info)`` for a model object.

    Accepts a stock Llama / Qwen2 / Qwen3 ``*ForCausalLM`` (returned as is), a Dream or LLaDA
    model object as loaded with their own modeling code (its parameters are reused: no copy for
    Dream and unfused LLaDA weights, row views for fused ones) and a ``peft.PeftModel`` over any
    of these (kept unmerged unless ``merge_adapter``; a LoRA over a Dream / LLaDA object is
    re-applied on the stock model, its weights shared).
    """
    base = _peft_base(model)
    inner = base if base is not None else model
    config = getattr(inner, "config", None)
    if config is None or not isinstance(inner, torch.nn.Module):
        raise TypeError("model must be a Hugging Face model (Llama / Qwen2 / Qwen3 *ForCausalLM, Dream, LLaDA) or a "
                        f"peft.PeftModel of one, got {type(model).__name__}")
    cfg = _config_dict(config)
    info = _info_from_config(cfg, _config_dict(inner.generation_config)
                             if getattr(inner, "generation_config", None) is not None else None, **overrides)
    if is_stock_model(model):
        if base is not None:
            if merge_adapter:
                model = model.merge_and_unload()
                info.adapter = "lora (merged)"
            else:
                info.adapter = "lora"
        info.vocab_size = (base if base is not None else model).lm_head.out_features
        return model, info
    if info.family not in ("dream", "llada"):
        raise TypeError(f"model must be a Llama / Qwen2 / Qwen3 *ForCausalLM with model.model.{{embed_tokens, layers, "
                        f"norm, rotary_emb}} and lm_head, or a Dream / LLaDA model, got {type(inner).__name__}")
    weights = _clean_base_state(inner)
    ref = next(inner.parameters())
    dt = dtype or ref.dtype
    stock = _build_stock(info.family, cfg, weights, dtype=dt, device=ref.device, what=type(inner).__name__)
    if base is not None:
        import peft

        peft_cfg = model.peft_config[model.active_adapter]
        lora_cfg = peft_cfg.to_dict()
        lora_state = peft.get_peft_model_state_dict(model)
        lora_cfg, lora_state = _rename_lora(info.family, cfg, lora_cfg, lora_state)
        stock = _apply_lora(stock, lora_cfg, lora_state, merge=merge_adapter, what=type(model).__name__)
        info.adapter = "lora (merged)" if merge_adapter else "lora"
    return stock, info
