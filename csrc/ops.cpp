// The one registration file of fatezero_fast._C: op schemas (TORCH_LIBRARY) and the CPU impls.
// The CUDA impls register themselves in their own .cu files with
// TORCH_LIBRARY_IMPL(fatezero_fast, CUDA, m) against exactly these schemas.
#include <Python.h>
#include <torch/library.h>

#include "blended_attention.h"

// out = M * softmax(Q K_e^T * scale) V_e + (1 - M) * P_s V_e; see csrc/blended_attention.h.
TORCH_LIBRARY(fatezero_fast, m) {
  m.def("blended_attention(Tensor q, Tensor k, Tensor v, Tensor kv_frames, int source_form, Tensor? src_a, "
        "Tensor? src_b, Tensor? row_scale, Tensor? mask, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fatezero_fast, CPU, m) {
  m.impl("blended_attention", &fatezero_fast::blended_attention_cpu);
}

// `import fatezero_fast._C` loads this library, which runs the registrations above; the Python
// module itself is empty (the ops live under torch.ops.fatezero_fast).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fatezero_fast C++/CUDA ops (registered in torch.ops.fatezero_fast)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
