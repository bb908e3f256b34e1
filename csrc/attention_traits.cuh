// Compile-time configuration of the fused attention kernel (sm80 tensor-core path, also
// used on sm90) and the layout helpers it relies on.
//
// Everything the kernel assumes about these layouts (which accumulator elements share a
// row, which lanes share a row, that a 16x8 accumulator pair is a valid A operand of the
// second GEMM, that an 8-element chunk of a shared-memory row is 16 contiguous bytes, that
// the transposed V view is a transpose) is checked on the host by layout_selfcheck.cu,
// which the CPU test suite runs. See that file for the list.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>

#include <type_traits>

namespace cdlm_fast {
namespace attn {

using namespace cute;

// kHeadDim: 64 or 128. kBlockM: packed query rows per CTA (rows are (query, head-in-group)
// pairs, see AttnParams). kBlockN: keys per K/V tile. kNWarps: warps per CTA, each warp
// owns 16-row slabs of the M tile.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct AttnTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>,
                "fp16 or bf16 only");
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row slabs");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of the MMA K (16)");

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cute::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // Shared memory: rows of 64 elements (128 bytes) in 8-row atoms, XOR-swizzled on 16-byte
  // units so ldmatrix reads of 8 rows hit 8 different bank groups.
  static constexpr int kBlockKSmem = 64;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<3, 3, 3>{}, Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V viewed as [kHeadDim, kBlockN]: SmemLayoutVt(d, n) == SmemLayoutKV(n, d).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  // Q, K, V tiles, then the tile's per-key bias (float, already multiplied by log2(e)).
  static constexpr int kSmemBytes =
      int(sizeof(Element)) * (kSmemQElems + 2 * kSmemKVElems) + int(sizeof(float)) * kBlockN;
  static_assert((int(sizeof(Element)) * (kSmemQElems + 2 * kSmemKVElems)) % 16 == 0, "bias alignment");
};

// Accumulator layout ((2,2), MMA_M, MMA_N) of the SM80 16x8 atoms viewed as
// (rows=(2, MMA_M), cols=(2, MMA_N)): mode 0 of the atom value is the column pair, mode 1 the
// row half (rows r and r+8). Checked by layout_selfcheck.cu.
template <class Layout_>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout_ const& l) {
  static_assert(decltype(rank(l))::value == 3, "accumulator must be (MMA, MMA_M, MMA_N)");
  static_assert(decltype(rank<0>(l))::value == 2, "SM80 accumulator value mode is (2,2)");
  static_assert(decltype(size<0>(l))::value == 4, "SM80 accumulator value mode is (2,2)");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The accumulator of S = Q K^T, ((2,2), MMA_M, MMA_N), re-read as the A operand of
// O += P V for the m16n8k16 atom: (((2,2),2), MMA_M, MMA_N/2) (two adjacent n8 accumulator
// tiles form one k16 A fragment). Checked against partition_A by layout_selfcheck.cu.
template <class Layout_>
CUTE_HOST_DEVICE constexpr auto acc_to_a_operand(Layout_ const& l) {
  static_assert(decltype(rank(l))::value == 3, "accumulator must be (MMA, MMA_M, MMA_N)");
  static_assert(decltype(size<2>(l))::value % 2 == 0, "MMA_N must be even");
  auto l2 = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2,2), MMA_M, (2, MMA_N/2))
  return make_layout(make_layout(get<0>(l2), get<2, 0>(l2)), get<1>(l2), get<2, 1>(l2));
}

// The configurations that are compiled (keep this set small: it drives build time).
// Prefill: 128 packed rows x 64 keys. Head dim 64 with 4 warps (two 16-row slabs per warp,
// 248 registers, no spills on sm_90a); head dim 128 with 8 warps (one slab per warp): at 4
// warps its O accumulator alone is 128 floats per thread and ptxas spills (255 registers,
// 116 B spill stores in the key loop), at 8 warps it uses 184 registers and spills nothing.
template <typename Element, int kHeadDim>
using PrefillTraits = AttnTraits<kHeadDim, 128, 64, kHeadDim == 128 ? 8 : 4, Element>;
template <typename Element, int kHeadDim>
using DecodeTraits = AttnTraits<kHeadDim, 64, 64, 4, Element>;

}  // namespace attn
}  // namespace cdlm_fast
