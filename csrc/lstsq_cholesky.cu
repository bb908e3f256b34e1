// cdlm_fast::lstsq_gram_cholesky: X = (G + ridge I)^{-1} R for a batch of small problems
// (t <= 64), float64, by a Cholesky factorisation held in shared memory.
//
// One CTA per problem. The CTA loads sym(G) + ridge I into shared memory, factors it in
// place (right-looking, one column per step, the trailing update spread over the threads)
// and then solves L L^T X = R with one thread per right-hand-side column (the threads of a
// warp read the same L entry: a shared-memory broadcast).
//
// A problem is flagged in `bad` (and its X set to 0) when a pivot is not positive or falls
// below rank_tol * max(diag(G + ridge I)) -- the same rule as the torch backend, whose
// eigendecomposition pseudo-inverse then solves the flagged problems (cdlm_fast/_cuda_ops.py).
// Larger t goes to the torch backend (cuSOLVER), also from cdlm_fast/_cuda_ops.py.
//
// Verified by compilation only on the build machine; numerical conformance is covered by
// the GPU tests (tests/test_solvers.py, backend "cuda").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace cdlm_fast {
namespace lstsq {

constexpr int kMaxT = 64;
constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    cholesky_solve_kernel(const double* __restrict__ G, const double* __restrict__ R, double* __restrict__ X,
                          bool* __restrict__ bad, int t, int d, double ridge, double rank_tol) {
  __shared__ double sA[kMaxT][kMaxT + 1];
  __shared__ double s_gmax;
  __shared__ int s_bad;
  const int64_t p = blockIdx.x;
  const double* Gp = G + p * t * t;
  const double* Rp = R + p * t * d;
  double* Xp = X + p * t * d;
  const int tid = threadIdx.x;
  const int64_t ld = d;  // row stride of R and X: t * d may exceed the int range

  for (int e = tid; e < t * t; e += kThreads) {
    const int i = e / t, j = e % t;
    sA[i][j] = 0.5 * (Gp[i * t + j] + Gp[j * t + i]) + (i == j ? ridge : 0.0);
  }
  __syncthreads();
  if (tid == 0) {
    double g = 0.0;
    for (int i = 0; i < t; ++i) g = fmax(g, sA[i][i]);
    s_gmax = fmax(g, 1e-300);
    s_bad = 0;
  }
  __syncthreads();

  for (int k = 0; k < t; ++k) {
    const double pivot = sA[k][k];  // every thread reads the same value: a uniform branch
    if (!(pivot > 0.0) || pivot < rank_tol * s_gmax) {
      if (tid == 0) s_bad = 1;
      break;
    }
    const double lkk = sqrt(pivot);
    __syncthreads();  // all threads have read sA[k][k]
    if (tid == 0) sA[k][k] = lkk;
    for (int i = k + 1 + tid; i < t; i += kThreads) sA[i][k] /= lkk;
    __syncthreads();
    const int m = t - k - 1;
    for (int e = tid; e < m * m; e += kThreads) {
      const int i = k + 1 + e / m, j = k + 1 + e % m;
      if (j <= i) sA[i][j] -= sA[i][k] * sA[j][k];
    }
    __syncthreads();
  }
  __syncthreads();
  const bool is_bad = s_bad != 0;
  if (tid == 0) bad[p] = is_bad;

  for (int c = tid; c < d; c += kThreads) {
    if (is_bad) {
      for (int i = 0; i < t; ++i) Xp[i * ld + c] = 0.0;
      continue;
    }
    // forward: L y = r (y stored in X)
    for (int i = 0; i < t; ++i) {
      double s = Rp[i * ld + c];
      for (int j = 0; j < i; ++j) s -= sA[i][j] * Xp[j * ld + c];
      Xp[i * ld + c] = s / sA[i][i];
    }
    // backward: L^T x = y
    for (int i = t - 1; i >= 0; --i) {
      double s = Xp[i * ld + c];
      for (int j = i + 1; j < t; ++j) s -= sA[j][i] * Xp[j * ld + c];
      Xp[i * ld + c] = s / sA[i][i];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lstsq_gram_cholesky_cuda(const at::Tensor& G, const at::Tensor& R, double ridge,
                                                            double rank_tol) {
  TORCH_CHECK_VALUE(G.is_cuda(), "cdlm_fast::lstsq_gram_cholesky runs on CUDA tensors only, got G on ", G.device());
  TORCH_CHECK_VALUE(R.is_cuda() && R.device() == G.device(), "cdlm_fast::lstsq_gram_cholesky: R must be on ",
                    G.device(), ", got ", R.device());
  TORCH_CHECK_TYPE(G.scalar_type() == at::kDouble && R.scalar_type() == at::kDouble,
                   "cdlm_fast::lstsq_gram_cholesky: G and R must be float64, got ", G.scalar_type(), " and ",
                   R.scalar_type());
  TORCH_CHECK_VALUE(G.dim() == 3 && G.size(1) == G.size(2), "cdlm_fast::lstsq_gram_cholesky: G must be [N, t, t], got ",
                    G.sizes());
  const int64_t N = G.size(0), t = G.size(1);
  TORCH_CHECK_VALUE(t <= kMaxT, "cdlm_fast::lstsq_gram_cholesky: t must be <= ", kMaxT, ", got ", t);
  TORCH_CHECK_VALUE(R.dim() == 3 && R.size(0) == N && R.size(1) == t, "cdlm_fast::lstsq_gram_cholesky: R must be [N=",
                    N, ", t=", t, ", d], got shape ", R.sizes());
  const int64_t d = R.size(2);
  TORCH_CHECK_VALUE(ridge >= 0.0 && rank_tol >= 0.0, "cdlm_fast::lstsq_gram_cholesky: ridge and rank_tol must be >= 0");
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31) && d < (int64_t(1) << 31),
                    "cdlm_fast::lstsq_gram_cholesky: sizes out of range (N=", N, ", d=", d, ")");

  at::Tensor X = at::empty({N, t, d}, R.options());
  at::Tensor bad = at::empty({N}, G.options().dtype(at::kBool));
  if (N == 0) return {X, bad};
  if (t == 0 || d == 0) {
    bad.zero_();
    return {X, bad};
  }
  at::Tensor Gc = G.contiguous(), Rc = R.contiguous();  // dense indexing in the kernel
  const c10::cuda::CUDAGuard guard(G.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cholesky_solve_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      Gc.data_ptr<double>(), Rc.data_ptr<double>(), X.data_ptr<double>(), bad.data_ptr<bool>(), static_cast<int>(t),
      static_cast<int>(d), ridge, rank_tol);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {X, bad};
}

}  // namespace lstsq
}  // namespace cdlm_fast

TORCH_LIBRARY_IMPL(cdlm_fast, CUDA, m) {
  m.impl("lstsq_gram_cholesky", &cdlm_fast::lstsq::lstsq_gram_cholesky_cuda);
}
