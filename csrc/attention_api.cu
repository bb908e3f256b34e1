// Host entry of cdlm_fast::attention_fwd (CUDA): argument checks, choice of the prefill or
// block-decode configuration and of the split-K count, and the split-K combine kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include <cute/numeric/numeric_types.hpp>

#include "attention_params.h"

namespace cdlm_fast {
namespace attn {

// Merge the per-split results: one warp per (b, h, i) row.
// out_accum [S, rows, D] holds each split's normalised output, lse_accum [S, rows] its lse.
template <typename T>
__global__ void attn_combine_kernel(const float* __restrict__ out_accum, const float* __restrict__ lse_accum,
                                    T* __restrict__ out, float* __restrict__ lse, int num_splits, int64_t rows,
                                    int head_dim) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  float m = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, lse_accum[s * rows + row]);
  T* dst = out + row * head_dim;
  if (m == -INFINITY) {  // no split saw a key
    for (int d = lane; d < head_dim; d += 32) dst[d] = static_cast<T>(0.f);
    if (lane == 0) lse[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int s = 0; s < num_splits; ++s) total += expf(lse_accum[s * rows + row] - m);
  const float lse_row = m + logf(total);
  for (int d = lane; d < head_dim; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = expf(lse_accum[s * rows + row] - lse_row);  // 0 for an empty split
      acc = fmaf(w, out_accum[(s * rows + row) * head_dim + d], acc);
    }
    dst[d] = static_cast<T>(acc);
  }
  if (lane == 0) lse[row] = lse_row;
}

namespace {

void check_kv_like(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t B, int64_t D) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == q.device(), "cdlm_fast::attention_fwd: ", name,
                    " must be on ", q.device(), " like q, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "cdlm_fast::attention_fwd: ", name,
                   " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == B && t.size(3) == D, "cdlm_fast::attention_fwd: ", name,
                    " must be [B=", B, ", Hkv, Lk, D=", D, "], got shape ", t.sizes());
}

// 16-byte loads of 8-element chunks: last dim contiguous, other strides multiples of 8
// elements, base 16-byte aligned.
void check_vector_loads(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, "cdlm_fast::attention_fwd: ", name,
                    " must be contiguous in the last (head) dimension, got strides ", t.strides());
  for (int dim = 0; dim < 3; ++dim) {
    TORCH_CHECK_VALUE(t.stride(dim) % 8 == 0 || t.size(dim) == 1, "cdlm_fast::attention_fwd: ", name,
                      " strides must be multiples of 8 elements (16-byte loads), got strides ", t.strides());
  }
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "cdlm_fast::attention_fwd: ", name,
                    " must be 16-byte aligned");
}

