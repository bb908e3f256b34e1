// cdlm_fast::nnls_admm_step: one ADMM iteration of the NNLS warm-start phase for a batch
// of problems, fused in a single pass over the cached inverse M = (G + rho I)^{-1}:
//
//   x  = M (h + rho (z - u))
//   z' = max(x + u, 0)
//   u' = u + x - z'
//
// The same math as the Triton kernel in kernels/nnls.py. float32 or float64 (all tensors
// of one dtype; the accumulation is in that dtype).
//
// Layout: one CTA per (problem, chunk of kRows rows), flattened into blockIdx.x. The CTA
// stages w = h + rho (z - u) in shared memory kChunk entries at a time; each warp owns
// kRows / kWarps rows and reads them coalesced (lanes walk along a row of M), reducing
// with warp shuffles. Outputs go to fresh buffers: every CTA reads all of z and u.
//
// Verified by compilation only on the build machine; numerical conformance is covered by
// the GPU tests (tests/test_cuda_extension.py, tests/test_solvers.py, backend "cuda").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace cdlm_fast {
namespace nnls {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 32;                    // rows of M per CTA
constexpr int kRowsPerWarp = kRows / kWarps;  // 4
constexpr int kChunk = 1024;                 // entries of w staged per step (8 KiB in float64)

template <typename T>
__global__ void __launch_bounds__(kThreads)
    admm_step_kernel(const T* __restrict__ M, const T* __restrict__ h, const T* __restrict__ z,
                     const T* __restrict__ u, const T* __restrict__ rho, T* __restrict__ zo, T* __restrict__ uo,
                     int t, int row_blocks, int64_t m_sp, int64_t m_si) {
  __shared__ T sw[kChunk];
  const int64_t p = blockIdx.x / row_blocks;
  const int row0 = (blockIdx.x % row_blocks) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T r = rho[p];
  const T* hp = h + p * t;
  const T* zp = z + p * t;
  const T* up = u + p * t;
  const T* Mp = M + p * m_sp;

  T acc[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = T(0);

  for (int k0 = 0; k0 < t; k0 += kChunk) {
    const int len = min(kChunk, t - k0);
    __syncthreads();  // the previous chunk is consumed
    for (int k = threadIdx.x; k < len; k += kThreads) sw[k] = hp[k0 + k] + r * (zp[k0 + k] - up[k0 + k]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = row0 + warp * kRowsPerWarp + i;
      if (row < t) {
        const T* mrow = Mp + row * m_si + k0;
        T a = T(0);
        for (int k = lane; k < len; k += 32) a = fma(mrow[k], sw[k], a);
        acc[i] += a;
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    T a = acc[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
    const int row = row0 + warp * kRowsPerWarp + i;
    if (lane == 0 && row < t) {
      const T ui = up[row];
      const T zn = max(a + ui, T(0));
      zo[p * t + row] = zn;
      uo[p * t + row] = ui + a - zn;
    }
  }
}

static void check_vec(const at::Tensor& x, const char* name, const at::Tensor& ref, int64_t N, int64_t t) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.device() == ref.device(), "cdlm_fast::nnls_admm_step: ", name,
                    " must be a CUDA tensor on ", ref.device(), ", got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), "cdlm_fast::nnls_admm_step: ", name, " must have dtype ",
                   ref.scalar_type(), " (the dtype of M), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == N && x.size(1) == t, "cdlm_fast::nnls_admm_step: ", name,
                    " must be [N=", N, ", t=", t, "], got shape ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor> nnls_admm_step_cuda(const at::Tensor& M, const at::Tensor& h, const at::Tensor& z,
                                                       const at::Tensor& u, const at::Tensor& rho) {
  TORCH_CHECK_VALUE(M.is_cuda(), "cdlm_fast::nnls_admm_step runs on CUDA tensors only, got M on ", M.device());
  TORCH_CHECK_TYPE(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
                   "cdlm_fast::nnls_admm_step: M must be float32 or float64, got ", M.scalar_type());
  TORCH_CHECK_VALUE(M.dim() == 3 && M.size(1) == M.size(2), "cdlm_fast::nnls_admm_step: M must be [N, t, t], got ",
                    M.sizes());
  const int64_t N = M.size(0), t = M.size(1);
  check_vec(h, "h", M, N, t);
  check_vec(z, "z", M, N, t);
  check_vec(u, "u", M, N, t);
  TORCH_CHECK_VALUE(rho.is_cuda() && rho.device() == M.device(), "cdlm_fast::nnls_admm_step: rho must be on ",
                    M.device(), ", got ", rho.device());
  TORCH_CHECK_TYPE(rho.scalar_type() == M.scalar_type(), "cdlm_fast::nnls_admm_step: rho must have dtype ",
                   M.scalar_type(), ", got ", rho.scalar_type());
  TORCH_CHECK_VALUE(rho.dim() == 1 && rho.size(0) == N, "cdlm_fast::nnls_admm_step: rho must be [N=", N,
                    "], got shape ", rho.sizes());

  at::Tensor zo = at::empty({N, t}, z.options());
  at::Tensor uo = at::empty({N, t}, u.options());
  if (N == 0 || t == 0) return {zo, uo};
  const int64_t row_blocks = (t + kRows - 1) / kRows;
  TORCH_CHECK_VALUE(t < (int64_t(1) << 31) && N * row_blocks < (int64_t(1) << 31),
                    "cdlm_fast::nnls_admm_step: sizes out of range (N=", N, ", t=", t, ")");

  // The kernel indexes M[p, i, j] = M + p * m_sp + i * m_si + j and the vectors as dense [N, t].
  at::Tensor Mc = M.stride(2) == 1 ? M : M.contiguous();
  at::Tensor hc = h.contiguous(), zc = z.contiguous(), uc = u.contiguous(), rc = rho.contiguous();

  const c10::cuda::CUDAGuard guard(M.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(N * row_blocks));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    admm_step_kernel<T><<<grid, kThreads, 0, stream>>>(
        Mc.data_ptr<T>(), hc.data_ptr<T>(), zc.data_ptr<T>(), uc.data_ptr<T>(), rc.data_ptr<T>(), zo.data_ptr<T>(),
        uo.data_ptr<T>(), static_cast<int>(t), static_cast<int>(row_blocks), Mc.stride(0), Mc.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (M.scalar_type() == at::kDouble) {
    launch(double{});
  } else {
    launch(float{});
  }
  return {zo, uo};
}

}  // namespace nnls
}  // namespace cdlm_fast

TORCH_LIBRARY_IMPL(cdlm_fast, CUDA, m) { m.impl("nnls_admm_step", &cdlm_fast::nnls::nnls_admm_step_cuda); }
