"""Checkpoint weights into a stock ``*ForCausalLM``: reading safetensors / bin files, key matching, building."""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .llada import _llada_stock_config, llada_module_names
from .settings import _read_json, _rope_kwargs, _stock_class_name


# ---------------------------------------------------------------------------- configs
def _dream_stock_config(cfg: Mapping):
    import transformers

    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "auto_map", "architectures",
                                                         "transformers_version", "torch_dtype", "dtype")}
    if fields.get("use_sliding_window"):
        raise ValueError("Dream checkpoints with use_sliding_window=true are not supported")
    if fields.get("rope_scaling") is None and "rope_theta" in fields:
        fields.pop("rope_scaling", None)
        fields.update(_rope_kwargs(transformers.Qwen2Config, float(fields.pop("rope_theta"))))
    return transformers.Qwen2Config(**fields)


def _stock_config(family: str, cfg: Mapping):
    import transformers

    if family == "llada":
        return _llada_stock_config(cfg)
    if family == "dream":
        return _dream_stock_config(cfg)
    fields = {k: v for k, v in cfg.items() if k not in ("auto_map", "transformers_version")}
    return transformers.AutoConfig.for_model(**fields)


# ---------------------------------------------------------------------------- renaming
# one entry: new key -> (old key, row slice or None)
Plan = Dict[str, Tuple[str, Optional[Tuple[int, int]]]]


def _plan(family: str, cfg: Mapping, names: List[str]) -> Tuple[Plan, List[str]]:
    """(plan, names that map to nothing) for checkpoint parameter ``names``."""
    plan: Plan = {}
    unknown: List[str] = []
    for name in names:
        if family != "llada":
            plan[name] = (name, None)
            continue
        module, _, param = name.rpartition(".")
        targets = llada_module_names(cfg, module)
        if not targets:
            unknown.append(name)
        for new, rows in targets:
            plan[f"{new}.{param}"] = (name, rows)
    return plan, unknown


# ---------------------------------------------------------------------------- weights
def _weight_files(path: str) -> List[str]:
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(idx):
        shards = sorted(set(_read_json(idx)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if bins:
        return [os.path.join(path, f) for f in bins]
    raise FileNotFoundError(f"no weights in {path!r}: expected model.safetensors, model.safetensors.index.json "
                            "or pytorch_model*.bin")


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        out.update(load_file(f) if f.endswith(".safetensors") else torch.load(f, map_location="cpu",
                                                                               weights_only=True))
    return out


def _default_dtype(cfg: Mapping, dtype) -> torch.dtype:
    if dtype is not None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
        return dtype
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _meta_model(family: str, cfg: Mapping):
    """(stock class, stock config, the model on the meta device: shapes and names only)."""
    import transformers

    stock_cfg = _stock_config(family, cfg)
    if cfg.get("mask_token_id") is not None:
        stock_cfg.mask_token_id = cfg["mask_token_id"]
    cls = getattr(transformers, _stock_class_name(family, cfg))
    with torch.device("meta"):
        model = cls(stock_cfg)
    return cls, stock_cfg, model


def _match_keys(family: str, cfg: Mapping, names: List[str], model, stock_cfg, what: str):
    """(plan, expected shapes, zero-filled keys); a ValueError naming missing / unexpected keys."""
    expected = dict(model.state_dict())
    tied = bool(getattr(stock_cfg, "tie_word_embeddings", False))
    if tied:
        expected.pop("lm_head.weight", None)
    plan, unknown = _plan(family, cfg, names)
    if tied and "lm_head.weight" in plan:
        unknown.append(plan.pop("lm_head.weight")[0])
    missing = sorted(k for k in expected if k not in plan)
    # o_proj bias absent in a LLaDA checkpoint with only q/k/v biases: zeros (exact)
    zero_fill = [k for k in missing if family == "llada" and k.endswith("self_attn.o_proj.bias")]
    missing = [k for k in missing if k not in zero_fill]
    unexpected = sorted(unknown + [plan[k][0] for k in plan if k not in expected])
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ValueError(f"{what} does not hold a {family} checkpoint's weights for {type(model).__name__}: "
                         f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]")
    return plan, expected, zero_fill


def _build_stock(family: str, cfg: Mapping, weights: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                 device, what: str):
    """A stock ``*ForCausalLM`` holding ``weights`` (checkpoint names), converted as the family needs."""
    cls, stock_cfg, model = _meta_model(family, cfg)
    plan, expected, zero_fill = _match_keys(family, cfg, list(weights), model, stock_cfg, what)
    tied = bool(getattr(stock_cfg, "tie_word_embeddings", False))
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = {}
    for new, (old, rows) in plan.items():
        t = weights[old]
        if rows is not None:
            t = t[rows[0]:rows[1]]
        want = tuple(expected[new].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{what}: {old} has shape {tuple(t.shape)}, {new} of {cls.__name__} needs {want} "
                             "(config.json and the weights disagree)")
        state[new] = t.to(device=device, dtype=dtype)
    for k in zero_fill:
        state[k] = torch.zeros(tuple(expected[k].shape), device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    # non-persistent buffers (the RoPE frequencies) are rebuilt on the target device
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=stock_cfg)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{what}: tensors left unset after loading: {left[:8]}")
    return model.eval()
