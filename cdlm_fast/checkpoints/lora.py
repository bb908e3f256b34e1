"""LoRA adapters (PEFT folders or a live ``peft.PeftModel``) over the stock model, renamed for LLaDA bases."""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Dict, Mapping, Tuple

import torch

from .llada import llada_module_names
from .settings import _read_json


# ---------------------------------------------------------------------------- LoRA
def _peft_base(model):
    """The wrapped model of a ``peft.PeftModel`` (``None`` for anything else)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return None


def _clean_base_state(model) -> Dict[str, torch.Tensor]:
    """Base weights of a (possibly LoRA-injected) model, in the original names."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k or ".modules_to_save." in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _rename_lora(family: str, cfg: Mapping, lora_cfg: Dict, lora_state: Mapping[str, torch.Tensor]):
    """(LoraConfig dict, state dict) with module names of the stock model (fused LoRA split by rows)."""
    prefix = "base_model.model."
    pat = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\..*)?$")
    new_state: Dict[str, torch.Tensor] = {}
    modules = set()
    for key, t in lora_state.items():
        body = key[len(prefix):] if key.startswith(prefix) else key
        m = pat.match(body)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in the LoRA adapter (only LoRA A/B weights are supported)")
        module, kind, rest = m.group(1), m.group(2), m.group(3) or ""
        if family != "llada":
            targets = [(module, None)]
        else:
            targets = llada_module_names(cfg, module)
            if not targets:
                raise ValueError(f"the LoRA adapter targets {module!r}, which is not a LLaDA module this loader maps")
        for new, rows in targets:
            x = t
            if rows is not None:
                if kind == "lora_B":
                    x = t[rows[0]:rows[1]]
                elif kind != "lora_A":
                    raise ValueError(f"{key}: {kind} on a fused LLaDA projection is not supported")
            new_state[f"{prefix}{new}.{kind}{rest}"] = x
            modules.add(new)
    cfg_out = dict(lora_cfg)
    cfg_out["target_modules"] = sorted(modules)
    if family == "llada" and (lora_cfg.get("rank_pattern") or lora_cfg.get("alpha_pattern")):
        raise ValueError("rank_pattern / alpha_pattern of a LoRA adapter on a LLaDA base are not supported")
    for k in ("modules_to_save", "layers_to_transform", "layers_pattern"):
        if lora_cfg.get(k):
            raise ValueError(f"LoRA adapters with {k}={lora_cfg[k]!r} are not supported")
    return cfg_out, new_state


def _apply_lora(model, lora_cfg: Dict, lora_state: Mapping[str, torch.Tensor], *, merge: bool, what: str):
    """Wrap the stock ``model`` in a ``peft.PeftModel`` with this LoRA (merged and unwrapped if ``merge``)."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA adapters need peft: pip install peft") from e
    peft_type = lora_cfg.get("peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
        raise ValueError(f"{what}: only LoRA adapters are supported, got peft_type={lora_cfg.get('peft_type')!r}")
    kw = {k: v for k, v in lora_cfg.items() if k in {f.name for f in dataclasses.fields(peft.LoraConfig)}}
    kw.pop("peft_type", None)
    kw["inference_mode"] = True
    kw["base_model_name_or_path"] = None
    config = peft.LoraConfig(**kw)
    ref = next(model.parameters())
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing`` itself (not our call)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        pm = peft.get_peft_model(model, config)
    state = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in lora_state.items()}
    res = peft.set_peft_model_state_dict(pm, state)
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(res, "missing_keys", []) or []) if ".lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{what}: the LoRA weights do not fit the model: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}")
    pm.eval()
    return pm.merge_and_unload() if merge else pm


def _read_adapter(path: str, meta: bool = False) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(adapter_config.json, LoRA weights); ``meta``: shapes only (meta tensors, safetensors files)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg = _read_json(os.path.join(path, "adapter_config.json"))
    st = os.path.join(path, "adapter_model.safetensors")
    bn = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st) and meta:
        with safe_open(st, framework="pt") as h:
            return cfg, {k: torch.empty(h.get_slice(k).get_shape(), device="meta") for k in h.keys()}
    if os.path.isfile(st):
        return cfg, load_file(st)
    if os.path.isfile(bn):
        return cfg, torch.load(bn, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no adapter weights in {path!r}: expected adapter_model.safetensors")
