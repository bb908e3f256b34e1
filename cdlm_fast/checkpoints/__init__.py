"""Diffusion-LM checkpoints (Dream, LLaDA, CDLM students, LoRA adapters) as stock transformers models.

The block-causal student (:class:`cdlm_fast.student.BlockCausalStudent`) runs its own forward
over a stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``. This package
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

Modules: :mod:`.settings` (family defaults, detection, decoding settings), :mod:`.llada` (LLaDA
config and parameter names), :mod:`.weights` (reading and matching weights, building the stock
model), :mod:`.lora` (PEFT adapters), :mod:`.loading` (the entry points).
"""
# re-exported: the public names, plus helpers other modules of the package import from here
from .llada import llada_module_names  # noqa: F401
from .loading import as_stock_model, check_weight_names, is_stock_model, load_stock_model
from .lora import _peft_base  # noqa: F401
from .settings import (FAMILY_DEFAULTS, STOCK_TYPES, CheckpointInfo, FamilyDefaults, check_token_ids,  # noqa: F401
                       inspect_checkpoint, resolve_settings)
from .weights import Plan  # noqa: F401

__all__ = ["FAMILY_DEFAULTS", "FamilyDefaults", "CheckpointInfo", "inspect_checkpoint", "check_weight_names",
           "load_stock_model",
           "as_stock_model", "is_stock_model", "STOCK_TYPES"]
