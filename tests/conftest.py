"""Test configuration.

Without a CUDA device the Triton kernels run in the Triton interpreter on the CPU, which
must be switched on before any kernel is defined, so it is set here, before cdlm_fast is
imported. Tests that need a real GPU (bf16 kernels, the CUDA extension) are skipped with a
visible reason.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _frame_modules():
    f = sys._getframe(2)
    while f is not None:
        yield f.f_globals.get("__name__", "") or ""
        f = f.f_back


@pytest.fixture(autouse=True)
def _transformers_deprecations_from_cdlm_fast_are_errors(monkeypatch):
    """A ``FutureWarning`` / ``DeprecationWarning`` that transformers raises while running
    ``cdlm_fast`` code (e.g. a deprecated keyword passed by the package) fails the test.

    Where transformers attributes such a warning depends on its ``stacklevel`` (often to
    ``torch.nn.Module.__call__``), so a ``filterwarnings`` module pattern cannot scope it; the
    call stack at the moment of the warning can. Other warnings are shown as usual.
    """
    shown = warnings.showwarning

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            mods = list(_frame_modules())
            if any(m.startswith("transformers") for m in mods) and any(m.startswith("cdlm_fast") for m in mods):
                raise category(f"transformers deprecation triggered from cdlm_fast code: {message}")
        return shown(message, category, filename, lineno, file, line)

    monkeypatch.setattr(warnings, "showwarning", check)


@pytest.fixture
def device():
    return DEVICE


def pytest_report_header(config):
    return (f"cdlm_fast tests on {DEVICE}"
            + ("" if HAS_CUDA else " (Triton kernels in the interpreter; CUDA-extension runs skipped)"))
