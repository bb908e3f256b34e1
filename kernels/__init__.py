"""Triton kernels. Installed as ``cdlm_fast.kernels`` (never as a top-level ``kernels``)."""
