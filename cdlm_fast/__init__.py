"""cdlm_fast: GPU kernels for block-causal diffusion LM decoding (CDLM) and Attention Matching
KV compaction.

Public ops (each with ``backend="auto" | "cuda" | "triton" | "torch"``):

* :func:`attention` -- block-causal attention with a per-key bias, optional lse;
* :func:`nnls`, :func:`nnls_gram` -- batched non-negative least squares;
* :func:`lstsq`, :func:`lstsq_gram` -- batched (ridge) least squares;
* :func:`exp_gram` -- fused Gram matrices of exp-score design matrices (Attention Matching fits).

Model-level layers: :mod:`cdlm_fast.student` / :mod:`cdlm_fast.decode` (CDLM block-causal
student and block decoding with an exact KV cache; :func:`load_student` takes Dream, LLaDA,
stock and LoRA checkpoints, see :mod:`cdlm_fast.checkpoints`) and :mod:`cdlm_fast.compaction` (Attention
Matching KV compaction for Hugging Face models).
"""
__version__ = "0.1.0"

from .ops.attention import attention  # noqa: E402
from .ops.gram import exp_gram  # noqa: E402
from .ops.solvers import NNLSResult, lstsq, lstsq_gram, nnls, nnls_gram  # noqa: E402
from .student import BlockCausalStudent, BlockKVCache, load_student  # noqa: E402
from .decode import GenerateOutput, generate, generate_block_causal_nocache, generate_vanilla  # noqa: E402

__all__ = ["attention", "nnls", "nnls_gram", "lstsq", "lstsq_gram", "exp_gram", "NNLSResult",
           "BlockCausalStudent", "BlockKVCache", "load_student", "generate", "generate_block_causal_nocache", "generate_vanilla",
           "GenerateOutput", "__version__"]