int choose_splits(int64_t ctas, int n_blocks_max, int64_t lk, int64_t rows_per_kv_head, bool decode, int num_sms) {
  if (n_blocks_max <= 1) return 1;
  const int target = decode ? 2 * num_sms : num_sms;
  if (ctas >= target) return 1;
  int splits = static_cast<int>((target + ctas - 1) / ctas);
  // The partial outputs (S x rows x D floats, written and read back) should stay small next
  // to the K/V bytes the split saves time on: S <= Lk / (8 * rows per KV head).
  const int64_t traffic_cap = std::max<int64_t>(1, lk / std::max<int64_t>(1, 8 * rows_per_kv_head));
  splits = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(splits), traffic_cap,
                                               static_cast<int64_t>(n_blocks_max), int64_t(64)}));
  return std::max(splits, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& prefix_len,
                                                      const std::optional<at::Tensor>& kv_lens, int64_t q_offset,
                                                      int64_t block_size, double scale) {
  TORCH_CHECK_VALUE(q.is_cuda(), "cdlm_fast::attention_fwd: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "cdlm_fast::attention_fwd: q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4, "cdlm_fast::attention_fwd: q must be [B, Hq, Lq, D], got shape ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D == 64 || D == 128, "cdlm_fast::attention_fwd: head dim D must be 64 or 128, got ", D);
  check_kv_like(k, "k", q, B, D);
  check_kv_like(v, "v", q, B, D);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "cdlm_fast::attention_fwd: v must have k's shape ", k.sizes(),
                    ", got ", v.sizes());
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "cdlm_fast::attention_fwd: Hq=", Hq,
                    " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK_VALUE(prefix_len.device() == q.device() && prefix_len.scalar_type() == at::kInt &&
                        prefix_len.dim() == 1 && prefix_len.size(0) == B,
                    "cdlm_fast::attention_fwd: prefix_len must be an int32 [B=", B, "] tensor on ", q.device(),
                    ", got ", prefix_len.scalar_type(), " ", prefix_len.sizes(), " on ", prefix_len.device());
  if (kv_lens.has_value()) {
    const auto& kl = *kv_lens;
    TORCH_CHECK_VALUE(kl.device() == q.device() && kl.scalar_type() == at::kInt && kl.dim() == 1 &&
                          kl.size(0) == B,
                      "cdlm_fast::attention_fwd: kv_lens must be an int32 [B=", B, "] tensor on ", q.device(),
                      ", got ", kl.scalar_type(), " ", kl.sizes(), " on ", kl.device());
  }
  if (bias.has_value()) {
    const auto& bi = *bias;
    TORCH_CHECK_VALUE(bi.device() == q.device(), "cdlm_fast::attention_fwd: bias must be on ", q.device(),
                      ", got ", bi.device());
    TORCH_CHECK_TYPE(bi.scalar_type() == at::kFloat, "cdlm_fast::attention_fwd: bias must be float32, got ",
                     bi.scalar_type());
    TORCH_CHECK_VALUE(bi.dim() == 3 && bi.size(0) == B && bi.size(1) == Hkv && bi.size(2) == Lk,
                      "cdlm_fast::attention_fwd: bias must be [B=", B, ", Hkv=", Hkv, ", Lk=", Lk, "], got shape ",
                      bi.sizes());
  }
  TORCH_CHECK_VALUE(q_offset >= 0 && q_offset < (int64_t(1) << 30), "cdlm_fast::attention_fwd: q_offset must be in [0, 2^30), got ",
                    q_offset);
  TORCH_CHECK_VALUE(block_size >= 0 && block_size < (int64_t(1) << 30),
                    "cdlm_fast::attention_fwd: block_size must be >= 0 (0: no mask), got ", block_size);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "cdlm_fast::attention_fwd: scale must be finite and > 0, got ",
                    scale);
  TORCH_CHECK_VALUE(Lq * (Hq / Hkv) < (int64_t(1) << 31) && Lk < (int64_t(1) << 31) && B * Hkv <= 65535,
                    "cdlm_fast::attention_fwd: sizes out of range (Lq * Hq / Hkv < 2^31, Lk < 2^31, B * Hkv <= 65535)");

  at::Tensor out = at::empty({B, Hq, Lq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  check_vector_loads(q, "q");
  check_vector_loads(k, "k");
  check_vector_loads(v, "v");

  // The kernel reads prefix_len[b] and kv_lens[b] densely.
  const at::Tensor prefix_c = prefix_len.contiguous();
  const at::Tensor kv_lens_c = kv_lens.has_value() ? kv_lens->contiguous() : at::Tensor();

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int group = static_cast<int>(Hq / Hkv);
  const bool decode = Lq <= 64;
  const int block_m = decode ? kDecodeBlockM : kPrefillBlockM;
  const int64_t rows_per_kv_head = Lq * group;
  const int m_blocks = static_cast<int>((rows_per_kv_head + block_m - 1) / block_m);
  const int n_blocks_max = static_cast<int>((Lk + kBlockN - 1) / kBlockN);
  const int num_sms = current_device_attribute(cudaDevAttrMultiProcessorCount);
  int splits = choose_splits(static_cast<int64_t>(m_blocks) * B * Hkv, n_blocks_max, Lk, rows_per_kv_head, decode,
                             num_sms);
  const int per_split = std::max(1, (n_blocks_max + splits - 1) / splits);
  splits = std::max(1, (n_blocks_max + per_split - 1) / per_split);  // no empty trailing splits

  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.prefix_len = prefix_c.data_ptr<int>();
  p.kv_lens = kv_lens.has_value() ? kv_lens_c.data_ptr<int>() : nullptr;
  p.q_stride_b = q.stride(0); p.q_stride_h = q.stride(1); p.q_stride_l = q.stride(2);
  p.k_stride_b = k.stride(0); p.k_stride_h = k.stride(1); p.k_stride_l = k.stride(2);
  p.v_stride_b = v.stride(0); p.v_stride_h = v.stride(1); p.v_stride_l = v.stride(2);
  if (bias.has_value()) {
    p.bias_stride_b = bias->stride(0); p.bias_stride_h = bias->stride(1); p.bias_stride_l = bias->stride(2);
  }
  p.batch = static_cast<int>(B);
  p.hq = static_cast<int>(Hq);
  p.hkv = static_cast<int>(Hkv);
  p.group = group;
  p.lq = static_cast<int>(Lq);
  p.lk = static_cast<int>(Lk);
  p.q_offset = static_cast<int>(q_offset);
  p.block_size = static_cast<int>(block_size);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.num_splits = splits;
  p.n_blocks_per_split = splits > 1 ? per_split : std::max(1, n_blocks_max);

  at::Tensor out_accum, lse_accum;
  if (splits > 1) {
    out_accum = at::empty({splits, B, Hq, Lq, D}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({splits, B, Hq, Lq}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  } else {
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
  }

  const bool fp16 = q.scalar_type() == at::kHalf;
  if (fp16 && D == 64) run_attn_fwd<cute::half_t, 64>(p, decode, stream);
  else if (fp16) run_attn_fwd<cute::half_t, 128>(p, decode, stream);
  else if (D == 64) run_attn_fwd<cute::bfloat16_t, 64>(p, decode, stream);
  else run_attn_fwd<cute::bfloat16_t, 128>(p, decode, stream);

  if (splits > 1) {
    const int64_t rows = B * Hq * Lq;
    constexpr int kWarps = 4;
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    if (fp16) {
      attn_combine_kernel<at::Half><<<grid, 32 * kWarps, 0, stream>>>(
          p.out_accum, p.lse_accum, out.data_ptr<at::Half>(), lse.data_ptr<float>(), splits, rows, int(D));
    } else {
      attn_combine_kernel<at::BFloat16><<<grid, 32 * kWarps, 0, stream>>>(
          p.out_accum, p.lse_accum, out.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), splits, rows, int(D));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

}  // namespace attn
}  // namespace cdlm_fast

TORCH_LIBRARY_IMPL(cdlm_fast, CUDA, m) { m.impl("attention_fwd", &cdlm_fast::attn::attention_fwd_cuda); }
