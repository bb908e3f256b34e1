"""Environment report: versions, device, and which backend can run each op.

``python -m cdlm_fast env`` prints it (like ``python -m xformers.info``).
"""
from __future__ import annotations

import importlib
import platform
from typing import Dict, List, Optional

import torch

from . import __version__
from .backends import BACKENDS, OPS, cuda_extension_error, triton_available, triton_interpreted
from .ops.attention_cpu import CPU_EXTENSION_ERROR


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return "not installed"


def _ensure_ops_loaded() -> None:
    """Import every public op module so that all backends are registered."""
    import cdlm_fast  # noqa: F401  (imports every op module, which registers its backends)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def backend_table(device: Optional[torch.device] = None) -> Dict[str, Dict[str, Optional[str]]]:
    """op -> backend -> ``None`` if it can run on ``device`` (generic inputs), else the reason."""
    _ensure_ops_loaded()
    device = device or default_device()
    return {name: op.available(device) for name, op in sorted(OPS.items())}


def info() -> Dict[str, object]:
    """Everything ``env`` prints, as a JSON-serialisable dict."""
    dev = default_device()
    gpu = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
               "sm_count": p.multi_processor_count}
    return {
        "cdlm_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": str(dev),
        "gpu": gpu,
        "triton_interpreter": triton_interpreted(),
        "triton_status": triton_available() or "ok",
        "cuda_extension": cuda_extension_error() or "built",
        "cpu_extension": CPU_EXTENSION_ERROR or "built (the CPU decode call of the torch backend in C++)",
        "backends": backend_table(dev),
    }


def format_info(data: Dict[str, object]) -> str:
    lines: List[str] = []
    for key in ("cdlm_fast", "python", "torch", "torch_cuda", "triton", "transformers", "device"):
        lines.append(f"{key:<22}{data[key]}")
    gpu = data["gpu"]
    lines.append(f"{'gpu':<22}" + ("none" if gpu is None else
                                   f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
                                   f"{gpu['memory_gib']} GiB, {gpu['sm_count']} SMs)"))
    lines.append(f"{'triton interpreter':<22}{'on (TRITON_INTERPRET=1)' if data['triton_interpreter'] else 'off'}")
    lines.append(f"{'cuda extension':<22}{data['cuda_extension']}")
    lines.append(f"{'cpu extension':<22}{data['cpu_extension']}")
    lines.append("")
    lines.append(f"{'op':<14}" + "".join(f"{b:<10}" for b in BACKENDS))
    reasons: List[str] = []
    for name, row in data["backends"].items():
        cells = []
        for b in BACKENDS:
            why = row[b]
            cells.append(f"{'yes' if why is None else 'no':<10}")
            if why is not None:
                reasons.append(f"  {name}/{b}: {why}")
        lines.append(f"{name:<14}" + "".join(cells))
    if reasons:
        lines.append("")
        lines.append("unavailable because:")
        lines.extend(sorted(set(reasons)))
    return "\n".join(lines)
