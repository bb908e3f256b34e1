// Registration of the cdlm_fast CUDA ops (torch.library, namespace "cdlm_fast").
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

namespace cdlm_fast {
int64_t build_info() { return 1; }
}  // namespace cdlm_fast

TORCH_LIBRARY_FRAGMENT(cdlm_fast, m) {
  m.def("build_info() -> int");
}
TORCH_LIBRARY_IMPL(cdlm_fast, CompositeExplicitAutograd, m) {
  m.impl("build_info", &cdlm_fast::build_info);
}

// An importable (empty) Python module: `import cdlm_fast._C` loads the shared library,
// whose static initialisers register the ops above with the dispatcher.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
