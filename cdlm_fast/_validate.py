"""Argument checks shared by the public ops.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
device or value) with a message naming the argument and what was expected.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def check_values_enabled(t: torch.Tensor) -> bool:
    """Whether value checks that need a device sync should run for ``t``.

    Values of CPU tensors are always checked. For GPU tensors a check would force a
    host-device synchronisation on the hot path, so it runs only with
    ``CDLM_FAST_CHECK_VALUES=1``. Under ``torch.compile`` they are skipped (a data-dependent
    branch cannot be part of a graph).
    """
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("CDLM_FAST_CHECK_VALUES", "0") == "1"


def tensor(name: str, x, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
           shape_doc: str = "") -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor{' of shape ' + shape_doc if shape_doc else ''}, "
                        f"got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {shape_doc}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    return x


def same_device(pairs: Iterable[tuple]) -> None:
    pairs = list(pairs)
    ref_name, ref = pairs[0]
    for name, t in pairs[1:]:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def non_negative_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def lengths(name: str, value, *, batch: int, device: torch.device, upper: Optional[int] = None,
            allow_int: bool = True) -> torch.Tensor:
    """Normalise an int or ``[B]`` integer tensor to an int32 tensor on ``device``."""
    if not torch.is_tensor(value):
        if not allow_int:
            raise TypeError(f"{name} must be a [B={batch}] integer tensor, got {type(value).__name__}")
        v = non_negative_int(name, value)
        if upper is not None and v > upper:
            raise ValueError(f"{name} must be <= {upper}, got {v}")
        return torch.full((batch,), v, dtype=torch.int32, device=device)
    if value.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an int32/int64 tensor of shape [B={batch}], got dtype "
                        f"{str(value.dtype).replace('torch.', '')}")
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B={batch}], got {tuple(value.shape)}")
    if value.device != device:
        if value.device.type != "cpu":
            raise ValueError(f"{name} must be on {device} or the CPU, got {value.device}")
    if check_values_enabled(value) and value.numel():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0:
            raise ValueError(f"{name} must be >= 0, got a minimum of {lo}")
        if upper is not None and hi > upper:
            raise ValueError(f"{name} must be <= {upper}, got a maximum of {hi}")
    return value.to(device=device, dtype=torch.int32)


def finite_tensor(name: str, x: torch.Tensor) -> None:
    """Reject NaN/inf in solver inputs (always checked: solvers synchronise anyway)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
