"""Diffusion-LM checkpoints (Dream, LLaDA, CDLM students, LoRA adapters) as stock transformers models.

The block-causal student (:class:`cdlm_fast.student.BlockCausalStudent`) runs its own forward
over a stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``. This module
turns everything a user may hold into one of those, **without** ``trust_remote_code`` (no
upstream modeling code runs, nothing is downloaded):

* **Dream** (``config.model_type == "Dream"``): the parameter names are Qwen2's
  (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v}_proj`` with bias, ``o_proj``,
  ``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``), so the weights load unchanged into a
  ``Qwen2ForCausalLM`` built from the same config fields.
* **LLaDA** (``config.model_type == "llada"``): weights under ``model.transformer``; renamed into a
  ``LlamaForCausalLM`` (``wte`` -> ``embed_tokens``, ``attn_norm`` -> ``input_layernorm``,
  ``ff_norm`` -> ``post_attention_layernorm``, ``attn_out`` -> ``o_proj``, ``ln_f`` -> ``norm``,
  ``transformer.ff_out`` -> ``lm_head``). ``block_type="llama"`` blocks have separate
  ``q_proj/k_proj/v_proj`` and ``ff_proj`` (gate, SiLU) / ``up_proj`` / ``ff_out`` (down);
  ``block_type="sequential"`` blocks fuse ``att_proj`` (rows: q, then k, then v) and a SwiGLU
  ``ff_proj`` (rows: the first half is multiplied by ``silu`` of the second half, i.e. up then
  gate). Fused weights are split into row views (no copy).
* **stock** Llama / Qwen2 / Qwen3 checkpoints load as themselves.
* **LoRA adapters** (PEFT ``adapter_config.json`` + ``adapter_model.safetensors``, or a live
  ``peft.PeftModel``): applied with PEFT over the stock model (kept as separate LoRA layers, or
  merged when asked). Adapter module names written against a LLaDA base are renamed the same
  way; a LoRA on a fused projection is split exactly (``A`` shared, ``B`` split by rows).

Per-family decoding defaults (:data:`FAMILY_DEFAULTS`) fill what the checkpoint's
``config.json`` / ``generation_config.json`` do not say.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["FAMILY_DEFAULTS", "FamilyDefaults", "CheckpointInfo", "inspect_checkpoint", "check_weight_names",
           "load_stock_model",
           "as_stock_model", "is_stock_model", "STOCK_TYPES"]

STOCK_TYPES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class FamilyDefaults:
    """Decoding defaults of one model family (used where the checkpoint does not say)."""

    mask_token_id: int
    eos_token_id: int
    eot_token_id: Optional[int]
    logits_alignment: str
    block_size: int = 32
    threshold: float = 0.9


#: Defaults by family. Token ids are those of the released tokenizers (Dream-v0: ``<|mask|>``
#: 151666, ``<|endoftext|>`` 151643, ``<|im_end|>`` 151645; LLaDA-8B: ``<|mdm_mask|>`` 126336,
#: ``<|endoftext|>`` 126081, ``<|eot_id|>`` 126348). Dream predicts token ``i`` from position
#: ``i - 1`` (shifted, it starts from an autoregressive Qwen2.5); LLaDA from position ``i``.
#: Block size 32 and threshold 0.9 are the CDLM / Fast-dLLM decoding settings.
FAMILY_DEFAULTS: Dict[str, FamilyDefaults] = {
    "dream": FamilyDefaults(151666, 151643, 151645, "shifted"),
    "llada": FamilyDefaults(126336, 126081, 126348, "unshifted"),
}
# a stock checkpoint without diffusion fields: Qwen-based students follow Dream, Llama-based LLaDA
_STOCK_FAMILY = {"qwen2": "dream", "qwen3": "dream", "llama": "llada"}


@dataclass
class CheckpointInfo:
    """What was detected about a checkpoint and the decoding settings it implies.

    Attributes:
        family: ``"dream"``, ``"llada"``, ``"qwen2"``, ``"qwen3"`` or ``"llama"``.
        model_type: the checkpoint's ``config.model_type``.
        architecture: the stock transformers class the weights go into.
        block_type: LLaDA's ``block_type`` (``"llama"`` / ``"sequential"``), else ``None``.
        mask_token_id, eos_token_id, eot_token_id, logits_alignment, block_size, threshold:
            decoding settings; ``sources`` says where each came from (``"config.json"``,
            ``"generation_config.json"``, ``"table"`` (:data:`FAMILY_DEFAULTS`), ``"argument"``).
        vocab_size: rows of the output layer.
        adapter: ``None``, ``"lora"`` (separate LoRA layers) or ``"lora (merged)"``.
        path, base_path: the folder(s) read (``None`` for a model object).
    """

    family: str
    model_type: str
    architecture: str
    block_type: Optional[str] = None
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    logits_alignment: str = "shifted"
    block_size: int = 32
    threshold: float = 0.9
    vocab_size: Optional[int] = None
    adapter: Optional[str] = None
    path: Optional[str] = None
    base_path: Optional[str] = None
    sources: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- detection
def _family_of(model_type: str) -> str:
    mt = (model_type or "").lower()
    if mt == "dream":
        return "dream"
    if mt == "llada":
        return "llada"
    if mt in STOCK_TYPES:
        return mt
    raise ValueError(f"unsupported checkpoint: config.model_type is {model_type!r}; expected 'Dream', 'llada' "
                     f"or one of {STOCK_TYPES}")


def _first_int(value) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None
    return int(value)


def resolve_settings(family: str, config: Mapping, generation_config: Optional[Mapping] = None,
                     **overrides) -> Dict[str, Tuple[object, str]]:
    """``name -> (value, source)`` of the decoding settings of a checkpoint.

    Order: an explicit (non-``None``) override, then ``generation_config.json``, then
    ``config.json``, then :data:`FAMILY_DEFAULTS`. Read fields: ``mask_token_id``,
    ``eos_token_id`` (the first of a list; the others are taken as end-of-turn), ``block_size``
    / ``block_length``, ``threshold``; the alignment is the family's.
    """
    table = FAMILY_DEFAULTS[_STOCK_FAMILY.get(family, family)]
    gen = dict(generation_config or {})
    out: Dict[str, Tuple[object, str]] = {}

    def pick(name, keys, default, conv):
        if overrides.get(name) is not None:
            out[name] = (conv(overrides[name]), "argument")
            return
        for src, d in (("generation_config.json", gen), ("config.json", config)):
            for k in keys:
                if d.get(k) is not None:
                    out[name] = (conv(d[k]), src)
                    return
        out[name] = (default, "table")

    diffusion_fields = family in ("dream", "llada") or config.get("mask_token_id") is not None
    if diffusion_fields:
        pick("mask_token_id", ("mask_token_id",), table.mask_token_id, int)
        pick("eos_token_id", ("eos_token_id",), table.eos_token_id, _first_int)
    else:  # a stock LM's own eos is not a diffusion student's: use the family table unless told
        pick("mask_token_id", (), table.mask_token_id, int)
        pick("eos_token_id", (), table.eos_token_id, int)
    eos_list = gen.get("eos_token_id", config.get("eos_token_id"))
    if overrides.get("eot_token_id") is not None:
        out["eot_token_id"] = (int(overrides["eot_token_id"]), "argument")
    elif diffusion_fields and isinstance(eos_list, (list, tuple)) and len(eos_list) > 1:
        out["eot_token_id"] = (int(eos_list[1]), "generation_config.json" if "eos_token_id" in gen else "config.json")
    else:
        out["eot_token_id"] = (table.eot_token_id, "table")
    pick("logits_alignment", (), table.logits_alignment, str)
    pick("block_size", ("block_size", "block_length"), table.block_size, int)
    pick("threshold", ("threshold",), table.threshold, float)
    return out


def _read_json(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _resolve_base(adapter_path: str, base: Optional[str]) -> str:
    if base is not None:
        base_path = str(base)
    else:
        cfg = _read_json(os.path.join(adapter_path, "adapter_config.json"))
        name = cfg.get("base_model_name_or_path")
        if not name:
            raise ValueError(f"{adapter_path} is a LoRA adapter without base_model_name_or_path: pass base=<folder>")
        cands = [name, os.path.join(adapter_path, name), os.path.join(os.path.dirname(os.path.abspath(adapter_path)),
                                                                      name)]
        found = [c for c in cands if os.path.isfile(os.path.join(c, "config.json"))]
        if not found:
            raise ValueError(f"the base model {name!r} of the adapter {adapter_path} is not a local folder "
                             "(nothing is downloaded): pass base=<folder with config.json and weights>")
        base_path = found[0]
    if not os.path.isfile(os.path.join(base_path, "config.json")):
        raise ValueError(f"base must be a model folder with config.json, got {base_path!r}")
    return base_path


def _check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a folder")
    if not (os.path.isfile(os.path.join(path, "config.json")) or _is_adapter_folder(path)):
        raise ValueError(f"{path!r} holds neither config.json (a model) nor adapter_config.json (a LoRA adapter)")


def _stock_class_name(family: str, config: Mapping) -> str:
    return {"dream": "Qwen2ForCausalLM", "llada": "LlamaForCausalLM", "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]


def inspect_checkpoint(path: str, *, base: Optional[str] = None, **overrides) -> CheckpointInfo:
    """Detect a checkpoint folder's family and decoding settings from its JSON files (no weights read).

    ``path`` is a model folder (``config.json`` + weights) or a PEFT adapter folder over a base
    folder (``base=``, or the adapter's ``base_model_name_or_path`` when it is a local folder).
    """
    path = os.fspath(path)
    _check_folder(path)
    adapter = None
    base_path = None
    model_path = path
    if _is_adapter_folder(path) and not os.path.isfile(os.path.join(path, "config.json")):
        base_path = _resolve_base(path, base)
        model_path = base_path
        adapter = "lora"
    config = _read_json(os.path.join(model_path, "config.json"))
    gen_file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_file):
        gen_file = os.path.join(model_path, "generation_config.json")
    gen = _read_json(gen_file) if os.path.isfile(gen_file) else None
    info = _info_from_config(config, gen, **overrides)
    info.adapter, info.path, info.base_path = adapter, path, base_path
    return info


def _info_from_config(config: Mapping, gen: Optional[Mapping], **overrides) -> CheckpointInfo:
    model_type = config.get("model_type", "")
    family = _family_of(model_type)
    settings = resolve_settings(family, config, gen, **overrides)
    if family == "llada":
        vocab = config.get("embedding_size") or config.get("vocab_size")
    else:
        vocab = config.get("vocab_size")
    info = CheckpointInfo(family=family, model_type=model_type, architecture=_stock_class_name(family, config),
                          block_type=config.get("block_type") if family == "llada" else None,
                          vocab_size=vocab)
    for name, (value, src) in settings.items():
        setattr(info, name, value)
        info.sources[name] = src
    return info


def check_token_ids(info: CheckpointInfo) -> None:
    """A clear error for a ``[MASK]`` id the model cannot score, or one equal to EOS."""
    mask, eos, vocab = info.mask_token_id, info.eos_token_id, info.vocab_size
    src = info.sources.get("mask_token_id", "?")
    if vocab is not None and not 0 <= mask < vocab:
        raise ValueError(f"mask_token_id {mask} (from {src}) is outside the vocabulary of {vocab} tokens of this "
                         f"{info.family} checkpoint: pass mask_token_id=<the [MASK] id of its tokenizer>")
    if eos is not None and mask == eos:
        raise ValueError(f"mask_token_id and eos_token_id must differ, both are {mask} (from {src} and "
                         f"{info.sources.get('eos_token_id', '?')})")


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


def _rope_kwargs(cfg_cls, theta: float) -> Dict[str, object]:
    """``rope_theta`` as the installed transformers spells it (``rope_parameters`` since 5.x)."""
    probe = cfg_cls()
    if hasattr(probe, "rope_parameters"):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


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


def is_stock_model(model) -> bool:
    """Whether ``model`` is (or wraps through PEFT) a Llama / Qwen2 / Qwen3 ``*ForCausalLM``."""
    base = _peft_base(model) or model
    cfg = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    return (getattr(cfg, "model_type", None) in STOCK_TYPES and inner is not None
            and all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and hasattr(base, "lm_head"))


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
