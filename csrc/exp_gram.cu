// cdlm_fast::exp_gram: G = A^T A and R = A^T Y for
//   A[p, i, j] = exp(scale * Q[p, i] . C[p, j] + beta[p, j] - shift[p, i])
// without materialising A in global memory.
//
// Plain CUDA (fp32 FMA, no tensor cores), so fp32 inputs are exact up to fp32 rounding and
// fp16/bf16 inputs are upcast on load. Each CTA owns one 64x64 output tile: for G the tile
// (I, J) with J >= I (the mirrored tile is written too), for R the tile (I, E) of A^T Y.
// It keeps the key rows C[I] (and C[J]) in shared memory as float and walks over the
// queries in chunks of 16: it recomputes the A tiles A[chunk, I] (and A[chunk, J]) into
// shared memory and accumulates their products in registers (4x4 outputs per thread).
//
// Verified by compilation only on the build machine; numerical conformance is covered by
// the GPU test suite (tests/test_gram.py, backend "cuda").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_params.h"

#include <cmath>
#include <optional>

namespace cdlm_fast {
namespace gram {

constexpr int kTile = 64;     // output tile (t and e directions)
constexpr int kChunk = 16;    // queries per step
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMaxDim = 256;  // shared memory: 2 * 64 * (D + 1) floats

struct GramParams {
  const void* q;  // [P, n, D]
  const void* c;  // [P, t, D]
  const float* beta;   // [P, t] or nullptr
  const float* shift;  // [P, n]
  const float* y;      // [P, n, e] or nullptr (a column of ones)
  float* out;          // G [P, t, t] or R [P, t, e], contiguous
  int64_t q_sp, q_sn, c_sp, c_st, beta_sp, beta_st, shift_sp, shift_sn, y_sp, y_sn, y_se;
  int n, t, d, e;
  float scale;
};

// A[chunk, tile] into sA[kChunk][kTile] (0 outside the problem).
template <typename T>
__device__ __forceinline__ void exp_tile(const GramParams& p, const float* sQ, const float* sC, float* sA, int p_idx,
                                         int i0, int t0) {
  const int tid = threadIdx.x;
  for (int e = tid; e < kChunk * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;  // a warp shares r: broadcast sQ, stride d+1 on sC
    const int i = i0 + r, j = t0 + c;
    float a = 0.f;
    if (i < p.n && j < p.t) {
      const float* qr = sQ + r * (p.d + 1);
      const float* cr = sC + c * (p.d + 1);
      float dot = 0.f;
      for (int k = 0; k < p.d; ++k) dot = fmaf(qr[k], cr[k], dot);
      const float beta = p.beta == nullptr ? 0.f : p.beta[p_idx * p.beta_sp + j * p.beta_st];
      a = expf(p.scale * dot + beta - p.shift[p_idx * p.shift_sp + i * p.shift_sn]);
    }
    sA[r * kTile + c] = a;
  }
}

template <typename T>
__device__ __forceinline__ void load_rows(const T* base, int64_t stride_row, int row0, int rows, int limit, int d,
                                          float* dst) {
  for (int e = threadIdx.x; e < rows * d; e += kThreads) {
    const int r = e / d, k = e % d;
    dst[r * (d + 1) + k] = row0 + r < limit ? static_cast<float>(base[(row0 + r) * stride_row + k]) : 0.f;
  }
}

// kRhs == false: G tile (I, J) (blockIdx.x = I * nT + J, only J >= I work).
// kRhs == true: R tile (I, E) (blockIdx.x = I * nE + E).
template <typename T, bool kRhs>
__global__ void __launch_bounds__(kThreads) exp_gram_kernel(const GramParams p, int n_cols_tiles) {
  extern __shared__ float smem[];
  const int p_idx = blockIdx.y;
  const int ti = blockIdx.x / n_cols_tiles, tj = blockIdx.x % n_cols_tiles;
  if (!kRhs && tj < ti) return;
  const int I0 = ti * kTile, J0 = tj * kTile;
  const int dp = p.d + 1;
  float* sCI = smem;                   // [kTile][d+1]
  float* sCJ = sCI + kTile * dp;       // [kTile][d+1] (G only)
  float* sQ = sCJ + kTile * dp;        // [kChunk][d+1]
  float* sA = sQ + kChunk * dp;        // [kChunk][kTile]
  float* sB = sA + kChunk * kTile;     // [kChunk][kTile]

  const T* q = reinterpret_cast<const T*>(p.q) + p_idx * p.q_sp;
  const T* c = reinterpret_cast<const T*>(p.c) + p_idx * p.c_sp;
  load_rows<T>(c, p.c_st, I0, kTile, p.t, p.d, sCI);
  if (!kRhs) load_rows<T>(c, p.c_st, J0, kTile, p.t, p.d, sCJ);

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int i0 = 0; i0 < p.n; i0 += kChunk) {
    __syncthreads();  // previous chunk's sQ/sA/sB reads are done (and sC loads visible)
    load_rows<T>(q, p.q_sn, i0, kChunk, p.n, p.d, sQ);
    __syncthreads();
    exp_tile<T>(p, sQ, sCI, sA, p_idx, i0, I0);
    if (!kRhs) {
      exp_tile<T>(p, sQ, sCJ, sB, p_idx, i0, J0);
    } else {
      for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
        const int r = e / kTile, col = J0 + e % kTile, i = i0 + r;
        float v = 0.f;
        if (i < p.n && col < p.e) v = p.y == nullptr ? 1.f : p.y[p_idx * p.y_sp + i * p.y_sn + col * p.y_se];
        sB[e] = v;
      }
    }
    __syncthreads();
    for (int r = 0; r < kChunk; ++r) {
      float a[4], bv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = sA[r * kTile + ty * 4 + u];
        bv[u] = sB[r * kTile + tx * 4 + u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int w = 0; w < 4; ++w) acc[u][w] = fmaf(a[u], bv[w], acc[u][w]);
    }
  }

