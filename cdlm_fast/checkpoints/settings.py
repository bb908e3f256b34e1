"""Checkpoint detection and decoding settings: family defaults, :class:`CheckpointInfo`, token-id checks.

Reads only the JSON files of a checkpoint folder (``config.json``, ``generation_config.json``,
``adapter_config.json``); no weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple


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


# ---------------------------------------------------------------------------- configs (rope spelling, shared)
def _rope_kwargs(cfg_cls, theta: float) -> Dict[str, object]:
    """``rope_theta`` as the installed transformers spells it (``rope_parameters`` since 5.x)."""
    probe = cfg_cls()
    if hasattr(probe, "rope_parameters"):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}
