// Fused block-causal attention with a per-key bias: FlashAttention-2-style tiling on the
// sm80 tensor-core MMA (also the path used on sm90), online softmax in fp32, GQA row
// packing and optional split-K over the key tiles.
//
// Structure of one CTA (packed query tile m_block of KV head hkv of batch b, split z):
//   * the tile's rows are queries i_lo..i_hi; every row sees a prefix [0, limit(i)) of the
//     keys and limit() is non-decreasing in i, so the key loop ends at limit(i_hi) and only
//     tiles that end past limit(i_lo) need the element mask;
//   * Q tile -> smem once; per key tile: K (and the tile's bias, once per tile) -> smem,
//     S = Q K^T on tensor cores, scale + bias + mask by logical (row, col) coordinates taken
//     from an identity tensor partitioned like the accumulator, online softmax, then
//     O += P V with P kept in registers; V of tile n is loaded while S of tile n is computed
//     and K of tile n+1 while O is updated;
//   * rows with no visible key end with l == 0: output 0 and lse = -inf (never NaN).
//
// Verification status: the layout facts this file relies on are checked on the host by
// layout_selfcheck.cu (run by the CPU tests). The kernel itself, the ldmatrix/MMA atoms and
// the cp.async pipeline were verified by compilation only on the build machine; numerical
// conformance is covered by the GPU test suite (tests/test_attention.py, backend "cuda").
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/cuda/CUDAException.h>

#include "attention_params.h"
#include "attention_traits.cuh"

