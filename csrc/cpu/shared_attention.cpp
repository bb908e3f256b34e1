// cdlm_fast._cpu: the CPU decode hot path of cdlm_fast.attention as one dispatcher call.
//
// shared_attention(q, k, v, bias, scale) -> (out, lse) is cdlm_fast.ops.attention_cpu._shared
// (every query sees the same keys: a decode block on the block grid, a bidirectional call) for
// keys already cut to the visible ones: the G query heads of a KV head folded into the rows of
// one call of PyTorch's CPU flash-attention kernel (K/V read once per KV head), the bias read as a
// [B, Hkv, 1, Lk] mask broadcast over the rows, then lse put back to [B, Hq, Lq] and the heads
// whose bias is -inf on every key given lse = -inf. In Python these steps after the kernel cost
// 40-120 us each on a 2-core x86 CPU (measured), which is the whole margin over SDPA in decode;
// here they are a few microseconds. Arguments are checked by the Python caller.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <tuple>

namespace {

std::tuple<at::Tensor, at::Tensor> shared_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& bias, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "shared_attention: q, k, v must be 4-D");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "shared_attention: Hq must be a multiple of Hkv");
  std::optional<at::Tensor> mask;
  if (bias.has_value()) mask = bias->unsqueeze(2);  // [B, Hkv, 1, Lk], broadcast over the rows
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(q.reshape({B, Hkv, Hq / Hkv * Lq, D}), k, v, 0.0,
                                                             false, mask, scale);
  at::Tensor out = std::get<0>(res).reshape({B, Hq, Lq, D});
  at::Tensor lse = std::get<1>(res).reshape({B, Hq, Lq});
  const auto cdt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (lse.scalar_type() != cdt) lse = lse.to(cdt);
  // the kernel gives a row without a visible key zeros and lse = 0: only then scan the bias
  if (bias.has_value() && !lse.all().item<bool>()) {
    auto dead = (bias->amax(-1) == -std::numeric_limits<double>::infinity()).repeat_interleave(Hq / Hkv, 1);
    lse = lse.masked_fill(dead.unsqueeze(2), -std::numeric_limits<double>::infinity());
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(cdlm_fast_cpu, m) {
  m.def("shared_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cdlm_fast_cpu, CPU, m) { m.impl("shared_attention", &shared_attention); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "cdlm_fast CPU ops (registered as torch.ops.cdlm_fast_cpu)"; }
