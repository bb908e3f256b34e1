"""Block decoding for CDLM students, with the exact block KV cache, and two baselines.

* :func:`generate` -- CDLM decoding: the prompt (or a compacted prompt cache) and every
  finished block live in a :class:`~cdlm_fast.student.BlockKVCache`; each denoising step runs
  only the current block's tokens as queries.
* :func:`generate_block_causal_nocache` -- the same block-causal model and the same decoding
  rule, recomputing the prompt and every block so far at every step. It gives the same
  tokens as :func:`generate` (the cache is exact); it exists to measure what the cache buys.
* :func:`generate_vanilla` -- vanilla diffusion-LM decoding as Dream / LLaDA ship it: the whole
  sequence (prompt + all ``max_new_tokens`` slots, undecided ones ``[MASK]``) is recomputed
  with full bidirectional attention at every step, semi-autoregressive blocks decide which
  positions may be fixed, and by default one token is fixed per step. Its outputs differ from
  the block-causal ones by design: every position (the prompt included) attends to every
  other, including still-masked future positions, so it is a different model of the sequence.

Decoding rule inside a block (Fast-dLLM's ``get_transfer_index``, which CDLM follows; Dream's
and LLaDA's samplers score confidence the same way): each step computes the logits of the
block; a masked position predicts its argmax token and its confidence is that token's
probability under the **full** softmax over the vocabulary, ``[MASK]`` included
(``confidence="full_softmax"``, the default; float32 by default, ``confidence_dtype=torch.float64``
as in Fast-dLLM); every masked position with confidence ``>= threshold`` is fixed, and always
at least one (the most confident). The ``[MASK]`` token is never chosen (upstream's argmax may
pick it and then loops forever; where upstream does not pick it the two rules agree exactly).
``confidence="mask_renormalized"`` scores ``p_top / (1 - p_mask)`` instead (``[MASK]`` dropped
from the softmax), which accepts more tokens when the model puts mass on ``[MASK]``.
Positions outside the current block never count. After a block is finished a sample stops
once its block contains the EOS token; its remaining positions are filled with EOS. With
``temperature > 0`` the token is sampled from ``softmax(logits / temperature)`` without
``[MASK]`` and its confidence is the sampled token's probability under the tempered softmax
(with ``[MASK]`` for ``"full_softmax"``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .student import BlockCausalStudent, load_student

__all__ = ["GenerateOutput", "generate", "generate_block_causal_nocache", "generate_vanilla", "as_student",
           "CONFIDENCE_RULES"]

#: ``"full_softmax"``: upstream (Fast-dLLM / Dream / LLaDA) confidence, the chosen token's
#: probability under the full softmax; ``"mask_renormalized"``: ``[MASK]`` removed from the softmax.
CONFIDENCE_RULES = ("full_softmax", "mask_renormalized")


class _FromModel:
    """Default of ``block_size`` / ``threshold``: the student's (checkpoint or family table)."""

    def __repr__(self):
        return "<from the model>"


FROM_MODEL = _FromModel()

LogitsHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class GenerateOutput:
    """Result of a decoding run.

    Attributes:
        sequences: ``[B, P + N]`` the prompt ids followed by the generated tokens (only the
            generated tokens when a prompt cache was given without prompt ids).
        tokens: ``[B, N]`` generated tokens (``N = max_new_tokens``); positions after a
            sample stopped hold EOS.
        steps_per_block: denoising steps (forwards with logits) of every decoded block.
        step_times: wall-clock seconds of every step (a commit forward fused into a step is
            counted in that step).
        block_times: wall-clock seconds of every block, separate commit forward included.
        num_forwards: model forwards run after the prompt (steps + separate commits).
        decoded_tokens: ``[B]`` tokens fixed by denoising steps (EOS fill excluded).
        active_steps: ``[B]`` steps in which the sample still had masked positions.
        prefill_time: seconds of the prompt forward.
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    steps_per_block: List[int] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)
    block_times: List[float] = field(default_factory=list)
    num_forwards: int = 0
    decoded_tokens: Optional[torch.Tensor] = None
    active_steps: Optional[torch.Tensor] = None
    prefill_time: float = 0.0

    @property
    def num_steps(self) -> int:
        """Total denoising steps."""
        return sum(self.steps_per_block)

    @property
    def tokens_per_step(self) -> float:
        """Mean over samples of (tokens fixed) / (steps in which the sample was active)."""
        if self.decoded_tokens is None or self.active_steps is None:
            return float("nan")
        ratio = self.decoded_tokens.double() / self.active_steps.double().clamp(min=1)
        return float(ratio.mean())

    @property
    def time_per_step(self) -> float:
        """Mean seconds per denoising step."""
        return sum(self.step_times) / max(len(self.step_times), 1)

    @property
    def total_time(self) -> float:
        """Prefill plus all blocks, in seconds."""
        return self.prefill_time + sum(self.block_times)


def as_student(model_or_student, *, mask_token_id=None, eos_token_id=None, logits_alignment=None,
               backend="auto") -> BlockCausalStudent:
    """A :class:`BlockCausalStudent` of a model, PEFT model, Dream / LLaDA object or checkpoint folder
    (no weight copy, see :func:`cdlm_fast.student.load_student`); a student is passed through."""
    if isinstance(model_or_student, BlockCausalStudent):
        return model_or_student
    return load_student(model_or_student, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                        logits_alignment=logits_alignment, backend=backend)


def _rewrap(student: BlockCausalStudent, **changes) -> BlockCausalStudent:
    """The same weights and settings with other ``backend`` / ``attn_impl`` / token ids."""
    kw = dict(mask_token_id=student.mask_token_id, eos_token_id=student.eos_token_id,
              logits_alignment=student.logits_alignment, backend=student.backend, attn_impl=student.attn_impl)
    kw.update(changes)
    return BlockCausalStudent(student.model, info=student.info, **kw)


def _resolve_defaults(student: BlockCausalStudent, block_size, threshold):
    if block_size is FROM_MODEL or block_size is None:
        block_size = student.info.block_size
    if threshold is FROM_MODEL:
        threshold = student.info.threshold
    return block_size, threshold


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def denoise_step(logits: torch.Tensor, block: torch.Tensor, *, mask_token_id: int, threshold: Optional[float],
                 temperature: float = 0.0, generator: Optional[torch.Generator] = None,
                 confidence_dtype: torch.dtype = torch.float32, confidence: str = "full_softmax"):
    """Fix the confident masked positions of ``block`` in place.

    Args:
        logits: ``[B, n, V]`` logits aligned with ``block`` (row j predicts ``block[:, j]``).
        block: ``[B, n]`` int64 current block (a view; updated in place).
        mask_token_id: the ``[MASK]`` id; it is never chosen as a prediction.
        threshold: confidence threshold; ``None`` fixes exactly one token per step.
        confidence: ``"full_softmax"`` (upstream: the chosen token's probability under the full
            softmax, ``[MASK]`` included) or ``"mask_renormalized"`` (``[MASK]`` left out of the
            softmax: ``p / (1 - p_mask)``); see the module docs.

    Returns:
        ``(accepted, masked)`` boolean ``[B, n]``: positions fixed now, positions masked before.
    """
    if confidence not in CONFIDENCE_RULES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_RULES}, got {confidence!r}")
    masked = block == mask_token_id
    lf = logits.to(confidence_dtype)
    pick = lf
    if 0 <= mask_token_id < lf.shape[-1]:
        # the [MASK] token itself is never a prediction (it would leave the position undecided)
        # (index built on the device: torch.tensor([...], device=cuda) would be a blocking copy every step)
        idx = torch.full((1,), mask_token_id, dtype=torch.int64, device=lf.device)
        pick = lf.index_fill(-1, idx, float("-inf"))
    scored = pick if confidence == "mask_renormalized" else lf
    if temperature > 0:
        probs = torch.softmax(pick / temperature, dim=-1)
        b, n, v = probs.shape
        pred = torch.multinomial(probs.view(-1, v), 1, generator=generator).view(b, n)
        if scored is not pick:
            probs = torch.softmax(scored / temperature, dim=-1)
        conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    else:
        mx, pred = pick.max(dim=-1)
        conf = torch.exp(mx - torch.logsumexp(scored, dim=-1))
    conf = conf.masked_fill(~masked, -1.0)
    if threshold is None:
        accept = torch.zeros_like(masked)
    else:
        accept = masked & (conf >= threshold)
    best = conf.argmax(dim=-1, keepdim=True)
    accept.scatter_(1, best, masked.gather(1, best))
    block.copy_(torch.where(accept, pred.to(block.dtype), block))
    return accept, masked


def _check_common(max_new_tokens, block_size, threshold, temperature, allow_none_block=False):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if block_size is None and allow_none_block:
        pass
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a float in [0, 1] (or None: one token per step), got {threshold!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (0 <= temperature < math.inf)):  # NaN would silently decode greedily, inf gives NaN probabilities
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")


def _check_token_ids(mask_id: int, eos_id: int, vocab_size: Optional[int] = None) -> None:
    if vocab_size is not None and not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_id} is outside the model's vocabulary of {vocab_size} tokens: "
                         "pass the [MASK] id of the checkpoint's tokenizer")
    if mask_id == eos_id:
        # EOS could then never be predicted (the [MASK] id is excluded) and an EOS fill would
        # read as undecided positions: decoding would silently never stop
        raise ValueError(f"mask_token_id and eos_token_id must differ, both are {mask_id}")


def _run_blocks(student: BlockCausalStudent, out: GenerateOutput, x: torch.Tensor, block_size: int,
                logits_fn, commit_fn, *, mask_token_id, eos_token_id, threshold, temperature, generator,
                confidence_dtype, stop_at_eos, logits_hook, progress, confidence="full_softmax"):
    """Shared block loop: ``logits_fn(bi, s, e) -> [B, e - s, V]``; ``commit_fn(bi, s, e)`` after a block."""
    if confidence not in CONFIDENCE_RULES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_RULES}, got {confidence!r}")
    b, n_total = x.shape
    dev = x.device
    nblocks = -(-n_total // block_size)
    stopped = torch.zeros(b, dtype=torch.bool, device=dev)
    out.decoded_tokens = torch.zeros(b, dtype=torch.int64, device=dev)
    out.active_steps = torch.zeros(b, dtype=torch.int64, device=dev)
    it = range(nblocks)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="blocks", leave=False)
    for bi in it:
        s, e = bi * block_size, min((bi + 1) * block_size, n_total)
        block = x[:, s:e]
        if stop_at_eos and bi > 0:
            block.masked_fill_(stopped.view(-1, 1), eos_token_id)
        t_block = time.perf_counter()
        step = 0
        while True:
            t0 = time.perf_counter()
            logits = logits_fn(bi, s, e)
            out.num_forwards += 1
            if logits_hook is not None:
                logits_hook(bi, step, x, logits)
            accept, masked = denoise_step(logits, block, mask_token_id=mask_token_id, threshold=threshold,
                                          temperature=temperature, generator=generator,
                                          confidence_dtype=confidence_dtype, confidence=confidence)
            out.decoded_tokens += accept.sum(1)
            out.active_steps += masked.any(1)
            step += 1
            done = not bool((block == mask_token_id).any())  # the one host sync of a step
            out.step_times.append(time.perf_counter() - t0)
            if done:
                break
        out.steps_per_block.append(step)
        last = bi + 1 == nblocks
        if stop_at_eos:
            stopped |= (block == eos_token_id).any(1)
            if bool(stopped.all()):
                last = True
        if not last and commit_fn is not None:
            out.num_forwards += commit_fn(bi, s, e)
        _sync(dev)
        out.block_times.append(time.perf_counter() - t_block)
        if last:
            break
    if stop_at_eos:
        # blocks never decoded after every sample stopped
        rest = x == mask_token_id
        x.masked_fill_(rest & stopped.view(-1, 1), eos_token_id)


@torch.no_grad()
def generate(
    model_or_student,
    prompt_ids: Optional[torch.Tensor],
    max_new_tokens: int,
    block_size=FROM_MODEL,
    threshold=FROM_MODEL,
    temperature: float = 0.0,
    mask_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    prompt_cache=None,
    backend: str = "auto",
    *,
    logits_alignment: Optional[str] = None,
    fuse_commit: bool = True,
    stop_at_eos: bool = True,
    generator: Optional[torch.Generator] = None,
    confidence_dtype: torch.dtype = torch.float32,
    confidence: str = "full_softmax",
    logits_hook: Optional[LogitsHook] = None,
    progress: bool = False,
) -> GenerateOutput:
    """CDLM block decoding with the exact block KV cache.

    Args:
        model_or_student: a :class:`~cdlm_fast.student.BlockCausalStudent`, or anything
            :func:`cdlm_fast.load_student` takes (a Llama / Qwen2 / Qwen3 ``*ForCausalLM``, a
            ``peft.PeftModel``, a Dream / LLaDA model object, a checkpoint or adapter folder),
            wrapped without copying weights.
        prompt_ids: ``[B, P]`` int64, left padded (``attention_mask`` marks real tokens). With
            ``prompt_cache`` these are tokens that follow the cached prompt (may be ``None``).
        max_new_tokens: generated length ``N`` (the last block may be shorter than ``block_size``).
        block_size: block length; default: the checkpoint's (``student.info.block_size``: its
            generation_config, else 32 as in CDLM).
        threshold: confidence threshold in ``[0, 1]``; ``None`` = one token per step; default:
            the checkpoint's (``student.info.threshold``, else 0.9 as in CDLM).
        temperature: 0 for greedy (deterministic), else sampling temperature.
        mask_token_id, eos_token_id, logits_alignment: default to the student's settings
            (Dream for Qwen2/Qwen3, LLaDA for Llama, see
            :func:`cdlm_fast.student.default_token_settings`).
        attention_mask: ``[B, P]`` 0/1 left-padding mask of ``prompt_ids``.
        prompt_cache: a (compacted) prompt cache, see :meth:`BlockCausalStudent.prefill`.
        backend: attention backend (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``).
        fuse_commit: write a finished block's K/V in the same forward as the next block's first
            step (queries = finished block + next block) instead of a separate commit forward.
        stop_at_eos: stop a sample once a finished block contains EOS.
        generator: RNG for ``temperature > 0``.
        confidence_dtype: dtype of the softmax confidence (float32 or float64).
        confidence: ``"full_softmax"`` (default, the upstream rule) or ``"mask_renormalized"``
            (see the module docs).
        logits_hook: called as ``hook(block_index, step, tokens [B, N], logits [B, n, V])`` before
            each step's update (``logits`` row j predicts token ``block_index * block_size + j``).
        progress: show a tqdm progress bar over blocks.

    Returns:
        :class:`GenerateOutput` with the tokens and step statistics.

    Example::

        >>> out = generate(model, ids, 256, block_size=32, threshold=0.9)
        >>> out.tokens.shape, out.steps_per_block, out.tokens_per_step
    """
    student = as_student(model_or_student, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                         logits_alignment=logits_alignment, backend=backend)
    block_size, threshold = _resolve_defaults(student, block_size, threshold)
    _check_common(max_new_tokens, block_size, threshold, temperature)
    mask_id = student.mask_token_id if mask_token_id is None else int(mask_token_id)
    eos_id = student.eos_token_id if eos_token_id is None else int(eos_token_id)
    _check_token_ids(mask_id, eos_id, student.vocab_size)
    if logits_alignment is not None and logits_alignment != student.logits_alignment:
        raise ValueError(f"logits_alignment={logits_alignment!r} differs from the student's "
                         f"{student.logits_alignment!r}; set it on the student")
    if backend != "auto" and backend != student.backend:
        student = _rewrap(student, mask_token_id=mask_id, eos_token_id=eos_id, backend=backend)
    dev = student.device
    t0 = time.perf_counter()
    cache = student.prefill(prompt_ids, attention_mask, max_new_tokens=max_new_tokens, block_size=block_size,
                            prompt_cache=prompt_cache)
    _sync(dev)
    b = cache.batch_size
    x = torch.full((b, max_new_tokens), mask_id, dtype=torch.int64, device=dev)
    out = GenerateOutput(sequences=x, tokens=x, prefill_time=time.perf_counter() - t0)
    pending = {}

    def logits_fn(bi, s, e):
        block = x[:, s:e]
        prev = pending.pop("block", None)
        if prev is not None:
            return student.block_forward(cache, torch.cat([prev, block], dim=1), commit=prev.shape[1])
        return student.block_forward(cache, block)

    def commit_fn(bi, s, e):
        if fuse_commit:
            pending["block"] = x[:, s:e]
            return 0
        student.block_forward(cache, x[:, s:e], commit=e - s, return_logits=False)
        return 1

    _run_blocks(student, out, x, block_size, logits_fn, commit_fn, mask_token_id=mask_id, eos_token_id=eos_id,
                threshold=threshold, temperature=temperature, generator=generator,
                confidence_dtype=confidence_dtype, confidence=confidence, stop_at_eos=stop_at_eos,
                             logits_hook=logits_hook,
                progress=progress)
    prompt = prompt_ids if prompt_ids is not None else x[:, :0]
    out.sequences = torch.cat([prompt, x], dim=1)
    return out


def _baseline_setup(model_or_student, prompt_ids, attention_mask, mask_token_id, eos_token_id, logits_alignment,
                    backend, attn_impl):
    student = as_student(model_or_student, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                         logits_alignment=logits_alignment, backend=backend)
    if backend != "auto" and backend != student.backend or (attn_impl is not None and attn_impl != student.attn_impl):
        student = _rewrap(student, backend=backend, attn_impl=attn_impl or student.attn_impl)
    mask_id = student.mask_token_id if mask_token_id is None else int(mask_token_id)
    eos_id = student.eos_token_id if eos_token_id is None else int(eos_token_id)
    _check_token_ids(mask_id, eos_id, student.vocab_size)
    if prompt_ids is None:
        raise ValueError("prompt_ids must be a [B, P] int64 tensor")
    student._check_ids("prompt_ids", prompt_ids)
    pmask = student._check_mask("attention_mask", attention_mask, prompt_ids)
    if student.shifted and prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token with the shifted alignment")
    return student, mask_id, eos_id, pmask


def _recompute_decode(student, prompt_ids, pmask, max_new_tokens, decode_block, attn_block, mask_id, eos_id,
                      **run_kw) -> GenerateOutput:
    """The no-cache baselines: every step recomputes the sequence with :meth:`BlockCausalStudent.full_forward`.

    ``decode_block``: length of the blocks decoded in turn. ``attn_block``: the attention's
    ``block_size`` (block-causal; ``None``: full bidirectional attention over the prompt and all
    ``max_new_tokens`` slots, as vanilla decoding does; else only the prompt and blocks so far).
    """
    b, p = prompt_ids.shape
    x = torch.full((b, max_new_tokens), mask_id, dtype=torch.int64, device=student.device)
    out = GenerateOutput(sequences=x, tokens=x)
    shift = 1 if student.shifted else 0

    def logits_fn(bi, s, e):
        ids = torch.cat([prompt_ids, x if attn_block is None else x[:, :e]], dim=1)
        return student.full_forward(ids, pmask, block_size=attn_block,
                                    logits_positions=slice(p + s - shift, p + e - shift))

    _run_blocks(student, out, x, decode_block, logits_fn, None, mask_token_id=mask_id, eos_token_id=eos_id, **run_kw)
    out.sequences = torch.cat([prompt_ids, x], dim=1)
    return out


@torch.no_grad()
def generate_block_causal_nocache(
    model_or_student,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    block_size=FROM_MODEL,
    threshold=FROM_MODEL,
    temperature: float = 0.0,
    mask_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    logits_alignment: Optional[str] = None,
    attn_impl: Optional[str] = None,
    stop_at_eos: bool = True,
    generator: Optional[torch.Generator] = None,
    confidence_dtype: torch.dtype = torch.float32,
    confidence: str = "full_softmax",
    logits_hook: Optional[LogitsHook] = None,
    progress: bool = False,
) -> GenerateOutput:
    """Block-causal decoding without a KV cache (baseline).

    Same arguments and result as :func:`generate` (no ``prompt_cache``). Every step runs the
    whole sequence so far (``[B, P + e]``: prompt, finished blocks, current block) under the
    block-causal mask; the tokens equal :func:`generate`'s, since the block cache is exact.
    ``attn_impl="sdpa"`` uses SDPA with a materialised mask instead of :func:`cdlm_fast.attention`.
    """
    student, mask_id, eos_id, pmask = _baseline_setup(model_or_student, prompt_ids, attention_mask, mask_token_id,
                                                      eos_token_id, logits_alignment, backend, attn_impl)
    block_size, threshold = _resolve_defaults(student, block_size, threshold)
    _check_common(max_new_tokens, block_size, threshold, temperature)
    return _recompute_decode(student, prompt_ids, pmask, max_new_tokens, block_size, block_size, mask_id, eos_id,
                             threshold=threshold, temperature=temperature, generator=generator,
                             confidence_dtype=confidence_dtype, confidence=confidence, stop_at_eos=stop_at_eos,
                             logits_hook=logits_hook,
                             progress=progress)


@torch.no_grad()
def generate_vanilla(
    model_or_student,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    block_size: Optional[int] = None,
    threshold: Optional[float] = None,
    temperature: float = 0.0,
    mask_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    logits_alignment: Optional[str] = None,
    attn_impl: Optional[str] = None,
    stop_at_eos: bool = True,
    generator: Optional[torch.Generator] = None,
    confidence_dtype: torch.dtype = torch.float32,
    confidence: str = "full_softmax",
    logits_hook: Optional[LogitsHook] = None,
    progress: bool = False,
) -> GenerateOutput:
    """Vanilla diffusion-LM decoding (Dream / LLaDA style; baseline).

    Every step recomputes the full sequence ``[B, P + N]`` (prompt + all ``N`` generated slots,
    undecided ones ``[MASK]``) with full bidirectional attention (no block mask, no cache).
    ``block_size`` sets semi-autoregressive blocks (LLaDA; ``None`` = one block of ``N``, as in
    Dream); only the current block's masked positions may be fixed. ``threshold=None`` fixes
    one token per step (``N`` steps for ``N`` tokens); a float applies the same rule as
    :func:`generate`. Outputs differ from the block-causal decoders (see the module docs).
    Returns a :class:`GenerateOutput`.
    """
    _check_common(max_new_tokens, block_size, threshold, temperature, allow_none_block=True)
    student, mask_id, eos_id, pmask = _baseline_setup(model_or_student, prompt_ids, attention_mask, mask_token_id,
                                                      eos_token_id, logits_alignment, backend, attn_impl)
    return _recompute_decode(student, prompt_ids, pmask, max_new_tokens, block_size or max_new_tokens, None,
                             mask_id, eos_id, threshold=threshold, temperature=temperature, generator=generator,
                             confidence_dtype=confidence_dtype, confidence=confidence, stop_at_eos=stop_at_eos,
                             logits_hook=logits_hook,
                             progress=progress)
