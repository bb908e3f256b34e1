"""Backend registry and dispatch.

Every op has up to three backends:

* ``"cuda"``: the compiled extension ``cdlm_fast._C`` (CUDA tensors only);
* ``"triton"``: Triton kernels in :mod:`cdlm_fast.kernels` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``, which is how the CPU test suite runs them);
* ``"torch"``: the pure-PyTorch implementation (any device, float64 on the CPU).

``backend="auto"`` picks the CUDA extension on a GPU, else Triton on a GPU, else torch,
skipping a backend whose ``supports`` check rejects the inputs. The environment variable
``CDLM_FAST_BACKEND`` (``cuda`` / ``triton`` / ``torch``) replaces ``"auto"``.

Each backend states what it supports with a function returning ``None`` (supported) or
a reason string, in the spirit of xformers' dispatch, so an explicit request for an
unsupported combination fails with the reason instead of a crash.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

BACKENDS = ("cuda", "triton", "torch")
_AUTO_ORDER = ("cuda", "triton", "torch")


# Under ``torch.compile`` the lookups below (imports, cached probes) run once at trace time and
# their results are constants of the graph, so that a function calling an op compiles with
# ``fullgraph=True`` (dynamo does not trace ``importlib``, and ignores ``lru_cache`` wrappers).
def _trace_constant(fn):
    """``torch.compiler.assume_constant_result`` without importing dynamo (and with it Triton)
    when ``cdlm_fast`` is imported: Triton must not be imported before a program has had the
    chance to set ``TRITON_INTERPRET``. This is exactly what that decorator does."""
    fn._dynamo_marked_constant = True
    return fn


# ``os.environ`` keeps its values in ``_data`` (encoded keys) and updates it on every assignment;
# a lookup there is a plain dict lookup, where ``os.environ.get`` of an unset name raises and
# catches a KeyError (about 5 us per call on a 2-core x86 VM, on the CPU decode hot path).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("CDLM_FAST_BACKEND") if hasattr(os.environ, "encodekey") else None


def forced_backend() -> str:
    """The value of ``CDLM_FAST_BACKEND``, stripped (``""`` when unset or empty)."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return os.environ.decodevalue(raw).strip() if raw else ""
    return os.environ.get("CDLM_FAST_BACKEND", "").strip()  # pragma: no cover - other os.environ implementations


@_trace_constant
def triton_available() -> Optional[str]:
    """``None`` if Triton can run here, else the reason it cannot."""
    return _triton_available()


@functools.lru_cache(maxsize=None)
def _triton_available() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({e.__class__.__name__}: {e})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cuda_extension() -> Optional[object]:
    """The loaded ``cdlm_fast._C`` module, or ``None``."""
    try:
        return importlib.import_module("cdlm_fast._C")
    except Exception:
        return None


@_trace_constant
def cuda_extension_error() -> Optional[str]:
    """``None`` if ``cdlm_fast._C`` loads, else the reason it does not."""
    return _cuda_extension_error()


@functools.lru_cache(maxsize=None)
def _cuda_extension_error() -> Optional[str]:
    try:
        importlib.import_module("cdlm_fast._C")
    except Exception as e:
        return (f"the CUDA extension cdlm_fast._C is not built or failed to load ({e.__class__.__name__}: {e}); "
                "reinstall on a machine with nvcc and a CUDA build of torch, with CDLM_FAST_BUILD_CUDA=1")
    return None


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (``None`` if it can)."""
    if backend == "torch":
        return None
    if backend == "cuda":
        if cuda_extension_error() is not None:
            return cuda_extension_error()
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        return None
    if backend == "triton":
        if triton_available() is not None:
            return triton_available()
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                f"import), got tensors on {device}")
    raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


@dataclass
class Op:
    """One op's implementations: backend name -> (function, supports-check)."""

    name: str
    impls: Dict[str, Callable] = field(default_factory=dict)
    checks: Dict[str, Callable[..., Optional[str]]] = field(default_factory=dict)
    pending: List[str] = field(default_factory=list)
    import_errors: List[str] = field(default_factory=list)

    def lazy(self, *modules: str) -> None:
        """Modules that register more backends of this op, imported on first use.

        Deferring the import keeps ``import cdlm_fast`` light and lets a program set
        ``TRITON_INTERPRET`` before the first Triton kernel is defined.
        """
        self.pending.extend(modules)

    def _load(self) -> None:
        _load_pending(self.name)  # not `if self.pending:`, which torch.compile would guard on

    def register(self, backend: str, fn: Callable, supports: Optional[Callable[..., Optional[str]]] = None):
        self.impls[backend] = fn
        if supports is not None:
            self.checks[backend] = supports

    def reason(self, backend: str, device: torch.device, **meta) -> Optional[str]:
        self._load()
        why = device_reason(backend, device)
        if why is not None:
            return why
        if backend not in self.impls:
            detail = "; ".join(self.import_errors)
            return f"no {backend} implementation of {self.name} is available" + (f" ({detail})" if detail else "")
        check = self.checks.get(backend)
        return None if check is None or not meta else check(**meta)

    def select(self, backend: str, device: torch.device, **meta) -> str:
        """Resolve ``backend`` ("auto" or explicit) to a backend name, or raise ``ValueError``."""
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        if backend == "auto":
            forced = forced_backend()
            if forced:
                if forced not in BACKENDS:
                    raise ValueError(f"CDLM_FAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
                backend = forced
        if backend == "auto":
            order = _AUTO_ORDER if device.type == "cuda" else ("torch",)
            for cand in order:
                if self.reason(cand, device, **meta) is None:
                    return cand
            raise ValueError(f"no backend of {self.name} supports these inputs")  # pragma: no cover
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; "
                             f"got {backend!r}")
        why = self.reason(backend, device, **meta)
        if why is not None:
            raise ValueError(f"{self.name}: backend {backend!r} cannot run these inputs: {why}")
        return backend

    def available(self, device: torch.device, **meta) -> Dict[str, Optional[str]]:
        """backend -> ``None`` if usable on ``device`` for ``meta``, else the reason."""
        return {b: self.reason(b, device, **meta) for b in BACKENDS}


OPS: Dict[str, Op] = {}


def op(name: str) -> Op:
    if name not in OPS:
        OPS[name] = Op(name)
    return OPS[name]


@_trace_constant
def _load_pending(name: str) -> int:
    """Import the pending backend modules of op ``name``; the number of import errors."""
    o = OPS[name]
    while o.pending:
        o.import_errors += load_optional(o.pending.pop(0))
    return len(o.import_errors)


def load_optional(module: str) -> List[str]:
    """Import an optional backend module (it registers itself); return import errors."""
    try:
        importlib.import_module(module)
        return []
    except Exception as e:  # pragma: no cover - depends on the machine
        return [f"{module}: {e.__class__.__name__}: {e}"]
