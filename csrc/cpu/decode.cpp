// cdlm_fast._cpu: the CPU decode call of cdlm_fast.attention in one C++ function.
//
// What cdlm_fast/ops/attention_cpu.py's _shared does on its row-chunked path (every query sees
// keys [0, lim); the KV heads a batch of one-head problems; each problem's G * Lq folded rows cut
// into c interleaved chunks passed to PyTorch's CPU flash kernel as heads over the same K/V and
// bias, stride 0), without the Python around it: on a 2-core CPU, after a large kernel every
// Python-level tensor op costs about 10 us, a third of the lead of this call over SDPA. The
// arguments are checked by the caller (cdlm_fast.attention's one-pass check).
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <tuple>

namespace {

template <typename T>
bool any_zero(const at::Tensor& t) {
  const T* p = t.data_ptr<T>();
  const int64_t n = t.numel();
  bool zero = false;
  for (int64_t i = 0; i < n; ++i) zero |= (p[i] == T(0));
  return zero;
}

// q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D(v)] on the CPU whose batch and head strides merge (or B == 1),
// bias [B, Hkv, Lk] float32/float64 or None; lim <= Lk keys seen by every query; chunks divides
// G * Lq. Returns out [B, Hq, Lq, Dv] (q's dtype) and lse [B, Hq, Lq] (float64 for float64 q, else
// float32); with need_lse, heads whose bias is -inf on all of [0, lim) get lse = -inf (the kernel
// gives them out = 0 and lse = 0).
std::tuple<at::Tensor, at::Tensor> decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& bias, int64_t lim, double scale,
                                          int64_t chunks, bool need_lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3);
  const int64_t bh = B * Hkv, R = Hq / Hkv * Lq, c = chunks;
  TORCH_CHECK(c >= 1 && R % c == 0, "cdlm_fast._cpu.decode: chunks must divide G * Lq");
  const auto ks = k.strides();
  const auto vs = v.strides();
  TORCH_CHECK(B == 1 || (ks[0] == Hkv * ks[1] && vs[0] == Hkv * vs[1]),
              "cdlm_fast._cpu.decode: the batch and head strides of k and v must merge");
  at::Tensor qf = q.reshape({bh, R / c, c, D}).transpose(1, 2);  // chunk j: rows j, j + c, ...
  at::Tensor kf = k.as_strided({bh, c, lim, D}, {ks[1], 0, ks[2], ks[3]});
  at::Tensor vf = v.as_strided({bh, c, lim, Dv}, {vs[1], 0, vs[2], vs[3]});
  std::optional<at::Tensor> mask;
  if (bias.has_value()) {
    const auto bs = bias->strides();
    if (B == 1 || bs[0] == Hkv * bs[1]) {
      mask = bias->as_strided({bh, c, 1, lim}, {bs[1], 0, 0, bs[2]});
    } else {
      mask = bias->slice(2, 0, lim).reshape({bh, 1, 1, lim}).expand({bh, c, 1, lim});
    }
  }
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(qf, kf, vf, 0.0, false, mask, scale);
  at::Tensor out = std::get<0>(res), lse = std::get<1>(res);
  if (c > 1) {  // [bh, c, R / c] -> [bh, R / c, c]: row order again (views)
    out = out.transpose(1, 2);
    lse = lse.transpose(1, 2);
  }
  out = out.reshape({B, Hq, Lq, Dv});
  lse = lse.reshape({B, Hq, Lq});
  const auto cdt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (lse.scalar_type() != cdt) lse = lse.to(cdt);
  if (need_lse && bias.has_value()) {
    const at::Tensor lc = lse.contiguous();
    const bool zero = cdt == at::kDouble ? any_zero<double>(lc) : any_zero<float>(lc);
    if (zero) {  // some lse == 0: heads that see no key get -inf
      const double ninf = -std::numeric_limits<double>::infinity();
      at::Tensor dead = bias->slice(2, 0, lim).amax(-1).eq(ninf).repeat_interleave(Hq / Hkv, 1);  // [B, Hq]
      lse = lse.masked_fill(dead.unsqueeze(-1), ninf);
    }
  }
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cdlm_fast CPU helpers (the decode call of cdlm_fast.attention's torch backend)";
  m.def("decode", &decode, "one-call CPU decode attention with row chunks (arguments checked by the caller)");
}
