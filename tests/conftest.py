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

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


def pytest_report_header(config):
    return (f"cdlm_fast tests on {DEVICE}"
            + ("" if HAS_CUDA else " (Triton kernels in the interpreter; CUDA-extension runs skipped)"))
