"""Block-causal CDLM student on top of a Hugging Face decoder, with an exact block KV cache.

:class:`BlockCausalStudent` wraps a Llama / Qwen2 / Qwen3 ``*ForCausalLM`` *without copying
its weights* and runs a short forward of its own that walks ``model.model.layers``
(embedding, per layer ``input_layernorm`` -> q/k/v projections (+ Qwen3's q/k norms) ->
RoPE from the model's own rotary embedding -> :func:`cdlm_fast.attention` -> ``o_proj`` ->
residual -> ``post_attention_layernorm`` -> ``mlp`` -> residual, then the final norm and
``lm_head``).

Attention layout (one physical key axis per sample)::

    slot:  [0, P)                    [P, P + bs)  [P + bs, P + 2 bs) ...
           prompt (left padded, or   block 0      block 1
           a compacted prompt cache)

* the prompt is visible to every query (``prefix_len = P``); left-padding keys carry a
  ``-inf`` bias so they are never attended;
* a query in block ``i`` sees the prompt and blocks ``<= i``, bidirectionally inside its
  own block (``block_size = bs``);
* RoPE positions are per sample: prompt tokens get ``0 .. n_b - 1`` (``n_b`` = the sample's
  true prompt length), generated token ``g`` gets ``n_b + g`` (``T + g`` after a compacted
  prompt of logical length ``T``).

The cache (:class:`BlockKVCache`) is preallocated once per generation: K/V buffers
``[layers, B, Hkv, max_len, D]`` in the model dtype and a float32 bias buffer
``[layers, B, Hkv, max_len]``, plus the RoPE cos/sin of every slot. A forward over the
current block writes the block's K/V into its slot and attends over the cache *and* the
block itself; ``cache.length`` (the committed length) only advances when a block is
finished (``commit=``), so the cached K/V of finished blocks are exact and never refreshed.

Logit alignment:

* ``"shifted"`` (Dream): the logit at position ``i - 1`` predicts token ``i``; the first
  token of a block takes the last logit of the previous block (or of the prompt), which is
  fixed once that block is finished and is carried in the cache.
* ``"unshifted"`` (LLaDA): the logit at position ``i`` predicts token ``i``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .ops.attention import attention
from .ops.attention_cpu import visible_mask

__all__ = [
    "BlockCausalStudent",
    "load_student",
    "BlockKVCache",
    "DREAM_MASK_TOKEN_ID",
    "DREAM_EOS_TOKEN_ID",
    "LLADA_MASK_TOKEN_ID",
    "LLADA_EOS_TOKEN_ID",
    "default_token_settings",
]

DREAM_MASK_TOKEN_ID = 151666
DREAM_EOS_TOKEN_ID = 151643
LLADA_MASK_TOKEN_ID = 126336
LLADA_EOS_TOKEN_ID = 126081

_SUPPORTED_TYPES = ("llama", "qwen2", "qwen3")
_ALIGNMENTS = ("shifted", "unshifted")
_ATTN_IMPLS = ("cdlm", "sdpa")


def default_token_settings(model_type: str) -> Tuple[int, int, str]:
    """``(mask_token_id, eos_token_id, logits_alignment)`` used when not given.

    Qwen2 / Qwen3 models default to Dream-v0 (mask 151666, eos 151643, ``"shifted"``);
    Llama models default to LLaDA-8B (mask 126336, eos 126081, ``"unshifted"``).
    """
    if model_type == "llama":
        return LLADA_MASK_TOKEN_ID, LLADA_EOS_TOKEN_ID, "unshifted"
    return DREAM_MASK_TOKEN_ID, DREAM_EOS_TOKEN_ID, "shifted"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_fallback(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@dataclass
class BlockKVCache:
    """Preallocated exact KV cache of a block-causal student.

    Attributes:
        keys, values: ``[layers, B, Hkv, max_len, D]`` in the model dtype (post-RoPE keys).
        bias: ``[layers, B, Hkv, max_len]`` float32 per-key bias (``-inf`` for padding keys,
            the fitted beta of a compacted prompt, 0 elsewhere).
        cos, sin: ``[B, max_len, D]`` RoPE tables of every slot (model dtype).
        prefix_len: physical prompt length ``P`` (padding and compacted keys included).
        prefix_len_t: the same as an int32 ``[B]`` tensor (passed to the attention op).
        length: committed physical length (``P`` + finished blocks).
        block_size: generated block length.
        position_base: ``[B]`` int64, RoPE position of the first generated token.
        carry_logits: ``[B, V]`` float32 logit predicting the next block's first token
            (shifted alignment), or ``None``.
        per_layer_bias: whether the layers' biases differ (a compacted prompt cache).
    """

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    prefix_len: int
    prefix_len_t: torch.Tensor
    length: int
    block_size: int
    position_base: torch.Tensor
    carry_logits: Optional[torch.Tensor] = None
    per_layer_bias: bool = False

    @property
    def capacity(self) -> int:
        """Number of key slots (``max_len``)."""
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]


class BlockCausalStudent:
    """A block-causal diffusion student sharing the weights of a Hugging Face decoder.

    Args:
        model: a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (weights used
            in place), a ``peft.PeftModel`` of one (LoRA layers kept, not merged), a Dream or
            LLaDA model object (moved into the stock class, weights shared), or a checkpoint
            folder (see :func:`load_student`, which also takes dtype / device / adapter options).
        mask_token_id: the ``[MASK]`` token; default from the checkpoint's config /
            generation_config, else :data:`cdlm_fast.checkpoints.FAMILY_DEFAULTS` (Dream for
            Qwen2/Qwen3, LLaDA for Llama, see :func:`default_token_settings`).
        eos_token_id: end of text; same default rule.
        logits_alignment: ``"shifted"`` (Dream) or ``"unshifted"`` (LLaDA); same default rule.
        backend: attention backend for :func:`cdlm_fast.attention` (``"auto"``, ``"cuda"``,
            ``"triton"``, ``"torch"``).
        attn_impl: ``"cdlm"`` (the fused :func:`cdlm_fast.attention`) or ``"sdpa"``
            (``torch.nn.functional.scaled_dot_product_attention`` with a materialised float
            mask, built once per forward: the usual Hugging Face path, kept as a baseline).
        info: a :class:`~cdlm_fast.checkpoints.CheckpointInfo` already detected for ``model``.

    Attributes:
        info: the detected :class:`~cdlm_fast.checkpoints.CheckpointInfo` (family, adapter, the
            decoding defaults ``block_size`` / ``threshold`` and where each setting came from).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mask_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        logits_alignment: Optional[str] = None,
        backend: str = "auto",
        attn_impl: str = "cdlm",
        info=None,
    ):
        from .checkpoints import _peft_base, as_stock_model, check_token_ids, load_stock_model

        if isinstance(model, (str, os.PathLike)):
            model, info = load_stock_model(model, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                                           logits_alignment=logits_alignment)
        elif info is None:
            # a Dream / LLaDA model object or a PEFT model becomes a stock model (weights shared)
            model, info = as_stock_model(model, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                                         logits_alignment=logits_alignment)
        hf = _peft_base(model)
        hf = model if hf is None else hf  # a PeftModel keeps its LoRA layers inside the stock modules
        inner = getattr(hf, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(hf, "lm_head"):
            raise TypeError("model must be a Hugging Face *ForCausalLM with model.model.{embed_tokens, layers, "
                            f"norm, rotary_emb}} and model.lm_head (Llama / Qwen2 / Qwen3), got {type(hf).__name__}")
        config = hf.config
        model_type = getattr(config, "model_type", "")
        if model_type not in _SUPPORTED_TYPES:
            raise TypeError(f"model.config.model_type must be one of {_SUPPORTED_TYPES}, got {model_type!r}")
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"sliding-window layers are not supported (config.layer_types = {layer_types})")
        if attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {_ATTN_IMPLS}, got {attn_impl!r}")
        info = dataclasses.replace(info, sources=dict(info.sources))
        self.info = info
        self.mask_token_id = info.mask_token_id if mask_token_id is None else int(mask_token_id)
        self.eos_token_id = info.eos_token_id if eos_token_id is None else int(eos_token_id)
        self.logits_alignment = info.logits_alignment if logits_alignment is None else logits_alignment
        if self.logits_alignment not in _ALIGNMENTS:
            raise ValueError(f"logits_alignment must be one of {_ALIGNMENTS}, got {logits_alignment!r}")
        info.mask_token_id, info.eos_token_id = self.mask_token_id, self.eos_token_id
        info.logits_alignment = self.logits_alignment
        info.vocab_size = hf.lm_head.out_features
        if info.family in ("dream", "llada") or info.path is not None:
            check_token_ids(info)  # a converted checkpoint: its ids must fit its vocabulary
        self.model = model
        self.config = config
        self.backend = backend
        self.attn_impl = attn_impl
        self.hf_model = hf
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = hf.lm_head
        attn0 = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn0.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = float(attn0.scaling)
        self.vocab_size = self.lm_head.out_features
        module = sys.modules.get(type(attn0).__module__)
        self._apply_rotary = getattr(module, "apply_rotary_pos_emb", None) or _apply_rotary_fallback

    # ------------------------------------------------------------------ properties
    @property
    def shifted(self) -> bool:
        return self.logits_alignment == "shifted"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ core forward
    def _layers(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run all decoder layers; ``attend(i, q, k, v) -> [B, Hq, n, D]``. Returns the final-normed hidden."""
        b, n = input_ids.shape
        d = self.head_dim
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, n, -1, d)
            k = attn.k_proj(x).view(b, n, -1, d)
            v = attn.v_proj(x).view(b, n, -1, d).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self._apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            o = attend(i, q, k, v)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _attention(self, q, k, v, bias, prefix_len, block_size, q_offset, sdpa_mask=None):
        if self.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)
        return attention(q, k, v, bias=bias, prefix_len=prefix_len, block_size=block_size or None,
                         q_offset=q_offset, scale=self.scale, backend=self.backend)

    @torch.no_grad()
    def prefill_with_queries(self, prompt_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                             *, block_size: int = 0):
        """Prefill the prompt and capture every layer's post-RoPE queries.

        These are the reference queries for compacting the student's own prompt cache with
        :func:`cdlm_fast.compaction.compact_kv` (the student's prompt attends bidirectionally,
        so its cache differs from an autoregressive prefill of the same tokens). With
        ``block_size > 0`` the queries of a first block of ``[MASK]`` tokens (what the decoder
        asks of the prompt cache at its first step) are appended after the prompt's own.

        Returns:
            ``(cache, queries)``: the :class:`BlockKVCache` of the prompt (``P`` committed slots)
            and ``{layer: [B, Hq, P + block_size, D]}``.
        """
        captured = []

        def capture(q, *args, **kwargs):
            captured.append(q.detach().clone())
            return type(self)._attention(self, q, *args, **kwargs)

        self._attention = capture
        try:
            cache = self.prefill(prompt_ids, attention_mask, max_new_tokens=block_size, block_size=max(block_size, 1))
            if block_size:
                masks = torch.full((cache.keys.shape[1], block_size), self.mask_token_id, dtype=torch.long,
                                   device=cache.keys.device)
                self.block_forward(cache, masks, return_logits=False)
        finally:
            del self._attention
        layers = self.num_layers
        queries = {i: torch.cat(captured[i::layers], dim=2) for i in range(layers)}
        return cache, queries

    def _sdpa_mask(self, bias, prefix_len_t, block_size, q_offset, lq, lk) -> Optional[torch.Tensor]:
        """Materialised additive mask ``[B, Hkv or 1 -> Hq, lq, lk]`` for the SDPA baseline."""
        if self.attn_impl != "sdpa":
            return None
        vis = visible_mask(prefix_len_t, block_size or None, q_offset, lq, lk)  # [B, lq, lk]
        add = torch.zeros(vis.shape, dtype=self.dtype, device=vis.device).masked_fill(~vis, float("-inf"))
        add = add.unsqueeze(1) + bias.to(self.dtype).repeat_interleave(self.num_heads // self.num_kv_heads,
                                                                         dim=1).unsqueeze(2)
        return add

    def rope(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, L, D]`` (model dtype) of integer ``positions`` ``[B, L]`` from the model's rotary module."""
        dummy = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.rotary_emb(dummy, positions)

    # ------------------------------------------------------------------ cache
    def allocate_cache(self, batch_size: int, max_len: int, *, block_size: int, prefix_len: int) -> BlockKVCache:
        """Preallocate a :class:`BlockKVCache` with ``max_len`` key slots (zeros; bias 0).

        The RoPE tables, ``position_base`` and padding biases are filled by :meth:`prefill`.
        """
        L, hkv, d = self.num_layers, self.num_kv_heads, self.head_dim
        dev, dt = self.device, self.dtype
        return BlockKVCache(
            keys=torch.zeros(L, batch_size, hkv, max_len, d, dtype=dt, device=dev),
            values=torch.zeros(L, batch_size, hkv, max_len, d, dtype=dt, device=dev),
            bias=torch.zeros(L, batch_size, hkv, max_len, dtype=torch.float32, device=dev),
            cos=torch.zeros(batch_size, max_len, d, dtype=dt, device=dev),
            sin=torch.zeros(batch_size, max_len, d, dtype=dt, device=dev),
            prefix_len=prefix_len,
            prefix_len_t=torch.full((batch_size,), prefix_len, dtype=torch.int32, device=dev),
            length=0,
            block_size=block_size,
            position_base=torch.zeros(batch_size, dtype=torch.int64, device=dev),
        )

    def _check_ids(self, name: str, ids: torch.Tensor, batch: Optional[int] = None) -> None:
        if not torch.is_tensor(ids) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int64 tensor of shape [B, L], got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 2 or (batch is not None and ids.shape[0] != batch):
            raise ValueError(f"{name} must have shape [B{'=' + str(batch) if batch else ''}, L], "
                             f"got {tuple(ids.shape)}")
        if ids.device != self.device:
            raise ValueError(f"{name} must be on the model's device {self.device}, got {ids.device}")

    def _check_mask(self, name: str, mask: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return torch.ones_like(ids, dtype=torch.bool)
        if not torch.is_tensor(mask):
            raise TypeError(f"{name} must be a [B, L] tensor of 0/1, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"{name} must have shape {tuple(ids.shape)} like the ids, got {tuple(mask.shape)}")
        mask = mask.to(device=ids.device).bool()
        if mask.shape[1] > 1 and bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
            raise ValueError(f"{name} must describe left padding (zeros first, then ones in every row)")
        return mask

    @torch.no_grad()
    def prefill(
        self,
        prompt_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        *,
        max_new_tokens: int,
        block_size: int = 32,
        prompt_cache=None,
    ) -> BlockKVCache:
        """Allocate the cache and fill it with the prompt.

        Args:
            prompt_ids: ``[B, P]`` int64, left padded. With ``prompt_cache``: tokens appended
                after the cached prompt (``[B, s]``, may be ``None``).
            attention_mask: ``[B, P]`` 0/1 (left padding), default all ones.
            max_new_tokens: generated tokens the cache must hold (rounded up to blocks).
            block_size: generated block length.
            prompt_cache: optional precomputed (e.g. Attention-Matching compacted) prompt
                cache: ``.layers[i].keys`` / ``.values`` ``[B, Hkv, t, D]`` (post-RoPE),
                ``.layers[i].bias`` ``[B, Hkv, t]`` float32 or ``None`` (``t`` may differ per layer: the
                cache holds ``max t`` slots, a layer's extra slots get bias ``-inf``), ``.logical_length`` (int
                or ``[B]``: original prompt length ``T``; new tokens are placed at RoPE positions
                ``T, T+1, ...``) and optionally ``.last_logits`` ``[B, V]`` (the prompt's last
                logit, needed by the shifted alignment when no ``prompt_ids`` follow).

        Returns:
            The filled :class:`BlockKVCache` (``length = prefix_len``); for the shifted alignment
            ``cache.carry_logits`` ``[B, V]`` float32 holds the logit of the last prompt position.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        n_gen = -(-max_new_tokens // block_size) * block_size
        dev = self.device
        if prompt_cache is None:
            if prompt_ids is None:
                raise ValueError("prompt_ids must be a [B, P] int64 tensor (it may only be None with prompt_cache)")
            self._check_ids("prompt_ids", prompt_ids)
            mask = self._check_mask("attention_mask", attention_mask, prompt_ids)
            b, p = prompt_ids.shape
            t, layers, base = 0, None, torch.zeros(b, dtype=torch.int64, device=dev)
        else:
            layers, t, b, base = self._check_prompt_cache(prompt_cache)
            if prompt_ids is None:
                prompt_ids = torch.zeros(b, 0, dtype=torch.int64, device=dev)
            self._check_ids("prompt_ids", prompt_ids, batch=b)
            mask = self._check_mask("attention_mask", attention_mask, prompt_ids)
            p = t + prompt_ids.shape[1]
        s = prompt_ids.shape[1]
        # capacity rounded up to 16 slots: every per-head row of the K/V and bias buffers then
        # starts 16-byte aligned, so kernels can read cache slices without a copy
        cache = self.allocate_cache(b, -(-(p + n_gen) // 16) * 16, block_size=block_size, prefix_len=p)
        # positions of every slot: cached prompt [0, t) (keys already rotated, unused),
        # prompt tokens base + cumsum(mask) - 1, generated base + n_prompt + g
        mask_l = mask.long()
        n_prompt = mask_l.sum(1)
        pos = torch.zeros(b, cache.capacity, dtype=torch.int64, device=dev)
        pos[:, t:p] = (base.view(-1, 1) + mask_l.cumsum(1) - 1).clamp(min=0)
        cache.position_base = base + n_prompt
        n_slots = cache.capacity - p
        pos[:, p:] = cache.position_base.view(-1, 1) + torch.arange(n_slots, device=dev).view(1, -1)
        cos, sin = self.rope(pos)
        cache.cos.copy_(cos)
        cache.sin.copy_(sin)
        if layers is not None:
            for i, lay in enumerate(layers):
                t_l = lay.keys.shape[2]
                cache.keys[i, :, :, :t_l].copy_(lay.keys)
                cache.values[i, :, :, :t_l].copy_(lay.values)
                if lay.bias is not None:
                    cache.bias[i, :, :, :t_l].copy_(lay.bias)
                    cache.per_layer_bias = True
                if t_l < t:  # a layer with fewer slots: the rest are absent keys
                    cache.bias[i, :, :, t_l:t] = float("-inf")
                    cache.per_layer_bias = True
        cache.bias[:, :, :, t:p].masked_fill_(~mask.view(1, b, 1, s), float("-inf"))
        cache.length = t
        if s > 0:
            hidden = self._cached_forward(cache, prompt_ids, prompt=True)
            cache.length = p
            if self.shifted:
                cache.carry_logits = self._logits(hidden[:, -1])
        elif self.shifted:
            last = getattr(prompt_cache, "last_logits", None)
            if last is None:
                raise ValueError("the shifted logit alignment needs the prompt's last logit: pass prompt_ids "
                                 "(e.g. the question after a compacted context) or give prompt_cache.last_logits")
            if tuple(last.shape) != (b, self.vocab_size):
                raise ValueError(f"prompt_cache.last_logits must have shape [B={b}, V={self.vocab_size}], "
                                 f"got {tuple(last.shape)}")
            cache.carry_logits = last.to(device=dev, dtype=torch.float32)
        return cache

    def _check_prompt_cache(self, pc):
        layers = getattr(pc, "layers", None)
        if layers is None or not hasattr(pc, "logical_length"):
            raise TypeError("prompt_cache must have .layers (one entry per decoder layer with .keys, .values, .bias) "
                            "and .logical_length")
        layers = list(layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"prompt_cache.layers must have {self.num_layers} entries (one per layer), "
                             f"got {len(layers)}")
        k0 = layers[0].keys
        if not torch.is_tensor(k0) or k0.dim() != 4:
            raise ValueError(f"prompt_cache.layers[0].keys must be a [B, Hkv, t, D] tensor, got "
                             f"{tuple(getattr(k0, 'shape', ()))}")
        b = k0.shape[0]
        t = max(lay.keys.shape[2] for lay in layers)  # layers may keep different numbers of slots
        for i, lay in enumerate(layers):
            t_l = lay.keys.shape[2] if lay.keys.dim() == 4 else -1
            want = (b, self.num_kv_heads, t_l, self.head_dim)
            for name in ("keys", "values"):
                x = getattr(lay, name)
                if tuple(x.shape) != want:
                    raise ValueError(f"prompt_cache.layers[{i}].{name} must have shape [B, Hkv, t, D] = {want}, "
                                     f"got {tuple(x.shape)}")
                if x.device != self.device:
                    raise ValueError(f"prompt_cache.layers[{i}].{name} must be on {self.device}, got {x.device}")
            if lay.bias is not None:
                if tuple(lay.bias.shape) != want[:3]:
                    raise ValueError(f"prompt_cache.layers[{i}].bias must have shape [B, Hkv, t] = {want[:3]}, "
                                     f"got {tuple(lay.bias.shape)}")
                if lay.bias.dtype != torch.float32:
                    raise TypeError(f"prompt_cache.layers[{i}].bias must be float32, got {lay.bias.dtype}")
        T = pc.logical_length
        if torch.is_tensor(T):
            if T.shape != (b,):
                raise ValueError(f"prompt_cache.logical_length must be an int or a [B={b}] tensor, "
                                 f"got shape {tuple(T.shape)}")
            base = T.to(device=self.device, dtype=torch.int64)
        else:
            if isinstance(T, bool) or not isinstance(T, int) or T < 0:
                raise TypeError(f"prompt_cache.logical_length must be a non-negative int, got {T!r}")
            base = torch.full((b,), T, dtype=torch.int64, device=self.device)
        return layers, t, b, base

    def _cached_forward(self, cache: BlockKVCache, ids: torch.Tensor, *, prompt: bool = False) -> torch.Tensor:
        """Forward of ``ids`` placed at slots ``[cache.length, cache.length + n)``; writes their K/V there.

        Returns the final-normed hidden states ``[B, n, H]``. ``cache.length`` is not changed.
        """
        s = cache.length
        n = ids.shape[1]
        e = s + n
        if e > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} slots, a forward up to slot {e} was requested")
        block = None if prompt else cache.block_size
        cos, sin = cache.cos[:, s:e], cache.sin[:, s:e]
        # the SDPA baseline materialises its mask once per forward (per layer only when the
        # layers carry different biases, i.e. a compacted prompt cache)
        sdpa_mask = None
        # the prompt length as a host int on the CPU (the attention op's one-pass decode path takes
        # ints), as the cached [B] tensor on a GPU (no host-to-device copy per call)
        prefix = cache.prefix_len if cache.keys.device.type == "cpu" else cache.prefix_len_t
        if self.attn_impl == "sdpa" and not cache.per_layer_bias:
            sdpa_mask = self._sdpa_mask(cache.bias[0, :, :, :e], cache.prefix_len_t, block, s, n, e)

        def attend(i, q, k, v):
            kc, vc, bc = cache.keys[i], cache.values[i], cache.bias[i]
            kc[:, :, s:e].copy_(k)
            vc[:, :, s:e].copy_(v)
            m = sdpa_mask
            if self.attn_impl == "sdpa" and cache.per_layer_bias:
                m = self._sdpa_mask(bc[:, :, :e], cache.prefix_len_t, block, s, n, e)
            return self._attention(q, kc[:, :, :e], vc[:, :, :e], bc[:, :, :e], prefix, block, s, m)

        return self._layers(ids, cos, sin, attend)

    @torch.no_grad()
    def block_forward(self, cache: BlockKVCache, block_ids: torch.Tensor, *, commit: int = 0,
                      return_logits: bool = True) -> Optional[torch.Tensor]:
        """One denoising forward of the current block (optionally with the just-finished block).

        Args:
            cache: the cache from :meth:`prefill`; ``cache.length - cache.prefix_len`` must be a
                multiple of ``cache.block_size``.
            block_ids: ``[B, n]`` tokens at slots ``[cache.length, cache.length + n)``: the first
                ``commit`` of them are a finished block (its K/V become part of the exact cache),
                the rest the current block (``[MASK]`` where undecided).
            commit: number of leading tokens to commit (``0``, or a full finished block; ``n``
                commits a finished block without a following block).
            return_logits: compute the logits of the current block.

        Returns:
            ``[B, n - commit, V]`` float32 logits, row ``j`` predicting ``block_ids[:, commit + j]``
            (alignment applied), or ``None`` when ``n == commit`` or ``return_logits`` is False.
            After the call ``cache.length`` has advanced by ``commit``; with the shifted alignment
            ``cache.carry_logits`` then holds the committed block's last logit.
        """
        self._check_ids("block_ids", block_ids, batch=cache.batch_size)
        n = block_ids.shape[1]
        if isinstance(commit, bool) or not isinstance(commit, int) or not 0 <= commit <= n:
            raise ValueError(f"commit must be an int in [0, {n}] (leading tokens of block_ids), got {commit!r}")
        rel = cache.length - cache.prefix_len
        if rel < 0 or rel % cache.block_size:
            raise ValueError(f"cache.length={cache.length} is not at a block boundary (prefix_len="
                             f"{cache.prefix_len}, block_size={cache.block_size})")
        if 0 < commit and commit != cache.block_size and commit != n:
            raise ValueError(f"commit must be a full block of {cache.block_size} tokens, got {commit}")
        hidden = self._cached_forward(cache, block_ids)
        cur = n - commit
        logits = None
        if self.shifted:
            if return_logits and cur > 0:
                if commit > 0:
                    logits = self._logits(hidden[:, commit - 1:n - 1])
                else:
                    if cache.carry_logits is None:
                        raise ValueError("cache.carry_logits is missing (shifted alignment): prefill first")
                    rest = self._logits(hidden[:, : cur - 1])
                    logits = torch.cat([cache.carry_logits.unsqueeze(1), rest], dim=1)
            if commit > 0:
                cache.carry_logits = self._logits(hidden[:, commit - 1])
        elif return_logits and cur > 0:
            logits = self._logits(hidden[:, commit:])
        cache.length += commit
        return logits

    # ------------------------------------------------------------------ no-cache forward
    def sequence_positions(self, prompt_mask: torch.Tensor, n_gen: int) -> torch.Tensor:
        """RoPE positions ``[B, P + n_gen]`` for a left-padded prompt followed by ``n_gen`` tokens."""
        m = prompt_mask.long()
        ppos = (m.cumsum(1) - 1).clamp(min=0)
        gen = m.sum(1, keepdim=True) + torch.arange(n_gen, device=m.device).view(1, -1)
        return torch.cat([ppos, gen], dim=1)

    @torch.no_grad()
    def full_forward(self, ids: torch.Tensor, prompt_mask: torch.Tensor, *, block_size: Optional[int],
                     logits_positions: Optional[slice] = None) -> torch.Tensor:
        """Forward of a whole sequence without a cache (the recompute baselines).

        Args:
            ids: ``[B, P + n]`` int64, the left-padded prompt followed by ``n`` generated slots.
            prompt_mask: ``[B, P]`` 0/1 prompt attention mask (left padding).
            block_size: ``None`` for full bidirectional attention (vanilla diffusion decoding),
                else the block-causal mask with blocks of ``block_size`` after the prompt.
            logits_positions: positions whose logits to compute (default all).

        Returns:
            float32 logits ``[B, len(positions), V]`` of those *positions* (no alignment applied).
        """
        hidden = self.sequence_hidden(ids, prompt_mask, block_size=block_size)
        if logits_positions is not None:
            hidden = hidden[:, logits_positions]
        return self._logits(hidden)

    def sequence_hidden(self, ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                        block_size: Optional[int]) -> torch.Tensor:
        """Final hidden states ``[B, P + n, hidden]`` of a whole sequence without a cache, with
        autograd (:meth:`full_forward` runs it under ``no_grad``; :mod:`cdlm_fast.training` trains
        through it). Arguments as in :meth:`full_forward`."""
        self._check_ids("ids", ids)
        b, total = ids.shape
        p = prompt_mask.shape[1]
        prompt_mask = prompt_mask.to(ids.device).bool()
        pos = self.sequence_positions(prompt_mask, total - p)
        cos, sin = self.rope(pos)
        bias = torch.zeros(b, self.num_kv_heads, total, dtype=torch.float32, device=ids.device)
        bias[:, :, :p].masked_fill_(~prompt_mask.view(b, 1, p), float("-inf"))
        prefix_t = torch.full((b,), p, dtype=torch.int32, device=ids.device)
        sdpa_mask = self._sdpa_mask(bias, prefix_t, block_size, 0, total, total)

        def attend(i, q, k, v):
            return self._attention(q, k, v, bias, prefix_t, block_size, 0, sdpa_mask)

        return self._layers(ids, cos, sin, attend)


def load_student(path_or_model, *, base=None, dtype=None, device=None, merge_adapter: bool = False,
                 mask_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 logits_alignment: Optional[str] = None, block_size: Optional[int] = None,
                 threshold: Optional[float] = None, backend: str = "auto", attn_impl: str = "cdlm"
                 ) -> BlockCausalStudent:
    """A :class:`BlockCausalStudent` from any supported checkpoint or model object.

    Args:
        path_or_model: a checkpoint folder (``config.json`` + safetensors: Dream
            ``model_type "Dream"``, LLaDA ``"llada"`` with either block type, or stock
            ``"llama"`` / ``"qwen2"`` / ``"qwen3"``), a PEFT LoRA adapter folder (over ``base``),
            a Dream / LLaDA / stock model object, a ``peft.PeftModel`` or a student (returned as is).
            Folders load without ``trust_remote_code``: the weights go into the stock
            transformers class (see :mod:`cdlm_fast.checkpoints`).
        base: base model folder of an adapter folder (default: the adapter's
            ``base_model_name_or_path`` when it is a local folder).
        dtype, device: of the loaded weights (folders; a model object keeps its own device, and
            its dtype unless converted). Default: the checkpoint's dtype, CPU.
        merge_adapter: merge a LoRA into the weights (default: separate LoRA layers, the base
            weights untouched).
        mask_token_id, eos_token_id, logits_alignment, block_size, threshold: override the
            checkpoint's settings (default: generation_config.json, config.json, then
            :data:`cdlm_fast.checkpoints.FAMILY_DEFAULTS`).
        backend, attn_impl: as for :class:`BlockCausalStudent`.

    Returns:
        the student; ``student.info`` says what was detected.

    Raises:
        ValueError: a folder that is no supported checkpoint (naming the missing / unexpected
            weight keys), a ``[MASK]`` id outside the vocabulary or equal to EOS.
    """
    from .checkpoints import as_stock_model, load_stock_model

    if isinstance(path_or_model, BlockCausalStudent):
        return path_or_model
    kw = dict(mask_token_id=mask_token_id, eos_token_id=eos_token_id, logits_alignment=logits_alignment,
              block_size=block_size, threshold=threshold)
    if isinstance(path_or_model, (str, os.PathLike)):
        model, info = load_stock_model(path_or_model, base=base, dtype=dtype, device=device,
                                       merge_adapter=merge_adapter, **kw)
    else:
        if base is not None:
            raise ValueError("base= is for an adapter folder; a model object already holds its base")
        model, info = as_stock_model(path_or_model, merge_adapter=merge_adapter, dtype=dtype, **kw)
        if device is not None:
            model = model.to(device)
    return BlockCausalStudent(model, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                              logits_alignment=logits_alignment, backend=backend, attn_impl=attn_impl, info=info)
