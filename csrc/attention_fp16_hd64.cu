// Instantiation of the fused attention kernels for fp16, head dim 64 (one file per
// combination so the build compiles them in parallel).
#include "attention_kernel.cuh"

namespace cdlm_fast {
namespace attn {
template void run_attn_fwd<cute::half_t, 64>(const AttnParams&, bool, cudaStream_t);
}  // namespace attn
}  // namespace cdlm_fast
