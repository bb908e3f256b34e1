// Registration of the cdlm_fast CUDA ops (torch.library, namespace "cdlm_fast").
//
// Schemas are defined here; the CUDA implementations register themselves from
// attention_api.cu, exp_gram.cu, nnls_admm.cu and lstsq_cholesky.cu, the fake (meta)
// implementations from cdlm_fast/_cuda_ops.py. CPU tensors reach the CPU implementations
// below, which raise a ValueError that says what is needed instead of the dispatcher's
// generic error.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace cdlm_fast {
namespace attn {
std::string layout_selfcheck();
}

int64_t build_info() { return 2; }

std::string layout_selfcheck_op() {
  std::string err = attn::layout_selfcheck();
  if (err.size() > 4000) err = err.substr(0, 4000) + "...";
  return err;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, int64_t, int64_t, double) {
  TORCH_CHECK_VALUE(false, "cdlm_fast::attention_fwd runs on CUDA tensors only, got q on ", q.device(),
                    "; use cdlm_fast.attention(..., backend=\"torch\") or backend=\"triton\" on the CPU");
}

std::tuple<at::Tensor, at::Tensor> exp_gram_cpu(const at::Tensor& Q, const at::Tensor&,
                                                const std::optional<at::Tensor>&, const at::Tensor&, double,
                                                const std::optional<at::Tensor>&) {
  TORCH_CHECK_VALUE(false, "cdlm_fast::exp_gram runs on CUDA tensors only, got Q on ", Q.device(),
                    "; use the torch backend on the CPU");
}

std::tuple<at::Tensor, at::Tensor> nnls_admm_step_cpu(const at::Tensor& M, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK_VALUE(false, "cdlm_fast::nnls_admm_step runs on CUDA tensors only, got M on ", M.device(),
                    "; use cdlm_fast.nnls_gram(..., backend=\"torch\") or backend=\"triton\" on the CPU");
}

std::tuple<at::Tensor, at::Tensor> lstsq_gram_cholesky_cpu(const at::Tensor& G, const at::Tensor&, double, double) {
  TORCH_CHECK_VALUE(false, "cdlm_fast::lstsq_gram_cholesky runs on CUDA tensors only, got G on ", G.device(),
                    "; use cdlm_fast.lstsq_gram(..., backend=\"torch\") on the CPU");
}

}  // namespace cdlm_fast

TORCH_LIBRARY_FRAGMENT(cdlm_fast, m) {
  m.def("build_info() -> int");
  m.def("layout_selfcheck() -> str");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor prefix_len, Tensor? kv_lens, "
      "int q_offset, int block_size, float scale) -> (Tensor out, Tensor lse)");
  m.def("exp_gram(Tensor Q, Tensor C, Tensor? beta, Tensor shift, float scale, Tensor? Y) -> (Tensor G, Tensor R)");
  m.def("nnls_admm_step(Tensor M, Tensor h, Tensor z, Tensor u, Tensor rho) -> (Tensor z_out, Tensor u_out)");
  m.def("lstsq_gram_cholesky(Tensor G, Tensor R, float ridge, float rank_tol) -> (Tensor X, Tensor bad)");
}
TORCH_LIBRARY_IMPL(cdlm_fast, CompositeExplicitAutograd, m) {
  m.impl("build_info", &cdlm_fast::build_info);
  m.impl("layout_selfcheck", &cdlm_fast::layout_selfcheck_op);
}
TORCH_LIBRARY_IMPL(cdlm_fast, CPU, m) {
  m.impl("attention_fwd", &cdlm_fast::attention_fwd_cpu);
  m.impl("exp_gram", &cdlm_fast::exp_gram_cpu);
  m.impl("nnls_admm_step", &cdlm_fast::nnls_admm_step_cpu);
  m.impl("lstsq_gram_cholesky", &cdlm_fast::lstsq_gram_cholesky_cpu);
}

// An importable (empty) Python module: `import cdlm_fast._C` loads the shared library,
// whose static initialisers register the ops above with the dispatcher.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