  const int cols = kRhs ? p.e : p.t;
  float* out = p.out + static_cast<int64_t>(p_idx) * p.t * cols;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int i = I0 + ty * 4 + u;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int j = J0 + tx * 4 + w;
      if (i < p.t && j < cols) {
        out[static_cast<int64_t>(i) * cols + j] = acc[u][w];
        if (!kRhs && ti != tj) out[static_cast<int64_t>(j) * p.t + i] = acc[u][w];
      }
    }
  }
}

template <typename T, bool kRhs>
void launch(const GramParams& p, int P, cudaStream_t stream) {
  const int n_rows_tiles = (p.t + kTile - 1) / kTile;
  const int n_cols_tiles = kRhs ? (p.e + kTile - 1) / kTile : n_rows_tiles;
  const int dp = p.d + 1;
  const size_t smem = sizeof(float) * (size_t(2 * kTile + kChunk) * dp + 2 * kChunk * kTile);
  auto kernel = exp_gram_kernel<T, kRhs>;
  const size_t smem_max = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK_VALUE(smem <= smem_max, "cdlm_fast::exp_gram: head dim D=", p.d, " needs ", smem,
                    " bytes of shared memory per block, this GPU allows ", smem_max);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(n_rows_tiles * n_cols_tiles, P);
  kernel<<<grid, kThreads, smem, stream>>>(p, n_cols_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> exp_gram_cuda(const at::Tensor& Q, const at::Tensor& C,
                                                 const std::optional<at::Tensor>& beta, const at::Tensor& shift,
                                                 double scale, const std::optional<at::Tensor>& Y) {
  TORCH_CHECK_VALUE(Q.is_cuda() && C.is_cuda() && shift.is_cuda(),
                    "cdlm_fast::exp_gram: Q, C and shift must be CUDA tensors, got ", Q.device(), ", ", C.device(),
                    ", ", shift.device());
  TORCH_CHECK_VALUE(Q.dim() == 3, "cdlm_fast::exp_gram: Q must be [P, n, D], got shape ", Q.sizes());
  TORCH_CHECK_VALUE(C.dim() == 3, "cdlm_fast::exp_gram: C must be [P, t, D], got shape ", C.sizes());
  const int64_t P = Q.size(0), n = Q.size(1), D = Q.size(2), t = C.size(1);
  TORCH_CHECK_VALUE(C.size(0) == P && C.size(2) == D, "cdlm_fast::exp_gram: C must be [P=", P, ", t, D=", D,
                    "], got shape ", C.sizes());
  TORCH_CHECK_TYPE(Q.scalar_type() == C.scalar_type(), "cdlm_fast::exp_gram: Q and C must share a dtype, got ",
                   Q.scalar_type(), " and ", C.scalar_type());
  TORCH_CHECK_TYPE(Q.scalar_type() == at::kHalf || Q.scalar_type() == at::kBFloat16 ||
                       Q.scalar_type() == at::kFloat,
                   "cdlm_fast::exp_gram: Q and C must be float16, bfloat16 or float32, got ", Q.scalar_type());
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxDim, "cdlm_fast::exp_gram: head dim D must be in [1, ", kMaxDim, "], got ",
                    D);
  TORCH_CHECK_VALUE(shift.dim() == 2 && shift.size(0) == P && shift.size(1) == n,
                    "cdlm_fast::exp_gram: shift must be [P=", P, ", n=", n, "], got shape ", shift.sizes());
  TORCH_CHECK_TYPE(shift.scalar_type() == at::kFloat, "cdlm_fast::exp_gram: shift must be float32, got ",
                   shift.scalar_type());
  TORCH_CHECK_VALUE(C.device() == Q.device() && shift.device() == Q.device(),
                    "cdlm_fast::exp_gram: all tensors must be on ", Q.device());
  if (beta.has_value()) {
    const auto& b = *beta;
    TORCH_CHECK_VALUE(b.is_cuda() && b.device() == Q.device(), "cdlm_fast::exp_gram: beta must be on ", Q.device(),
                      ", got ", b.device());
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == P && b.size(1) == t, "cdlm_fast::exp_gram: beta must be [P=", P,
                      ", t=", t, "], got shape ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == at::kFloat, "cdlm_fast::exp_gram: beta must be float32, got ",
                     b.scalar_type());
  }
  int64_t e = 1;
  if (Y.has_value()) {
    const auto& y = *Y;
    TORCH_CHECK_VALUE(y.is_cuda() && y.device() == Q.device(), "cdlm_fast::exp_gram: Y must be on ", Q.device(),
                      ", got ", y.device());
    TORCH_CHECK_VALUE(y.dim() == 3 && y.size(0) == P && y.size(1) == n, "cdlm_fast::exp_gram: Y must be [P=", P,
                      ", n=", n, ", e], got shape ", y.sizes());
    TORCH_CHECK_TYPE(y.scalar_type() == at::kFloat, "cdlm_fast::exp_gram: Y must be float32, got ",
                     y.scalar_type());
    e = y.size(2);
  }
  TORCH_CHECK_VALUE(n < (int64_t(1) << 31) && t < (int64_t(1) << 31) && e < (int64_t(1) << 31) && P < 65536,
                    "cdlm_fast::exp_gram: sizes out of range (P must be < 65536)");

  auto fopts = Q.options().dtype(at::kFloat);
  at::Tensor G = at::empty({P, t, t}, fopts);
  at::Tensor R = at::empty({P, t, e}, fopts);
  if (P == 0 || t == 0) return {G, R};

  const c10::cuda::CUDAGuard guard(Q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GramParams p{};
  p.q = Q.data_ptr();
  p.c = C.data_ptr();
  p.beta = beta.has_value() ? beta->data_ptr<float>() : nullptr;
  p.shift = shift.data_ptr<float>();
  p.y = Y.has_value() ? Y->data_ptr<float>() : nullptr;
  p.q_sp = Q.stride(0); p.q_sn = Q.stride(1);
  p.c_sp = C.stride(0); p.c_st = C.stride(1);
  p.beta_sp = beta.has_value() ? beta->stride(0) : 0;
  p.beta_st = beta.has_value() ? beta->stride(1) : 0;
  p.shift_sp = shift.stride(0); p.shift_sn = shift.stride(1);
  p.y_sp = Y.has_value() ? Y->stride(0) : 0;
  p.y_sn = Y.has_value() ? Y->stride(1) : 0;
  p.y_se = Y.has_value() ? Y->stride(2) : 0;
  p.n = int(n); p.t = int(t); p.d = int(D); p.e = int(e);
  p.scale = static_cast<float>(scale);
  // The inner-dimension stride of Q and C is assumed 1 by load_rows.
  at::Tensor Qc = Q.stride(2) == 1 ? Q : Q.contiguous();
  at::Tensor Cc = C.stride(2) == 1 ? C : C.contiguous();
  p.q = Qc.data_ptr(); p.q_sp = Qc.stride(0); p.q_sn = Qc.stride(1);
  p.c = Cc.data_ptr(); p.c_sp = Cc.stride(0); p.c_st = Cc.stride(1);

  auto run = [&](auto tag) {
    using T = decltype(tag);
    GramParams pg = p;
    pg.out = G.data_ptr<float>();
    launch<T, false>(pg, int(P), stream);
    if (e > 0) {
      GramParams pr = p;
      pr.out = R.data_ptr<float>();
      launch<T, true>(pr, int(P), stream);
    }
  };
  switch (Q.scalar_type()) {
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: run(float{}); break;
  }
  return {G, R};
}

}  // namespace gram
}  // namespace cdlm_fast

TORCH_LIBRARY_IMPL(cdlm_fast, CUDA, m) { m.impl("exp_gram", &cdlm_fast::gram::exp_gram_cuda); }
