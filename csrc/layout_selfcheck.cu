// Host-side checks of the layout facts the attention kernel relies on. They evaluate the
// same CuTe layouts the kernel uses (same traits, same thread partitions) for every thread
// of a CTA, on the CPU, so they run in the CPU test suite without a GPU:
//
//  1. acc_rowcol(): every row slot of a thread's score (and output) accumulator holds one
//     logical row; score and output accumulators agree on the row of each slot;
//  2. the 4 lanes of a quad (lane ^ 1, lane ^ 2) share each slot's row and together hold
//     every column of it exactly once (the quad shuffles complete the row reductions, and
//     exactly one thread sees column 0 and writes lse);
//  3. over all threads every (row, col) of the score and output tiles appears exactly once;
//  4. acc_to_a_operand(): the score accumulator reinterpreted as the A operand of O += P V
//     has, element by element, the coordinates partition_A gives for a [M, N] operand;
//  5. the transposed V view: SmemLayoutVt(d, n) == SmemLayoutKV(n, d);
//  6. every 8-element chunk (row, 8c..8c+7) of the Q and K/V smem layouts is 8 contiguous,
//     16-byte aligned elements (the cp.async destinations) and the layouts are bijective.
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "attention_traits.cuh"

namespace cdlm_fast {
namespace attn {

namespace {

template <class Layout_>
void check_smem_layout(const char* what, Layout_ const& layout, int rows, int cols, std::ostringstream& err) {
  std::vector<int> seen(rows * cols, 0);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; c += 8) {
      const int base = static_cast<int>(layout(r, c));
      if (base % 8 != 0) err << what << ": chunk (" << r << "," << c << ") not 16-byte aligned; ";
      for (int e = 0; e < 8; ++e) {
        const int off = static_cast<int>(layout(r, c + e));
        if (off != base + e) err << what << ": chunk (" << r << "," << c << ") not contiguous; ";
        if (off < 0 || off >= rows * cols) {
          err << what << ": offset out of range; ";
        } else {
          seen[off] += 1;
        }
      }
    }
  }
  for (int s : seen) {
    if (s != 1) {
      err << what << ": layout is not a bijection; ";
      break;
    }
  }
}

template <class Traits>
std::string check_traits(const char* name) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  std::ostringstream err;
  typename Traits::TiledMma tiled_mma;

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor cA = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});  // P as the A operand [M, K=N]

  // rows[t][slot], and per thread the (row, col) lists per slot.
  std::vector<std::vector<int>> rows_s(kNThreads), rows_o(kNThreads);
  std::vector<std::vector<std::vector<int>>> cols_s(kNThreads), cols_o(kNThreads);
  std::vector<int> cover_s(kBlockM * kBlockN, 0), cover_o(kBlockM * kHeadDim, 0);

  for (int t = 0; t < kNThreads; ++t) {
    auto thr_mma = tiled_mma.get_thread_slice(t);
    Tensor tScS = thr_mma.partition_C(cS);
    Tensor s_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    Tensor tOcO = thr_mma.partition_C(cO);
    Tensor o_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    const int n_rows = size<0>(s_rc);
    if (n_rows != int(size<0>(o_rc))) err << name << ": score/output row slot counts differ; ";
    rows_s[t].resize(n_rows);
    rows_o[t].resize(n_rows);
    cols_s[t].resize(n_rows);
    cols_o[t].resize(n_rows);
    for (int mi = 0; mi < n_rows; ++mi) {
      rows_s[t][mi] = get<0>(s_rc(mi, 0));
      for (int ni = 0; ni < size<1>(s_rc); ++ni) {
        const int r = get<0>(s_rc(mi, ni)), c = get<1>(s_rc(mi, ni));
        if (r != rows_s[t][mi]) err << name << ": score slot " << mi << " of thread " << t << " mixes rows; ";
        cols_s[t][mi].push_back(c);
        cover_s[r * kBlockN + c] += 1;
      }
      rows_o[t][mi] = get<0>(o_rc(mi, 0));
      if (rows_o[t][mi] != rows_s[t][mi]) err << name << ": output slot " << mi << " row != score row; ";
      for (int ni = 0; ni < size<1>(o_rc); ++ni) {
        const int r = get<0>(o_rc(mi, ni)), c = get<1>(o_rc(mi, ni));
        if (r != rows_o[t][mi]) err << name << ": output slot " << mi << " of thread " << t << " mixes rows; ";
        cols_o[t][mi].push_back(c);
        cover_o[r * kHeadDim + c] += 1;
      }
    }

    // 4. accumulator -> A operand.
    Tensor tAcA = thr_mma.partition_A(cA);
    Tensor p_as_a = make_tensor(tScS.data(), acc_to_a_operand(tScS.layout()));
    if (size(tAcA) != size(p_as_a)) {
      err << name << ": A operand size differs from the accumulator size; ";
    } else {
      if (size<1>(tAcA) != size<1>(p_as_a) || size<2>(tAcA) != size<2>(p_as_a)) {
        err << name << ": A operand (MMA_M, MMA_K) differs; ";
      }
      for (int e = 0; e < size(tAcA); ++e) {
        if (get<0>(tAcA(e)) != get<0>(p_as_a(e)) || get<1>(tAcA(e)) != get<1>(p_as_a(e))) {
          err << name << ": P element " << e << " of thread " << t << " is not at the A operand's coordinate; ";
          break;
        }
      }
    }
  }

  // 2. quads.
  for (int t = 0; t < kNThreads; ++t) {
    if ((t & 3) != 0) continue;
    for (size_t mi = 0; mi < rows_s[t].size(); ++mi) {
      std::vector<int> cs(kBlockN, 0), co(kHeadDim, 0);
      for (int q = 0; q < 4; ++q) {
        if (rows_s[t + q][mi] != rows_s[t][mi]) err << name << ": quad of thread " << t << " splits a row; ";
        for (int c : cols_s[t + q][mi]) cs[c] += 1;
        for (int c : cols_o[t + q][mi]) co[c] += 1;
      }
      for (int c : cs)
        if (c != 1) {
          err << name << ": quad of thread " << t << " does not hold each score column of its row once; ";
          break;
        }
      for (int c : co)
        if (c != 1) {
          err << name << ": quad of thread " << t << " does not hold each output column of its row once; ";
          break;
        }
    }
  }
  // 3. coverage.
  for (int c : cover_s)
    if (c != 1) {
      err << name << ": score tile not covered exactly once; ";
      break;
    }
  for (int c : cover_o)
    if (c != 1) {
      err << name << ": output tile not covered exactly once; ";
      break;
    }

  // 5. V transpose.
  typename Traits::SmemLayoutKV kv;
  typename Traits::SmemLayoutVt vt;
  for (int d = 0; d < kHeadDim; ++d)
    for (int n = 0; n < kBlockN; ++n)
      if (int(vt(d, n)) != int(kv(n, d))) {
        err << name << ": SmemLayoutVt is not the transpose of SmemLayoutKV; ";
        d = kHeadDim;
        break;
      }
  // 6. cp.async destinations.
  check_smem_layout(name, typename Traits::SmemLayoutQ{}, kBlockM, kHeadDim, err);
  check_smem_layout(name, kv, kBlockN, kHeadDim, err);
  return err.str();
}

}  // namespace

std::string layout_selfcheck() {
  std::string err;
  err += check_traits<PrefillTraits<cute::half_t, 64>>("prefill fp16 hd64");
  err += check_traits<PrefillTraits<cute::bfloat16_t, 128>>("prefill bf16 hd128");
  err += check_traits<PrefillTraits<cute::half_t, 128>>("prefill fp16 hd128");
  err += check_traits<DecodeTraits<cute::half_t, 64>>("decode fp16 hd64");
  err += check_traits<DecodeTraits<cute::bfloat16_t, 128>>("decode bf16 hd128");
  return err;
}

}  // namespace attn
}  // namespace cdlm_fast
