"""Helpers shared by the Triton attention kernels (constants, autotune configs, device facts)."""
from __future__ import annotations

import functools
import math
import os

import triton
import triton.language as tl

LOG2E_F = 1.0 / math.log(2.0)
LN2_F = math.log(2.0)
LOG2E = tl.constexpr(LOG2E_F)
LN2 = tl.constexpr(LN2_F)


@triton.jit
def sample_key_range(Prefix, KvLens, b, Lk, HAS_KVLENS: tl.constexpr):
    """``(cap, prefix)`` of sample ``b``: the number of keys it has (``kv_lens[b]`` capped at
    ``Lk``, at least 0) and its prompt length capped by that; shared by every attention kernel."""
    cap = b * 0 + Lk  # a tensor even when Triton specialises Lk == 1 to a constant
    if HAS_KVLENS:
        cap = tl.minimum(tl.load(KvLens + b), Lk)
    cap = tl.maximum(cap, 0)
    prefix = tl.minimum(tl.load(Prefix + b), cap)
    return cap, prefix


def is_interpreted() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, read at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Autotuning runs for large shapes unless ``CDLM_FAST_AUTOTUNE=0`` (never in the interpreter)."""
    return not is_interpreted() and os.environ.get("CDLM_FAST_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Number of multiprocessors of a CUDA device (132 on an H100 SXM)."""
    import torch
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def max_shared_memory(device_index: int) -> int:
    """Opt-in shared memory per block in bytes (227 KiB on an H100, 163 KiB on an A100, ~99 KiB on
    consumer Ampere / Ada)."""
    import torch
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def big_shared_memory(t) -> bool:
    """Whether the device of tensor ``t`` has data-centre-class shared memory (>= 160 KiB)."""
    return t.device.type == "cuda" and max_shared_memory(t.device.index or 0) >= 160 * 1024


def bucket(n: int) -> int:
    """Autotune key bucket of a length: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))
