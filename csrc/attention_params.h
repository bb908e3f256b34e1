// Parameters of the fused block-causal attention kernels and the launch entry points that
// the per-(dtype, head dim) translation units instantiate.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace cdlm_fast {
namespace attn {

// Query rows are *packed*: row r of the M dimension is query i = r / group of head
// h = hkv * group + r % group, so the `group` query heads that share a KV head (GQA) are
// processed by one CTA against each K/V tile, which is loaded once. For group == 1 this
// is the usual row = query mapping.
struct AttnParams {
  const void* q;           // [B, Hq, Lq, D] (strided; last dim contiguous)
  const void* k;           // [B, Hkv, Lk, D]
  const void* v;           // [B, Hkv, Lk, D]
  const float* bias;       // [B, Hkv, Lk] float32 or nullptr
  const int* prefix_len;   // [B] int32
  const int* kv_lens;      // [B] int32 or nullptr
  void* out;               // [B, Hq, Lq, D] contiguous, q's dtype (num_splits == 1)
  float* lse;              // [B, Hq, Lq] contiguous (num_splits == 1)
  float* out_accum;        // [num_splits, B, Hq, Lq, D] (num_splits > 1), normalised per split
  float* lse_accum;        // [num_splits, B, Hq, Lq] (num_splits > 1)

  int64_t q_stride_b, q_stride_h, q_stride_l;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t bias_stride_b, bias_stride_h, bias_stride_l;

  int batch, hq, hkv, group, lq, lk;
  int q_offset, block_size;  // block_size 0: no block-causal mask
  float scale_log2;          // scale * log2(e)
  int num_splits;            // split-K over key tiles (grid z)
  int n_blocks_per_split;    // key tiles per split
};

// Key tile and query tiles of the two compiled configurations (see attention_traits.cuh).
constexpr int kBlockN = 64;
constexpr int kPrefillBlockM = 128;
constexpr int kDecodeBlockM = 64;

// Launch the main kernel (decode: the kDecodeBlockM configuration). Element is
// cute::half_t or cute::bfloat16_t; instantiated in attention_{fp16,bf16}_hd{64,128}.cu.
template <typename Element, int kHeadDim>
void run_attn_fwd(const AttnParams& params, bool decode, cudaStream_t stream);

}  // namespace attn
}  // namespace cdlm_fast

namespace cdlm_fast {
// An attribute of the current CUDA device (e.g. cudaDevAttrMultiProcessorCount).
inline int current_device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return value;
}
}  // namespace cdlm_fast
