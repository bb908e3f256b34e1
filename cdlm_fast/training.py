"""Training a :class:`~cdlm_fast.student.BlockCausalStudent` through the fused attention op.

:func:`student_logits` is the student's whole-sequence forward with autograd (the same layers,
RoPE positions and block-causal mask as :meth:`BlockCausalStudent.full_forward`, which runs
:meth:`BlockCausalStudent.sequence_hidden` under ``no_grad`` for decoding). Its attention is :func:`cdlm_fast.attention`, which is differentiable
(:mod:`cdlm_fast.ops.attention_grad`), so block-causal post-training runs on the package's own
kernels. :func:`masked_diffusion_loss` is the masked-diffusion objective: mask a random fraction
of the generated tokens, predict them under the block-causal mask, cross-entropy on the masked
positions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .student import BlockCausalStudent

__all__ = ["student_logits", "mask_tokens", "masked_diffusion_loss"]


def student_logits(student: BlockCausalStudent, ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                   block_size: Optional[int]) -> torch.Tensor:
    """Differentiable logits ``[B, P + n, V]`` (float32, float64 for a float64 model) of a left-padded prompt ``[B, P]`` followed by
    ``n`` generated slots (``ids`` ``[B, P + n]``, ``prompt_mask`` ``[B, P]`` 0/1), under the
    block-causal mask with blocks of ``block_size`` after the prompt (``None``: bidirectional)."""
    if not isinstance(student, BlockCausalStudent):
        raise TypeError(f"student must be a BlockCausalStudent, got {type(student).__name__}")
    student._check_ids("ids", ids)
    if not torch.is_tensor(prompt_mask) or prompt_mask.dim() != 2 or prompt_mask.shape[0] != ids.shape[0] \
            or prompt_mask.shape[1] > ids.shape[1]:
        raise ValueError(f"prompt_mask must be a [B={ids.shape[0]}, P <= {ids.shape[1]}] 0/1 tensor")
    logits = student.lm_head(student.sequence_hidden(ids, prompt_mask, block_size=block_size))
    return logits if logits.dtype == torch.float64 else logits.float()


def mask_tokens(ids: torch.Tensor, prompt_len: int, mask_token_id: int, *, ratio: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace a random fraction of the generated tokens ``ids[:, prompt_len:]`` by ``mask_token_id``.

    The fraction is ``ratio`` or, per sequence, uniform in ``(0, 1]`` (the masked-diffusion noise
    level); at least one token per sequence is masked. Returns ``(noisy ids [B, L], masked [B, n]
    bool)``.
    """
    b, total = ids.shape
    n = total - prompt_len
    if n < 1:
        raise ValueError(f"ids must have generated tokens after the prompt of length {prompt_len}")
    if ratio is None:
        level = 1.0 - torch.rand(b, 1, generator=generator)
    else:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        level = torch.full((b, 1), float(ratio))
    masked = torch.rand(b, n, generator=generator) < level
    masked[torch.arange(b), torch.randint(0, n, (b,), generator=generator)] = True
    masked = masked.to(ids.device)
    noisy = ids.clone()
    noisy[:, prompt_len:] = torch.where(masked, torch.full_like(ids[:, prompt_len:], mask_token_id),
                                        ids[:, prompt_len:])
    return noisy, masked


def masked_diffusion_loss(student: BlockCausalStudent, ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                          block_size: Optional[int], ratio: Optional[float] = None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Masked-diffusion loss of clean sequences ``ids`` ``[B, P + n]`` (prompt ``[B, P]`` left-padded,
    ``prompt_mask`` its 0/1 mask): mean cross-entropy of the masked generated tokens given the
    noisy sequence, under the block-causal mask. The logit alignment of the student applies
    (``"shifted"``: position ``i - 1`` predicts token ``i``, so ``P >= 1`` is needed)."""
    p = prompt_mask.shape[1]
    if student.shifted and p == 0:
        raise ValueError("the shifted logit alignment needs a prompt of at least one token")
    noisy, masked = mask_tokens(ids, p, student.mask_token_id, ratio=ratio, generator=generator)
    logits = student_logits(student, noisy, prompt_mask, block_size=block_size)
    shift = 1 if student.shifted else 0
    pred = logits[:, p - shift: ids.shape[1] - shift]
    return F.cross_entropy(pred[masked], ids[:, p:][masked])