namespace cdlm_fast {
namespace attn {

using namespace cute;

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// 16-byte global -> shared copy; when !pred the destination is zero-filled and nothing is
// read (src must still be a valid address, callers pass the tensor base).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}

// Number of keys visible to query i of batch b (the prefix [0, limit) of the keys).
__device__ __forceinline__ int key_limit(const AttnParams& p, int b, int i) {
  int64_t cap = p.lk;
  if (p.kv_lens != nullptr) cap = min(cap, static_cast<int64_t>(p.kv_lens[b]));
  int64_t lim = p.lk;
  if (p.block_size > 0) {
    const int64_t prefix = p.prefix_len[b];
    const int64_t pos = static_cast<int64_t>(p.q_offset) + i;
    lim = pos < prefix ? prefix : prefix + static_cast<int64_t>(p.block_size) * ((pos - prefix) / p.block_size + 1);
  }
  lim = min(lim, cap);
  return static_cast<int>(max(lim, int64_t(0)));
}

// acc += A B^T with both operands in shared memory (ldmatrix into registers, one k-slice ahead).
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class CopyA, class CopyB, class ThrCopyA,
          class ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& tCrA, RB& tCrB, SA const& tCsA, SB const& tCsB, Mma& mma,
                                        CopyA const& copy_a, CopyB const& copy_b, ThrCopyA const& thr_copy_a,
                                        ThrCopyB const& thr_copy_b) {
  Tensor tCrA_view = thr_copy_a.retile_D(tCrA);
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(tCrA_view));
  CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<1>(tCrB_view));
  CUTE_STATIC_ASSERT_V(size<2>(tCsA) == size<2>(tCrA_view));
  CUTE_STATIC_ASSERT_V(size<2>(tCsB) == size<2>(tCrB_view));
  copy(copy_a, tCsA(_, _, _0{}), tCrA_view(_, _, _0{}));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k < size<2>(tCrA) - 1) {
      copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
      copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    }
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers and B in shared memory.
template <class Acc, class RA, class RB, class SB, class Mma, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& tCrA, RB& tCrB, SB const& tCsB, Mma& mma,
                                        CopyB const& copy_b, ThrCopyB const& thr_copy_b) {
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<1>(tCrB_view));
  CUTE_STATIC_ASSERT_V(size<2>(tCsB) == size<2>(tCrB_view));
  CUTE_STATIC_ASSERT_V(size<2>(tCrA) == size<2>(tCrB));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k < size<2>(tCrA) - 1) copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) attn_fwd_kernel(const AttnParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks per row
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sK_ptr = sQ_ptr + Traits::kSmemQElems;
  Element* sV_ptr = sK_ptr + Traits::kSmemKVElems;
  float* sBias = reinterpret_cast<float*>(sV_ptr + Traits::kSmemKVElems);

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x;
  const int b = blockIdx.y / p.hkv;
  const int hkv = blockIdx.y % p.hkv;
  const int split = blockIdx.z;
  const int packed = p.lq * p.group;
  const int row0 = m_block * kBlockM;

  // Key range of this CTA.
  const int i_lo = row0 / p.group;
  const int i_hi = (min(row0 + kBlockM, packed) - 1) / p.group;
  const int limit_lo = key_limit(p, b, i_lo);
  const int limit_hi = key_limit(p, b, i_hi);
  const int n_blocks = (limit_hi + kBlockN - 1) / kBlockN;
  const int nb_begin = split * p.n_blocks_per_split;
  const int nb_end = min(n_blocks, nb_begin + p.n_blocks_per_split);

  const Element* q_base = reinterpret_cast<const Element*>(p.q) + b * p.q_stride_b;
  const Element* k_base = reinterpret_cast<const Element*>(p.k) + b * p.k_stride_b + hkv * p.k_stride_h;
  const Element* v_base = reinterpret_cast<const Element*>(p.v) + b * p.v_stride_b + hkv * p.v_stride_h;

  auto load_q = [&]() {
    typename Traits::SmemLayoutQ layout;
    for (int c = tid; c < kBlockM * kChunksPerRow; c += kNThreads) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int r = row0 + row;
      const bool valid = r < packed;
      const Element* src = q_base;
      if (valid) {
        const int i = r / p.group;
        const int h = hkv * p.group + r % p.group;
        src = q_base + h * p.q_stride_h + i * p.q_stride_l + col;
      }
      cp_async_16(sQ_ptr + layout(row, col), src, valid);
    }
  };
  // Rows at or past limit_hi (the end of this CTA's keys, <= kv_lens, <= Lk) are zero-filled,
  // so keys outside the cache never reach the MMA (V rows past it are exact zeros).
  auto load_kv = [&](Element* dst, const Element* base, int64_t stride_l, int nb) {
    typename Traits::SmemLayoutKV layout;
    for (int c = tid; c < kBlockN * kChunksPerRow; c += kNThreads) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int n = nb * kBlockN + row;
      const bool valid = n < limit_hi;
      const Element* src = valid ? base + n * stride_l + col : base;
      cp_async_16(dst + layout(row, col), src, valid);
    }
  };
  auto load_bias = [&](int nb) {
    for (int j = tid; j < kBlockN; j += kNThreads) {
      const int n = nb * kBlockN + j;
      float bv = 0.f;
      if (p.bias != nullptr && n < limit_hi) {
        bv = p.bias[b * p.bias_stride_b + hkv * p.bias_stride_h + n * p.bias_stride_l] * kLog2e;
      }
      sBias[j] = bv;
    }
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sK_ptr), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(sV_ptr), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(make_smem_ptr(sV_ptr), typename Traits::SmemLayoutVtNoSwizzle{});

  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_N)

  auto smem_tiled_copy_Q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_Q = smem_tiled_copy_Q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_copy_Q.partition_S(sQ);
  auto smem_tiled_copy_K = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_K = smem_tiled_copy_K.get_thread_slice(tid);
  Tensor tSsK = smem_thr_copy_K.partition_S(sK);
  auto smem_tiled_copy_V = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_copy_V = smem_tiled_copy_V.get_thread_slice(tid);
  Tensor tOsVt = smem_thr_copy_V.partition_S(sVt);

  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));

  // Logical (row, col) of every score accumulator element, in the same row/col view.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

  constexpr int kRows = decltype(size<0>(o_rc))::value;
  static_assert(kRows == decltype(size<0>(tScS_rc))::value, "score and output accumulators share rows");
  float row_max[kRows];  // running max of the scores, log2 units
  float row_sum[kRows];  // running sum of exp2(score - row_max), this thread's columns only
  int row_limit[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    row_max[mi] = kNegInf;
    row_sum[mi] = 0.f;
    const int r = row0 + get<0>(tScS_rc(mi, 0));
    row_limit[mi] = r < packed ? key_limit(p, b, r / p.group) : 0;
  }

  if (nb_begin < nb_end) {
    load_q();
    load_kv(sK_ptr, k_base, p.k_stride_l, nb_begin);
    cute::cp_async_fence();
    load_bias(nb_begin);

    for (int nb = nb_begin; nb < nb_end; ++nb) {
      cute::cp_async_wait<0>();
      __syncthreads();  // K[nb] and bias[nb] visible; every warp is done reading V[nb-1]
      load_kv(sV_ptr, v_base, p.v_stride_l, nb);
      cute::cp_async_fence();

      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_tiled_copy_Q, smem_tiled_copy_K, smem_thr_copy_Q,
              smem_thr_copy_K);

      Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
      const int n0 = nb * kBlockN;
      const bool need_mask = n0 + kBlockN > limit_lo;
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        float mx = kNegInf;
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(s_rc); ++ni) {
          const int col = get<1>(tScS_rc(mi, ni));
          float x = s_rc(mi, ni) * p.scale_log2 + sBias[col];
          if (need_mask && n0 + col >= row_limit[mi]) x = kNegInf;
          s_rc(mi, ni) = x;
          mx = fmaxf(mx, x);
        }
        mx = quad_max(mx);
        const float new_max = fmaxf(row_max[mi], mx);
        const float ref = new_max == kNegInf ? 0.f : new_max;  // all -inf so far: exp2 gives 0, not NaN
        const float corr = exp2f(row_max[mi] - ref);
        row_max[mi] = new_max;
        float sum = 0.f;
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(s_rc); ++ni) {
          const float e = exp2f(s_rc(mi, ni) - ref);
          s_rc(mi, ni) = e;
          sum += e;
        }
        row_sum[mi] = row_sum[mi] * corr + sum;
        CUTE_UNROLL
        for (int nj = 0; nj < size<1>(o_rc); ++nj) o_rc(mi, nj) *= corr;
      }

      Tensor rP = make_tensor<Element>(acc_s.layout());
      CUTE_UNROLL
      for (int e = 0; e < size(acc_s); ++e) rP(e) = static_cast<Element>(acc_s(e));
      Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));

      cute::cp_async_wait<0>();
      __syncthreads();  // V[nb] visible; every warp is done reading K[nb] and bias[nb]
      if (nb + 1 < nb_end) {
        load_kv(sK_ptr, k_base, p.k_stride_l, nb + 1);
        cute::cp_async_fence();
        load_bias(nb + 1);
      }
      gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_tiled_copy_V, smem_thr_copy_V);
    }
  }

  // Epilogue: normalise, write out (or this split's partial result) and lse by coordinates.
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_mma.partition_C(cO);
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  const bool split_out = p.num_splits > 1;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float l = quad_sum(row_sum[mi]);  // all lanes, before any divergence
    const float inv = l == 0.f ? 0.f : 1.f / l;
    const float lse = l == 0.f ? kNegInf : (row_max[mi] + log2f(l)) * kLn2;
    const int r = row0 + get<0>(tOcO_rc(mi, 0));
    if (r >= packed) continue;
    const int i = r / p.group;
    const int h = hkv * p.group + r % p.group;
    const int64_t row_index = (static_cast<int64_t>(b) * p.hq + h) * p.lq + i;  // in [B, Hq, Lq]
    if (split_out) {
      const int64_t rows = static_cast<int64_t>(p.batch) * p.hq * p.lq;
      const int64_t acc_row = static_cast<int64_t>(split) * rows + row_index;
      float* dst = p.out_accum + acc_row * kHeadDim;
      CUTE_UNROLL
      for (int nj = 0; nj < size<1>(o_rc); ++nj) {
        const int col = get<1>(tOcO_rc(mi, nj));
        dst[col] = o_rc(mi, nj) * inv;
        if (col == 0) p.lse_accum[acc_row] = lse;
      }
    } else {
      Element* dst = reinterpret_cast<Element*>(p.out) + row_index * kHeadDim;
      CUTE_UNROLL
      for (int nj = 0; nj < size<1>(o_rc); ++nj) {
        const int col = get<1>(tOcO_rc(mi, nj));
        dst[col] = static_cast<Element>(o_rc(mi, nj) * inv);
        if (col == 0) p.lse[row_index] = lse;
      }
    }
  }
}

template <class Traits>
void launch_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  static_assert(Traits::kBlockN == kBlockN, "attention_params.h constants out of date");
  auto kernel = attn_fwd_kernel<Traits>;
  constexpr int smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const dim3 grid((p.lq * p.group + Traits::kBlockM - 1) / Traits::kBlockM, p.batch * p.hkv, p.num_splits);
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element, int kHeadDim>
void run_attn_fwd(const AttnParams& p, bool decode, cudaStream_t stream) {
  static_assert(PrefillTraits<Element, kHeadDim>::kBlockM == kPrefillBlockM, "attention_params.h out of date");
  static_assert(DecodeTraits<Element, kHeadDim>::kBlockM == kDecodeBlockM, "attention_params.h out of date");
  if (decode) {
    launch_attn_fwd<DecodeTraits<Element, kHeadDim>>(p, stream);
  } else {
    launch_attn_fwd<PrefillTraits<Element, kHeadDim>>(p, stream);
  }
}

}  // namespace attn
}  // namespace cdlm_fast
