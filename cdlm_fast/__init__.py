"""cdlm_fast: GPU kernels for block-causal diffusion LM decoding (CDLM) and Attention Matching
KV compaction.

Public ops (each with ``backend="auto" | "cuda" | "triton" | "torch"``):

* :func:`attention` -- block-causal attention with a per-key bias, optional lse;
* :func:`nnls`, :func:`nnls_gram` -- batched non-negative least squares;
* :func:`lstsq` -- batched (ridge) least squares.
"""
__version__ = "0.1.0"

from .ops.attention import attention  # noqa: E402
# from .ops.solvers import NNLSResult, lstsq, nnls, nnls_gram  # noqa: E402

__all__ = ["attention", "nnls", "nnls_gram", "lstsq", "NNLSResult", "__version__"]
